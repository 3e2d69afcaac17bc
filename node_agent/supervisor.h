#pragma once

// Supervisor: starts and watches the processes of ranks on one node.
//
// Used by `muster run` (the launcher) and by the node agent. For each child it:
//   - spawns the program (fork + exec, PATH searched as execvp does) in its own process group
//     (so a stop reaches every process the rank started), with an exact environment, a working
//     directory, and stdin from a given fd or /dev/null; every signal the child could inherit
//     as blocked or ignored is reset to its default; the child gets SIGKILL if the reactor
//     thread that started it dies (PR_SET_PDEATHSIG), so a rank never outlives its agent or
//     launcher, kill -9 included (processes the rank itself started are not covered: the
//     agent's restart kills what is left of the group);
//   - reads the child's stdout and stderr through pipes and hands out whole lines (one callback
//     per line; a final unterminated line is handed out at EOF; a line longer than
//     kMaxLineBytes is cut into pieces of that size), optionally appending each line to a
//     per-child log file;
//   - learns of the child's exit from a pidfd that the reactor polls (no SIGCHLD handler, no
//     polling sleeps), reaps it, and reports the exit with a sequence number that orders exits
//     by the time they were noticed;
//   - stops a child, a group of children, or all of them: SIGTERM to the process group, then
//     SIGKILL to the groups still alive after a grace period.
//
// Lifecycle of one child, as its callbacks see it:
//   Spawn() -> on_line* -> on_exit (once, when reaped) -> on_line* (output still buffered in the
//   pipes) -> on_closed (once, when every pipe reached EOF, or `drain_timeout` after the exit,
//   when the rest of the process group is SIGKILLed and the pipes are dropped).
//
// Threading: a Supervisor lives on one Reactor. Every method and every callback runs on that
// reactor's thread (use Reactor::Call from elsewhere). It holds no locks.
// REQUIRES: the destructor runs on the reactor thread or after the reactor has stopped; it
// SIGKILLs the process groups of children still running and reaps them.
//
// Output written by a callback (the launcher writes to its own stdout) blocks the reactor while
// the destination is full; that back-pressure is deliberate (a rank cannot outrun the terminal).

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/reactor.h"
#include "common/status.h"

namespace muster::node_agent {

using ChildId = uint64_t;

// kControl: the control channel (SpawnSpec::control_channel).
enum class OutputStream { kStdout, kStderr, kControl };

// What to start. Copied into the Supervisor.
struct SpawnSpec {
  // Shown in logs and given back in ChildInfo; the launcher uses the rank ("3").
  std::string name;
  // StopGroup() target; the agent uses "<job>/<attempt>", the launcher the job id.
  std::string group;
  // argv[0] is looked up in the supervisor process's PATH when it has no '/'.
  // REQUIRES: non-empty.
  std::vector<std::string> argv;
  // The child's whole environment, "KEY=VALUE" each; nothing is inherited implicitly.
  std::vector<std::string> env;
  // Working directory; empty keeps the supervisor's.
  std::string cwd;
  // Becomes the child's stdin (dup'ed; not owned, may be closed after Spawn returns);
  // -1 gives /dev/null.
  int stdin_fd = -1;
  // If set, each output line of both streams is appended to this file (created 0644).
  std::string log_path;
  // If set, each line of stdout ([0]) or stderr ([1]) is also appended to a file of its own.
  std::string stream_log_paths[2];
  // Give the child a control channel at fd Supervisor::kControlFd. The caller tells the child
  // so in its environment (MUSTER_CONTROL_FD, common/rank_env.h).
  bool control_channel = false;
};

// How a child ended.
struct ExitInfo {
  pid_t pid = -1;
  bool signaled = false;  // killed by `signal`; otherwise exited with `code`
  int code = 0;
  int signal = 0;
  std::chrono::steady_clock::time_point when;
  uint64_t seq = 0;  // 1, 2, 3... in the order exits were noticed by this Supervisor
  // The exit was caused by a Stop (the child ended after the supervisor's first signal or its
  // SIGKILL, and not by some other signal). A child SIGKILLed from outside while its stop's SIGTERM
  // was pending is not `stopped`: it failed on its own.
  bool stopped = false;

  bool success() const { return !signaled && code == 0; }
  // The shell's convention: `code`, or 128 + `signal`.
  int ShellCode() const { return signaled ? 128 + signal : code; }
  // "exited with code 3" / "was killed by signal 9 (SIGKILL)".
  std::string Describe() const;
};

struct ChildInfo {
  ChildId id = 0;
  std::string name;
  std::string group;
  pid_t pid = -1;
  std::chrono::steady_clock::time_point started;
  bool running = true;          // false once reaped (the child stays listed until on_closed)
  bool stop_requested = false;  // Stop/StopGroup/StopAll reached it before it exited
};

class Supervisor {
 public:
  static constexpr size_t kMaxLineBytes = 64 * 1024;
  // The child's fd number of its control channel (the first after stdin, stdout, stderr).
  static constexpr int kControlFd = 3;

  struct Callbacks {
    // One whole line, without its '\n'. May be empty (then lines are only logged to files).
    std::function<void(ChildId, const std::string& name, OutputStream, std::string_view line)>
        on_line;
    // The child was reaped.
    std::function<void(ChildId, const std::string& name, const ExitInfo&)> on_exit;
    // The child's output is fully delivered; the child is then forgotten.
    std::function<void(ChildId, const std::string& name)> on_closed;
  };

  struct Options {
    // After a child exits, how long its pipes may stay open (held by processes it left behind
    // in its group) before the group is SIGKILLed and the pipes dropped.
    std::chrono::milliseconds drain_timeout{2000};
  };

  Supervisor(Reactor& reactor, Callbacks callbacks, Options options);
  Supervisor(Reactor& reactor, Callbacks callbacks) : Supervisor(reactor, callbacks, Options()) {}
  ~Supervisor();

  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts a child. Fails with InvalidArgument for an empty argv, NotFound when the program
  // does not exist, FailedPrecondition when it cannot be executed (permissions, bad format),
  // or Internal for a failed syscall; on failure nothing was started.
  StatusOr<ChildId> Spawn(const SpawnSpec& spec);

  // Sends `signal` to the child's process group. NotFound if it is no longer running.
  Status Signal(ChildId id, int signal);

  // SIGTERM now, SIGKILL after `grace` to whatever of the process group is still running, and
  // SIGKILL to the rest of the group as soon as the child itself has exited
  // (`grace` of zero: SIGKILL at once). No effect on children that already exited. Calling it
  // again with a shorter grace brings the SIGKILL forward.
  // `signal` replaces SIGTERM as the first signal (the launcher forwards a user's SIGINT so).
  void Stop(ChildId id, std::chrono::milliseconds grace, int signal = SIGTERM);
  void StopGroup(const std::string& group, std::chrono::milliseconds grace, int signal = SIGTERM);
  void StopAll(std::chrono::milliseconds grace, int signal = SIGTERM);

  // Children not yet closed, in spawn order.
  std::vector<ChildInfo> List() const;
  // Children not yet reaped.
  size_t running() const;

 private:
  struct Child;
  enum : int { kPidfd = 0, kStdoutPipe = 1, kStderrPipe = 2, kControlPipe = 3 };

  void Watch(int fd, ChildId id, int kind);
  void Unwatch(int fd);
  void OnEvents();
  void OnPidfdReadable(ChildId id);
  void OnPipeReadable(ChildId id, OutputStream stream);
  void EmitLine(Child& c, OutputStream stream, std::string_view line);
  void CloseStream(Child& c, OutputStream stream);
  void MaybeClosed(ChildId id);
  void OnDrainTimeout(ChildId id);
  void StopChild(Child& c, std::chrono::milliseconds grace, int signal);
  void KillGroup(Child& c);

  Reactor& reactor_;
  Callbacks callbacks_;
  Options options_;
  int epoll_fd_ = -1;  // pidfds and pipes of every child; the reactor polls this one fd
  ChildId next_id_ = 1;
  uint64_t next_exit_seq_ = 1;
  std::map<ChildId, std::unique_ptr<Child>> children_;  // reactor thread only
};

}  // namespace muster::node_agent
