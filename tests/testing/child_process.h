#pragma once

// ChildProcess: a rank (or any program) started by a multi-process test, with its stdout and
// stderr collected by a reader thread so the test can wait for a line or for its exit with a
// deadline. Killed (SIGKILL) when destroyed if still running.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/logging.h"

extern "C" char** environ;

namespace muster::testing {

// A child process whose stdout and stderr are collected by a reader thread.
class Child {
 public:
  using Clock = std::chrono::steady_clock;

  Child(std::vector<std::string> argv, std::map<std::string, std::string> env) {
    int fds[2];
    MUSTER_CHECK(pipe2(fds, O_CLOEXEC) == 0);
    std::map<std::string, std::string> full;
    for (char** e = environ; *e; ++e) {
      std::string kv = *e;
      auto eq = kv.find('=');
      if (eq != std::string::npos) full[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (auto& [k, v] : env) full[k] = v;
    std::vector<std::string> envs;
    for (auto& [k, v] : full) envs.push_back(k + "=" + v);
    std::vector<char*> cargv, cenv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    for (auto& e : envs) cenv.push_back(e.data());
    cenv.push_back(nullptr);
    pid_ = fork();
    MUSTER_CHECK(pid_ >= 0);
    if (pid_ == 0) {
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      execve(cargv[0], cargv.data(), cenv.data());
      _exit(127);
    }
    close(fds[1]);
    pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
    reader_ = std::thread([this, fd = fds[0]] {
      char buf[4096];
      for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n <= 0) break;
        std::lock_guard<std::mutex> l(mu_);
        out_.append(buf, n);
        cv_.notify_all();
      }
      close(fd);
    });
  }
  ~Child() {
    if (!exited_) {
      kill(pid_, SIGKILL);
      WaitExit(Clock::now() + std::chrono::seconds(10));
    }
    if (reader_.joinable()) reader_.join();
    if (pidfd_ >= 0) close(pidfd_);
  }

  bool WaitOutput(const std::string& needle, Clock::time_point deadline) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_until(l, deadline, [&] { return out_.find(needle) != std::string::npos; });
  }
  std::string Output() {
    std::lock_guard<std::mutex> l(mu_);
    return out_;
  }
  void Kill(int sig) { kill(pid_, sig); }

  // The exit code (128+signal if signalled), or -1 if still running at `deadline`.
  int WaitExit(Clock::time_point deadline) {
    if (exited_) return code_;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    pollfd p{pidfd_, POLLIN, 0};
    if (poll(&p, 1, std::max<int>(0, static_cast<int>(left.count()))) <= 0) return -1;
    int status = 0;
    waitpid(pid_, &status, 0);
    exited_ = true;
    exit_time_ = Clock::now();
    code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (reader_.joinable()) reader_.join();  // the rest of its output, up to EOF
    return code_;
  }
  Clock::time_point exit_time() const { return exit_time_; }

 private:
  pid_t pid_ = -1;
  int pidfd_ = -1;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string out_;
  bool exited_ = false;
  int code_ = -1;
  Clock::time_point exit_time_;
};

}  // namespace muster::testing
