// Hot spares (JobSpec::spares) on a cluster of network namespaces: a real `muster coordinator`
// on host 0 and real `muster agent`s (CURVE) on n1..n3, later n4. A 2-node job with `spares: 1`
// holds the third node idle; the agent of a gang node is killed with SIGKILL (no notice). The
// coordinator must declare it lost, put the spare in its place (an event naming both), restart
// the gang on the survivor and the spare once the lost node's lease fence has passed, without a
// scheduling pass, and hold n4 as the new spare when it registers. A spec asking for more spares
// than the nodes can ever hold is refused at submit with the reason. A spare held when the
// coordinator is killed with SIGKILL and restarted is still held for its job afterwards.
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
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

const std::vector<std::string> kHosts = {"coord", "n1", "n2", "n3", "n4"};
constexpr int kPort = 7071;

class SparesClusterTest : public MusterClusterTest {
 protected:
  SparesClusterTest() : MusterClusterTest(kHosts, kPort, "spares-cluster") {}

  void SetUp() override {
    MusterClusterTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    StartCoordinator();
  }
};

TEST_F(SparesClusterTest, AnAgentKilledWithSigkillIsReplacedByTheSpareAndTheJobContinues) {
  for (int h = 1; h <= 3; ++h) StartAgent(h);
  ASSERT_TRUE(WaitUntil([&] { return NodesUp() == 3; }, 30s)) << Logs();

  // More spares than the 3 nodes of provider aws can ever hold: refused with the reason.
  auto refused = Muster({"submit", WriteSpec("big",
                                             "name: big\ncommand: \"true\"\nnodes: 2\n"
                                             "spares: 2\n")
                                       .string()});
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("4 (2 for the gang + 2 spares)"), std::string::npos)
      << refused.status();

  // Attempt 1 runs until it is killed; attempt 2 says where it runs and finishes.
  auto out = Muster(
      {"submit", WriteSpec("sp",
                           "name: sp\n"
                           "command: \"if [ $MUSTER_ATTEMPT = 1 ]; then echo UP; exec sleep 600; "
                           "else echo RESUMED attempt=$MUSTER_ATTEMPT node_rank=$NODE_RANK; "
                           "exec sleep 600; fi\"\n"
                           "nodes: 2\nspares: 1\nrestart:\n  max_restarts: 0\n")
                     .string()});
  ASSERT_TRUE(out.ok()) << out.status();
  std::string job = *out;
  while (!job.empty() && (job.back() == '\n' || job.back() == ' ')) job.pop_back();

  json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = JobStatus(job);
        return st.value("state", "") == "running";
      },
      40s))
      << st.dump() << Events(job) << Logs();
  std::vector<std::string> gang = st["nodes"];
  std::vector<std::string> spares = st["spares"];
  ASSERT_EQ(gang.size(), 2u) << st.dump();
  ASSERT_EQ(spares.size(), 1u) << "muster status shows the spare held: " << st.dump();
  const std::string spare = spares[0];
  EXPECT_EQ(std::count(gang.begin(), gang.end(), spare), 0);
  const std::string victim = gang[1];
  const std::string survivor = gang[0];

  agents_.at(victim).Signal(SIGKILL);
  const auto killed_at = Clock::now();
  // Attempt 2 runs on the survivor and the spare (the spare's rank says so).
  const fs::path spare_log = WorkDir(spare) / "logs" / job / "attempt-2" / "rank-1.log";
  ASSERT_TRUE(WaitUntil(
      [&] {
        return ReadFileText(spare_log).find("RESUMED attempt=2 node_rank=1") != std::string::npos;
      },
      60s))
      << JobStatus(job).dump() << Events(job) << Logs();
  const double took = std::chrono::duration<double>(Clock::now() - killed_at).count();
  st = JobStatus(job);
  std::string events = Events(job);
  EXPECT_EQ(st.value("attempt", 0), 2) << st.dump() << events;
  EXPECT_EQ(st.value("restarts", -1), 0) << st.dump();
  EXPECT_EQ(st["nodes"], json({survivor, spare})) << "the spare takes the lost node's rank";
  EXPECT_NE(events.find("spare " + spare + " replaces lost node " + victim), std::string::npos)
      << events;
  EXPECT_NE(events.find("attempt 2 on " + survivor + "," + spare + " without a scheduling pass"),
            std::string::npos)
      << events;
  EXPECT_NE(events.find("a new one is requested"), std::string::npos) << events;
  std::cout << "kill -9 of " << victim << "'s agent -> attempt 2 on " << survivor << "+" << spare
            << " after " << took << " s\n";

  // A new node is held as the new spare while the job runs.
  StartAgent(4);
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = JobStatus(job);
        return st.contains("spares") && st["spares"] == json({"n4"});
      },
      30s))
      << st.dump() << Events(job) << Logs();
  EXPECT_NE(Events(job).find("node n4 held as a new spare"), std::string::npos) << Events(job);
  ASSERT_TRUE(Muster({"cancel", job}).ok());
}

// The coordinator is killed with SIGKILL and restarted on its data dir while the job runs and
// another job waits for a node: the spare is still held for its job once the agents are back
// (not given to the waiting job), and it still replaces a gang node whose agent is then killed.
TEST_F(SparesClusterTest, ASpareHeldAcrossACoordinatorKillNineStillReplacesAKilledNode) {
  for (int h = 1; h <= 3; ++h) StartAgent(h);
  ASSERT_TRUE(WaitUntil([&] { return NodesUp() == 3; }, 30s)) << Logs();
  auto out = Muster(
      {"submit", WriteSpec("sp",
                           "name: sp\n"
                           "command: \"if [ $MUSTER_ATTEMPT = 1 ]; then echo UP; exec sleep 600; "
                           "else echo RESUMED attempt=$MUSTER_ATTEMPT node_rank=$NODE_RANK; "
                           "exec sleep 600; fi\"\n"
                           "nodes: 2\nspares: 1\nrestart:\n  max_restarts: 0\n")
                     .string()});
  ASSERT_TRUE(out.ok()) << out.status();
  std::string job = *out;
  while (!job.empty() && (job.back() == '\n' || job.back() == ' ')) job.pop_back();
  json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = JobStatus(job);
        return st.value("state", "") == "running";
      },
      40s))
      << st.dump() << Events(job) << Logs();
  std::vector<std::string> gang = st["nodes"];
  ASSERT_EQ(st["spares"].size(), 1u) << st.dump();
  const std::string spare = st["spares"][0];
  std::string wjob = Submit(WriteSpec("w", "name: w\ncommand: \"exec sleep 600\"\nnodes: 1\n"));
  ASSERT_FALSE(wjob.empty());

  coordinator_->Signal(SIGKILL);
  ASSERT_TRUE(coordinator_->Wait(10s));
  coordinator_.reset();
  StartCoordinator("coordinator-2.log");
  // Every agent is back (the gang's with their ranks): the spare is still the job's, idle.
  ASSERT_TRUE(WaitUntil([&] { return NodesUp() == 3; }, 30s)) << Logs();
  st = JobStatus(job);
  EXPECT_EQ(st.value("state", ""), "running") << st.dump();
  EXPECT_EQ(st["spares"], json({spare})) << st.dump() << Events(job);
  auto nodes = Muster({"nodes", "--json"});
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  for (const auto& n : json::parse(*nodes)) {
    if (n.value("name", "") != spare) continue;
    EXPECT_EQ(n.value("job_id", ""), job) << n.dump();
    EXPECT_TRUE(n.value("spare", false)) << n.dump();
  }

  agents_.at(gang[1]).Signal(SIGKILL);
  const fs::path spare_log = WorkDir(spare) / "logs" / job / "attempt-2" / "rank-1.log";
  ASSERT_TRUE(WaitUntil(
      [&] {
        return ReadFileText(spare_log).find("RESUMED attempt=2 node_rank=1") != std::string::npos;
      },
      60s))
      << JobStatus(job).dump() << Events(job) << Logs();
  st = JobStatus(job);
  EXPECT_EQ(st["nodes"], json({gang[0], spare})) << st.dump();
  std::string events = Events(job);
  EXPECT_NE(events.find("node " + spare + " held as a spare again after the coordinator restarted"),
            std::string::npos)
      << events;
  EXPECT_NE(events.find("spare " + spare + " replaces lost node " + gang[1]), std::string::npos)
      << events;
  EXPECT_EQ(JobStatus(wjob).value("state", ""), "pending") << "the spare went to the other job";
  ASSERT_TRUE(Muster({"cancel", job}).ok());
  ASSERT_TRUE(Muster({"cancel", wjob}).ok());
}

}  // namespace
}  // namespace muster::testing
