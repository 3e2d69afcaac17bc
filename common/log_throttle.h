#pragma once

// LogThrottle: at most one log line per key per interval, and how many were held back.
//
// For warnings that an untrusted peer can trigger at will (a key refused on every request it
// sends): the first occurrence is logged at once; repeats within `interval` are counted, not
// logged; the next one after the interval is logged with the count held back since. Keys are
// bounded: past `max_keys`, the key least recently logged is forgotten (its next occurrence is
// logged as a first one), so a peer inventing keys cannot grow memory.
//
// Thread-compatible: callers serialise (the coordinator calls it from its reactor thread).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace muster {

class LogThrottle {
 public:
  using Clock = std::chrono::steady_clock;

  // REQUIRES: interval > 0, max_keys >= 1.
  explicit LogThrottle(std::chrono::milliseconds interval, size_t max_keys = 1024);

  // Log this occurrence of `key` at `now`? nullopt: hold it back (counted). Otherwise the
  // number of occurrences held back since the key was last logged (0 for a first one).
  std::optional<int64_t> Admit(const std::string& key, Clock::time_point now);

  size_t keys() const { return entries_.size(); }

 private:
  struct Entry {
    Clock::time_point logged_at;
    int64_t held_back = 0;
  };
  void ForgetOldest();

  const std::chrono::milliseconds interval_;
  const size_t max_keys_;
  std::map<std::string, Entry> entries_;
};

}  // namespace muster
