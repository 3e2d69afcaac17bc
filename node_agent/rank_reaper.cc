#include "node_agent/rank_reaper.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "common/logging.h"
#include "node_agent/assignment_runner.h"  // KillLeftoverRanks

namespace muster::node_agent {

Status StartRankReaper(const std::string& reaper_bin, const std::filesystem::path& pids_file) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return ErrnoStatus(errno, "rank reaper: pipe");
  std::vector<std::string> args = {reaper_bin, "rank-reaper", "--pids", pids_file.string()};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int read_end = p[0];
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(p[0]);
    ::close(p[1]);
    return ErrnoStatus(err, "rank reaper: fork");
  }
  if (pid == 0) {
    // Async-signal-safe calls only until exec.
    ::setsid();
    if (::dup2(read_end, 3) < 0) ::_exit(127);
    ::syscall(SYS_close_range, 4U, ~0U, 0U);  // nothing else of the agent's (its sockets)
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(p[0]);
  // p[1] stays open until this process ends: that is the reaper's signal.
  log::Get("agent")->debug("rank reaper {} started (pids {})", pid, pids_file.string());
  return Status::Ok();
}

int RunRankReaper(int fd, const std::filesystem::path& pids_file) {
  char buf[64];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n == 0) break;
    if (n < 0 && errno != EINTR) break;
  }
  KillLeftoverRanks(pids_file, log::Get("reaper"));
  return 0;
}

}  // namespace muster::node_agent
