#include "tests/cluster/netns_cluster.h"

#include <signal.h>
#include <unistd.h>

#include <sstream>

#include "common/logging.h"
#include "tests/testing/subprocess.h"

namespace muster::testing {
namespace {

Status Ip(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"ip"};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, std::chrono::seconds(10)).status();
}

StatusOr<std::vector<int>> PidsIn(const std::string& ns) {
  MUSTER_ASSIGN_OR_RETURN(std::string out, RunCommand({"ip", "netns", "pids", ns}));
  std::vector<int> pids;
  std::istringstream in(out);
  for (int pid; in >> pid;) pids.push_back(pid);
  return pids;
}

// SIGKILLs every process in `ns` until none is left (a forking process may add one meanwhile).
int KillAllIn(const std::string& ns) {
  int killed = 0;
  for (int round = 0; round < 20; ++round) {
    auto pids = PidsIn(ns);
    if (!pids.ok() || pids->empty()) break;
    for (int pid : *pids) {
      if (pid != getpid() && kill(pid, SIGKILL) == 0) ++killed;
    }
    usleep(20000);  // let the kernel tear them down before listing again
  }
  return killed;
}

}  // namespace

void NetnsCluster::RemoveStale() {
  auto list = RunCommand({"ip", "netns", "list"});
  if (!list.ok()) return;
  std::istringstream in(*list);
  std::string name;
  while (in >> name) {
    // Ours are "mt<pid>h<i>"; skip the "(id: N)" tokens and foreign namespaces.
    if (name.rfind("mt", 0) != 0) continue;
    size_t h = name.find('h');
    if (h == std::string::npos) continue;
    pid_t owner = std::atoi(name.substr(2, h - 2).c_str());
    if (owner > 0 && (kill(owner, 0) == 0 || errno != ESRCH)) continue;
    KillAllIn(name);  // daemons a killed test left running there
    Ip({"netns", "del", name}).IgnoreError();
    Ip({"link", "del", "mt" + std::to_string(owner) + "br"}).IgnoreError();
  }
}

StatusOr<std::unique_ptr<NetnsCluster>> NetnsCluster::Create(
    const std::vector<std::string>& hosts) {
  if (geteuid() != 0) {
    return FailedPreconditionError("multi-host tests need root (network namespaces)");
  }
  if (hosts.empty() || hosts.size() > 200) {
    return InvalidArgumentError("a cluster has 1 to 200 hosts");
  }
  if (!RunCommand({"ip", "-V"}).ok()) {
    return FailedPreconditionError("iproute2 ('ip') is not installed");
  }
  RemoveStale();
  std::unique_ptr<NetnsCluster> c(new NetnsCluster);
  c->prefix_ = "mt" + std::to_string(getpid());
  c->bridge_ = c->prefix_ + "br";
  c->hosts_ = hosts;
  Status st = Ip({"link", "add", c->bridge_, "type", "bridge"});
  if (!st.ok()) return FailedPreconditionError("cannot create a bridge: " + st.message());
  MUSTER_RETURN_IF_ERROR(Ip({"link", "set", c->bridge_, "up"}));
  for (size_t i = 0; i < hosts.size(); ++i) {
    std::string ns = c->prefix_ + "h" + std::to_string(i);
    std::string veth = c->prefix_ + "v" + std::to_string(i);
    MUSTER_RETURN_IF_ERROR(Ip({"netns", "add", ns}));
    c->netns_.push_back(ns);
    MUSTER_RETURN_IF_ERROR(Ip({"link", "add", veth, "type", "veth", "peer", "name", veth + "p"}));
    c->veths_.push_back(veth);
    MUSTER_RETURN_IF_ERROR(Ip({"link", "set", veth + "p", "netns", ns}));
    MUSTER_RETURN_IF_ERROR(Ip({"-n", ns, "link", "set", veth + "p", "name", "eth0"}));
    MUSTER_RETURN_IF_ERROR(Ip({"link", "set", veth, "master", c->bridge_}));
    MUSTER_RETURN_IF_ERROR(Ip({"link", "set", veth, "up"}));
    MUSTER_RETURN_IF_ERROR(Ip({"-n", ns, "addr", "add", c->address(i) + "/15", "dev", "eth0"}));
    MUSTER_RETURN_IF_ERROR(Ip({"-n", ns, "link", "set", "eth0", "up"}));
    MUSTER_RETURN_IF_ERROR(Ip({"-n", ns, "link", "set", "lo", "up"}));
  }
  log::Get("test.netns")
      ->info("cluster {}: {} hosts on bridge {}", c->prefix_, hosts.size(), c->bridge_);
  return c;
}

NetnsCluster::~NetnsCluster() {
  for (const auto& ns : netns_) KillAllIn(ns);
  for (const auto& ns : netns_) Ip({"netns", "del", ns}).IgnoreError();  // takes its veth along
  for (const auto& v : veths_) Ip({"link", "del", v}).IgnoreError();
  Ip({"link", "del", bridge_}).IgnoreError();
}

std::string NetnsCluster::address(int i) const { return "198.18.0." + std::to_string(10 + i); }

std::vector<std::string> NetnsCluster::Wrap(int i, const std::vector<std::string>& argv) const {
  std::vector<std::string> out = {"ip", "netns", "exec", netns_[i]};
  out.insert(out.end(), argv.begin(), argv.end());
  return out;
}

Status NetnsCluster::CutLink(int i) { return Ip({"link", "set", veths_[i], "down"}); }
Status NetnsCluster::RestoreLink(int i) { return Ip({"link", "set", veths_[i], "up"}); }

StatusOr<int> NetnsCluster::KillAll(int i) {
  if (i < 0 || i >= size()) return InvalidArgumentError("no host " + std::to_string(i));
  return KillAllIn(netns_[i]);
}

StatusOr<std::vector<int>> NetnsCluster::Pids(int i) const {
  if (i < 0 || i >= size()) return InvalidArgumentError("no host " + std::to_string(i));
  return PidsIn(netns_[i]);
}

}  // namespace muster::testing
