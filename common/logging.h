#pragma once

// Logging for every muster component, over spdlog.
//
// Each subsystem takes a named logger (`coord.sched`, `agent.spawn`, `coll.nccl`, `ckpt.write`)
// with log::Get(name). All loggers share one stderr sink, so lines from different threads never
// interleave. The pattern carries the component and, once SetContext() has been called, the
// job, node and rank this process works for:
//
//   2026-11-27 19:04:11.032 I agent.spawn job=ft-7 node=aws-0 rank=- | started 4 ranks
//
// The level comes from InitLogging(level) (the --log-level flag) or else MUSTER_LOG_LEVEL,
// default "info". Thread-safety: every function here is thread-safe.

#include <spdlog/spdlog.h>

#include <memory>
#include <sstream>
#include <string>
#include <string_view>

#include "common/status.h"

namespace muster::log {

// Sets the level for all loggers from `level` ("trace", "debug", "info", "warn", "error",
// "critical", "off"); an empty `level` falls back to $MUSTER_LOG_LEVEL, then "info".
// Returns InvalidArgument for an unknown level name.
Status InitLogging(std::string_view level = "");

// Returns the logger named `name`, creating it on first use.
std::shared_ptr<spdlog::logger> Get(const std::string& name);

// Sets what every log line of this process says about its job, node and rank. Empty fields
// are printed as "-" and a context with all three empty is not printed at all.
void SetContext(std::string job, std::string node, std::string rank);

// Adds a sink (tests use this to capture lines); it receives every logger's output.
void AddSink(std::shared_ptr<spdlog::sinks::sink> sink);
void RemoveSink(const std::shared_ptr<spdlog::sinks::sink>& sink);

namespace internal {
// Collects a streamed message for MUSTER_CHECK, logs it critical and aborts when destroyed.
class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition);
  [[noreturn]] ~CheckFailure();
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};
}  // namespace internal

}  // namespace muster::log

// For broken invariants only: logs critical and aborts. `MUSTER_CHECK(n > 0) << "n=" << n;`
#define MUSTER_CHECK(cond) \
  if (cond) {              \
  } else                   \
    ::muster::log::internal::CheckFailure(__FILE__, __LINE__, #cond).stream()
