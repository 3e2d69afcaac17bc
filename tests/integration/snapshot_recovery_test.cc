// In-memory peer snapshots end to end, on real processes with CURVE: a real `muster
// coordinator`, three real `muster agent`s with snapshot memory, and a 2-node gang of
// muster-snapshot-trainer (tests/runtime/snapshot_trainer.cc) that snapshots every step and
// commits to the volume every 20. The agent of node rank 1 is killed with SIGKILL (its rank dies
// with it); the survivor holds its own rank's frames and, through the peer copy, the dead
// node's. The next attempt runs on the survivor and the spare node: the coordinator resumes it
// from the newest complete snapshot set (newer than the volume's step), the spare's agent fetches
// its rank's frame from the survivor first, and each rank restores its state from its own
// agent's memory, checked value for value by the trainer. At most one step is lost.
//
// The same with the real C++ fine-tune (examples/finetune, where built with libtorch): a 2-node
// gang over Gloo, snapshots every step; after the kill the job resumes from a snapshot, losing at
// most one step, and its final parameters equal those of an uninterrupted run of the same job.

#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "tests/testing/port_range.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::RunCommand;
using testing::Subprocess;
using testing::WaitUntil;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The last `MUSTER_PROGRESS step=N` of a rank's log, and its `T_START ... resume=R source=S`.
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

class SnapshotRecoveryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("snapshots2-recovery-" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "coord");
    fs::create_directories(dir_ / "vol");
    ASSERT_TRUE(RunCommand({MUSTER_BIN, "keys", "init", "--dir", (dir_ / "keys").string()}).ok());
    auto p = Subprocess::Start({MUSTER_BIN, "coordinator", "--data-dir", (dir_ / "coord").string(),
                                "--keys", (dir_ / "keys").string(), "--heartbeat-interval-ms",
                                "100", "--heartbeat-timeout-ms", "1000", "--rendezvous-port-base",
                                std::to_string(ports_.base()), "--listen", "tcp://127.0.0.1:*"},
                               {}, (dir_ / "coord.log").string());
    ASSERT_TRUE(p.ok()) << p.status();
    coordinator_ = std::make_unique<Subprocess>(std::move(*p));
    ASSERT_TRUE(WaitUntil([&] { return fs::exists(dir_ / "coord" / "endpoint"); }, 30s))
        << ReadFile(dir_ / "coord.log");
    endpoint_ = ReadFile(dir_ / "coord" / "endpoint");
    while (!endpoint_.empty() && std::isspace(endpoint_.back())) endpoint_.pop_back();
    for (const std::string& name : AgentNames()) {
      std::vector<std::string> argv = {MUSTER_BIN,
                                       "agent",
                                       "--coordinator",
                                       endpoint_,
                                       "--keys",
                                       (dir_ / "keys").string(),
                                       "--provider",
                                       "aws",
                                       "--name",
                                       name,
                                       "--slots",
                                       "1",
                                       "--gpus",
                                       "0",
                                       "--volume",
                                       "ckpt=" + (dir_ / "vol").string(),
                                       "--work-dir",
                                       (dir_ / name).string(),
                                       "--grace-ms",
                                       "1000",
                                       "--snapshot-memory-mb",
                                       "64"};
      for (const std::string& a : ExtraAgentArgs()) argv.push_back(a);
      auto a = Subprocess::Start(argv, {}, (dir_ / (std::string(name) + ".log")).string());
      ASSERT_TRUE(a.ok()) << a.status();
      agents_[name] = std::make_unique<Subprocess>(std::move(*a));
    }
    ASSERT_TRUE(WaitUntil(
        [&] {
          auto out = Muster({"nodes", "--json"});
          auto j = nlohmann::json::parse(out.ok() ? *out : "", nullptr, false);
          int up = 0;
          if (j.is_array())
            for (auto& n : j) up += n.value("state", "") == "up";
          return up == static_cast<int>(AgentNames().size());
        },
        20s));
  }
  // The agents started (one node each).
  virtual std::vector<std::string> AgentNames() const { return {"n1", "n2", "n3"}; }
  // Flags every agent gets besides those above.
  virtual std::vector<std::string> ExtraAgentArgs() const { return {}; }
  void TearDown() override {
    agents_.clear();
    coordinator_.reset();
    if (!HasFailure()) fs::remove_all(dir_);
  }

  StatusOr<std::string> Muster(std::vector<std::string> args) {
    std::vector<std::string> argv = {MUSTER_BIN};
    argv.insert(argv.end(), args.begin(), args.end());
    for (std::string a : {std::string("--coordinator"), endpoint_, std::string("--keys"),
                          (dir_ / "keys").string()}) {
      argv.push_back(a);
    }
    return RunCommand(argv, 15s);
  }
  nlohmann::json Status(const std::string& job) {
    auto out = Muster({"status", job, "--json"});
    auto j = nlohmann::json::parse(out.ok() ? *out : "", nullptr, false);
    if (j.is_array() && !j.empty()) return j[0];
    return j.is_object() ? j : nlohmann::json::object();
  }
  std::string Events(const std::string& job) {
    auto out = Muster({"events", job});
    return out.ok() ? *out : out.status().ToString();
  }
  // Submits `yaml` as a file; the job id.
  std::string Submit(const std::string& name, const std::string& yaml) {
    std::ofstream(dir_ / (name + ".yaml")) << yaml;
    auto submitted = Muster({"submit", (dir_ / (name + ".yaml")).string()});
    EXPECT_TRUE(submitted.ok()) << submitted.status();
    std::string job = submitted.ok() ? *submitted : "";
    while (!job.empty() && std::isspace(job.back())) job.pop_back();
    return job;
  }
  fs::path RankLogPath(const std::string& node, const std::string& job, int attempt, int rank) {
    return dir_ / node / "logs" / job / ("attempt-" + std::to_string(attempt)) /
           ("rank-" + std::to_string(rank) + ".log");
  }

  fs::path dir_;
  std::string endpoint_;
  muster::testing::PortRange ports_;
  std::unique_ptr<Subprocess> coordinator_;
  std::map<std::string, std::unique_ptr<Subprocess>> agents_;

  // The snapshot trainer's gang, its node rank 1's agent killed past the volume's step 20: the
  // next attempt resumes from in-memory snapshots newer than that. `max_lost`: the most steps
  // lost. `on_running`: called once the first attempt runs, before the kill.
  void KillNineResumesFromPeerSnapshots(
      int64_t max_lost,
      const std::function<void(const std::set<std::string>& gang)>& on_running = nullptr) {
    std::ofstream(dir_ / "job.yaml")
        << "name: snap\ncommand: [" << nlohmann::json(std::string(MUSTER_SNAPSHOT_TRAINER)).dump()
        << "]\nenv:\n  TOTAL: \"100000\"\n  STEP_MS: \"50\"\n  CKPT_EVERY: \"20\"\n"
           "  STATE_KB: \"256\"\nnodes: 2\nranks_per_node: 1\n"
           "restart:\n  max_restarts: 3\n"
           "checkpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n";
    auto submitted = Muster({"submit", (dir_ / "job.yaml").string()});
    ASSERT_TRUE(submitted.ok()) << submitted.status();
    std::string job = *submitted;
    while (!job.empty() && std::isspace(job.back())) job.pop_back();

    // Past the volume's step 20, before its step 40.
    nlohmann::json st;
    ASSERT_TRUE(WaitUntil(
        [&] {
          st = Status(job);
          return st.value("attempt", 0) == 1 && st.contains("progress") &&
                 st["progress"].value("step", 0) >= 27;
        },
        60s))
        << st.dump() << "\n"
        << Events(job);
    ASSERT_EQ(st["nodes"].size(), 2u);
    if (on_running) on_running({st["nodes"][0], st["nodes"][1]});
    const std::string survivor = st["nodes"][0], victim = st["nodes"][1];
    agents_.at(victim)->Signal(SIGKILL);
    agents_.at(victim)->Wait(5s);
    agents_.erase(victim);

    // The next attempt runs on the survivor and the spare, from the snapshots.
    std::string events;
    ASSERT_TRUE(WaitUntil(
        [&] {
          events = Events(job);
          return events.find("in-memory snapshot of attempt 1") != std::string::npos;
        },
        30s))
        << events << "\n"
        << ReadFile(dir_ / "coord.log");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(
        events, m, std::regex(R"(attempt (\d+) resumes from step (\d+) \(in-memory snapshot)")))
        << events;
    const int attempt = std::stoi(m[1]);
    const int64_t step = std::stoll(m[2]);
    EXPECT_GT(step, 20) << "newer than the volume's step\n" << events;
    EXPECT_NE(events.find("the volume has step 20"), std::string::npos) << events;

    // Both ranks restored that step from memory and train on.
    nlohmann::json now;
    ASSERT_TRUE(WaitUntil(
        [&] {
          now = Status(job);
          return now.value("attempt", 0) == attempt && now.contains("progress") &&
                 now["progress"].value("step", 0) > step + 2;
        },
        30s))
        << now.dump() << "\n"
        << events;
    ASSERT_EQ(now["nodes"].size(), 2u);
    for (int rank = 0; rank < 2; ++rank) {
      const std::string node = now["nodes"][rank];
      EXPECT_NE(node, victim);
      RankLog r = ParseRankLog(ReadFile(RankLogPath(node, job, attempt, rank)));
      EXPECT_EQ(r.source, "snapshot") << "rank " << rank << " on " << node;
      EXPECT_EQ(r.resume, step) << "rank " << rank;
    }
    // The spare had nothing: its agent fetched its rank's frame from the survivor.
    const std::string spare = now["nodes"][0] == survivor ? now["nodes"][1] : now["nodes"][0];
    EXPECT_NE(ReadFile(dir_ / (spare + ".log")).find("fetched from peers"), std::string::npos);

    // Lost: what the survivor's rank had done past the resumed step (its gang peer was gone, so
    // it stopped within a step of the kill).
    RankLog before = ParseRankLog(ReadFile(RankLogPath(survivor, job, 1, 0)));
    ASSERT_GT(before.last_step, 0);
    EXPECT_LE(before.last_step - step, max_lost)
        << "attempt 1 reached step " << before.last_step << ", resumed from " << step;
    std::printf("%s\nattempt 1 reached step %lld; attempt %d resumed from %lld on %s (spare %s)\n",
                m[0].str().c_str(), static_cast<long long>(before.last_step), attempt,
                static_cast<long long>(step), survivor.c_str(), spare.c_str());
    (void)Muster({"cancel", job});
  }
};

TEST_F(SnapshotRecoveryTest, AgentKillNineResumesFromPeerSnapshotsLosingAtMostOneStep) {
  KillNineResumesFromPeerSnapshots(1);
}

// The same with `--snapshot-cpu background`: in each real agent process the snapshot threads
// (named snap-*, and the snapshot ZeroMQ contexts' "5/ZMQbg/...") run at SCHED_IDLE and every
// other thread (the reactor, its ZeroMQ threads: heartbeats, the lease, control calls) at the
// normal class; the gang still resumes from the peer's copies. Copies at the background class
// wait for idle CPU, so on a machine busy with other work they may lag: up to 5 steps lost
// here (the volume's interval is 20).
class BackgroundSnapshotRecoveryTest : public SnapshotRecoveryTest {
 protected:
  std::vector<std::string> ExtraAgentArgs() const override {
    return {"--snapshot-cpu", "background"};
  }
};

TEST_F(BackgroundSnapshotRecoveryTest, SnapshotThreadsRunIdleAndTheGangResumesFromThem) {
  KillNineResumesFromPeerSnapshots(5, [&](const std::set<std::string>& gang) {
    for (const auto& [name, agent] : agents_) {
      int snapshot_threads = 0, io_threads = 0, others = 0;
      const fs::path tasks = "/proc/" + std::to_string(agent->pid()) + "/task";
      for (const auto& t : fs::directory_iterator(tasks)) {
        std::string comm = ReadFile(t.path() / "comm");
        while (!comm.empty() && std::isspace(comm.back())) comm.pop_back();
        const int policy = ::sched_getscheduler(std::stoi(t.path().filename().string()));
        if (policy < 0) continue;  // the thread has gone
        if (comm.rfind("snap-", 0) == 0 || comm.rfind("5/ZMQbg/", 0) == 0) {
          ++snapshot_threads;
          io_threads += comm == "5/ZMQbg/IO/0";
          EXPECT_EQ(policy, SCHED_IDLE) << name << ": " << comm;
        } else {
          ++others;
          EXPECT_EQ(policy, SCHED_OTHER) << name << ": " << comm;
        }
      }
      // The accept thread, the forwarder's loop, the peer server's reactor and worker, and the
      // snapshot contexts' I/O threads: the peer server's, and in the gang's agents the
      // forwarder's (its context starts with its first frame).
      const bool in_gang = gang.count(name) > 0;
      EXPECT_GE(snapshot_threads, in_gang ? 6 : 5) << name;
      EXPECT_EQ(io_threads, in_gang ? 2 : 1) << name;
      EXPECT_GT(others, 0) << name;
    }
  });
}

// A 3-node gang (four agents: the fourth takes the lost node's place). Each agent holds its own
// rank and a copy of the previous node rank's, and the coordinator pins a step for the whole gang
// (coordinator/snapshot_pin.h). The middle node's agent is killed with SIGKILL: the survivors and
// the spare resume from in-memory snapshots newer than the volume's step, each rank restoring
// its own frame (the spare's fetched from the survivor that holds the copy).
class ThreeNodeSnapshotRecoveryTest : public SnapshotRecoveryTest {
 protected:
  std::vector<std::string> AgentNames() const override { return {"n1", "n2", "n3", "n4"}; }
};

TEST_F(ThreeNodeSnapshotRecoveryTest, AgentKillNineInAThreeNodeGangResumesFromSnapshots) {
  const std::string job =
      Submit("snap3", "name: snap3\ncommand: [" +
                          nlohmann::json(std::string(MUSTER_SNAPSHOT_TRAINER)).dump() +
                          "]\nenv:\n  TOTAL: \"100000\"\n  STEP_MS: \"50\"\n  CKPT_EVERY: \"20\"\n"
                          "  STATE_KB: \"64\"\nnodes: 3\nranks_per_node: 1\n"
                          "restart:\n  max_restarts: 3\n"
                          "checkpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n");
  ASSERT_FALSE(job.empty());
  nlohmann::json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(job);
        return st.value("attempt", 0) == 1 && st.contains("progress") &&
               st["progress"].value("step", 0) >= 27;
      },
      60s))
      << st.dump() << "\n"
      << Events(job);
  ASSERT_EQ(st["nodes"].size(), 3u);
  const std::string victim = st["nodes"][1];
  agents_.at(victim)->Signal(SIGKILL);
  agents_.at(victim)->Wait(5s);
  agents_.erase(victim);

  std::string events;
  ASSERT_TRUE(WaitUntil(
      [&] {
        events = Events(job);
        return events.find("in-memory snapshot of attempt 1") != std::string::npos ||
               events.find("resumes from step 20 on volume") != std::string::npos;
      },
      30s))
      << events << "\n"
      << ReadFile(dir_ / "coord.log");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      events, m, std::regex(R"(attempt (\d+) resumes from step (\d+) \(in-memory snapshot)")))
      << "fell back to the volume\n"
      << events;
  const int attempt = std::stoi(m[1]);
  const int64_t step = std::stoll(m[2]);
  EXPECT_GT(step, 20) << events;
  nlohmann::json now;
  ASSERT_TRUE(WaitUntil(
      [&] {
        now = Status(job);
        return now.value("attempt", 0) == attempt && now.contains("progress") &&
               now["progress"].value("step", 0) > step + 2;
      },
      30s))
      << now.dump() << "\n"
      << events;
  ASSERT_EQ(now["nodes"].size(), 3u);
  for (int rank = 0; rank < 3; ++rank) {
    const std::string node = now["nodes"][rank];
    EXPECT_NE(node, victim);
    RankLog r = ParseRankLog(ReadFile(RankLogPath(node, job, attempt, rank)));
    EXPECT_EQ(r.source, "snapshot") << "rank " << rank << " on " << node;
    EXPECT_EQ(r.resume, step) << "rank " << rank;
  }
  RankLog before = ParseRankLog(ReadFile(RankLogPath(st["nodes"][0], job, 1, 0)));
  std::printf("%s\nattempt 1 reached step %lld; attempt %d resumed from %lld\n", m[0].str().c_str(),
              static_cast<long long>(before.last_step), attempt, static_cast<long long>(step));
  (void)Muster({"cancel", job});
}

#ifdef MUSTER_FINETUNE_BIN
// The steps a fine-tune rank's log shows it finished ("step N/T" log lines; the MUSTER_PROGRESS
// lines go to the agent on the control channel), where it resumed from, and its MUSTER_DONE.
struct FinetuneLog {
  int64_t last_step = -1, snapshot_resume = -1;
  std::string digest;
};
FinetuneLog ParseFinetuneLog(const std::string& text) {
  FinetuneLog f;
  std::istringstream in(text);
  std::string line;
  static const std::regex step(R"(\| step (\d+)/\d+ )");
  static const std::regex resumed(R"(resumed from the in-memory snapshot of step (\d+))");
  static const std::regex done(R"(MUSTER_DONE step=\d+ .*param_digest=([0-9a-f]+))");
  while (std::getline(in, line)) {
    std::smatch m;
    if (std::regex_search(line, m, step)) {
      f.last_step = std::stoll(m[1]);
    } else if (std::regex_search(line, m, resumed)) {
      f.snapshot_resume = std::stoll(m[1]);
    } else if (std::regex_search(line, m, done)) {
      f.digest = m[1];
    }
  }
  return f;
}

TEST_F(SnapshotRecoveryTest, FinetuneAgentKillNineResumesFromSnapshotsBitIdentical) {
  auto yaml = [](const std::string& name, bool snapshots) {
    return "name: " + name + "\ncommand: [" +
           nlohmann::json(std::string(MUSTER_FINETUNE_BIN)).dump() +
           ", \"--pretrain\", \"--steps\", \"60\", \"--ckpt-every\", \"10\", \"--log-every\", "
           "\"1\", \"--deterministic\", \"--device\", \"cpu\", \"--d-model\", \"32\", "
           "\"--seq-len\", \"32\", \"--batch\", \"8\"]\nnodes: 2\nranks_per_node: 1\n"
           "restart:\n  max_restarts: 3\ncheckpoint:\n  volume: ckpt\n" +
           (snapshots ? "  snapshot_every_steps: 1\n" : "");
  };
  auto finished = [&](const std::string& job, nlohmann::json* st) {
    *st = Status(job);
    const std::string s = st->value("state", "");
    return s == "succeeded" || s == "failed" || s == "cancelled";
  };
  // The uninterrupted run, without snapshots.
  const std::string ref = Submit("ref", yaml("ref", false));
  nlohmann::json st;
  ASSERT_TRUE(WaitUntil([&] { return finished(ref, &st); }, 90s)) << st.dump() << Events(ref);
  ASSERT_EQ(st.value("state", ""), "succeeded") << st.dump() << Events(ref);
  std::string want;
  for (const auto& [name, agent] : agents_) {
    for (int attempt = 1; attempt <= st.value("attempt", 1); ++attempt) {
      FinetuneLog f = ParseFinetuneLog(ReadFile(RankLogPath(name, ref, attempt, 0)));
      if (!f.digest.empty()) want = f.digest;
    }
  }
  ASSERT_EQ(want.size(), 16u) << "no MUSTER_DONE in the reference run's rank-0 log";

  // The same job with snapshots every step, its node-rank-1 agent killed past the volume's step
  // 10 and before its step 20.
  const std::string job = Submit("ftsnap", yaml("ftsnap", true));
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(job);
        return st.contains("progress") && st["progress"].value("step", 0) >= 13;
      },
      60s))
      << st.dump() << "\n"
      << Events(job);
  const int interrupted = st.value("attempt", 0);
  ASSERT_EQ(st["nodes"].size(), 2u);
  const std::string survivor = st["nodes"][0], victim = st["nodes"][1];
  agents_.at(victim)->Signal(SIGKILL);
  agents_.at(victim)->Wait(5s);
  agents_.erase(victim);

  std::string events;
  ASSERT_TRUE(WaitUntil(
      [&] {
        events = Events(job);
        return events.find("(in-memory snapshot") != std::string::npos;
      },
      30s))
      << events << "\n"
      << ReadFile(dir_ / "coord.log");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      events, m, std::regex(R"(attempt (\d+) resumes from step (\d+) \(in-memory snapshot)")))
      << events;
  const int attempt = std::stoi(m[1]);
  const int64_t step = std::stoll(m[2]);
  EXPECT_GT(step, 10) << "newer than the volume's step\n" << events;

  ASSERT_TRUE(WaitUntil([&] { return finished(job, &st); }, 90s)) << st.dump() << Events(job);
  ASSERT_EQ(st.value("state", ""), "succeeded") << st.dump() << Events(job);
  ASSERT_EQ(st.value("attempt", 0), attempt) << "one restart, from the snapshot\n" << Events(job);
  ASSERT_EQ(st["nodes"].size(), 2u);
  std::string got;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string node = st["nodes"][rank];
    EXPECT_NE(node, victim);
    FinetuneLog f = ParseFinetuneLog(ReadFile(RankLogPath(node, job, attempt, rank)));
    EXPECT_EQ(f.snapshot_resume, step) << "rank " << rank << " on " << node;
    if (rank == 0) got = f.digest;
  }
  EXPECT_EQ(got, want) << "the resumed run's final parameters differ from the uninterrupted run's";

  FinetuneLog before = ParseFinetuneLog(ReadFile(RankLogPath(survivor, job, interrupted, 0)));
  ASSERT_GT(before.last_step, 0);
  EXPECT_LE(before.last_step - step, 1) << "attempt " << interrupted << " reached step "
                                        << before.last_step << ", resumed from " << step;
  std::printf("%s\nattempt %d reached step %lld; attempt %d resumed from %lld; digest %s\n",
              m[0].str().c_str(), interrupted, static_cast<long long>(before.last_step), attempt,
              static_cast<long long>(step), got.c_str());
}
#endif  // MUSTER_FINETUNE_BIN

}  // namespace
}  // namespace muster
