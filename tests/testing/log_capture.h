#pragma once

// Captures the log lines of every muster logger while alive, so a test can assert that
// something was logged (a refusal, a drop). Thread-safe.

#include <spdlog/sinks/base_sink.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace muster::testing {

class LogCapture {
 public:
  LogCapture();
  ~LogCapture();

  std::vector<std::string> Lines() const;
  // Waits up to `timeout` for a line containing `needle`.
  bool WaitFor(const std::string& needle, std::chrono::milliseconds timeout) const;

 private:
  class Sink;
  std::shared_ptr<Sink> sink_;
};

}  // namespace muster::testing
