#pragma once

// WaitUntil: waits for a condition with a deadline, for tests (never a fixed sleep).
//
// For state this process is not notified of (a child process's files or exit, a server in
// another process, `muster status`): the condition is checked at once, then at growing
// intervals (1 ms doubling up to `max_interval`), so a condition that holds soon costs
// microseconds and a slow one costs little CPU. State of this process should be waited on
// with the condition variable that guards it instead.
//
// Thread-safety: `cond` runs on the calling thread only.

#include <algorithm>
#include <chrono>
#include <functional>
#include <thread>

namespace muster::testing {

// True once `cond` holds; false if it still does not at `deadline` (checked once more then).
inline bool WaitUntil(const std::function<bool()>& cond,
                      std::chrono::steady_clock::time_point deadline,
                      std::chrono::milliseconds max_interval = std::chrono::milliseconds(50)) {
  std::chrono::microseconds interval(1000);
  for (;;) {
    if (cond()) return true;
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    std::this_thread::sleep_for(
        std::min<std::chrono::steady_clock::duration>(interval, deadline - now));
    interval = std::min<std::chrono::microseconds>(interval * 2, max_interval);
  }
}

// The same with a deadline `timeout` from now.
inline bool WaitUntil(const std::function<bool()>& cond, std::chrono::milliseconds timeout,
                      std::chrono::milliseconds max_interval = std::chrono::milliseconds(50)) {
  return WaitUntil(cond, std::chrono::steady_clock::now() + timeout, max_interval);
}

}  // namespace muster::testing
