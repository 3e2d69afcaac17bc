// In-memory peer snapshots (node_agent/snapshots/) on a cluster of network namespaces: a real
// `muster coordinator` on host 0 and three real `muster agent`s (CURVE, 64 MiB of snapshot
// memory each, a shared volume) on n1..n3. A 2-node gang of muster-snapshot-trainer
// (tests/runtime/snapshot_trainer.cc) snapshots every step and commits to the volume every 20.
//
//   - One gang host crashes (every process in its namespace killed with SIGKILL: its agent and
//     its rank). The survivor holds its own rank's frames and, through the peer copy, the dead
//     node's. The next attempt runs on the survivor and n3: it must resume from the newest
//     complete snapshot set, the new node's agent fetching its rank's frame across the network
//     from the survivor, lose at most one step, and never resume from the volume.
//   - Both gang hosts crash, so the lost node's peer copy is gone too; one of them comes back
//     with an empty agent. The next attempt must resume from the volume, with an event saying
//     why the snapshots were not used.
//   - The frames exist but the ranks cannot restore them (the program's state changed size):
//     that attempt costs one restart, and the next resumes from the volume.
//
// Needs root (network namespaces); skips otherwise. Run under `flock /tmp/muster-netns.lock`.

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
using Clock = std::chrono::steady_clock;

const std::vector<std::string> kHosts = {"coord", "n1", "n2", "n3"};
constexpr int kPort = 7072;

// A rank's `T_START ... resume=R source=S` and its last `MUSTER_PROGRESS step=N`.
struct RankLog {
  int64_t last_step = -1, resume = -1;
  std::string source;
};
RankLog ParseRankLog(const std::string& text) {
  RankLog r;
  std::istringstream in(text);
  std::string line;
  static const std::regex start(R"(T_START=\d+ resume=(\d+) source=(\w+))");
  static const std::regex progress(R"(MUSTER_PROGRESS step=(\d+))");
  while (std::getline(in, line)) {
    std::smatch m;
    if (std::regex_search(line, m, start)) {
      r.resume = std::stoll(m[1]);
      r.source = m[2];
    } else if (std::regex_search(line, m, progress)) {
      r.last_step = std::stoll(m[1]);
    }
  }
  return r;
}

class SnapshotClusterTest : public MusterClusterTest {
 protected:
  SnapshotClusterTest() : MusterClusterTest(kHosts, kPort, "snapshot-cluster") {}

  void SetUp() override {
    MusterClusterTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    fs::create_directories(root_ / "vol");
    StartCoordinator();
    for (int h = 1; h <= 3; ++h) StartAgent(h);
    ASSERT_TRUE(WaitUntil([&] { return NodesUp() == 3; }, 30s)) << Logs();
  }

  // One shared volume, a short grace, and 64 MiB of snapshot memory per agent.
  std::vector<std::string> AgentFlags(int /*host*/) const override {
    return {"--provider",
            "aws",
            "--volume",
            "ckpt=" + (root_ / "vol").string(),
            "--grace-ms",
            "1000",
            "--snapshot-memory-mb",
            "64"};
  }

  // The host crashed: its agent and its ranks, everything in its namespace, die with SIGKILL.
  void Crash(const std::string& node) {
    auto killed = net_->KillAll(HostOf(node));
    ASSERT_TRUE(killed.ok()) << killed.status();
    ASSERT_GE(*killed, 1);
    agents_.at(node).Wait(5s);
    agents_.erase(node);
  }

  fs::path RankLogPath(const std::string& node, const std::string& job, int attempt, int rank) {
    return WorkDir(node) / "logs" / job / ("attempt-" + std::to_string(attempt)) /
           ("rank-" + std::to_string(rank) + ".log");
  }

  // Submits the snapshot trainer's job and waits until attempt 1 is past the volume's step 20.
  // Returns the job id and fills `st` with its status.
  // `command`: the job's command (default: the trainer).
  std::string SubmitAndRunPastStep20(json& st, json command = json()) {
    if (command.is_null()) command = json::array({std::string(MUSTER_SNAPSHOT_TRAINER)});
    fs::path spec = root_ / "snap.yaml";
    std::ofstream(spec) << "name: snap\ncommand: " << command
                        << "\nenv:\n  TOTAL: \"100000\"\n  STEP_MS: \"50\"\n"
                           "  CKPT_EVERY: \"20\"\n  STATE_KB: \"256\"\n"
                           "nodes: 2\nranks_per_node: 1\nrestart:\n  max_restarts: 3\n"
                           "  backoff: 1s\n"
                           "checkpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n";
    std::string job = Submit(spec);
    if (job.empty()) return "";
    bool past = WaitUntil(
        [&] {
          st = JobStatus(job);
          return st.value("attempt", 0) == 1 && st.contains("progress") &&
                 st["progress"].value("step", 0) >= 24 &&
                 Events(job).find("checkpoint_committed") != std::string::npos;
        },
        60s);
    EXPECT_TRUE(past) << st.dump() << "\n" << Events(job) << Logs();
    EXPECT_EQ(st["nodes"].size(), 2u) << st.dump();
    return past && st["nodes"].size() == 2 ? job : "";
  }
};

TEST_F(SnapshotClusterTest, AHostCrashResumesFromThePeerSnapshotFetchedAcrossTheNetwork) {
  json st;
  const std::string job = SubmitAndRunPastStep20(st);
  ASSERT_FALSE(job.empty());
  const std::string survivor = st["nodes"][0], victim = st["nodes"][1];
  Crash(victim);
  const auto crashed_at = Clock::now();

  std::string events;
  ASSERT_TRUE(WaitUntil(
      [&] {
        events = Events(job);
        return events.find("in-memory snapshot of attempt 1") != std::string::npos;
      },
      30s))
      << events << "\n"
      << Logs();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      events, m, std::regex(R"(attempt (\d+) resumes from step (\d+) \(in-memory snapshot)")))
      << events;
  const int attempt = std::stoi(m[1]);
  const int64_t step = std::stoll(m[2]);
  EXPECT_GE(step, 20) << events;
  EXPECT_FALSE(std::regex_search(events, std::regex(R"(resumes from step \d+ on volume)")))
      << "no attempt resumes from the volume\n"
      << events;

  // Both ranks restored that step from memory and train on.
  json now;
  ASSERT_TRUE(WaitUntil(
      [&] {
        now = JobStatus(job);
        return now.value("attempt", 0) == attempt && now.contains("progress") &&
               now["progress"].value("step", 0) > step + 2;
      },
      30s))
      << now.dump() << "\n"
      << Events(job) << Logs();
  const double took = std::chrono::duration<double>(Clock::now() - crashed_at).count();
  ASSERT_EQ(now["nodes"].size(), 2u);
  std::string moved;  // the node that took the crashed host's rank
  for (int rank = 0; rank < 2; ++rank) {
    const std::string node = now["nodes"][rank];
    EXPECT_NE(node, victim);
    if (node != survivor) moved = node;
    RankLog r = ParseRankLog(ReadFileText(RankLogPath(node, job, attempt, rank)));
    EXPECT_EQ(r.source, "snapshot") << "rank " << rank << " on " << node;
    EXPECT_EQ(r.resume, step) << "rank " << rank << " on " << node;
  }
  ASSERT_FALSE(moved.empty()) << now.dump();
  events = Events(job);
  EXPECT_EQ(now.value("restarts", -1), 0) << "a lost node costs no restart\n" << events;
  EXPECT_EQ(events.find("rank_failed"), std::string::npos) << events;
  // It held nothing of the job: its agent fetched the frame over the bridge from the survivor.
  EXPECT_NE(ReadFileText(root_ / (moved + ".log")).find("fetched from peers"), std::string::npos)
      << Logs();
  EXPECT_NE(events.find("on nodes " + survivor), std::string::npos) << events;

  // Lost: what the survivor's rank did past the resumed step (it stopped within a step of the
  // crash: its gang peer was gone).
  RankLog before = ParseRankLog(ReadFileText(RankLogPath(survivor, job, 1, 0)));
  ASSERT_GT(before.last_step, 0);
  EXPECT_LE(before.last_step - step, 1)
      << "attempt 1 reached step " << before.last_step << ", resumed from " << step;
  std::cout << m[0].str() << "; attempt 1 reached step " << before.last_step << "; " << victim
            << " crashed, attempt " << attempt << " on " << survivor << "+" << moved
            << " trained on after " << took << " s\n";
  ASSERT_TRUE(Muster({"cancel", job}).ok());
}

TEST_F(SnapshotClusterTest, WhenBothHoldersOfALostRanksFramesAreGoneTheJobResumesFromTheVolume) {
  json st;
  const std::string job = SubmitAndRunPastStep20(st);
  ASSERT_FALSE(job.empty());
  const std::string a = st["nodes"][0], b = st["nodes"][1];
  Crash(a);
  Crash(b);
  // One host comes back with an empty agent: with n3 the gang has 2 nodes again, and no frame
  // of the job is in any memory.
  StartAgent(HostOf(b));

  std::string events;
  std::smatch m;
  static const std::regex resumed(R"(attempt (\d+) resumes from step (\d+) on volume ckpt[^\n]*)");
  ASSERT_TRUE(WaitUntil(
      [&] {
        events = Events(job);
        return std::regex_search(events, m, resumed);
      },
      40s))
      << events << "\n"
      << Logs();
  const int attempt = std::stoi(m[1]);
  const int64_t step = std::stoll(m[2]);
  const std::string line = m[0];
  EXPECT_GE(step, 20) << events;
  EXPECT_EQ(step % 20, 0) << events;
  EXPECT_EQ(events.find("in-memory snapshot of attempt"), std::string::npos) << events;
  // The event says why the snapshots were not used.
  EXPECT_NE(line.find("no in-memory snapshots survive"), std::string::npos) << line;

  json now;
  ASSERT_TRUE(WaitUntil(
      [&] {
        now = JobStatus(job);
        return now.value("attempt", 0) == attempt && now.contains("progress") &&
               now["progress"].value("step", 0) > step + 2;
      },
      30s))
      << now.dump() << "\n"
      << Events(job) << Logs();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string node = now["nodes"][rank];
    RankLog r = ParseRankLog(ReadFileText(RankLogPath(node, job, attempt, rank)));
    EXPECT_EQ(r.source, "volume") << "rank " << rank << " on " << node;
    EXPECT_EQ(r.resume, step) << "rank " << rank << " on " << node;
  }
  EXPECT_EQ(now.value("restarts", -1), 0) << "lost nodes are not the job's fault\n" << now.dump();
  std::cout << line << "\n";
  ASSERT_TRUE(Muster({"cancel", job}).ok());
}

// The snapshot exists but cannot be restored: from attempt 2 on the program's state has another
// size (a new program version), so each rank's restore is refused (exit 7). That attempt costs
// one restart; the next one must resume from the volume, not try the same frames again.
TEST_F(SnapshotClusterTest, ASnapshotThatCannotBeRestoredCostsOneRestartThenTheVolumeIsUsed) {
  json st;
  const std::string trainer = MUSTER_SNAPSHOT_TRAINER;
  const std::string job = SubmitAndRunPastStep20(
      st, json::array({"/bin/sh", "-c",
                       "if [ \"$MUSTER_ATTEMPT\" != 1 ]; then export STATE_KB=128; fi; exec '" +
                           trainer + "'"}));
  ASSERT_FALSE(job.empty());
  Crash(st["nodes"][1]);

  std::string events;
  std::smatch m;
  static const std::regex resumed(R"(attempt (\d+) resumes from step (\d+) on volume ckpt[^\n]*)");
  ASSERT_TRUE(WaitUntil(
      [&] {
        events = Events(job);
        return std::regex_search(events, m, resumed);
      },
      40s))
      << events << "\n"
      << Logs();
  const int attempt = std::stoi(m[1]);
  const int64_t step = std::stoll(m[2]);
  const std::string line = m[0];
  EXPECT_EQ(attempt, 3) << events;
  EXPECT_NE(events.find("attempt 2 resumes from step"), std::string::npos) << events;
  EXPECT_NE(events.find("(in-memory snapshot of attempt 1"), std::string::npos) << events;
  EXPECT_NE(events.find("exited 7"), std::string::npos) << events;
  EXPECT_NE(events.find("snapshot_resume_failed"), std::string::npos) << events;
  EXPECT_NE(line.find("the snapshot resume of attempt 2"), std::string::npos) << line;

  json now;
  ASSERT_TRUE(WaitUntil(
      [&] {
        now = JobStatus(job);
        return now.value("attempt", 0) == attempt && now.contains("progress") &&
               now["progress"].value("step", 0) > step + 2;
      },
      30s))
      << now.dump() << "\n"
      << Events(job) << Logs();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string node = now["nodes"][rank];
    RankLog r = ParseRankLog(ReadFileText(RankLogPath(node, job, attempt, rank)));
    EXPECT_EQ(r.source, "volume") << "rank " << rank << " on " << node;
    EXPECT_EQ(r.resume, step) << "rank " << rank << " on " << node;
  }
  EXPECT_EQ(now.value("restarts", -1), 1) << "only the failed snapshot resume's\n" << Events(job);
  std::cout << line << "\n";
  ASSERT_TRUE(Muster({"cancel", job}).ok());
}

}  // namespace
}  // namespace muster::testing
