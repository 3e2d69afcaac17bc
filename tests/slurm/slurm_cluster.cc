#include "tests/slurm/slurm_cluster.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <random>
#include <set>

namespace muster::providers_test {
namespace {

// A port nothing listens on now (bound once by us, then closed).
int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

std::string Which(const std::string& tool) {
  for (const char* d : {"/usr/sbin", "/usr/bin", "/sbin", "/bin"}) {
    fs::path p = fs::path(d) / tool;
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

}  // namespace

Status SlurmCluster::Start(int nodes, const std::string& partitions) {
  std::vector<std::string> missing;
  for (const char* t :
       {"munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun"}) {
    if (Which(t).empty()) missing.push_back(t);
  }
  if (!missing.empty())
    return UnavailableError(fmt::format(
        "Slurm is not installed here (missing {}): run scripts/install-deps.sh (slurmctld "
        "slurmd slurm-client munge)",
        fmt::join(missing, ", ")));
  started_ = true;
  std::error_code ec;
  for (const char* d : {"munge", "state", "spool", "log"}) fs::create_directories(dir_ / d, ec);
  fs::permissions(dir_ / "munge", fs::perms::owner_all, ec);
  {
    std::random_device rd;
    std::string key(1024, '\0');
    for (auto& c : key) c = static_cast<char>(rd());
    std::ofstream(dir_ / "munge" / "munge.key", std::ios::binary) << key;
    fs::permissions(dir_ / "munge" / "munge.key", fs::perms::owner_read, ec);
  }
  std::string sock = (dir_ / "munge" / "sock").string();
  auto start = [&](std::vector<std::string> argv, const std::string& log) -> Status {
    auto p = Subprocess::Start(argv, {ConfEnv()}, (dir_ / "log" / log).string());
    if (!p.ok()) return p.status();
    daemons_.push_back(std::make_unique<Subprocess>(std::move(*p)));
    return Status::Ok();
  };
  MUSTER_RETURN_IF_ERROR(start(
      {Which("munged"), "-F", "--force", "--key-file=" + (dir_ / "munge" / "munge.key").string(),
       "--socket=" + sock, "--pid-file=" + (dir_ / "munge" / "pid").string(),
       "--log-file=" + (dir_ / "munge" / "log").string(),
       "--seed-file=" + (dir_ / "munge" / "seed").string()},
      "munged.out"));
  if (!WaitUntil([&] { return fs::exists(sock); }, 10s))
    return UnavailableError("munged did not create its socket in 10 s:\n" + Logs());

  char host[256] = {};
  gethostname(host, sizeof host - 1);
  int ctld_port = FreePort(), slurmd_port = FreePort();
  std::string conf = fmt::format(
      "ClusterName=muster\nSlurmctldHost={0}(127.0.0.1)\nSlurmctldPort={1}\nSlurmdPort={2}\n"
      "AuthType=auth/munge\nAuthInfo=socket={3}\nCredType=cred/munge\nSlurmUser=root\n"
      "SlurmdUser=root\nStateSaveLocation={4}/state\nSlurmdSpoolDir={4}/spool/%n\n"
      "SlurmctldPidFile={4}/slurmctld.pid\nSlurmdPidFile={4}/spool/slurmd-%n.pid\n"
      "SlurmctldLogFile={4}/log/slurmctld.log\nSlurmdLogFile={4}/log/slurmd-%n.log\n"
      "ProctrackType=proctrack/pgid\nTaskPlugin=task/none\nSwitchType=switch/none\n"
      "MpiDefault=none\nSelectType=select/linear\nSchedulerType=sched/builtin\n"
      "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
      "JobCompType=jobcomp/none\nReturnToService=2\nSlurmdParameters=config_overrides\n"
      "SlurmctldTimeout=10\nSlurmdTimeout=10\nMessageTimeout=5\nInactiveLimit=0\nKillWait=2\n"
      "MinJobAge=2\nPluginDir=/usr/lib/x86_64-linux-gnu/slurm-wlm\n",
      host, ctld_port, slurmd_port, sock, dir_.string());
  for (int i = 1; i <= nodes; ++i) {
    conf += fmt::format(
        "NodeName=n{} NodeHostname={} NodeAddr=127.0.0.1 Port={} CPUs=2 RealMemory=100 "
        "State=UNKNOWN\n",
        i, host, FreePort());
    fs::create_directories(dir_ / "spool" / fmt::format("n{}", i), ec);
  }
  conf += partitions.empty()
              ? "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
              : partitions;
  std::ofstream(dir_ / "slurm.conf") << conf;
  setenv("SLURM_CONF", (dir_ / "slurm.conf").c_str(), 1);  // for Tool() and this process

  std::string cf = (dir_ / "slurm.conf").string();
  MUSTER_RETURN_IF_ERROR(start({Which("slurmctld"), "-D", "-i", "-f", cf}, "slurmctld.out"));
  for (int i = 1; i <= nodes; ++i) {
    std::string n = fmt::format("n{}", i);
    MUSTER_RETURN_IF_ERROR(start({Which("slurmd"), "-D", "-N", n, "-f", cf}, n + ".out"));
  }
  std::string last;
  bool idle = WaitUntil(
      [&] {
        auto out = Tool({"sinfo", "-h", "-N", "-o", "%N %T"});
        if (!out.ok()) {
          last = out.status().message();
          return false;
        }
        last = *out;
        std::set<std::string> idle;  // a node is listed once per partition
        std::istringstream in(*out);
        for (std::string name, state; in >> name >> state;) {
          if (state == "idle") idle.insert(name);
        }
        return static_cast<int>(idle.size()) == nodes;
      },
      30s);
  if (!idle)
    return UnavailableError(fmt::format(
        "the Slurm nodes did not come up idle in 30 s (last sinfo: {}):\n{}", last, Logs()));
  return Status::Ok();
}

StatusOr<std::string> SlurmCluster::Tool(std::vector<std::string> argv) {
  argv[0] = Which(argv[0]);
  return RunCommand(argv, 15s);
}

std::string SlurmCluster::Logs() const {
  std::string out;
  for (const auto& e : fs::directory_iterator(dir_ / "log")) {
    std::string text = ReadFile(e.path());
    if (text.size() > 3000) text = "..." + text.substr(text.size() - 3000);
    out += "== " + e.path().filename().string() + "\n" + text + "\n";
  }
  return out;
}

void SlurmCluster::Stop() {
  if (!started_) return;
  started_ = false;
  (void)Tool({"scancel", "--full", "--user", "root"});
  daemons_.clear();  // SIGKILL to each daemon's process group
  // What the daemons started outside their groups (slurmstepd, job steps, agents) carries our
  // slurm.conf in its environment.
  std::string needle = "SLURM_CONF=" + (dir_ / "slurm.conf").string();
  for (int round = 0; round < 50; ++round) {
    std::vector<pid_t> left;
    for (const auto& e : fs::directory_iterator("/proc")) {
      std::string name = e.path().filename().string();
      if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
      pid_t pid = std::stoi(name);
      if (pid == getpid()) continue;
      std::string env = ReadFile(e.path() / "environ");
      std::replace(env.begin(), env.end(), '\0', '\n');
      if (env.find(needle + "\n") == std::string::npos) continue;
      if (ReadFile(e.path() / "stat").find(") Z") != std::string::npos) continue;
      left.push_back(pid);
    }
    if (left.empty()) break;
    for (pid_t p : left) kill(p, SIGKILL);
    std::this_thread::sleep_for(100ms);
  }
  unsetenv("SLURM_CONF");
}

}  // namespace muster::providers_test
