#include "launcher/slurm_run.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/curve.h"
#include "common/logging.h"
#include "common/strings.h"
#include "coordinator/client.h"
#include "coordinator/providers/slurm_provider.h"
#include "launcher/remote_run.h"

namespace muster::launcher {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

void WriteLine(int fd, const std::string& s) {
  std::string line = s + "\n";
  (void)!::write(fd, line.data(), line.size());
}

// A child in its own process group, killed with us (PDEATHSIG), output to `log`.
StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const fs::path& log) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::string log_path = log.string();
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return UnavailableError(fmt::format("fork: {}", strerror(errno)));
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    setpgid(0, 0);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    if (null >= 0) dup2(null, 0);
    execvp(args[0], args.data());
    _exit(127);
  }
  return pid;
}

// SIGTERM to the group, SIGKILL after `grace`; reaps it.
void Stop(pid_t pid, std::chrono::milliseconds grace) {
  if (pid <= 0) return;
  kill(-pid, SIGTERM);
  auto end = std::chrono::steady_clock::now() + grace;
  int st;
  while (waitpid(pid, &st, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > end) {
      kill(-pid, SIGKILL);
      waitpid(pid, &st, 0);
      return;
    }
    std::this_thread::sleep_for(20ms);
  }
  kill(-pid, SIGKILL);  // whatever is left in its group
}

bool Exited(pid_t pid) {
  int st;
  return waitpid(pid, &st, WNOHANG) == pid;
}

std::string Tail(const fs::path& p) {
  std::ifstream in(p);
  std::string text(std::istreambuf_iterator<char>(in), {});
  return text.size() > 2000 ? "..." + text.substr(text.size() - 2000) : text;
}

}  // namespace

StatusOr<std::vector<int>> ParseTasksPerNode(const std::string& text) {
  std::vector<int> out;
  auto bad = [&] {
    return InvalidArgumentError("SLURM_TASKS_PER_NODE: expected a list like 2(x3),1, not '" + text +
                                "'");
  };
  size_t i = 0;
  while (i < text.size()) {
    int n = 0, times = 1;
    auto [p, ec] = std::from_chars(text.data() + i, text.data() + text.size(), n);
    if (ec != std::errc() || n <= 0) return bad();
    i = p - text.data();
    if (i < text.size() && text[i] == '(') {
      if (text.compare(i, 2, "(x") != 0) return bad();
      auto [q, ec2] = std::from_chars(text.data() + i + 2, text.data() + text.size(), times);
      if (ec2 != std::errc() || times <= 0 || times > 100000) return bad();
      i = q - text.data();
      if (i >= text.size() || text[i] != ')') return bad();
      ++i;
    }
    if (out.size() + times > 100000) return bad();
    out.insert(out.end(), times, n);
    if (i < text.size()) {
      if (text[i] != ',' || i + 1 == text.size()) return bad();
      ++i;
    }
  }
  if (out.empty()) return bad();
  return out;
}

StatusOr<std::optional<std::vector<HostSlots>>> SlurmAllocationHosts(
    const std::function<const char*(const char*)>& getenv,
    const std::function<StatusOr<std::vector<std::string>>(const std::string&)>& expand) {
  const char* job = getenv("SLURM_JOB_ID");
  const char* list = getenv("SLURM_JOB_NODELIST");
  if (!job || !*job || !list || !*list) return std::optional<std::vector<HostSlots>>();
  MUSTER_ASSIGN_OR_RETURN(auto names, expand(list));
  const char* tasks = getenv("SLURM_TASKS_PER_NODE");
  std::vector<int> per(names.size(), 1);
  if (tasks && *tasks) {
    MUSTER_ASSIGN_OR_RETURN(per, ParseTasksPerNode(tasks));
    if (per.size() != names.size())
      return InvalidArgumentError(
          fmt::format("SLURM_TASKS_PER_NODE ({}) names {} nodes, SLURM_JOB_NODELIST ({}) {}", tasks,
                      per.size(), list, names.size()));
  }
  std::vector<HostSlots> hosts;
  for (size_t i = 0; i < names.size(); ++i) hosts.push_back({names[i], per[i]});
  return std::optional<std::vector<HostSlots>>(std::move(hosts));
}

int RunInSlurmAllocation(const RunOptions& options, const std::vector<HostSlots>& hosts,
                         const RunIo& io) {
  auto fail = [&](const std::string& what) {
    WriteLine(io.stderr_fd, "muster run: " + what);
    return 1;
  };
  std::optional<std::string> job = EnvValue("SLURM_JOB_ID");
  std::optional<std::string> base = EnvValue("MUSTER_RUN_DIR");
  if (!base) base = EnvValue("SLURM_SUBMIT_DIR");
  fs::path dir =
      fs::path(base.value_or(".")) / fmt::format(".muster-run-{}-{}", job.value_or("0"), getpid());
  std::error_code ec;
  fs::create_directories(dir / "coord", ec);
  if (ec) return fail(fmt::format("cannot create {}: {}", dir.string(), ec.message()));
  struct Cleanup {
    fs::path dir;
    pid_t coord = -1, agents = -1;
    ~Cleanup() {
      Stop(agents, 10s);
      Stop(coord, 5s);
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } cleanup{dir};

  KeysDir keys{dir / "keys"};
  if (Status st = InitKeysDir(keys, false); !st.ok()) return fail(st.message());
  std::error_code ec2;
  std::string self = fs::read_symlink("/proc/self/exe", ec2).string();
  auto coord = Spawn({self, "coordinator", "--data-dir", (dir / "coord").string(), "--keys",
                      keys.dir.string(), "--listen", "tcp://0.0.0.0:*"},
                     dir / "coordinator.log");
  if (!coord.ok()) return fail(coord.status().message());
  cleanup.coord = *coord;
  auto deadline = std::chrono::steady_clock::now() + 20s;
  while (!fs::exists(dir / "coord" / "endpoint")) {
    if (Exited(*coord) || std::chrono::steady_clock::now() > deadline)
      return fail("the allocation's coordinator did not start:\n" + Tail(dir / "coordinator.log"));
    std::this_thread::sleep_for(20ms);
  }
  std::string endpoint;
  std::ifstream(dir / "coord" / "endpoint") >> endpoint;
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  if (auto at = endpoint.find("://0.0.0.0:"); at != std::string::npos)
    endpoint.replace(at + 3, 7, host);

  // One agent per node, named as Slurm names it, with that node's slots.
  int slots = 0;
  for (const auto& h : hosts) slots = std::max(slots, h.slots);
  std::string agent = fmt::format(
      "mkdir -p '{0}/agents' && exec '{1}' agent --coordinator '{2}' --keys '{3}' --provider "
      "slurm --name \"$SLURMD_NODENAME\" --slots {4} --gpus auto --work-dir "
      "'{0}'/agents/\"$SLURMD_NODENAME\"",
      dir.string(), self, endpoint, keys.dir.string(), slots);
  auto agents = Spawn(
      {"srun", "--nodes", std::to_string(hosts.size()), "--ntasks", std::to_string(hosts.size()),
       "--ntasks-per-node=1", "--kill-on-bad-exit=0", "bash", "-c", agent},
      dir / "agents.log");
  if (!agents.ok()) return fail(agents.status().message());
  cleanup.agents = *agents;

  coordinator::ClientOptions co;
  co.endpoint = endpoint;
  co.keys_dir = keys.dir.string();
  auto client = coordinator::CoordinatorClient::Connect(co);
  if (!client.ok()) return fail(client.status().message());
  deadline = std::chrono::steady_clock::now() + 60s;
  for (;;) {
    auto nodes = (*client)->Nodes();
    size_t up = 0;
    if (nodes.ok()) {
      for (const auto& n : nodes->nodes()) up += n.state() == proto::NODE_UP;
    }
    if (up == hosts.size()) break;
    if (Exited(*agents)) {
      cleanup.agents = -1;
      return fail("srun of the agents ended:\n" + Tail(dir / "agents.log"));
    }
    if (std::chrono::steady_clock::now() > deadline)
      return fail(fmt::format("{} of {} agents registered in 60 s:\n{}", up, hosts.size(),
                              Tail(dir / "agents.log")));
    std::this_thread::sleep_for(50ms);
  }
  client->reset();
  RunOptions remote = options;
  remote.coordinator = endpoint;
  remote.keys_dir = keys.dir.string();
  remote.hosts = hosts;
  return RunThroughCoordinator(remote, io);
}

}  // namespace muster::launcher
