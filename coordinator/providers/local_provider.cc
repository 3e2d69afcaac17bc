#include "coordinator/providers/local_provider.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "common/logging.h"

namespace muster::coordinator::providers {
namespace {

namespace fs = std::filesystem;

auto Logger() {
  static auto l = log::Get("coord.provider");
  return l;
}

std::string Substitute(std::string s, const std::string& node) {
  for (size_t at; (at = s.find("{node}")) != std::string::npos;) s.replace(at, 6, node);
  return s;
}

}  // namespace

LocalProvider::LocalProvider(ProviderConfig config, AgentLaunch launch)
    : config_(std::move(config)), launch_(std::move(launch)) {}

LocalProvider::~LocalProvider() {
  for (auto& [name, a] : agents_) {
    if (a.pid > 0) kill(a.pid, SIGINT);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (auto& [name, a] : agents_) {
    if (a.pid <= 0) continue;
    int st;
    while (waitpid(a.pid, &st, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(a.pid, SIGKILL);
        waitpid(a.pid, &st, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
}

Status LocalProvider::Request(const NodeGroupRequest& req) {
  const NodeTemplate& t = config_.node;
  for (const auto& name : req.names) {
    fs::path dir = fs::path(config_.work_dir) / name;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec)
      return UnavailableError(fmt::format("cannot create {}: {}", dir.string(), ec.message()));
    std::vector<std::string> args = {launch_.muster_bin, "agent",
                                     "--coordinator",    launch_.coordinator,
                                     "--provider",       config_.name,
                                     "--name",           name,
                                     "--gpus",           std::to_string(t.gpus),
                                     "--slots",          std::to_string(t.slots),
                                     "--work-dir",       dir.string()};
    if (!t.region.empty()) args.insert(args.end(), {"--region", t.region});
    if (!t.island.empty()) args.insert(args.end(), {"--island", t.island});
    if (!t.gpu_type.empty()) args.insert(args.end(), {"--gpu-type", t.gpu_type});
    for (const auto& [vol, path] : t.volumes) {
      std::string p = Substitute(path, name);
      fs::create_directories(p, ec);
      args.push_back("--volume");
      args.push_back(vol + "=" + p);
    }
    args.insert(args.end(), launch_.args.begin(), launch_.args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::string log = (dir / "agent.log").string();
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) return UnavailableError(fmt::format("fork: {}", strerror(errno)));
    if (pid == 0) {
      // The agent stops (SIGINT: at once) if the coordinator that started it dies.
      prctl(PR_SET_PDEATHSIG, SIGINT);
      if (getppid() != parent) _exit(1);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      if (null >= 0) dup2(null, 0);
      setpgid(0, 0);
      execv(argv[0], argv.data());
      _exit(127);
    }
    agents_[name] = Agent{pid, req.id, false};
    Logger()->info("provider {}: started agent {} (pid {}) for request {} of job {}", config_.name,
                   name, pid, req.id, req.job);
  }
  return Status::Ok();
}

void LocalProvider::Stop(Agent& a) {
  if (a.stopping || a.pid <= 0) return;
  a.stopping = true;
  kill(a.pid, SIGINT);
}

void LocalProvider::Cancel(uint64_t request_id) {
  for (auto& [name, a] : agents_) {
    if (a.request == request_id) Stop(a);
  }
}

void LocalProvider::Release(const std::string& node) {
  if (auto it = agents_.find(node); it != agents_.end()) Stop(it->second);
}

std::vector<RequestFailure> LocalProvider::Poll() {
  std::vector<RequestFailure> out;
  for (auto it = agents_.begin(); it != agents_.end();) {
    int st = 0;
    pid_t r = waitpid(it->second.pid, &st, WNOHANG);
    if (r == 0) {
      ++it;
      continue;
    }
    if (!it->second.stopping) {
      std::string how = WIFEXITED(st) ? fmt::format("exit code {}", WEXITSTATUS(st))
                                      : fmt::format("signal {}", WTERMSIG(st));
      out.push_back({it->second.request, fmt::format("agent {} exited ({}); see {}/{}/agent.log",
                                                     it->first, how, config_.work_dir, it->first)});
    }
    it = agents_.erase(it);
  }
  return out;
}

pid_t LocalProvider::PidOf(const std::string& node) const {
  auto it = agents_.find(node);
  return it == agents_.end() ? -1 : it->second.pid;
}

}  // namespace muster::coordinator::providers
