#pragma once

// A child process for tests: started with fork/exec in its own process group, killed (the
// whole group, SIGKILL) when the object dies, so a failing test leaves nothing behind.

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::testing {

class Subprocess {
 public:
  // Starts `argv` with the current environment plus `env` ("K=V"). stdout and stderr go to
  // `log_path` if given (appended), else are inherited.
  static StatusOr<Subprocess> Start(const std::vector<std::string>& argv,
                                    const std::vector<std::string>& env = {},
                                    const std::string& log_path = "");
  Subprocess(Subprocess&& o) noexcept : pid_(o.pid_), status_(o.status_) { o.pid_ = -1; }
  Subprocess& operator=(Subprocess&& o) noexcept;
  ~Subprocess();

  pid_t pid() const { return pid_; }
  // Sends `sig` to the process group.
  void Signal(int sig) const;
  // Waits up to `timeout`; returns the wait status (as from waitpid) or nullopt on timeout.
  std::optional<int> Wait(std::chrono::milliseconds timeout);

 private:
  explicit Subprocess(pid_t pid) : pid_(pid) {}
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// Runs `argv` to completion (up to `timeout`); returns its stdout+stderr, or an error naming
// the command, its exit status and its output.
// Whether process `pid` has exited: gone, or a zombie that its parent (init, for an orphan)
// has not reaped yet.
bool ProcessExited(pid_t pid);

StatusOr<std::string> RunCommand(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(30));

}  // namespace muster::testing
