#include "node_agent/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "common/logging.h"

namespace muster::node_agent {
namespace {

auto Log() {
  static auto logger = log::Get("agent.spawn");
  return logger;
}

constexpr unsigned kCloseRangeCloexec = 1U << 2;  // CLOSE_RANGE_CLOEXEC (linux/close_range.h)

int PidfdOpen(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

std::string SignalName(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

// Writes all of `data` to `fd`, retrying on EINTR and short writes.
void WriteAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // a log file that cannot take more output is not worth killing a rank for
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
}

// Closes its fd on destruction.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept {
    Reset();
    fd = o.fd;
    o.fd = -1;
    return *this;
  }
  ~Fd() { Reset(); }
  void Reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

// The file `prog` names as posix_spawnp and execvp find it: as given when it has a '/', else
// the first executable regular file of that name on this process's PATH. Sets `*err` (ENOENT,
// EACCES) when there is none.
std::string ResolveProgram(const std::string& prog, int* err) {
  *err = 0;
  if (prog.find('/') != std::string::npos) return prog;
  const char* env = ::getenv("PATH");
  std::string path = env != nullptr && *env != '\0' ? env : "/bin:/usr/bin";
  int first_error = ENOENT;
  size_t start = 0;
  for (;;) {
    size_t colon = path.find(':', start);
    std::string dir = path.substr(start, colon == std::string::npos ? colon : colon - start);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + prog;
    struct stat st;
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
      first_error = EACCES;
    }
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  *err = first_error;
  return "";
}

}  // namespace

std::string ExitInfo::Describe() const {
  if (signaled)
    return "was killed by signal " + std::to_string(signal) + " (" + SignalName(signal) + ")";
  return "exited with code " + std::to_string(code);
}

struct Supervisor::Child {
  ChildId id = 0;
  std::string name;
  std::string group;
  pid_t pid = -1;
  std::chrono::steady_clock::time_point started;
  Fd pidfd;
  Fd out[3];  // indexed by OutputStream
  std::string partial[3];
  Fd log;
  Fd stream_log[2];  // indexed by OutputStream
  bool running = true;
  bool stop_requested = false;
  int sent_signal = 0;  // the stop's first signal, once sent
  bool sent_kill = false;
  std::chrono::steady_clock::time_point kill_at = std::chrono::steady_clock::time_point::max();
  Reactor::TimerId kill_timer = 0;
  Reactor::TimerId drain_timer = 0;
};

Supervisor::Supervisor(Reactor& reactor, Callbacks callbacks, Options options)
    : reactor_(reactor), callbacks_(std::move(callbacks)), options_(options) {
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  MUSTER_CHECK(epoll_fd_ >= 0) << "epoll_create1: " << strerror(errno);
  reactor_.AddFd(epoll_fd_, "supervisor.events", [this] { OnEvents(); });
}

// One epoll set for all children: the reactor polls a single fd however many ranks run, and
// epoll reports a pipe's EOF (EPOLLHUP) as an event, which a plain poll-for-readable would not.
void Supervisor::Watch(int fd, ChildId id, int kind) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = (id << 2) | static_cast<uint64_t>(kind);
  MUSTER_CHECK(::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) == 0)
      << "epoll_ctl: " << strerror(errno);
}

void Supervisor::Unwatch(int fd) { ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr); }

void Supervisor::OnEvents() {
  epoll_event events[64];
  int n;
  do {
    n = ::epoll_wait(epoll_fd_, events, 64, 0);
  } while (n < 0 && errno == EINTR);
  for (int i = 0; i < n; ++i) {
    ChildId id = events[i].data.u64 >> 2;
    int kind = static_cast<int>(events[i].data.u64 & 3);
    if (kind == kPidfd) {
      OnPidfdReadable(id);
    } else {
      OnPipeReadable(id, kind == kStdoutPipe   ? OutputStream::kStdout
                         : kind == kStderrPipe ? OutputStream::kStderr
                                               : OutputStream::kControl);
    }
  }
}

Supervisor::~Supervisor() {
  for (auto& [id, c] : children_) {
    if (c->kill_timer) reactor_.CancelTimer(c->kill_timer);
    if (c->drain_timer) reactor_.CancelTimer(c->drain_timer);
    if (c->running) {
      ::kill(-c->pid, SIGKILL);
      int status;
      while (::waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
      }
      Log()->warn("child {} (pid {}) was still running when its supervisor ended; killed", c->name,
                  c->pid);
    }
  }
  children_.clear();
  reactor_.RemoveFd(epoll_fd_);
  ::close(epoll_fd_);
}

StatusOr<ChildId> Supervisor::Spawn(const SpawnSpec& spec) {
  if (spec.argv.empty() || spec.argv[0].empty()) {
    return InvalidArgumentError("spawn '" + spec.name + "': no program given");
  }
  auto child = std::make_unique<Child>();
  child->id = next_id_++;
  child->name = spec.name;
  child->group = spec.group;

  int out_pipe[2][2];
  for (int s = 0; s < 2; ++s) {
    if (::pipe2(out_pipe[s], O_CLOEXEC) != 0) {
      if (s == 1) {
        ::close(out_pipe[0][0]);
        ::close(out_pipe[0][1]);
      }
      return ErrnoStatus(errno, "spawn '" + spec.name + "': pipe");
    }
  }
  child->out[0] = Fd(out_pipe[0][0]);
  child->out[1] = Fd(out_pipe[1][0]);
  Fd out_w(out_pipe[0][1]), err_w(out_pipe[1][1]);
  // The control channel is a socket rather than a pipe, so that a rank writing to it after its
  // reader is gone gets EPIPE from send(MSG_NOSIGNAL) instead of dying of SIGPIPE.
  Fd control_w;
  if (spec.control_channel) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      return ErrnoStatus(errno, "spawn '" + spec.name + "': control channel");
    }
    ::shutdown(sv[0], SHUT_WR);
    ::shutdown(sv[1], SHUT_RD);
    child->out[2] = Fd(sv[0]);
    control_w = Fd(sv[1]);
  }

  Fd devnull;
  int stdin_fd = spec.stdin_fd;
  if (stdin_fd < 0) {
    devnull = Fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (devnull.fd < 0) return ErrnoStatus(errno, "open /dev/null");
    stdin_fd = devnull.fd;
  }
  if (!spec.log_path.empty()) {
    child->log = Fd(::open(spec.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (child->log.fd < 0) {
      return ErrnoStatus(errno, "spawn '" + spec.name + "': log file " + spec.log_path);
    }
  }
  for (int s = 0; s < 2; ++s) {
    const std::string& path = spec.stream_log_paths[s];
    if (path.empty()) continue;
    child->stream_log[s] =
        Fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (child->stream_log[s].fd < 0) {
      return ErrnoStatus(errno, "spawn '" + spec.name + "': log file " + path);
    }
  }

  std::vector<char*> argv, envp;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : spec.env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  auto exec_error = [&](int rc) -> Status {
    std::string what = "cannot execute '" + spec.argv[0] + "'";
    if (!spec.cwd.empty() && rc == ENOENT && ::access(spec.cwd.c_str(), X_OK) != 0) {
      what += " in directory '" + spec.cwd + "'";
    }
    what += ": " + std::string(strerrordesc_np(rc));
    if (rc == ENOENT) return NotFoundError(what);
    if (rc == EACCES || rc == ENOEXEC || rc == EPERM) return FailedPreconditionError(what);
    return InternalError(what);
  };
  int resolve_error = 0;
  const std::string program = ResolveProgram(spec.argv[0], &resolve_error);
  if (resolve_error != 0) return exec_error(resolve_error);

  // fork + exec rather than posix_spawn, for one step posix_spawn cannot take: the child asks
  // for SIGKILL when the thread that started it (this Supervisor's reactor thread) dies, so a
  // rank never outlives its agent or launcher (kill -9 included) to run on beside the attempt
  // that replaced it. Between fork and exec the child makes only async-signal-safe calls.
  int err_pipe[2];
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) return ErrnoStatus(errno, "spawn: pipe");
  Fd err_r(err_pipe[0]), err_w_child(err_pipe[1]);
  const pid_t parent = ::getpid();
  const int stdout_w = out_w.fd, stderr_w = err_w.fd, control_fd = control_w.fd;
  const char* cwd = spec.cwd.empty() ? nullptr : spec.cwd.c_str();
  pid_t pid = ::fork();
  if (pid < 0) return ErrnoStatus(errno, "spawn '" + spec.name + "': fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the parent died before the line above
    ::setpgid(0, 0);
    int fail = 0;
    if (::dup2(stdin_fd, 0) < 0 || ::dup2(stdout_w, 1) < 0 || ::dup2(stderr_w, 2) < 0) {
      fail = errno;
    }
    // dup2 onto itself would keep FD_CLOEXEC: clear it by hand then.
    if (fail == 0 && control_fd >= 0 &&
        (control_fd == kControlFd ? ::fcntl(kControlFd, F_SETFD, 0)
                                  : ::dup2(control_fd, kControlFd)) < 0) {
      fail = errno;
    }
    // Nothing else of the parent's reaches the program: every other fd is closed at exec
    // (CLOSE_RANGE_CLOEXEC, so the exec-error pipe still works until then). Best effort on
    // kernels without it.
    if (fail == 0) {
      ::syscall(SYS_close_range, control_fd >= 0 ? kControlFd + 1 : kControlFd, ~0U,
                kCloseRangeCloexec);
    }
    if (fail == 0 && cwd != nullptr && ::chdir(cwd) != 0) fail = errno;
    if (fail == 0) {
      struct sigaction dfl;
      ::memset(&dfl, 0, sizeof(dfl));
      dfl.sa_handler = SIG_DFL;
      for (int sig = 1; sig < NSIG; ++sig) {
        if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
      }
      sigset_t none;
      ::sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::execve(program.c_str(), argv.data(), envp.data());
      fail = errno;
    }
    ssize_t unused = ::write(err_pipe[1], &fail, sizeof(fail));
    (void)unused;
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // as the child does: no window where a group signal misses it
  err_w_child.Reset();
  int child_errno = 0;
  ssize_t got;
  do {
    got = ::read(err_r.fd, &child_errno, sizeof(child_errno));
  } while (got < 0 && errno == EINTR);
  if (got == static_cast<ssize_t>(sizeof(child_errno))) {  // exec failed: the child is exiting
    int status;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return exec_error(child_errno);
  }
  child->pid = pid;
  child->started = std::chrono::steady_clock::now();
  out_w.Reset();
  err_w.Reset();
  control_w.Reset();

  // A zombie still has a pidfd, so an exit before this line is not missed.
  child->pidfd = Fd(PidfdOpen(pid));
  if (child->pidfd.fd < 0) {
    int err = errno;
    ::kill(-pid, SIGKILL);
    int status;
    ::waitpid(pid, &status, 0);
    return ErrnoStatus(err, "pidfd_open");
  }
  for (auto& fd : child->out) {
    if (fd.fd >= 0) ::fcntl(fd.fd, F_SETFL, ::fcntl(fd.fd, F_GETFL) | O_NONBLOCK);
  }

  ChildId id = child->id;
  Watch(child->pidfd.fd, id, kPidfd);
  Watch(child->out[0].fd, id, kStdoutPipe);
  Watch(child->out[1].fd, id, kStderrPipe);
  if (child->out[2].fd >= 0) Watch(child->out[2].fd, id, kControlPipe);
  Log()->debug("started {} as pid {}: {}", spec.name, pid, spec.argv[0]);
  children_.emplace(id, std::move(child));
  return id;
}

void Supervisor::OnPidfdReadable(ChildId id) {
  auto it = children_.find(id);
  if (it == children_.end() || !it->second->running) return;
  Child& c = *it->second;
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(c.pid, &status, WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r == 0) return;  // spurious wake-up: not exited yet
  ExitInfo info;
  info.pid = c.pid;
  info.when = std::chrono::steady_clock::now();
  info.seq = next_exit_seq_++;
  if (r < 0) {
    // Someone else reaped it (a stray waitpid(-1)); we cannot know how it ended.
    Log()->error("child {} (pid {}) was reaped elsewhere: {}", c.name, c.pid, strerror(errno));
    info.code = 255;
  } else if (WIFSIGNALED(status)) {
    info.signaled = true;
    info.signal = WTERMSIG(status);
  } else {
    info.code = WEXITSTATUS(status);
  }
  bool sent_the_fatal_signal =
      info.signaled ? (info.signal == c.sent_signal) || (info.signal == SIGKILL && c.sent_kill)
                    : c.stop_requested;
  info.stopped = c.stop_requested && sent_the_fatal_signal;
  // A stop is for the whole process group: what the child left behind goes now, not at the
  // drain timeout. (The pgid cannot be reused while any member is alive.)
  if (c.stop_requested) ::kill(-c.pid, SIGKILL);
  c.running = false;
  Unwatch(c.pidfd.fd);
  c.pidfd.Reset();
  if (c.kill_timer) reactor_.CancelTimer(c.kill_timer);
  c.kill_timer = 0;
  Log()->debug("{} (pid {}) {}", c.name, c.pid, info.Describe());
  std::string name = c.name;
  if (callbacks_.on_exit) callbacks_.on_exit(id, name, info);
  // The callback may have stopped or spawned others; `c` is still ours (only MaybeClosed
  // erases).
  it = children_.find(id);
  if (it == children_.end()) return;
  if (it->second->out[0].fd >= 0 || it->second->out[1].fd >= 0 || it->second->out[2].fd >= 0) {
    it->second->drain_timer = reactor_.PostAfter(options_.drain_timeout, "supervisor.drain",
                                                 [this, id] { OnDrainTimeout(id); });
  }
  MaybeClosed(id);
}

void Supervisor::OnPipeReadable(ChildId id, OutputStream stream) {
  auto it = children_.find(id);
  if (it == children_.end()) return;
  Child& c = *it->second;
  int s = static_cast<int>(stream);
  if (c.out[s].fd < 0) return;
  char buf[16384];
  // Bounded: a child that writes without pause must not starve the other children.
  for (int round = 0; round < 16; ++round) {
    ssize_t n = ::read(c.out[s].fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return;
      Log()->warn("{}: read from pipe: {}", c.name, strerror(errno));
      n = 0;
    }
    if (n == 0) {
      CloseStream(c, stream);
      MaybeClosed(id);
      return;
    }
    std::string& partial = c.partial[s];
    partial.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    // A line over kMaxLineBytes comes out in pieces of that size, however the reads cut it:
    // whether its newline arrives in the same read or a later one.
    for (;;) {
      size_t nl = partial.find('\n', start);
      if (nl == std::string::npos) break;
      while (nl - start > kMaxLineBytes) {
        EmitLine(c, stream, std::string_view(partial).substr(start, kMaxLineBytes));
        start += kMaxLineBytes;
      }
      EmitLine(c, stream, std::string_view(partial).substr(start, nl - start));
      start = nl + 1;
    }
    while (partial.size() - start > kMaxLineBytes) {
      EmitLine(c, stream, std::string_view(partial).substr(start, kMaxLineBytes));
      start += kMaxLineBytes;
    }
    partial.erase(0, start);
  }
}

void Supervisor::EmitLine(Child& c, OutputStream stream, std::string_view line) {
  const int own = stream == OutputStream::kControl ? -1 : c.stream_log[static_cast<int>(stream)].fd;
  if (c.log.fd >= 0 || own >= 0) {
    std::string l;
    l.reserve(line.size() + 1);
    l.append(line);
    l.push_back('\n');
    if (c.log.fd >= 0) WriteAll(c.log.fd, l);
    if (own >= 0) WriteAll(own, l);
  }
  if (callbacks_.on_line) callbacks_.on_line(c.id, c.name, stream, line);
}

void Supervisor::CloseStream(Child& c, OutputStream stream) {
  int s = static_cast<int>(stream);
  if (c.out[s].fd < 0) return;
  if (!c.partial[s].empty()) {
    std::string rest = std::move(c.partial[s]);
    c.partial[s].clear();
    EmitLine(c, stream, rest);
  }
  Unwatch(c.out[s].fd);
  c.out[s].Reset();
}

void Supervisor::MaybeClosed(ChildId id) {
  auto it = children_.find(id);
  if (it == children_.end()) return;
  Child& c = *it->second;
  if (c.running || c.out[0].fd >= 0 || c.out[1].fd >= 0 || c.out[2].fd >= 0) return;
  if (c.drain_timer) reactor_.CancelTimer(c.drain_timer);
  std::string name = c.name;
  children_.erase(it);
  if (callbacks_.on_closed) callbacks_.on_closed(id, name);
}

void Supervisor::OnDrainTimeout(ChildId id) {
  auto it = children_.find(id);
  if (it == children_.end()) return;
  Child& c = *it->second;
  c.drain_timer = 0;
  Log()->warn("{}: output pipes still open {} ms after pid {} exited; killing its process group",
              c.name, options_.drain_timeout.count(), c.pid);
  // The leader is reaped, but its pgid cannot be reused while members remain.
  ::kill(-c.pid, SIGKILL);
  // Deliver what is already buffered, then drop the pipes.
  for (auto s : {OutputStream::kStdout, OutputStream::kStderr, OutputStream::kControl}) {
    OnPipeReadable(id, s);
  }
  it = children_.find(id);
  if (it == children_.end()) return;
  for (auto s : {OutputStream::kStdout, OutputStream::kStderr, OutputStream::kControl}) {
    CloseStream(*it->second, s);
  }
  MaybeClosed(id);
}

Status Supervisor::Signal(ChildId id, int signal) {
  auto it = children_.find(id);
  if (it == children_.end() || !it->second->running) {
    return NotFoundError("child " + std::to_string(id) + " is not running");
  }
  if (::kill(-it->second->pid, signal) != 0 && errno != ESRCH) {
    return ErrnoStatus(errno, "kill " + std::to_string(it->second->pid));
  }
  return Status::Ok();
}

void Supervisor::KillGroup(Child& c) {
  if (!c.running) return;
  c.kill_timer = 0;
  Log()->debug("{}: SIGKILL to process group {}", c.name, c.pid);
  c.sent_kill = true;
  ::kill(-c.pid, SIGKILL);
}

void Supervisor::StopChild(Child& c, std::chrono::milliseconds grace, int signal) {
  if (!c.running) return;
  auto now = std::chrono::steady_clock::now();
  if (!c.stop_requested) {
    c.stop_requested = true;
    if (grace.count() > 0) {
      c.sent_signal = signal;
      ::kill(-c.pid, signal);
    }
  }
  if (grace.count() <= 0) {
    KillGroup(c);
    return;
  }
  if (now + grace >= c.kill_at) return;
  c.kill_at = now + grace;
  if (c.kill_timer) reactor_.CancelTimer(c.kill_timer);
  ChildId id = c.id;
  c.kill_timer = reactor_.PostAt(c.kill_at, "supervisor.kill", [this, id] {
    auto it = children_.find(id);
    if (it != children_.end()) KillGroup(*it->second);
  });
}

void Supervisor::Stop(ChildId id, std::chrono::milliseconds grace, int signal) {
  auto it = children_.find(id);
  if (it != children_.end()) StopChild(*it->second, grace, signal);
}

void Supervisor::StopGroup(const std::string& group, std::chrono::milliseconds grace, int signal) {
  for (auto& [id, c] : children_)
    if (c->group == group) StopChild(*c, grace, signal);
}

void Supervisor::StopAll(std::chrono::milliseconds grace, int signal) {
  for (auto& [id, c] : children_) StopChild(*c, grace, signal);
}

std::vector<ChildInfo> Supervisor::List() const {
  std::vector<ChildInfo> out;
  for (const auto& [id, c] : children_) {
    out.push_back({id, c->name, c->group, c->pid, c->started, c->running, c->stop_requested});
  }
  return out;
}

size_t Supervisor::running() const {
  size_t n = 0;
  for (const auto& [id, c] : children_) n += c->running;
  return n;
}

}  // namespace muster::node_agent
