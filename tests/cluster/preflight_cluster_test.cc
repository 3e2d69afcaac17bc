// The launch preflight of a multi-node attempt (node_agent/preflight.h) on a cluster of network
// namespaces: a real `muster coordinator` on host 0 and real `muster agent`s on hosts 1..4, all
// on the harness's bridge (eth0), with CURVE.
//
// One scenario covers both of the preflight's cases:
//   - hosts n2 and n3 also have a direct link (x23 / x32) that carries their traffic to each
//     other (a /32 route each way); it is cut (`ip link set x32 down` in n3) before the job is
//     submitted, so n2 and n3 cannot reach each other while every other pair can. The job
//     (3 nodes, max_restarts 0) first lands on n1, n2 and n3: the preflight must name one of n2,
//     n3 with its interface, address and the error, keep it off the job, and place the gang
//     again without using a restart;
//   - n4, registered only after that failure, has a second interface, ib0 (NCCL's preferred
//     prefix), whose address reaches nobody. The second attempt runs on n1, n4 and whichever of
//     n2, n3 was not blamed; every rank must get GLOO_SOCKET_IFNAME=eth0 and
//     NCCL_SOCKET_IFNAME==eth0, the interface that routes to the others, and the job succeeds.
//
// Needs root (network namespaces); skips otherwise.

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <sstream>
#include <thread>

#include "tests/cluster/muster_cluster.h"
#include "tests/cluster/netns_cluster.h"
#include "tests/testing/subprocess.h"

namespace muster::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

const std::vector<std::string> kHosts = {"coord", "n1", "n2", "n3", "n4"};
constexpr int kPort = 7070;

Status Ip(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"ip"};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, 10s).status();
}

class PreflightClusterTest : public MusterClusterTest {
 protected:
  PreflightClusterTest() : MusterClusterTest(kHosts, kPort, "preflight-cluster") {}

  void SetUp() override {
    MusterClusterTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    StartCoordinator();
  }

  void TearDown() override {
    for (const auto& v : extra_links_) Ip({"link", "del", v}).IgnoreError();
    MusterClusterTest::TearDown();
  }

  // In host `h`: `ip ARGS...`.
  Status IpIn(int h, std::vector<std::string> args) {
    args.insert(args.begin(), {"-n", net_->netns(h)});
    return Ip(args);
  }

  // A direct link between hosts a and b (interfaces x<a><b> in a, x<b><a> in b) that carries
  // their traffic to each other: a /32 route each way, over the bridge's addresses.
  void DirectLink(int a, int b) {
    std::string ta = "pf" + std::to_string(getpid() % 100000) + "a";
    std::string tb = "pf" + std::to_string(getpid() % 100000) + "b";
    std::string na = "x" + std::to_string(a) + std::to_string(b);
    std::string nb = "x" + std::to_string(b) + std::to_string(a);
    ASSERT_TRUE(Ip({"link", "add", ta, "type", "veth", "peer", "name", tb}).ok());
    extra_links_.push_back(ta);
    ASSERT_TRUE(Ip({"link", "set", ta, "netns", net_->netns(a)}).ok());
    ASSERT_TRUE(Ip({"link", "set", tb, "netns", net_->netns(b)}).ok());
    ASSERT_TRUE(IpIn(a, {"link", "set", ta, "name", na}).ok());
    ASSERT_TRUE(IpIn(b, {"link", "set", tb, "name", nb}).ok());
    ASSERT_TRUE(IpIn(a, {"link", "set", na, "up"}).ok());
    ASSERT_TRUE(IpIn(b, {"link", "set", nb, "up"}).ok());
    ASSERT_TRUE(
        IpIn(a, {"route", "add", net_->address(b) + "/32", "dev", na, "src", net_->address(a)})
            .ok());
    ASSERT_TRUE(
        IpIn(b, {"route", "add", net_->address(a) + "/32", "dev", nb, "src", net_->address(b)})
            .ok());
  }

  // A second interface ib0 on host h whose subnet reaches nobody (its other end stays down).
  void DeadInterface(int h) {
    std::string t = "pf" + std::to_string(getpid() % 100000) + "i";
    ASSERT_TRUE(Ip({"link", "add", t, "type", "veth", "peer", "name", t + "p"}).ok());
    extra_links_.push_back(t);
    ASSERT_TRUE(Ip({"link", "set", t + "p", "netns", net_->netns(h)}).ok());
    ASSERT_TRUE(IpIn(h, {"link", "set", t + "p", "name", "ib0"}).ok());
    ASSERT_TRUE(
        IpIn(h, {"addr", "add", "198.19.200." + std::to_string(h) + "/24", "dev", "ib0"}).ok());
    ASSERT_TRUE(IpIn(h, {"link", "set", "ib0", "up"}).ok());
  }

  std::vector<std::string> extra_links_;
};

TEST_F(PreflightClusterTest, ACutPeerLinkIsNamedAndRoutedAroundAndRanksGetTheRoutingInterface) {
  DirectLink(2, 3);
  DeadInterface(4);
  for (int h = 1; h <= 3; ++h) StartAgent(h);
  ASSERT_TRUE(WaitUntil([&] { return NodesUp() == 3; }, 30s)) << Logs();
  ASSERT_TRUE(IpIn(3, {"link", "set", "x32", "down"}).ok());  // n2 <-> n3 now goes nowhere

  fs::path spec = root_ / "pf.yaml";
  {
    std::ofstream f(spec);
    f << "name: pf\n"
      << "command: \"echo IFNAMES gloo=$GLOO_SOCKET_IFNAME nccl=$NCCL_SOCKET_IFNAME\"\n"
      << "nodes: 3\nranks_per_node: 1\n"
      << "restart:\n  max_restarts: 0\n";
  }
  std::string job = Submit(spec);
  ASSERT_FALSE(job.empty());

  // The first attempt fails its preflight, naming n2 or n3, its interface, address and error.
  std::smatch m;
  std::string events;
  ASSERT_TRUE(WaitUntil(
      [&] {
        events = Events(job);
        // The requeue is recorded just after the quarantine: wait for both.
        return events.find("node_quarantined") != std::string::npos &&
               events.find("placed again at once") != std::string::npos;
      },
      40s))
      << events << Logs();
  ASSERT_TRUE(std::regex_search(events, m, std::regex("preflight_failed \\[(n2|n3)\\]  (.*)")))
      << events;
  const std::string blamed = m[1];
  const std::string detail = m[2];
  std::cout << "blamed " << blamed << ": " << detail << "\n";
  EXPECT_TRUE(std::regex_search(
      detail, std::regex("node n[23] \\(198\\.18\\.0\\.1[23] via eth0\\) cannot reach node n[23] "
                         "at 198\\.18\\.0\\.1[23]:\\d+: .+")))
      << detail;
  EXPECT_NE(events.find("placed again at once without that node, not counted against max_restarts"),
            std::string::npos)
      << events;

  // Two usable nodes are left for it: it waits for a third, n4, with its dead ib0.
  StartAgent(4);
  json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = JobStatus(job);
        return st.value("state", "") == "succeeded" || st.value("state", "") == "failed";
      },
      60s))
      << st.dump() << Events(job) << Logs();
  EXPECT_EQ(st.value("state", ""), "succeeded") << st.dump() << Events(job);
  EXPECT_EQ(st.value("restarts", -1), 0) << st.dump();
  ASSERT_TRUE(st.contains("nodes")) << st.dump();
  std::vector<std::string> nodes = st["nodes"];
  EXPECT_EQ(std::count(nodes.begin(), nodes.end(), blamed), 0) << st.dump();
  EXPECT_EQ(std::count(nodes.begin(), nodes.end(), "n4"), 1) << st.dump();
  // Every rank of the second attempt, n4's included, got the interface that routes to the
  // others, not ib0.
  int seen = 0;
  for (const auto& n : nodes) {
    for (int r = 0; r < 3; ++r) {
      fs::path p = WorkDir(n) / "logs" / job / "attempt-2" / ("rank-" + std::to_string(r) + ".log");
      if (!fs::exists(p)) continue;
      EXPECT_NE(ReadFileText(p).find("IFNAMES gloo=eth0 nccl==eth0"), std::string::npos)
          << n << ": " << ReadFileText(p);
      ++seen;
    }
  }
  EXPECT_EQ(seen, 3);
}

}  // namespace
}  // namespace muster::testing
