// Survive preemption across providers, on a cluster of network namespaces: a real
// `muster coordinator` on one host and four real `muster agent`s on others, two on provider aws
// and two on gcp. Each provider's agents share one volume directory (a per-provider shared
// filesystem), each agent has its own work dir, and everything speaks CURVE with the keys of
// `muster keys init`. The job is the real C++ fine-tune (examples/finetune), 2 nodes x 1 rank,
// submitted with `muster submit`; outcomes are read from `muster status --json`,
// `muster events` and the ranks' own log lines (MUSTER_PROGRESS, MUSTER_CHECKPOINT step=N,
// MUSTER_PREEMPTED step=N, MUSTER_DONE ... param_digest=...).
//
// Scenarios:
//   a. a preemption notice (`muster node preempt`): the job resumes at exactly the step it was
//      preempted at, on the other provider;
//   b. kill -9 of an agent: the job is requeued and resumes from its last commit, losing at
//      most the checkpoint interval, not counted against max_restarts;
//   c. a node's link cut: the node is declared lost, its own agent stops its ranks when its
//      lease runs out (while still cut off), and the job resumes elsewhere;
//   d. all of a provider lost: the job resumes on the other provider from the newest step
//      replicated there;
//   e. the coordinator killed with SIGKILL mid-job and restarted on its data dir: the job
//      completes, its ranks never restarted;
//   f. a deterministic job interrupted by (a) and (d) ends bit-identical (param_digest) to an
//      uninterrupted run of the same job.
//
// (a), (d) and (f) also run with the PyTorch example (examples/pytorch_ddp/train.py on the
// `muster` package: muster.save/load, the notice through muster.notice_seen, commits announced by
// the library) in place of the C++ fine-tune.
//
// Needs root (network namespaces) and the fine-tune example (libtorch), or Debian's
// python3-torch and the `muster` package for the PyTorch runs; skips otherwise.

#include <gtest/gtest.h>
#include <signal.h>
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
#include "tests/testing/wait_until.h"

namespace muster::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Host 0 runs the coordinator; hosts 1..4 the agents.
constexpr int kCoordHost = 0;
const std::vector<std::string> kHosts = {"coord", "aws-0", "aws-1", "gcp-0", "gcp-1"};
constexpr int kPort = 7070;
constexpr int kCheckpointEvery = 10;

std::string Provider(const std::string& node) { return node.substr(0, node.find('-')); }

std::string Tail(const std::string& s, size_t n = 3000) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

// The cluster has no push channel to a test: WaitUntil (tests/testing/wait_until.h) polls its
// state (`muster status` and the logs), at most every 50 ms.

// Every `step=N` of lines starting with `tag`, in order.
std::vector<int> Steps(const std::string& log, const std::string& tag) {
  std::vector<int> out;
  std::regex re("(^|\\n)" + tag + " step=(\\d+)");
  for (auto it = std::sregex_iterator(log.begin(), log.end(), re); it != std::sregex_iterator();
       ++it) {
    out.push_back(std::stoi((*it)[2]));
  }
  return out;
}
int LastStep(const std::string& log, const std::string& tag) {
  auto s = Steps(log, tag);
  return s.empty() ? -1 : s.back();
}
std::string Digest(const std::string& log) {
  std::smatch m;
  if (std::regex_search(log, m, std::regex("MUSTER_DONE step=\\d+ .*param_digest=(\\w+)"))) {
    return m[1];
  }
  return "";
}

enum class Program { kFinetune, kPytorch };

struct JobOptions {
  std::string name = "ft";
  int steps = 120;
  bool deterministic = false;
  Program program = Program::kFinetune;
  // train.py only: seconds slept after each step (the result does not change), so that a
  // status-paced notice lands mid-run although a step of the tiny model takes milliseconds.
  double step_delay = 0;
};

// The PyTorch example's command line under Debian's python3 (python3-torch); the same tiny model
// sizes as the fine-tune's. It always runs deterministically (fixed seeds, Gloo on CPU, one
// thread, torch.use_deterministic_algorithms).
std::vector<std::string> PytorchArgv(const JobOptions& o) {
  return {MUSTER_SYSTEM_PYTHON,
          MUSTER_PYTORCH_TRAIN,
          "--steps",
          std::to_string(o.steps),
          "--ckpt-every",
          std::to_string(kCheckpointEvery),
          "--log-every",
          "1",
          "--threads",
          "1",
          "--batch",
          "8",
          "--d-model",
          "32",
          "--layers",
          "1",
          "--seq-len",
          "32",
          "--step-delay",
          std::to_string(o.step_delay)};
}

// The fine-tune's command line: a tiny model so that a step takes milliseconds on 2 cores.
std::vector<std::string> FinetuneArgv(const JobOptions& o) {
  if (o.program == Program::kPytorch) return PytorchArgv(o);
  std::vector<std::string> argv = {MUSTER_FINETUNE_BIN, "--pretrain",
                                   "--steps",           std::to_string(o.steps),
                                   "--ckpt-every",      std::to_string(kCheckpointEvery),
                                   "--log-every",       "1",
                                   "--threads",         "1",
                                   "--batch",           "8",
                                   "--d-model",         "32",
                                   "--layers",          "2",
                                   "--seq-len",         "32"};
  if (o.deterministic) argv.push_back("--deterministic");
  return argv;
}

class PreemptionClusterTest : public MusterClusterTest {
 protected:
  PreemptionClusterTest() : MusterClusterTest(kHosts, kPort, "cluster") {}

  void SetUp() override {
    if (program_ == Program::kFinetune && !fs::exists(MUSTER_FINETUNE_BIN)) {
      GTEST_SKIP() << "the fine-tune example was not built (libtorch not found): "
                   << MUSTER_FINETUNE_BIN;
    }
    if (program_ == Program::kPytorch) {
      if (!fs::exists(MUSTER_PYTHON_PACKAGE)) {
        GTEST_SKIP() << "the muster Python package was not built: " << MUSTER_PYTHON_PACKAGE;
      }
      if (!RunCommand({MUSTER_SYSTEM_PYTHON, "-c", "import torch.distributed"}, 60s).ok()) {
        GTEST_SKIP() << MUSTER_SYSTEM_PYTHON << " has no torch.distributed (python3-torch)";
      }
    }
    MusterClusterTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    for (const char* p : {"aws", "gcp"}) fs::create_directories(Volume(p));
    StartCoordinator();
    for (size_t i = 1; i < kHosts.size(); ++i) StartAgent(static_cast<int>(i));
    ASSERT_TRUE(WaitUntil([&] { return NodesUp() == static_cast<int>(kHosts.size()) - 1; }, 30s))
        << "agents did not register\n"
        << Logs();
  }

  // ---- the cluster

  std::string Volume(const std::string& provider) const {
    return (root_ / ("volume-" + provider)).string();
  }

  void StartCoordinator() {
    MusterClusterTest::StartCoordinator("coordinator.log", heartbeat_timeout_ms_);
  }

  // Each provider's agents share its volume; a 10 s notice and a 2 s grace.
  std::vector<std::string> AgentFlags(int host) const override {
    const std::string& name = kHosts[host];
    return {"--provider", Provider(name),
            "--region",   Provider(name) == "aws" ? "us-east-1" : "us-central1",
            "--volume",   "ckpt=" + Volume(Provider(name)),
            "--notice",   "10",
            "--grace-ms", "2000"};
  }

  // `muster events JOB`, one line each: "<date> <time>  <kind> [<node>]  <message>".
  std::vector<std::string> Events(const std::string& job) {
    auto out = Muster({"events", job});
    std::vector<std::string> lines;
    if (!out.ok()) return lines;
    std::istringstream in(*out);
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    return lines;
  }
  std::string EventText(const std::string& job) {
    std::string s;
    for (const auto& l : Events(job)) s += l + "\n";
    return s;
  }
  // The first capture group of `re` in every event line of `kind` that matches it.
  std::vector<std::string> EventFields(const std::string& job, const std::string& kind,
                                       const std::string& re) {
    std::vector<std::string> out;
    std::regex k("^\\S+ \\S+  " + kind + "( \\[[^\\]]+\\])?  ");
    std::regex r(re);
    for (const auto& l : Events(job)) {
      std::smatch m;
      if (!std::regex_search(l, k)) continue;
      if (std::regex_search(l, m, r)) out.push_back(m.size() > 1 ? m[1].str() : m[0].str());
    }
    return out;
  }

  // The newest step replicated to `provider`'s volume that the coordinator had recorded when it
  // logged the line matching `until` (-1: none).
  int NewestReplicaBefore(const std::string& job, const std::string& provider,
                          const std::string& until) {
    std::regex replica(
        "  checkpoint_committed \\[[^\\]]+\\]  step (\\d+) on volume ckpt of provider " + provider +
        " \\(verified replica\\)");
    std::regex stop(until);
    int newest = -1;
    for (const auto& l : Events(job)) {
      if (std::regex_search(l, stop)) break;
      std::smatch m;
      if (std::regex_search(l, m, replica)) newest = std::max(newest, std::stoi(m[1]));
    }
    return newest;
  }

  void Drain(const std::string& node, bool drain) {
    auto out = Muster({"node", drain ? "drain" : "undrain", node});
    ASSERT_TRUE(out.ok()) << out.status();
  }

  std::string Submit(const JobOptions& o) {
    fs::path spec = root_ / (o.name + ".yaml");
    std::ofstream f(spec);
    f << "name: " << o.name << "\n"
      << "command: [";
    auto argv = FinetuneArgv(o);
    for (size_t i = 0; i < argv.size(); ++i) f << (i ? ", " : "") << "\"" << argv[i] << "\"";
    f << "]\n"
      << "env:\n  MUSTER_LOG_LEVEL: info\n"
      << "nodes: 2\nranks_per_node: 1\n"
      << "checkpoint:\n  volume: ckpt\n  every: " << kCheckpointEvery << "\n  keep: 50\n"
      << "restart:\n  max_restarts: 2\n  backoff: 1s\n";
    f.close();
    auto out = Muster({"submit", spec.string()});
    EXPECT_TRUE(out.ok()) << out.status();
    if (!out.ok()) return "";
    std::string id = *out;
    while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
    return id;
  }

  // The log of global rank `rank` of `job`'s attempt, from whichever agent ran it, and that
  // agent's name; "" when no agent has it (yet).
  std::string RankLog(const std::string& job, int attempt, int rank, std::string* node = nullptr) {
    for (size_t i = 1; i < kHosts.size(); ++i) {
      fs::path p = WorkDir(kHosts[i]) / "logs" / job / ("attempt-" + std::to_string(attempt)) /
                   ("rank-" + std::to_string(rank) + ".log");
      if (fs::exists(p)) {
        if (node) *node = kHosts[i];
        return ReadFileText(p);
      }
    }
    return "";
  }

  // Waits until rank 0 of the attempt has reported progress at `step` or later.
  bool WaitForStep(const std::string& job, int attempt, int step, std::chrono::seconds timeout) {
    return WaitUntil([&] { return LastStep(RankLog(job, attempt, 0), "MUSTER_PROGRESS") >= step; },
                     timeout);
  }

  // Waits until the job is in `state` (and, if given, at `attempt`); returns its status.
  json WaitForState(const std::string& job, const std::string& state, std::chrono::seconds timeout,
                    int attempt = 0) {
    json st;
    WaitUntil(
        [&] {
          st = JobStatus(job);
          return st.value("state", "") == state &&
                 (attempt == 0 || st.value("attempt", 0) == attempt);
        },
        timeout);
    return st;
  }

  // Waits for the job to be running attempt `attempt`; returns the provider it runs on.
  std::string WaitForAttempt(const std::string& job, int attempt, std::chrono::seconds timeout) {
    json st;
    WaitUntil(
        [&] {
          st = JobStatus(job);
          return st.value("attempt", 0) >= attempt &&
                 (st.value("state", "") == "running" || st.value("state", "") == "succeeded");
        },
        timeout);
    EXPECT_EQ(st.value("attempt", 0), attempt) << st.dump(2) << "\n" << EventText(job);
    return st.value("provider", "");
  }

  std::vector<std::string> NodesOf(const json& st) {
    std::vector<std::string> out;
    for (const auto& n : st.value("nodes", json::array())) out.push_back(n.get<std::string>());
    return out;
  }

  // Every process in host `host`'s namespace other than its agent.
  std::vector<int> StrayPids(int host) {
    auto pids = net_->Pids(host);
    std::vector<int> out;
    if (!pids.ok()) return out;
    auto it = agents_.find(kHosts[host]);
    for (int pid : *pids) {
      if (it != agents_.end() && pid == it->second.pid()) continue;
      // The agent's rank reaper (node_agent/rank_reaper.h) is the agent's, not a rank.
      if (ReadFileText("/proc/" + std::to_string(pid) + "/cmdline").find("rank-reaper") !=
          std::string::npos)
        continue;
      out.push_back(pid);
    }
    return out;
  }

  // A node is lost after this long without heartbeats; agents stop their ranks after 1.5x
  // (the lease). Short, so that failures are detected fast.
  // (a), (d) and (f) with `opts` (see the tests below).
  void NoticeThenProviderLoss(const JobOptions& opts);

  int heartbeat_timeout_ms_ = 2000;
  Program program_ = Program::kFinetune;  // what SetUp needs to have been built
};

// (b) An agent killed with SIGKILL (no notice): its node is declared lost within the heartbeat
// timeout, its rank goes with it (no orphan keeps training), and the job resumes on the other
// provider from its last commit, losing at most the checkpoint interval.
TEST_F(PreemptionClusterTest, AgentKilledJobResumesFromItsLastCommit) {
  Drain("gcp-0", true);
  Drain("gcp-1", true);
  const std::string job = Submit({.name = "killed", .steps = 60});
  ASSERT_FALSE(job.empty());
  ASSERT_EQ(WaitForAttempt(job, 1, 90s), "aws");
  Drain("gcp-0", false);
  Drain("gcp-1", false);
  json st = JobStatus(job);
  const std::string victim = NodesOf(st).at(1);
  // Mid-interval, well clear of a commit in flight: the last commit is 20. Commits are
  // asynchronous (a loaded host took four steps to commit one in ci-clone34), so wait for the
  // commit itself too.
  ASSERT_TRUE(WaitForStep(job, 1, 2 * kCheckpointEvery + 3, 120s)) << RankLog(job, 1, 0);
  ASSERT_TRUE(WaitUntil(
      [&] { return LastStep(RankLog(job, 1, 0), "MUSTER_CHECKPOINT") >= 2 * kCheckpointEvery; },
      120s))
      << RankLog(job, 1, 0);

  // Node rank 1's agent dies.
  agents_.at(victim).Signal(SIGKILL);
  agents_.at(victim).Wait(5s);
  const auto killed_at = Clock::now();

  ASSERT_EQ(WaitForAttempt(job, 2, 90s), "gcp");
  const auto resumed_at = Clock::now();
  std::string log1 = RankLog(job, 1, 0);
  const int last_commit = LastStep(log1, "MUSTER_CHECKPOINT");
  const int last_step = LastStep(log1, "MUSTER_PROGRESS");
  st = WaitForState(job, "succeeded", 150s);
  ASSERT_EQ(st.value("state", ""), "succeeded") << st.dump(2) << EventText(job);

  const std::string events = EventText(job);
  EXPECT_NE(events.find("node_lost [" + victim + "]"), std::string::npos) << events;
  auto resumed = EventFields(job, "resumed", "attempt 2 resumes from step (\\d+)");
  ASSERT_EQ(resumed.size(), 1u) << events;
  const int from = std::stoi(resumed[0]);
  // The newest commit of attempt 1 (replicated to gcp), and no more than an interval lost.
  EXPECT_EQ(from, NewestReplicaBefore(job, "gcp", "attempt 2 resumes from step")) << events;
  EXPECT_EQ(from, last_commit) << events << Tail(log1);
  EXPECT_LE(last_step - from, kCheckpointEvery) << Tail(log1);
  EXPECT_GE(from, 2 * kCheckpointEvery);
  const std::string log2 = RankLog(job, 2, 0);
  EXPECT_NE(log2.find("resumed from step " + std::to_string(from)), std::string::npos)
      << Tail(log2);
  EXPECT_EQ(LastStep(log2, "MUSTER_DONE"), 60) << Tail(log2);
  // A lost node is not the application's fault.
  EXPECT_EQ(st.value("restarts", -1), 0) << st.dump(2) << events;
  EXPECT_EQ(st.value("preemptions", -1), 1) << st.dump(2);
  // The dead agent's rank did not outlive it.
  EXPECT_TRUE(StrayPids(HostOf(victim)).empty());
  std::cout << "kill -9 of " << victim << " agent -> attempt 2 running on gcp in "
            << std::chrono::duration<double>(resumed_at - killed_at).count() << " s; resumed at "
            << from << ", last step reached before " << last_step << "\n";
}

// (a), (d) and (f) in one deterministic job: attempt 1 on aws gets a preemption notice and
// resumes on gcp at exactly the step it checkpointed on the notice; attempt 2 then loses all
// of gcp (both hosts die) and resumes on aws from the newest step replicated there; the final
// parameters are bit-identical to an uninterrupted run of the same job.
void PreemptionClusterTest::NoticeThenProviderLoss(const JobOptions& opts) {
  // The uninterrupted reference: the same ranks under `muster run -np 2` on this host, while the
  // cluster job runs.
  std::vector<std::string> ref_argv = {MUSTER_BIN,
                                       "--log-level",
                                       "warn",
                                       "run",
                                       "-np",
                                       "2",
                                       "--checkpoint-dir",
                                       (root_ / "reference-ckpt").string(),
                                       "--"};
  for (const auto& a : FinetuneArgv(opts)) ref_argv.push_back(a);
  const std::string ref_log = (root_ / "reference.log").string();
  auto reference = Subprocess::Start(ref_argv, {}, ref_log);
  ASSERT_TRUE(reference.ok()) << reference.status();

  Drain("gcp-0", true);
  Drain("gcp-1", true);
  const std::string job = Submit(opts);
  ASSERT_FALSE(job.empty());
  ASSERT_EQ(WaitForAttempt(job, 1, 90s), "aws");
  Drain("gcp-0", false);
  Drain("gcp-1", false);
  ASSERT_TRUE(WaitForStep(job, 1, kCheckpointEvery + 5, 120s)) << RankLog(job, 1, 0);

  // (a) A notice for node rank 0: both ranks checkpoint the step they agree on and stop; the
  // node is drained, so aws cannot hold the gang any more and the job moves to gcp.
  json st = JobStatus(job);
  const std::string noticed = NodesOf(st).at(0);
  auto out = Muster({"node", "preempt", noticed, "--notice", "10"});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NE(out->find(job), std::string::npos) << *out;

  ASSERT_EQ(WaitForAttempt(job, 2, 90s), "gcp") << EventText(job);
  const std::string a1r0 = RankLog(job, 1, 0), a1r1 = RankLog(job, 1, 1);
  const int preempted = LastStep(a1r0, "MUSTER_PREEMPTED");
  ASSERT_GT(preempted, kCheckpointEvery) << Tail(a1r0);
  // Only rank 0 prints the MUSTER_ lines; every rank logs the step it stopped at.
  EXPECT_NE(a1r1.find("checkpointed step " + std::to_string(preempted) + " and stopping"),
            std::string::npos)
      << "the ranks agree on the step\n"
      << Tail(a1r1);
  EXPECT_EQ(LastStep(a1r0, "MUSTER_CHECKPOINT"), preempted) << Tail(a1r0);
  // Zero lost steps: nothing trained past the checkpoint, and the next attempt starts there.
  EXPECT_EQ(LastStep(a1r0, "MUSTER_PROGRESS"), preempted) << Tail(a1r0);
  auto resumed = EventFields(job, "resumed", "attempt 2 resumes from step (\\d+)");
  ASSERT_EQ(resumed.size(), 1u) << EventText(job);
  EXPECT_EQ(std::stoi(resumed[0]), preempted) << EventText(job);
  EXPECT_NE(EventText(job).find("provider gcp)"), std::string::npos);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return RankLog(job, 2, 0).find("resumed from step " + std::to_string(preempted)) !=
               std::string::npos;
      },
      30s))
      << Tail(RankLog(job, 2, 0));

  // (d) Provider gcp disappears: both its hosts die once a gcp commit has been replicated to
  // aws (so the resume point is one that gcp made). aws gets the preempted node back.
  Drain(noticed, false);
  const std::string replica_re =
      "step (\\d+) on volume ckpt of provider aws \\(verified replica\\)";
  ASSERT_TRUE(WaitUntil(
      [&] {
        for (const auto& s : EventFields(job, "checkpoint_committed", replica_re)) {
          if (std::stoi(s) > preempted) return true;
        }
        return false;
      },
      60s))
      << EventText(job);
  st = JobStatus(job);
  ASSERT_EQ(st.value("attempt", 0), 2) << st.dump(2);
  for (const auto& n : NodesOf(st)) {
    auto killed = net_->KillAll(HostOf(n));
    ASSERT_TRUE(killed.ok()) << killed.status();
  }
  const auto lost_at = Clock::now();
  ASSERT_EQ(WaitForAttempt(job, 3, 90s), "aws") << EventText(job);
  const double recovery_s = std::chrono::duration<double>(Clock::now() - lost_at).count();
  const int newest_replica = NewestReplicaBefore(job, "aws", "attempt 3 resumes from step");
  resumed = EventFields(job, "resumed", "attempt 3 resumes from step (\\d+)");
  ASSERT_EQ(resumed.size(), 1u) << EventText(job);
  const int from = std::stoi(resumed[0]);
  EXPECT_EQ(from, newest_replica) << EventText(job);
  EXPECT_GT(from, preempted);
  const std::string a2r0 = RankLog(job, 2, 0);
  EXPECT_LE(from, LastStep(a2r0, "MUSTER_CHECKPOINT")) << Tail(a2r0);

  st = WaitForState(job, "succeeded", 150s);
  ASSERT_EQ(st.value("state", ""), "succeeded") << st.dump(2) << EventText(job);
  EXPECT_EQ(st.value("preemptions", -1), 2) << st.dump(2);
  EXPECT_EQ(st.value("restarts", -1), 0) << st.dump(2) << EventText(job);
  const std::string a3r0 = RankLog(job, 3, 0);
  EXPECT_NE(a3r0.find("resumed from step " + std::to_string(from)), std::string::npos)
      << Tail(a3r0);
  EXPECT_EQ(LastStep(a3r0, "MUSTER_DONE"), opts.steps) << Tail(a3r0);

  // (f) Bit-identical to the uninterrupted run.
  ASSERT_TRUE(reference->Wait(120s).has_value()) << "the reference run did not end";
  const std::string want = Digest(ReadFileText(ref_log));
  ASSERT_EQ(want.size(), 16u) << Tail(ReadFileText(ref_log));
  EXPECT_EQ(Digest(a3r0), want) << Tail(a3r0);
  std::cout << "notice at step " << preempted << " -> resumed on gcp at " << preempted
            << "; gcp lost at step " << LastStep(a2r0, "MUSTER_PROGRESS")
            << " -> resumed on aws at " << from << " after " << recovery_s << " s; param_digest "
            << Digest(a3r0) << " (uninterrupted: " << want << ")\n";
}

TEST_F(PreemptionClusterTest, NoticeThenProviderLossResumesAcrossProvidersBitIdentical) {
  NoticeThenProviderLoss({.name = "determ", .steps = 80, .deterministic = true});
}

// The same with the PyTorch example on the `muster` package: its asynchronous muster.save
// commits (announced by the library) are what is replicated and resumed from.
class PytorchClusterTest : public PreemptionClusterTest {
 protected:
  PytorchClusterTest() { program_ = Program::kPytorch; }
};

TEST_F(PytorchClusterTest, NoticeThenProviderLossResumesAcrossProvidersBitIdentical) {
  NoticeThenProviderLoss({.name = "torchddp",
                          .steps = 100,
                          .deterministic = true,
                          .program = Program::kPytorch,
                          .step_delay = 0.1});
}

// (c) A node cut off from the network: the coordinator declares it lost after the heartbeat
// timeout; its own agent, which cannot reach the coordinator, stops its rank when its lease runs
// out -- before the link comes back -- and the job resumes on the other provider.
TEST_F(PreemptionClusterTest, PartitionedNodeStopsItsOwnRanksAndTheJobResumesElsewhere) {
  Drain("gcp-0", true);
  Drain("gcp-1", true);
  const std::string job = Submit({.name = "cut", .steps = 60});
  ASSERT_FALSE(job.empty());
  ASSERT_EQ(WaitForAttempt(job, 1, 90s), "aws");
  Drain("gcp-0", false);
  Drain("gcp-1", false);
  ASSERT_TRUE(WaitForStep(job, 1, kCheckpointEvery + 5, 120s)) << RankLog(job, 1, 0);

  json st = JobStatus(job);
  const std::string victim = NodesOf(st).at(1);
  const int host = HostOf(victim);
  ASSERT_FALSE(StrayPids(host).empty()) << "the rank runs on " << victim;
  ASSERT_TRUE(net_->CutLink(host).ok());
  const auto cut_at = Clock::now();

  // Detected by the coordinator...
  ASSERT_TRUE(WaitUntil(
      [&] { return EventText(job).find("node_lost [" + victim + "]") != std::string::npos; }, 20s))
      << EventText(job);
  const double detect_s = std::chrono::duration<double>(Clock::now() - cut_at).count();
  // A cut link closes no connection: the node is silent, not dead, so it is lost by the
  // heartbeat timeout and its job waits for the lease fence (docs/protocol.md, "Dead or
  // silent"), never by the fast path for an agent whose process ended.
  EXPECT_EQ(EventText(job).find("agent process is gone"), std::string::npos) << EventText(job);
  EXPECT_NE(EventText(job).find("no heartbeat for"), std::string::npos) << EventText(job);
  // ...and the node's own agent stops its rank while the link is still down.
  ASSERT_TRUE(WaitUntil([&] { return StrayPids(host).empty(); }, 20s))
      << "the partitioned node's rank is still running";
  const double stopped_s = std::chrono::duration<double>(Clock::now() - cut_at).count();
  EXPECT_NE(ReadFileText(root_ / (victim + ".log")).find("stopping every rank on this node"),
            std::string::npos)
      << Tail(ReadFileText(root_ / (victim + ".log")));

  ASSERT_EQ(WaitForAttempt(job, 2, 90s), "gcp") << EventText(job);
  ASSERT_TRUE(net_->RestoreLink(host).ok());
  const std::string a1r0 = RankLog(job, 1, 0);
  const int last_commit = LastStep(a1r0, "MUSTER_CHECKPOINT");
  auto resumed = EventFields(job, "resumed", "attempt 2 resumes from step (\\d+)");
  ASSERT_EQ(resumed.size(), 1u) << EventText(job);
  EXPECT_EQ(std::stoi(resumed[0]), last_commit) << EventText(job) << Tail(a1r0);
  EXPECT_GE(last_commit, kCheckpointEvery);

  st = WaitForState(job, "succeeded", 150s);
  ASSERT_EQ(st.value("state", ""), "succeeded") << st.dump(2) << EventText(job);
  EXPECT_EQ(st.value("restarts", -1), 0) << st.dump(2) << EventText(job);
  EXPECT_EQ(LastStep(RankLog(job, 2, 0), "MUSTER_DONE"), 60);
  // The cut-off attempt never committed after the job moved on.
  EXPECT_EQ(LastStep(RankLog(job, 1, 0), "MUSTER_CHECKPOINT"), last_commit);
  std::cout << "link of " << victim << " cut: node lost after " << detect_s
            << " s, its rank stopped by its own agent after " << stopped_s << " s\n";
}

// (e) The coordinator dies (SIGKILL) mid-job and is restarted on the same data dir: the agents
// re-register with what they run, the coordinator adopts it, and the job completes without its
// ranks ever restarting. The agents' lease must outlast the restart plus the call to the dead
// coordinator that was in flight (the agent's 3 s call timeout): the default 5 s heartbeat
// timeout gives a 7.5 s lease.
class CoordinatorRestartTest : public PreemptionClusterTest {
 protected:
  CoordinatorRestartTest() { heartbeat_timeout_ms_ = 5000; }
};

TEST_F(CoordinatorRestartTest, CoordinatorKilledMidJobTheJobStillCompletes) {
  const std::string job = Submit({.name = "coordkill", .steps = 200});
  ASSERT_FALSE(job.empty());
  WaitForAttempt(job, 1, 90s);
  ASSERT_TRUE(WaitForStep(job, 1, kCheckpointEvery + 5, 120s)) << RankLog(job, 1, 0);

  coordinator_->Signal(SIGKILL);
  ASSERT_TRUE(coordinator_->Wait(10s).has_value());
  coordinator_.reset();
  const int step_at_kill = LastStep(RankLog(job, 1, 0), "MUSTER_PROGRESS");
  StartCoordinator();
  // The restarted coordinator knows the job from its database and sees it still running (the
  // agents re-registered with their ranks) before the job ends.
  json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = JobStatus(job);
        return !st.empty();
      },
      30s));
  EXPECT_EQ(st.value("state", ""), "running") << st.dump(2);
  EXPECT_EQ(LastStep(RankLog(job, 1, 0), "MUSTER_DONE"), -1) << "the job ended too soon";

  st = WaitForState(job, "succeeded", 150s);
  ASSERT_EQ(st.value("state", ""), "succeeded") << st.dump(2) << EventText(job);
  EXPECT_EQ(st.value("attempt", 0), 1) << "the ranks kept running\n" << EventText(job);
  EXPECT_EQ(st.value("restarts", -1), 0);
  EXPECT_EQ(st.value("preemptions", -1), 0);
  const std::string log = RankLog(job, 1, 0);
  EXPECT_EQ(LastStep(log, "MUSTER_DONE"), 200) << Tail(log);
  EXPECT_EQ(log.find("MUSTER_PREEMPTED"), std::string::npos) << Tail(log);
  // The timeline from before the crash is still there.
  const std::string events = EventText(job);
  EXPECT_NE(events.find("submitted"), std::string::npos) << events;
  EXPECT_NE(events.find("started"), std::string::npos) << events;
  EXPECT_NE(events.find("succeeded"), std::string::npos) << events;
  std::cout << "coordinator killed at step " << step_at_kill << "; job completed on attempt 1\n";
}

}  // namespace
}  // namespace muster::testing
