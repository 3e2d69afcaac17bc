// Real `muster coordinator` and real `muster agent` processes on loopback with CURVE, driven
// through the real `muster` CLI: a gang of shell-script ranks runs with the env contract,
// failures are named and retried, a coordinator kill -9 and an agent kill -9 are survived, a
// preemption notice checkpoints first, and the lease stops the ranks of an agent that lost its
// coordinator.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "checkpoint/checkpointer.h"
#include "coordinator/client.h"
#include "tests/testing/http_get.h"
#include "tests/testing/port_range.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using testing::RunCommand;
using testing::Subprocess;

using testing::WaitUntil;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A coordinator and named agents, each a real process, with their own keys and directories.
class AgentCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("muster-agent-test-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ASSERT_TRUE(RunCommand({MUSTER_BIN, "keys", "init", "--dir", (dir_ / "keys").string()}).ok());
    StartCoordinator();
  }
  void TearDown() override {
    agents_.clear();
    coordinator_.reset();
    // Ranks left by a killed agent die on their next write (their pipe is gone); give them a
    // moment, then remove the files.
    std::this_thread::sleep_for(300ms);
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // `lease_ms` 0: the coordinator's default (1.5 x the heartbeat timeout).
  void StartCoordinator(int lease_ms = 0, int heartbeat_timeout_ms = 1500) {
    fs::remove(dir_ / "coord" / "endpoint");
    fs::create_directories(dir_ / "coord");
    std::vector<std::string> argv = {MUSTER_BIN,
                                     "coordinator",
                                     "--data-dir",
                                     (dir_ / "coord").string(),
                                     "--keys",
                                     (dir_ / "keys").string(),
                                     "--heartbeat-interval-ms",
                                     "200",
                                     "--heartbeat-timeout-ms",
                                     std::to_string(heartbeat_timeout_ms)};
    if (lease_ms > 0) {
      argv.push_back("--lease-ms");
      argv.push_back(std::to_string(lease_ms));
    }
    // Tests run side by side: each coordinator hands out its own range of rendezvous ports.
    argv.push_back("--rendezvous-port-base");
    argv.push_back(std::to_string(port_base_));
    argv.push_back("--listen");
    argv.push_back(endpoint_.empty() ? "tcp://127.0.0.1:*" : endpoint_);
    auto p = Subprocess::Start(argv, {}, (dir_ / "coord.log").string());
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    coordinator_ = std::make_unique<Subprocess>(std::move(*p));
    ASSERT_TRUE(WaitUntil([&] { return fs::exists(dir_ / "coord" / "endpoint"); }, 30s))
        << ReadFile(dir_ / "coord.log");
    endpoint_ = ReadFile(dir_ / "coord" / "endpoint");
    while (!endpoint_.empty() && std::isspace(endpoint_.back())) endpoint_.pop_back();
  }

  void StartAgent(const std::string& name, const std::string& provider,
                  std::vector<std::string> extra = {}) {
    fs::path vol = dir_ / ("vol-" + provider);
    fs::create_directories(vol);
    std::vector<std::string> argv = {MUSTER_BIN,      "agent",
                                     "--coordinator", endpoint_,
                                     "--keys",        (dir_ / "keys").string(),
                                     "--provider",    provider,
                                     "--name",        name,
                                     "--slots",       "2",
                                     "--gpus",        "0",
                                     "--volume",      "ckpt=" + vol.string(),
                                     "--work-dir",    (dir_ / ("agent-" + name)).string(),
                                     "--grace-ms",    "1000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = Subprocess::Start(argv, {}, (dir_ / (name + ".log")).string());
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    agents_[name] = std::make_unique<Subprocess>(std::move(*p));
  }

  void KillAgent(const std::string& name) {
    agents_.at(name)->Signal(SIGKILL);
    agents_.at(name)->Wait(5s);
    agents_.erase(name);
  }

  StatusOr<std::string> Muster(std::vector<std::string> args) {
    std::vector<std::string> argv = {MUSTER_BIN};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--coordinator");
    argv.push_back(endpoint_);
    argv.push_back("--keys");
    argv.push_back((dir_ / "keys").string());
    return RunCommand(argv, 15s);
  }

  void WaitNodesUp(int n) {
    ASSERT_TRUE(WaitUntil(
        [&] {
          auto out = Muster({"nodes", "--json"});
          if (!out.ok()) return false;
          auto j = nlohmann::json::parse(*out, nullptr, false);
          if (!j.is_array()) return false;
          int up = 0;
          for (auto& node : j) up += node.value("state", "") == "up";
          return up == n;
        },
        15s))
        << *Muster({"nodes"});
  }

  std::string Submit(const std::string& yaml) {
    fs::path f = dir_ / "job.yaml";
    std::ofstream(f) << yaml;
    auto out = Muster({"submit", f.string()});
    EXPECT_TRUE(out.ok()) << out.status().ToString();
    std::string id = out.ok() ? *out : "";
    while (!id.empty() && std::isspace(id.back())) id.pop_back();
    return id;
  }

  nlohmann::json Status(const std::string& job) {
    auto out = Muster({"status", job, "--json"});
    if (!out.ok()) return {};
    auto j = nlohmann::json::parse(*out, nullptr, false);
    if (j.is_array() && !j.empty()) return j[0];
    return j;
  }

  std::string State(const std::string& job) { return Status(job).value("state", ""); }

  bool WaitState(const std::string& job, const std::string& state,
                 std::chrono::milliseconds timeout) {
    return WaitUntil([&] { return State(job) == state; }, timeout);
  }

  std::string Events(const std::string& job) {
    auto out = Muster({"events", job});
    return out.ok() ? *out : out.status().ToString();
  }

  fs::path dir_;
  std::string endpoint_;
  // Tests run side by side: each coordinator hands out ports from a range of its own.
  muster::testing::PortRange ports_;
  int port_base_ = ports_.base();
  std::unique_ptr<Subprocess> coordinator_;
  std::map<std::string, std::unique_ptr<Subprocess>> agents_;
};

// A rank that prints its env contract and progress, runs `seconds`, and exits `code`.
std::string Script(const std::string& body) {
  return "command: [\"/bin/sh\", \"-c\", " + nlohmann::json(body).dump() + "]\n";
}

// Shell that commits a real checkpoint of `step` into MUSTER_CHECKPOINT_DIR from rank 0 (the
// agent reports a printed commit only once the step is good on the volume).
std::string WriteStep(const std::string& step) {
  return "[ \"$RANK\" != 0 ] || " + std::string(MUSTER_WRITE_STEP) +
         " \"$MUSTER_CHECKPOINT_DIR\" " + step + " || exit 9; ";
}

// A rank that "trains" `total` steps from MUSTER_RESUME_STEP, and when the notice file appears
// "checkpoints" the step it is at (MUSTER_CHECKPOINT, notice_at=) and exits 3.
std::string CheckpointingRank(int total) {
  std::string t = std::to_string(total);
  return "s=${MUSTER_RESUME_STEP:-0}; s=${s:-0}; echo resumed_from=$s; "
         "while [ $s -lt " +
         t + " ]; do s=$((s+1)); echo MUSTER_PROGRESS step=$s total=" + t +
         "; if [ -e \"$MUSTER_PREEMPT_FILE\" ]; then " + WriteStep("$s") +
         "echo MUSTER_CHECKPOINT step=$s; "
         "echo notice_at=$s; exit 3; fi; sleep 0.1; done";
}

TEST_F(AgentCluster, GangRunsWithTheEnvContractLogsAndProgress) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  StartAgent("gcp-1", "gcp");
  WaitNodesUp(3);
  std::string job = Submit(
      "name: hello\n" +
      Script("echo \"rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_WORLD_SIZE "
             "node=$NODE_RANK/$NNODES master=$MASTER_ADDR:$MASTER_PORT "
             "rdzv=$MUSTER_RDZV_ENDPOINT key=${MUSTER_RDZV_KEY%%,*} ompi=$OMPI_COMM_WORLD_RANK "
             "job=$MUSTER_JOB_ID attempt=$MUSTER_ATTEMPT ckpt=$MUSTER_CHECKPOINT_DIR "
             "node_name=$MUSTER_NODE\"; "
             "for s in 1 2 3 4 5; do echo MUSTER_PROGRESS step=$s total=5 loss=0.$s; sleep 0.2; "
             "done") +
      "nodes: 2\nranks_per_node: 2\nplacement:\n  providers: [aws]\ncheckpoint:\n  volume: "
      "ckpt\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  auto st = Status(job);
  EXPECT_EQ(st["attempt"], 1);
  EXPECT_EQ(st["progress"]["step"], 5) << st.dump();
  // The gang is one provider's two nodes, in node-rank order.
  auto nodes = st["nodes"];
  ASSERT_EQ(nodes.size(), 2u);
  for (int rank = 0; rank < 4; ++rank) {
    auto log = Muster({"logs", job, "--rank", std::to_string(rank)});
    ASSERT_TRUE(log.ok()) << log.status().ToString();
    std::string want = "rank=" + std::to_string(rank) +
                       " world=4 local=" + std::to_string(rank % 2) +
                       "/2 node=" + std::to_string(rank / 2) + "/2";
    EXPECT_NE(log->find(want), std::string::npos) << *log;
    EXPECT_NE(log->find("key=v1 "), std::string::npos) << "CURVE rendezvous key: " << *log;
    EXPECT_NE(log->find("ompi=" + std::to_string(rank)), std::string::npos);
    EXPECT_NE(log->find("attempt=1 ckpt=" + (dir_ / "vol-aws" / job).string()), std::string::npos)
        << *log;
    EXPECT_NE(log->find("node_name=" + nodes[rank / 2].get<std::string>()), std::string::npos);
    EXPECT_NE(log->find("MUSTER_PROGRESS step=5"), std::string::npos);
  }
  std::string events = Events(job);
  EXPECT_NE(events.find("scheduled"), std::string::npos) << events;
  EXPECT_NE(events.find("started"), std::string::npos) << events;
  EXPECT_NE(events.find("succeeded"), std::string::npos) << events;
}

// A Gloo job over two agents x two ranks: each node's ranks meet the store through their own
// agent's relay (a unix:// socket), the agents through CURVE; the conformance checks (every
// collective, op and dtype) pass. With MUSTER_RDZV_DIRECT=1 the ranks connect to the store
// themselves, as before relays, and pass too.
TEST_F(AgentCluster, AGlooJobOverTwoAgentsRendezvousesThroughTheirRelays) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  WaitNodesUp(2);
  for (bool direct : {false, true}) {
    std::string job = Submit(
        std::string("name: relay\n") +
        Script(std::string("echo rdzv=$MUSTER_RDZV_ENDPOINT; exec ") + MUSTER_CONFORMANCE_RANK) +
        "nodes: 2\nranks_per_node: 2\nenv:\n  MUSTER_COLL_BACKEND: gloo\n" +
        (direct ? "  MUSTER_RDZV_DIRECT: \"1\"\n" : ""));
    ASSERT_FALSE(job.empty());
    ASSERT_TRUE(WaitState(job, "succeeded", 90s)) << Events(job) << *Muster({"logs", job});
    for (int rank = 0; rank < 4; ++rank) {
      auto log = Muster({"logs", job, "--rank", std::to_string(rank)});
      ASSERT_TRUE(log.ok()) << log.status().ToString();
      EXPECT_NE(log->find(direct ? "rdzv=tcp://" : "rdzv=unix://"), std::string::npos)
          << "rank " << rank << ": " << *log;
    }
  }
}

// A C++ rank that never prints (runtime::JobContext: progress on the control channel, the
// checkpointer announcing its own commit) is catalogued all the same, and its progress shows.
TEST_F(AgentCluster, ARankThatNeverPrintsIsStillCataloguedThroughItsControlChannel) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  std::string job =
      Submit(std::string("name: silent\ncommand: [\"") + MUSTER_SILENT_RANK_BIN +
             "\", \"4\"]\nnodes: 1\nranks_per_node: 2\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  std::string events = Events(job);
  EXPECT_NE(events.find("checkpoint_committed"), std::string::npos) << events;
  EXPECT_NE(events.find("step 4 on volume ckpt"), std::string::npos) << events;
  // Progress rides on heartbeats, so the last one may land just after the exit report.
  EXPECT_TRUE(WaitUntil(
      [&] {
        auto st = Status(job);
        return st.contains("progress") && st["progress"].value("step", 0) == 4;
      },
      10s))
      << Status(job).dump();
  // The rank log keeps what came on the channel, beside the (empty) output.
  auto log = Muster({"logs", job, "--rank", "0"});
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  // With the commit latency the checkpointer measured.
  EXPECT_NE(log->find("MUSTER_CHECKPOINT step=4 seconds="), std::string::npos) << *log;
}

// A commit announced on the control channel and printed as well is catalogued once.
TEST_F(AgentCluster, ACommitAnnouncedTwiceIsRecordedOnce) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  std::string job = Submit(
      "name: twice\n" +
      Script(WriteStep("2") +
             "if [ \"$RANK\" = 0 ]; then echo MUSTER_CHECKPOINT step=2; "
             "echo MUSTER_CHECKPOINT step=2 >&$MUSTER_CONTROL_FD; echo MUSTER_CHECKPOINT step=2; "
             "fi") +
      "nodes: 1\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  std::string events = Events(job);
  size_t first = events.find("checkpoint_committed");
  ASSERT_NE(first, std::string::npos) << events;
  EXPECT_EQ(events.find("checkpoint_committed", first + 1), std::string::npos) << events;
}

// Gang placement on one provider, all or nothing, a visible pending reason, refusal of a job no
// node set could hold, and a higher-priority job preempting a lower one, which checkpoints
// first and resumes afterwards from that step.
// `muster submit --follow` into a file: the timeline, then each new progress bar on a line of
// its own (no carriage returns), then the outcome.
TEST_F(AgentCluster, SubmitFollowPrintsTheTimelineAndProgressLines) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path f = dir_ / "follow.yaml";
  std::ofstream(f) << "name: follow\n" +
                          Script(
                              "for s in 1 2 3 4; do echo MUSTER_PROGRESS step=$s total=4 "
                              "loss=0.$s; sleep 0.6; done") +
                          "nodes: 1\nranks_per_node: 1\n";
  auto out = Muster({"submit", f.string(), "--follow"});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->find('\r'), std::string::npos) << *out;
  EXPECT_NE(out->find("  started: "), std::string::npos) << *out;
  EXPECT_NE(out->find("] 4/4 loss 0.4\n"), std::string::npos) << *out;
  EXPECT_NE(out->find("  succeeded: "), std::string::npos) << *out;
  EXPECT_NE(out->find("follow-1 succeeded\n"), std::string::npos) << *out;
}

TEST_F(AgentCluster, GangsPriorityPreemptionPendingReasonsAndRefusals) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  StartAgent("gcp-1", "gcp");
  WaitNodesUp(3);
  // No provider has 3 nodes: refused at submit, with the reason.
  fs::path big = dir_ / "big.yaml";
  std::ofstream(big) << "name: big\ncommand: [\"/bin/true\"]\nnodes: 3\n";
  auto refused = Muster({"submit", big.string()});
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("3"), std::string::npos) << refused.status().ToString();

  // A long, low-priority job that checkpoints on request and resumes from MUSTER_RESUME_STEP.
  std::string body = CheckpointingRank(30);
  std::string low = Submit("name: low\n" + Script(body) +
                           "nodes: 2\nranks_per_node: 1\npriority: 0\ncheckpoint:\n  volume: "
                           "ckpt\n");
  ASSERT_TRUE(WaitState(low, "running", 15s)) << Events(low);
  EXPECT_EQ(Status(low)["provider"], "aws") << "the only provider with 2 nodes";
  // A second 2-node job of the same priority waits, and says why.
  std::string same = Submit("name: same\n" + Script("sleep 0.2") + "nodes: 2\nranks_per_node: 1\n");
  ASSERT_TRUE(WaitUntil([&] { return !Status(same).value("pending_reason", "").empty(); }, 10s));
  EXPECT_EQ(State(same), "pending");
  EXPECT_NE(Status(same)["pending_reason"].get<std::string>().find("waiting"), std::string::npos)
      << Status(same).dump();
  // A higher-priority job takes the aws nodes: the low one checkpoints and is requeued.
  std::string high =
      Submit("name: high\n" + Script("sleep 0.5") + "nodes: 2\nranks_per_node: 1\npriority: 10\n");
  ASSERT_TRUE(WaitState(high, "succeeded", 40s)) << Events(high) << Events(low);
  ASSERT_TRUE(WaitState(low, "succeeded", 60s)) << Events(low);
  ASSERT_TRUE(WaitState(same, "succeeded", 60s)) << Events(same);
  auto st = Status(low);
  EXPECT_GE(st["attempt"].get<int>(), 2);
  EXPECT_EQ(st["restarts"], 0) << "preemption is not the job's failure";
  std::string events = Events(low);
  EXPECT_NE(events.find("preempted"), std::string::npos) << events;
  EXPECT_NE(events.find("checkpoint_committed"), std::string::npos) << events;
  auto first = Muster({"logs", low, "--rank", "0", "--attempt", "1"});
  auto last = Muster({"logs", low, "--rank", "0"});
  ASSERT_TRUE(first.ok() && last.ok());
  auto at = first->rfind("MUSTER_CHECKPOINT step=");
  ASSERT_NE(at, std::string::npos) << *first;
  int step = std::atoi(first->c_str() + at + 23);
  EXPECT_NE(last->find("resumed_from=" + std::to_string(step) + "\n"), std::string::npos) << *last;
}

TEST_F(AgentCluster, FirstFailureIsNamedAndTheJobIsRetried) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  WaitNodesUp(2);
  std::string job = Submit(
      "name: flaky\n" +
      Script("if [ \"$MUSTER_ATTEMPT\" = 1 ] && [ \"$RANK\" = 3 ]; then sleep 0.3; exit 7; fi; "
             "sleep 1") +
      "nodes: 2\nranks_per_node: 2\nrestart:\n  max_restarts: 1\n  backoff: 0\n");
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  auto st = Status(job);
  EXPECT_EQ(st["attempt"], 2);
  EXPECT_EQ(st["restarts"], 1);
  std::string events = Events(job);
  EXPECT_NE(events.find("rank 3 on"), std::string::npos) << events;
  EXPECT_NE(events.find("exited 7"), std::string::npos) << events;
  EXPECT_NE(events.find("requeued"), std::string::npos) << events;
}

TEST_F(AgentCluster, APortInUseOnTheMasterNodeIsRetriedOnOtherPortsAndNotCounted) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  WaitNodesUp(2);
  // Some other program holds the MASTER_PORT of the first job's first attempt (seq 1: base +
  // (1 * 7 + 1) % 500): not the job's fault, nor the node's.
  muster::testing::HeldPort held(port_base_ + 8);
  ASSERT_GE(held.fd(), 0);
  std::string job = Submit("name: ports\n" + Script("echo port=$MASTER_PORT; sleep 0.2") +
                           "nodes: 2\nranks_per_node: 1\nrestart:\n  max_restarts: 0\n");
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  auto st = Status(job);
  EXPECT_EQ(st["attempt"], 2);
  EXPECT_EQ(st["restarts"], 0);
  std::string events = Events(job);
  EXPECT_NE(events.find("port " + std::to_string(port_base_ + 8) + " is in use"), std::string::npos)
      << events;
  EXPECT_NE(events.find("retried on other ports"), std::string::npos) << events;
  EXPECT_EQ(events.find("quarantined"), std::string::npos) << events;
}

TEST_F(AgentCluster, CoordinatorKill9DoesNotStopRunningRanks) {
  // A lease long enough for a restart on a loaded machine (the restart must not cost the job
  // an attempt); LeaseStopsRanks... tests the short one.
  coordinator_.reset();
  StartCoordinator(10000);
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  WaitNodesUp(2);
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  // Each rank records its pid, then runs ~5 s.
  std::string job = Submit("name: long\n" +
                           Script("echo $$ > " + marks.string() +
                                  "/$RANK; for s in $(seq 1 25); do echo MUSTER_PROGRESS "
                                  "step=$s total=25; sleep 0.2; done") +
                           "nodes: 2\nranks_per_node: 1\n");
  ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
  ASSERT_TRUE(WaitUntil([&] { return fs::exists(marks / "1"); }, 10s));
  std::string pid1 = ReadFile(marks / "1");
  coordinator_->Signal(SIGKILL);
  coordinator_->Wait(5s);
  coordinator_.reset();
  std::this_thread::sleep_for(500ms);
  StartCoordinator(10000);  // same data dir, same endpoint
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  EXPECT_EQ(Status(job)["attempt"], 1) << "the ranks kept running: no second attempt\n"
                                       << Events(job);
  EXPECT_EQ(ReadFile(marks / "1"), pid1);
}

TEST_F(AgentCluster, AgentKill9IsDetectedAndTheJobMovesToOtherNodes) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  StartAgent("aws-3", "aws");
  WaitNodesUp(3);
  std::string job =
      Submit("name: moving\n" +
             Script("for s in $(seq 1 15); do echo MUSTER_PROGRESS step=$s; sleep 0.2; done") +
             "nodes: 2\nranks_per_node: 1\n");
  ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
  std::string victim = Status(job)["nodes"][1];
  KillAgent(victim);
  ASSERT_TRUE(WaitUntil([&] { return Status(job).value("attempt", 0) == 2; }, 20s)) << Events(job);
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  auto st = Status(job);
  for (auto& n : st["nodes"]) EXPECT_NE(n.get<std::string>(), victim);
  EXPECT_EQ(st["restarts"], 0) << "a lost node is not the job's failure";
  std::string events = Events(job);
  EXPECT_NE(events.find("node_lost"), std::string::npos) << events;
}

// Dead or silent (docs/protocol.md): an agent killed -9 closes its connections, and the
// coordinator declares its node lost at once, without the heartbeat timeout (a minute here, so
// that "well before" is no race) or the lease fence; the job moves on.
TEST_F(AgentCluster, AgentKill9IsDeclaredLostAsSoonAsItsConnectionsClose) {
  coordinator_.reset();
  endpoint_.clear();
  StartCoordinator(/*lease_ms=*/0, /*heartbeat_timeout_ms=*/60000);
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  StartAgent("aws-3", "aws");
  WaitNodesUp(3);
  std::string job = Submit("name: dead\n" +
                           Script("for s in $(seq 1 600); do echo MUSTER_PROGRESS step=$s; "
                                  "sleep 0.1; done") +
                           "nodes: 2\nranks_per_node: 1\n");
  ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
  std::string victim = Status(job)["nodes"][1];
  const auto killed_at = Clock::now();
  KillAgent(victim);
  // 60 s timeout + 30 s fence on the silent path; 20 s leaves a loaded machine room.
  ASSERT_TRUE(WaitUntil([&] { return Status(job).value("attempt", 0) == 2; }, 20s)) << Events(job);
  const double moved_s = std::chrono::duration<double>(Clock::now() - killed_at).count();
  std::string events = Events(job);
  EXPECT_NE(events.find("agent process is gone"), std::string::npos) << events;
  EXPECT_EQ(events.find("no heartbeat for"), std::string::npos) << events;
  ASSERT_TRUE(WaitState(job, "running", 20s)) << Events(job);
  for (auto& n : Status(job)["nodes"]) EXPECT_NE(n.get<std::string>(), victim);
  std::cout << "agent kill -9: attempt 2 placed after " << moved_s << " s\n";
  (void)Muster({"cancel", job});
}

// A rank and every process it started die with their agent (kill -9): the rank by
// PR_SET_PDEATHSIG, what it started by the agent's rank reaper (node_agent/rank_reaper.h).
TEST_F(AgentCluster, ARankAndWhatItStartedDieWithTheirAgent) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  // A process the rank started in the background (it writes nothing, so no SIGPIPE, and
  // ignores SIGPIPE) would outlive both without the reaper.
  std::string job = Submit("name: orphan\n" +
                           Script("trap '' PIPE; sleep 60 & echo $! > " + marks.string() +
                                  "/child; echo $$ > " + marks.string() + "/rank; wait") +
                           "nodes: 1\nranks_per_node: 1\n");
  ASSERT_TRUE(WaitUntil([&] { return !ReadFile(marks / "rank").empty(); }, 15s)) << Events(job);
  ASSERT_TRUE(WaitUntil([&] { return !ReadFile(marks / "child").empty(); }, 5s));
  pid_t rank = std::stoi(ReadFile(marks / "rank"));
  pid_t child = std::stoi(ReadFile(marks / "child"));
  KillAgent("aws-1");
  EXPECT_TRUE(WaitUntil([&] { return muster::testing::ProcessExited(rank); }, 5s))
      << "the rank dies with its agent (SIGKILL, PR_SET_PDEATHSIG)";
  EXPECT_TRUE(WaitUntil([&] { return muster::testing::ProcessExited(child); }, 5s))
      << "what the rank started dies with its agent too (the rank reaper)";
  (void)Muster({"cancel", job});
}

// The pids of this test's rank reapers (`muster rank-reaper --pids <dir_>/...`).
std::vector<pid_t> ReapersUnder(const fs::path& dir) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string cmd = ReadFile(e.path() / "cmdline");
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    if (cmd.find("rank-reaper") != std::string::npos && cmd.find(dir.string()) != std::string::npos)
      out.push_back(std::stoi(name));
  }
  return out;
}

// Without its reaper (killed too), what a rank started outlives its agent until the agent
// starts again: the restarted agent kills it.
TEST_F(AgentCluster, ARestartedAgentKillsTheRanksItsPredecessorLeft) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  std::string job = Submit("name: orphan\n" +
                           Script("trap '' PIPE; sleep 60 & echo $! > " + marks.string() +
                                  "/child; echo $$ > " + marks.string() + "/rank; wait") +
                           "nodes: 1\nranks_per_node: 1\n");
  ASSERT_TRUE(WaitUntil([&] { return !ReadFile(marks / "rank").empty(); }, 15s)) << Events(job);
  ASSERT_TRUE(WaitUntil([&] { return !ReadFile(marks / "child").empty(); }, 5s));
  pid_t rank = std::stoi(ReadFile(marks / "rank"));
  pid_t child = std::stoi(ReadFile(marks / "child"));
  auto reapers = ReapersUnder(dir_);
  ASSERT_EQ(reapers.size(), 1u) << "the agent starts one rank reaper";
  ::kill(reapers[0], SIGKILL);
  ASSERT_TRUE(WaitUntil([&] { return muster::testing::ProcessExited(reapers[0]); }, 5s));
  KillAgent("aws-1");
  EXPECT_TRUE(WaitUntil([&] { return muster::testing::ProcessExited(rank); }, 5s))
      << "the rank dies with its agent (SIGKILL, PR_SET_PDEATHSIG)";
  ASSERT_FALSE(muster::testing::ProcessExited(child))
      << "without the reaper, what the rank started outlives a kill -9 of the agent";
  StartAgent("aws-1", "aws");  // same work dir
  EXPECT_TRUE(WaitUntil([&] { return muster::testing::ProcessExited(child); }, 10s))
      << "the restarted agent stops what its predecessor left running";
  // The agent may log the kill a moment after the child is gone.
  EXPECT_TRUE(WaitUntil(
      [&] {
        return ReadFile(dir_ / "aws-1.log").find("left by a previous agent") != std::string::npos;
      },
      5s))
      << ReadFile(dir_ / "aws-1.log");
  (void)Muster({"cancel", job});
}

TEST_F(AgentCluster, PreemptionNoticeCheckpointsFirstAndTheJobResumesFromThatStep) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  StartAgent("aws-3", "aws");
  WaitNodesUp(3);
  // A rank that "checkpoints" the step it is at when the notice file appears, then exits 3;
  // a resumed attempt starts from MUSTER_RESUME_STEP.
  std::string job = Submit("name: notice\n" + Script(CheckpointingRank(40)) +
                           "nodes: 2\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto st = Status(job);
        return st.contains("progress") && st["progress"].value("step", 0) >= 5;
      },
      10s));
  std::string victim = Status(job)["nodes"][1];
  auto out = Muster({"node", "preempt", victim, "--notice", "10"});
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_NE(out->find(job), std::string::npos) << *out;
  ASSERT_TRUE(WaitState(job, "succeeded", 40s)) << Events(job);
  auto st = Status(job);
  EXPECT_EQ(st["attempt"], 2);
  EXPECT_EQ(st["restarts"], 0);
  EXPECT_EQ(st["preemptions"], 1);
  for (auto& n : st["nodes"]) EXPECT_NE(n.get<std::string>(), victim);
  // Zero lost steps: attempt 2 resumed from the step rank 0 checkpointed on the notice.
  auto first = Muster({"logs", job, "--rank", "0", "--attempt", "1"});
  auto second = Muster({"logs", job, "--rank", "0"});
  ASSERT_TRUE(first.ok() && second.ok());
  auto at = first->find("notice_at=");
  ASSERT_NE(at, std::string::npos) << *first;
  int notice_step = std::atoi(first->c_str() + at + 10);
  EXPECT_NE(second->find("resumed_from=" + std::to_string(notice_step) + "\n"), std::string::npos)
      << *second;
  EXPECT_EQ(st.value("resume_step", -1), notice_step);
  std::string events = Events(job);
  EXPECT_NE(events.find("checkpoint_committed"), std::string::npos) << events;
  EXPECT_NE(events.find("resumed"), std::string::npos) << events;
}

// `muster agent --http`: the agent's own /metrics, scraped over a real socket from the real
// process, shows the ranks it runs (with their real pids), the age of their output and progress,
// and the notice it received. Bound beyond loopback it wants the token of `muster keys init`.
TEST_F(AgentCluster, AgentMetricsShowItsRanksTheirAgesAndNotices) {
  fs::path notice = dir_ / "notice-aws-1";
  StartAgent("aws-1", "aws",
             {"--http", "0.0.0.0:0", "--preempt-file", notice.string(), "--notice", "30"});
  WaitNodesUp(1);
  int port = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        std::string log = ReadFile(dir_ / "aws-1.log");
        auto at = log.find("agent metrics on http://0.0.0.0:");
        if (at == std::string::npos) return false;
        port = std::atoi(log.c_str() + at + std::strlen("agent metrics on http://0.0.0.0:"));
        return port > 0;
      },
      10s))
      << ReadFile(dir_ / "aws-1.log");
  std::string token = ReadFile(dir_ / "keys" / "http_token");
  while (!token.empty() && std::isspace(token.back())) token.pop_back();
  ASSERT_EQ(token.size(), 64u);
  const std::string auth = "Authorization: Bearer " + token + "\r\n";
  EXPECT_EQ(testing::HttpGet(port, "/metrics").code, 401);
  EXPECT_EQ(testing::HttpGet(port, "/metrics", "Authorization: Bearer x\r\n").code, 401);
  EXPECT_EQ(testing::HttpGet(port, "/nowhere", auth).code, 404);
  EXPECT_EQ(testing::HttpGet(port, "/metrics?a=b", auth).code, 400);

  std::string job = Submit("name: watched\n" +
                           Script("echo pid=$$; s=0; while [ $s -lt 600 ]; do s=$((s+1)); "
                                  "echo MUSTER_PROGRESS step=$s total=600; sleep 0.1; done") +
                           "nodes: 1\nranks_per_node: 2\n");
  ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
  // The ranks' own pids, as they printed them.
  std::map<int, std::string> pids;
  ASSERT_TRUE(WaitUntil(
      [&] {
        for (int r = 0; r < 2; ++r) {
          auto log = Muster({"logs", job, "--rank", std::to_string(r)});
          if (!log.ok()) return false;
          auto at = log->find("pid=");
          if (at == std::string::npos) return false;
          pids[r] = log->substr(at + 4, log->find('\n', at) - at - 4);
        }
        return true;
      },
      15s));
  const std::string node = "node=\"aws-1\",provider=\"aws\"";
  const std::string id = node + ",job_id=\"" + job + "\",attempt=\"1\"";
  std::string text;
  auto value = [&](const std::string& series) {
    auto at = text.find(series + " ");
    return at == std::string::npos ? -1.0 : std::atof(text.c_str() + at + series.size() + 1);
  };
  // Published by the agent's reactor every 500 ms: wait for one with both ranks' progress.
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto m = testing::HttpGet(port, "/metrics", auth);
        text = m.body;
        return m.code == 200 &&
               value("muster_agent_rank_last_progress_age_seconds{" + id + ",rank=\"1\"}") >= 0;
      },
      15s))
      << text;
  for (int r = 0; r < 2; ++r) {
    std::string rank = ",rank=\"" + std::to_string(r) + "\"";
    EXPECT_EQ(value("muster_agent_rank_info{" + id + rank + ",pid=\"" + pids[r] +
                    "\",state=\"running\"}"),
              1)
        << text;
    double out_age = value("muster_agent_rank_last_output_age_seconds{" + id + rank + "}");
    double progress_age = value("muster_agent_rank_last_progress_age_seconds{" + id + rank + "}");
    EXPECT_GE(out_age, 0) << text;
    EXPECT_LT(out_age, 5) << text;  // it prints every 100 ms
    EXPECT_GE(progress_age, 0) << text;
    EXPECT_LT(progress_age, 5) << text;
  }
  EXPECT_EQ(value("muster_agent_ranks{" + node + ",state=\"running\"}"), 2) << text;
  EXPECT_EQ(value("muster_agent_replication_copies_in_flight{" + node + "}"), 0) << text;
  EXPECT_EQ(text.find("muster_agent_notices_total{"), std::string::npos) << text;

  // A notice from the node's file source is counted.
  std::ofstream(notice) << "30\n";
  ASSERT_TRUE(WaitUntil(
      [&] {
        text = testing::HttpGet(port, "/metrics", auth).body;
        return value("muster_agent_notices_total{" + node + ",source=\"file\"}") == 1;
      },
      15s))
      << text;
}

// notice_signal: a rank that only checkpoints on a signal (as HF Trainer or Lightning do on
// SIGTERM) gets the notice as that signal, long before the deadline's SIGTERM. SIGUSR1 here, so
// only the notice can have sent it.
TEST_F(AgentCluster, NoticeSignalReachesRanksThatCheckpointOnASignal) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  WaitNodesUp(2);
  std::string rank =
      "s=${MUSTER_RESUME_STEP:-0}; s=${s:-0}; echo resumed_from=$s; "
      "trap '" +
      WriteStep("$s") +
      "echo MUSTER_CHECKPOINT step=$s; echo got_usr1_at=$s; exit 3' USR1; "
      "while [ $s -lt 40 ]; do s=$((s+1)); echo MUSTER_PROGRESS step=$s total=40; sleep 0.1; "
      "done";
  std::string job = Submit("name: sig\n" + Script(rank) +
                           "nodes: 1\nranks_per_node: 1\nnotice_signal: SIGUSR1\n"
                           "checkpoint:\n  volume: ckpt\n");
  ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto st = Status(job);
        return st.contains("progress") && st["progress"].value("step", 0) >= 3;
      },
      10s));
  std::string victim = Status(job)["nodes"][0];
  ASSERT_TRUE(Muster({"node", "preempt", victim, "--notice", "60"}).ok());
  ASSERT_TRUE(WaitState(job, "succeeded", 40s)) << Events(job);
  auto first = Muster({"logs", job, "--rank", "0", "--attempt", "1"});
  auto second = Muster({"logs", job, "--rank", "0"});
  ASSERT_TRUE(first.ok() && second.ok());
  auto at = first->find("got_usr1_at=");
  ASSERT_NE(at, std::string::npos) << *first;
  int step = std::atoi(first->c_str() + at + 12);
  EXPECT_NE(second->find("resumed_from=" + std::to_string(step) + "\n"), std::string::npos)
      << *second;
}

// The other notice sources of an agent: SIGTERM to the agent itself, and a notice file.
TEST_F(AgentCluster, SigtermToTheAgentAndANoticeFileAreNoticesToo) {
  fs::path notice = dir_ / "notice-aws-2";
  StartAgent("aws-1", "aws", {"--notice", "20"});
  StartAgent("aws-2", "aws", {"--preempt-file", notice.string()});
  StartAgent("aws-3", "aws");
  StartAgent("aws-4", "aws");
  WaitNodesUp(4);
  std::string body = CheckpointingRank(40);
  auto job_yaml = [&](const std::string& name, const std::string& hosts) {
    return "name: " + name + "\n" + Script(body) +
           "nodes: 1\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\nplacement:\n  hosts: [" +
           hosts + "]\n";
  };
  // Pinned jobs, so each starts on the node whose notice source is under test.
  std::string a = Submit(job_yaml("on-sigterm", "aws-1"));
  std::string b = Submit(job_yaml("on-file", "aws-2"));
  ASSERT_TRUE(WaitState(a, "running", 15s)) << Events(a);
  ASSERT_TRUE(WaitState(b, "running", 15s)) << Events(b);
  ASSERT_TRUE(WaitUntil([&] { return Status(a).contains("progress"); }, 10s));
  agents_.at("aws-1")->Signal(SIGTERM);
  std::ofstream(notice) << "20\n";
  for (const auto& job : {a, b}) {
    ASSERT_TRUE(WaitUntil([&] { return Status(job).value("preemptions", 0) == 1; }, 20s))
        << Events(job);
  }
  // The SIGTERMed agent exits once its ranks have checkpointed and stopped.
  auto st = agents_.at("aws-1")->Wait(20s);
  ASSERT_TRUE(st.has_value()) << "the agent exits after the notice's work is done";
  agents_.erase("aws-1");
  for (const auto& job : {a, b}) {
    std::string events = Events(job);
    EXPECT_NE(events.find("checkpoint_committed"), std::string::npos) << events;
    EXPECT_NE(events.find("requeued"), std::string::npos) << events;
  }
  EXPECT_NE(ReadFile(dir_ / "aws-2.log").find("preemption notice from file"), std::string::npos);
  EXPECT_NE(ReadFile(dir_ / "aws-1.log").find("SIGTERM"), std::string::npos);
}

// The cloud's own notices, end to end: an agent polling the AWS spot instance-action document
// and one polling the GCP preempted flag (a loopback stand-in for both metadata servers, in
// their documented formats) each checkpoint their job on the notice, and the jobs are requeued.
TEST_F(AgentCluster, CloudMetadataNoticesCheckpointAndRequeueTheirNodesJobs) {
#ifndef MUSTER_HAVE_CURL
  GTEST_SKIP() << "muster was built without libcurl: no metadata notice sources";
#endif
  fs::path meta_out = dir_ / "metadata.out";
  auto meta = Subprocess::Start({"python3", "-u", MUSTER_FAKE_METADATA}, {}, meta_out.string());
  ASSERT_TRUE(meta.ok()) << meta.status();
  std::string port;
  ASSERT_TRUE(WaitUntil(
      [&] {
        std::ifstream in(meta_out);
        std::getline(in, port);
        return !port.empty();
      },
      10s));
  const std::string base = "http://127.0.0.1:" + port;
  StartAgent("aws-1", "aws", {"--aws-metadata", base});
  StartAgent("gcp-1", "gcp", {"--gcp-metadata", base});
  StartAgent("aws-2", "aws");
  StartAgent("gcp-2", "gcp");
  WaitNodesUp(4);
  std::string body = CheckpointingRank(40);
  auto job_yaml = [&](const std::string& name, const std::string& host) {
    return "name: " + name + "\n" + Script(body) +
           "nodes: 1\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\nplacement:\n  hosts: [" +
           host + "]\n";
  };
  std::string a = Submit(job_yaml("on-aws-spot", "aws-1"));
  std::string g = Submit(job_yaml("on-gcp-preempted", "gcp-1"));
  for (const auto& job : {a, g}) {
    ASSERT_TRUE(WaitState(job, "running", 15s)) << Events(job);
    ASSERT_TRUE(WaitUntil([&] { return Status(job).contains("progress"); }, 10s)) << Events(job);
  }
  // A spot interruption two minutes out, and the preempted flag.
  std::time_t at = std::time(nullptr) + 120;
  char when[32];
  std::strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&at));
  auto post = [&](const std::string& which, const std::string& data) {
    auto r = RunCommand({"python3", "-c",
                         "import urllib.request,sys; urllib.request.urlopen("
                         "urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),"
                         " method='POST'), timeout=5)",
                         base + "/control/" + which, data},
                        10s);
    ASSERT_TRUE(r.ok()) << r.status();
  };
  post("aws", std::string("{\"action\": \"terminate\", \"time\": \"") + when + "\"}");
  post("gcp", "TRUE");
  for (const auto& job : {a, g}) {
    ASSERT_TRUE(WaitUntil([&] { return Status(job).value("preemptions", 0) == 1; }, 20s))
        << Events(job);
    std::string events = Events(job);
    EXPECT_NE(events.find("checkpoint_committed"), std::string::npos) << events;
    EXPECT_NE(events.find("requeued"), std::string::npos) << events;
  }
  EXPECT_NE(ReadFile(dir_ / "aws-1.log").find("preemption notice from aws"), std::string::npos);
  EXPECT_NE(ReadFile(dir_ / "gcp-1.log").find("preemption notice from gcp"), std::string::npos);
}

TEST_F(AgentCluster, LeaseStopsRanksWhenTheCoordinatorIsUnreachable) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  std::string job = Submit("name: lease\n" +
                           Script("echo $$ > " + marks.string() +
                                  "/pid; while true; do echo MUSTER_PROGRESS step=1; sleep 0.1; "
                                  "done") +
                           "nodes: 1\nranks_per_node: 1\n");
  ASSERT_TRUE(
      WaitUntil([&] { return fs::exists(marks / "pid") && !ReadFile(marks / "pid").empty(); }, 15s))
      << Events(job);
  pid_t pid = std::stoi(ReadFile(marks / "pid"));
  ASSERT_EQ(kill(pid, 0), 0);
  // The coordinator stops answering (a partition, as the agent sees it).
  coordinator_->Signal(SIGSTOP);
  // lease = 1.5 x heartbeat timeout = 2.25 s; then SIGTERM to the rank.
  bool stopped = WaitUntil([&] { return kill(pid, 0) != 0; }, 8s);
  coordinator_->Signal(SIGCONT);
  EXPECT_TRUE(stopped) << "the rank outlived the agent's lease";
  auto log = ReadFile(dir_ / "aws-1.log");
  EXPECT_NE(log.find("lease"), std::string::npos) << log;
  (void)Muster({"cancel", job});
}

// The step directories of `dir` that look committed (step-N, not step-N.tmp).
std::vector<std::string> StepDirs(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (name.rfind("step-", 0) == 0 && name.find(".tmp") == std::string::npos) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The catalog records only steps that exist: a printed commit of a step that was never written
// (a forged `MUSTER_CHECKPOINT step=999999`) is not reported, and a resume step that is no
// longer good on the volume where the next attempt starts falls back to the newest good one.
TEST_F(AgentCluster, ForgedCommitsAreNotRecordedAndAResumeStepThatIsGoneFallsBack) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path go = dir_ / "go";
  std::string job = Submit(
      "name: forged\n" +
      Script("if [ \"$MUSTER_ATTEMPT\" = 1 ]; then " + WriteStep("3") +
             "echo MUSTER_CHECKPOINT step=3; " + WriteStep("6") +
             "echo MUSTER_CHECKPOINT step=6; echo MUSTER_CHECKPOINT step=999999; "
             "while [ ! -e " +
             go.string() +
             " ]; do sleep 0.05; done; exit 1; fi; echo resumed_from=$MUSTER_RESUME_STEP") +
      "nodes: 1\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\nrestart:\n  max_restarts: 1\n"
      "  backoff: 0\n");
  ASSERT_TRUE(
      WaitUntil([&] { return Events(job).find("step 6 on volume") != std::string::npos; }, 20s))
      << Events(job);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return ReadFile(dir_ / "aws-1.log").find("step=999999, but it is not a good checkpoint") !=
               std::string::npos;
      },
      10s))
      << ReadFile(dir_ / "aws-1.log");
  EXPECT_EQ(Events(job).find("999999"), std::string::npos) << Events(job);
  // Step 6 loses a shard before the next attempt starts from it.
  fs::path step6 = dir_ / "vol-aws" / job / "step-000000006";
  ASSERT_TRUE(fs::remove(step6 / "shard-00000.bin"));
  std::ofstream(go) << "go\n";
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  auto second = Muster({"logs", job, "--rank", "0", "--attempt", "2"});
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE(second->find("resumed_from=3\n"), std::string::npos) << *second << Events(job);
  std::string events = Events(job);
  EXPECT_NE(events.find("resume_fallback"), std::string::npos) << events;
  EXPECT_NE(events.find("resume step 6 is not a good checkpoint"), std::string::npos) << events;
  EXPECT_EQ(Status(job).value("resume_step", -1), 3) << Status(job).dump();
}

// D3's first observation: a forged commit of a step that does not exist, sent on the wire by
// another authorized key posing as an agent of the job's provider, must not make the job
// resume from it. (Whether the coordinator refuses the forgery or records it, the agent that
// starts the next attempt checks the step on its volume.)
TEST_F(AgentCluster, AForgedCommitOnTheWireDoesNotMakeTheJobResumeFromIt) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path go = dir_ / "go";
  std::string job = Submit(
      "name: wire\n" +
      Script("if [ \"$MUSTER_ATTEMPT\" = 1 ]; then " + WriteStep("2") +
             "echo MUSTER_CHECKPOINT step=2; while [ ! -e " + go.string() +
             " ]; do sleep 0.05; done; exit 1; fi; echo resumed_from=$MUSTER_RESUME_STEP") +
      "nodes: 1\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\nrestart:\n  max_restarts: 1\n"
      "  backoff: 0\n");
  ASSERT_TRUE(
      WaitUntil([&] { return Events(job).find("step 2 on volume") != std::string::npos; }, 20s))
      << Events(job);
  // The forger: registers as a node of aws mounting ckpt, then reports step 999999 committed.
  coordinator::ClientOptions co;
  co.endpoint = endpoint_;
  co.keys_dir = (dir_ / "keys").string();
  auto forger = coordinator::CoordinatorClient::Connect(co);
  ASSERT_TRUE(forger.ok()) << forger.status();
  proto::Envelope reg;
  auto* l = reg.mutable_agent_register()->mutable_labels();
  l->set_name("aws-forger");
  l->set_provider("aws");
  auto* v = l->add_volumes();
  v->set_name("ckpt");
  v->set_path("/nonexistent");
  auto registered = (*forger)->Call(reg, 5s);
  if (registered.ok() && registered->has_agent_registered()) {
    proto::Envelope rep;
    auto* r = rep.mutable_agent_report();
    r->set_node("aws-forger");
    r->set_session_id(registered->agent_registered().session_id());
    r->set_job_id(job);
    r->set_attempt(1);
    r->set_checkpoint_step(999999);
    r->set_checkpoint_volume("ckpt");
    (void)(*forger)->Call(rep, 5s);  // refused or recorded: either way it must not matter
  }
  std::ofstream(go) << "go\n";
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  auto second = Muster({"logs", job, "--rank", "0", "--attempt", "2"});
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE(second->find("resumed_from=2\n"), std::string::npos) << *second << Events(job);
  EXPECT_EQ(second->find("999999"), std::string::npos) << *second;
  EXPECT_EQ(Status(job).value("resume_step", -1), 2) << Status(job).dump() << Events(job);
  std::string events = Events(job);
  if (events.find("step 999999 on volume") != std::string::npos) {
    EXPECT_NE(events.find("resume step 999999 is not a good checkpoint"), std::string::npos)
        << events;
  }
}

// checkpoint.keep applies on every volume: the one the job commits to and the other
// provider's, which receives the replicas.
TEST_F(AgentCluster, KeepAppliesOnEveryVolumeReplicasIncluded) {
  StartAgent("aws-1", "aws");
  StartAgent("gcp-1", "gcp");
  WaitNodesUp(2);
  std::string job =
      Submit("name: keep\n" +
             Script("for s in 1 2 3 4 5; do " + WriteStep("$s") +
                    "echo MUSTER_CHECKPOINT step=$s; sleep 0.3; done") +
             "nodes: 1\nranks_per_node: 1\nplacement:\n  providers: [aws]\ncheckpoint:\n"
             "  volume: ckpt\n  keep: 2\n");
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  fs::path aws = dir_ / "vol-aws" / job, gcp = dir_ / "vol-gcp" / job;
  std::vector<std::string> want = {"step-000000004", "step-000000005"};
  EXPECT_TRUE(WaitUntil([&] { return StepDirs(aws) == want; }, 10s))
      << ::testing::PrintToString(StepDirs(aws));
  EXPECT_TRUE(WaitUntil(
      [&] {
        auto got = StepDirs(gcp);
        return !got.empty() && got.back() == "step-000000005" && got.size() <= 2 &&
               fs::exists(gcp / "step-000000005" / "MANIFEST");
      },
      20s))
      << ::testing::PrintToString(StepDirs(gcp)) << Events(job);
}

// A copy to another provider interrupted by a kill -9 of its target is retried once the
// target is back, and each outcome is an event.
TEST_F(AgentCluster, AReplicationInterruptedByKillingItsTargetIsRetried) {
  // Heartbeats may stop for a while without the stopped target being declared lost.
  coordinator_.reset();
  StartCoordinator(40000, 20000);
  StartAgent("aws-1", "aws");
  StartAgent("gcp-1", "gcp");
  WaitNodesUp(2);
  // The target stops before the copy is asked of it, and is killed with the copy undone.
  agents_.at("gcp-1")->Signal(SIGSTOP);
  // The job runs on until the copy is in (the copies of a job that ended are not retried).
  fs::path go = dir_ / "go";
  std::string job = Submit("name: copy\n" +
                           Script("if [ \"$MUSTER_ATTEMPT\" = 1 ]; then " + WriteStep("4") +
                                  "echo MUSTER_CHECKPOINT step=4; fi; while [ ! -e " + go.string() +
                                  " ]; do sleep 0.05; done") +
                           "nodes: 1\nranks_per_node: 1\nplacement:\n  providers: [aws]\n"
                           "checkpoint:\n  volume: ckpt\n");
  ASSERT_TRUE(WaitUntil([&] { return Events(job).find("replicating") != std::string::npos; }, 20s))
      << Events(job);
  KillAgent("gcp-1");
  fs::path replica = dir_ / "vol-gcp" / job / "step-000000004" / "MANIFEST";
  EXPECT_FALSE(fs::exists(replica));
  StartAgent("gcp-1", "gcp");
  ASSERT_TRUE(WaitUntil([&] { return fs::exists(replica); }, 20s)) << Events(job);
  ASSERT_TRUE(
      WaitUntil([&] { return Events(job).find("(verified replica)") != std::string::npos; }, 10s))
      << Events(job);
  std::string events = Events(job);
  EXPECT_NE(events.find("replicate_retry"), std::string::npos) << events;
  EXPECT_NE(events.find("target gcp-1 restarted during the copy"), std::string::npos) << events;
  std::ofstream(go) << "go\n";
}

// The same with a kill -9 of the source: the target's copy fails, and it is retried from the
// restarted source's new endpoint.
TEST_F(AgentCluster, AReplicationInterruptedByKillingItsSourceIsRetried) {
  coordinator_.reset();
  StartCoordinator(40000, 20000);
  StartAgent("aws-1", "aws");
  StartAgent("gcp-1", "gcp");
  WaitNodesUp(2);
  // The target holds the copy until the source is gone.
  agents_.at("gcp-1")->Signal(SIGSTOP);
  // The job runs on until the copy is in (the copies of a job that ended are not retried).
  fs::path go = dir_ / "go";
  std::string job = Submit("name: copy\n" +
                           Script("if [ \"$MUSTER_ATTEMPT\" = 1 ]; then " + WriteStep("4") +
                                  "echo MUSTER_CHECKPOINT step=4; fi; while [ ! -e " + go.string() +
                                  " ]; do sleep 0.05; done") +
                           "nodes: 1\nranks_per_node: 1\nplacement:\n  providers: [aws]\n"
                           "checkpoint:\n  volume: ckpt\n");
  ASSERT_TRUE(WaitUntil([&] { return Events(job).find("replicating") != std::string::npos; }, 20s))
      << Events(job);
  KillAgent("aws-1");
  StartAgent("aws-1", "aws");  // same volume, a new transfer endpoint
  agents_.at("gcp-1")->Signal(SIGCONT);
  fs::path replica = dir_ / "vol-gcp" / job / "step-000000004" / "MANIFEST";
  // The first try waits out its call timeout against the dead endpoint, then fails.
  ASSERT_TRUE(WaitUntil([&] { return fs::exists(replica); }, 60s)) << Events(job);
  ASSERT_TRUE(
      WaitUntil([&] { return Events(job).find("(verified replica)") != std::string::npos; }, 10s))
      << Events(job);
  std::string events = Events(job);
  EXPECT_NE(events.find("replicate_retry"), std::string::npos) << events;
  EXPECT_NE(events.find("failed on gcp-1"), std::string::npos) << events;
  std::ofstream(go) << "go\n";
}

// `muster run` through the coordinator: an interactive job on the agents, with mpirun's output
// and exit semantics.
TEST_F(AgentCluster, MusterRunThroughTheCoordinatorStreamsOutputAndExitsLikeMpirun) {
  StartAgent("aws-1", "aws");
  StartAgent("aws-2", "aws");
  WaitNodesUp(2);
  fs::path out = dir_ / "run.out", err = dir_ / "run.err";
  // stdout to run.out, stderr to run.err.
  auto run = Subprocess::Start(
      {"/bin/sh",
       "-c",
       "exec \"$0\" \"$@\" 2>" + err.string(),
       MUSTER_BIN,
       "run",
       "--coordinator",
       endpoint_,
       "--keys",
       (dir_ / "keys").string(),
       "-np",
       "4",
       "-H",
       "aws-1:2,aws-2:2",
       "--tag-output",
       "-x",
       "GREETING=hello",
       "--",
       "/bin/sh",
       "-c",
       "echo \"$GREETING from $RANK of $WORLD_SIZE on $MUSTER_NODE\"; echo \"warning $RANK\" >&2; "
       "sleep 0.3; if [ $RANK = 2 ]; then exit 5; fi; sleep 5"},
      {}, out.string());
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  auto st = run->Wait(40s);
  ASSERT_TRUE(st.has_value()) << ReadFile(out);
  ASSERT_TRUE(WIFEXITED(*st));
  std::string text = ReadFile(out), errors = ReadFile(err);
  EXPECT_EQ(WEXITSTATUS(*st), 5) << "the first failing rank's code\n" << text << errors;
  for (int r = 0; r < 4; ++r) {
    std::string host = r < 2 ? "aws-1" : "aws-2";
    EXPECT_NE(text.find("[" + std::to_string(r) + "]hello from " + std::to_string(r) + " of 4 on " +
                        host + "\n"),
              std::string::npos)
        << text;
    // Each rank's stderr comes out on ours, and only there, as with a local `muster run`.
    std::string warning = "[" + std::to_string(r) + "]warning " + std::to_string(r) + "\n";
    EXPECT_NE(errors.find(warning), std::string::npos) << errors;
    EXPECT_EQ(text.find(warning), std::string::npos) << text;
  }
  EXPECT_NE(errors.find("rank 2 on aws-2 exited 5"), std::string::npos) << errors;
}

TEST_F(AgentCluster, MusterRunThroughTheCoordinatorCancelsTheJobOnSigint) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  fs::path out = dir_ / "run.out";
  auto run = Subprocess::Start(
      {MUSTER_BIN, "run", "--coordinator", endpoint_, "--keys", (dir_ / "keys").string(), "-np",
       "2", "--", "/bin/sh", "-c",
       "echo $$ > " + marks.string() + "/$RANK; echo started; while true; do sleep 0.1; done"},
      {}, out.string());
  ASSERT_TRUE(run.ok());
  ASSERT_TRUE(WaitUntil([&] { return ReadFile(out).find("started") != std::string::npos; }, 20s))
      << ReadFile(out);
  pid_t rank0 = std::stoi(ReadFile(marks / "0"));
  ::kill(run->pid(), SIGINT);
  auto st = run->Wait(20s);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(WEXITSTATUS(*st), 128 + SIGINT) << ReadFile(out);
  EXPECT_TRUE(WaitUntil([&] { return muster::testing::ProcessExited(rank0); }, 10s))
      << "the agent stopped the ranks of the cancelled job";
}

TEST_F(AgentCluster, MusterRunThroughTheCoordinatorEndsAtItsTimeoutWith124) {
  StartAgent("aws-1", "aws");
  WaitNodesUp(1);
  fs::path out = dir_ / "run.out";
  auto run = Subprocess::Start(
      {MUSTER_BIN, "run", "--coordinator", endpoint_, "--keys", (dir_ / "keys").string(),
       "--timeout", "2", "-np", "1", "--", "/bin/sh", "-c", "echo started; sleep 60"},
      {}, out.string());
  ASSERT_TRUE(run.ok());
  auto st = run->Wait(30s);
  ASSERT_TRUE(st.has_value()) << ReadFile(out);
  ASSERT_TRUE(WIFEXITED(*st));
  EXPECT_EQ(WEXITSTATUS(*st), 124) << ReadFile(out);
  EXPECT_NE(ReadFile(out).find("started\n"), std::string::npos) << ReadFile(out);
  EXPECT_NE(ReadFile(out).find("ran past --timeout 2 s"), std::string::npos) << ReadFile(out);
}

// A chatty rank cannot fill the node's disk: the agent rotates its log (--rank-log-max-mb,
// --rank-log-keep), and `muster logs` reads the current part, which ends with the last line.
TEST_F(AgentCluster, RankLogsAreRotatedAndMusterLogsReadsEveryKeptPartInOrder) {
  StartAgent("aws-1", "aws", {"--rank-log-max-mb", "1", "--rank-log-keep", "1"});
  WaitNodesUp(1);
  // 40000 lines of 101 bytes: about four times the limit.
  std::string job = Submit(
      "name: chatty\n" +
      Script("yes " + std::string(100, 'x') + " | head -n 40000; echo LAST-LINE") + "nodes: 1\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job);
  fs::path logs = dir_ / "agent-aws-1" / "logs" / job / "attempt-1";
  ASSERT_TRUE(fs::exists(logs / "rank-0.log.1")) << "rotated";
  EXPECT_FALSE(fs::exists(logs / "rank-0.log.2")) << "one old part kept";
  EXPECT_LE(fs::file_size(logs / "rank-0.log"), 1u << 20);
  EXPECT_LE(fs::file_size(logs / "rank-0.log.1"), 1u << 20);
  auto log = Muster({"logs", job, "--rank", "0"});
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  // Everything the agent kept, oldest part first (node_agent/log_reader.h), each byte once.
  EXPECT_EQ(*log, ReadFile(logs / "rank-0.log.1") + ReadFile(logs / "rank-0.log"));
  EXPECT_NE(log->find("LAST-LINE"), std::string::npos) << log->substr(0, 200);
  EXPECT_EQ(log->find(std::string(101, 'x')), std::string::npos) << "no torn lines";
}

// A step committed on one provider is copied to the other provider's volume, agent to agent
// over CURVE, with a transfer key that the source revokes once the copy is reported.
TEST_F(AgentCluster, ACommitIsCopiedToTheOtherProviderAndItsTransferKeyRevoked) {
  const fs::path made = dir_ / "made";  // a real committed step 10 that the rank "commits"
  {
    checkpoint::CheckpointerOptions o;
    o.dir = made.string();
    o.block_size = 4096;
    auto ck = checkpoint::Checkpointer::Create(o);
    ASSERT_TRUE(ck.ok()) << ck.status();
    std::vector<int32_t> w(5000, 3);
    checkpoint::SaveState s;
    s.tensors.push_back(
        checkpoint::TensorRef::Replicated("w", checkpoint::DType::kI32, {5000}, w.data()));
    ASSERT_TRUE((*ck)->Save(10, s).ok());
    ASSERT_TRUE((*ck)->Wait().ok());
  }
  StartAgent("aws-1", "aws");
  StartAgent("gcp-1", "gcp");
  WaitNodesUp(2);
  std::string body = "mkdir -p \"$MUSTER_CHECKPOINT_DIR\" && cp -r " +
                     (made / "step-000000010").string() + " " + (made / "LATEST").string() +
                     " \"$MUSTER_CHECKPOINT_DIR\"/ && echo MUSTER_CHECKPOINT step=10 && sleep 60";
  std::string id = Submit("name: copied\n" + Script(body) +
                          "nodes: 1\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n"
                          "placement:\n  hosts: [aws-1]\n");
  const fs::path replica = dir_ / "vol-gcp" / id / "step-000000010" / "MANIFEST";
  ASSERT_TRUE(WaitUntil([&] { return fs::exists(replica); }, 30s)) << Events(id);
  ASSERT_TRUE(
      WaitUntil([&] { return Events(id).find("(verified replica)") != std::string::npos; }, 10s))
      << Events(id);
  EXPECT_EQ(ReadFile(replica), ReadFile(made / "step-000000010" / "MANIFEST"));
  EXPECT_TRUE(WaitUntil(
      [&] { return ReadFile(dir_ / "aws-1.log").find("revoked") != std::string::npos; }, 10s))
      << ReadFile(dir_ / "aws-1.log");
  ASSERT_TRUE(Muster({"cancel", id}).ok());
}

}  // namespace
}  // namespace muster
