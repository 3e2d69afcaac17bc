// The fine-tune example's promises, with real processes killed for real: a run killed with
// SIGKILL at a random step and resumed from its latest checkpoint ends bit-identical (parameter
// digest) to an uninterrupted run, in full and LoRA modes; a preemption notice (SIGTERM)
// checkpoints the current step and stops, losing nothing; LoRA checkpoints hold only adapters
// and refuse a different base; a 2-rank run (Gloo, rendezvous through a CURVE store hosted by
// this test, as `muster run` hosts it) killed mid-run resumes at world size 1 with its loss
// carrying on; with in-memory snapshots (an agent's SnapshotServer hosted here), a run killed with
// SIGKILL resumes from the newest snapshot its agent holds, losing at most one step, and ends
// bit-identical; a snapshot that cannot be restored stops the rank with a clear error.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <thread>

#include "checkpoint/checkpointer.h"
#include "collectives/rendezvous_server.h"
#include "common/curve.h"
#include "common/logging.h"
#include "common/reactor.h"
#include "node_agent/snapshots/snapshot_server.h"
#include "node_agent/snapshots/snapshot_store.h"
#include "tests/testing/child_process.h"

namespace muster::finetune {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

using Child = ::muster::testing::Child;

// Tiny settings so that every run takes seconds on a loaded 2-core machine.
const std::vector<std::string> kSmall = {"--deterministic", "--log-every", "1", "--batch", "8"};
constexpr int kSteps = 30;

std::vector<std::string> Args(std::vector<std::string> extra) {
  std::vector<std::string> a = {MUSTER_FINETUNE_BIN};
  a.insert(a.end(), kSmall.begin(), kSmall.end());
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// The value of `key=` on the last line starting with `prefix`, or "".
std::string LastField(const std::string& out, const std::string& prefix, const std::string& key) {
  std::string found;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) != 0) continue;
    std::smatch m;
    if (std::regex_search(line, m, std::regex("\\b" + key + "=(\\S+)"))) found = m[1];
  }
  return found;
}

// step -> loss from MUSTER_PROGRESS lines.
std::map<int, double> Losses(const std::string& out) {
  std::map<int, double> losses;
  std::regex re("MUSTER_PROGRESS step=(\\d+) total=\\d+ loss=([0-9.]+) tokens_per_s=\\d+");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), re); it != std::sregex_iterator();
       ++it) {
    losses[std::stoi((*it)[1])] = std::stod((*it)[2]);
  }
  return losses;
}

int RunToEnd(const std::vector<std::string>& argv, std::string* out,
             std::map<std::string, std::string> env = {}) {
  Child c(argv, std::move(env));
  int code = c.WaitExit(Clock::now() + 90s);
  *out = c.Output();
  return code;
}

class FinetuneTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() /
                         ("muster-finetune-test-" + std::to_string(getpid())));
    fs::remove_all(*root_);
    fs::create_directories(*root_);
    std::string out;
    int code = RunToEnd(Args({"--pretrain", "--steps", "20", "--d-model", "32", "--layers", "2",
                              "--seq-len", "32", "--checkpoint-dir", Base()}),
                        &out);
    ASSERT_EQ(code, 0) << out;
    ASSERT_EQ(LastField(out, "MUSTER_DONE", "step"), "20") << out;
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  static std::string Base() { return (*root_ / "base").string(); }
  static std::string Dir(const std::string& name) { return (*root_ / name).string(); }

  // An uninterrupted fine-tune; returns its final parameter digest.
  std::string Uninterrupted(const std::string& mode, const std::string& dir) {
    std::string out;
    int code = RunToEnd(Args({"--mode", mode, "--base", Base(), "--steps", std::to_string(kSteps),
                              "--ckpt-every", "5", "--checkpoint-dir", dir}),
                        &out);
    EXPECT_EQ(code, 0) << out;
    return LastField(out, "MUSTER_DONE", "param_digest");
  }

  // The same run, killed with `sig` once it reports step `at`, then resumed as an agent would
  // (MUSTER_RESUME_STEP=<the latest committed step>). Returns the resumed run's output.
  std::string KilledAndResumed(const std::string& mode, const std::string& dir, int at, int sig,
                               int* resumed_from) {
    std::vector<std::string> argv =
        Args({"--mode", mode, "--base", Base(), "--steps", std::to_string(kSteps), "--ckpt-every",
              "5", "--checkpoint-dir", dir});
    {
      Child c(argv, {});
      EXPECT_TRUE(
          c.WaitOutput("MUSTER_PROGRESS step=" + std::to_string(at) + " ", Clock::now() + 60s))
          << c.Output();
      // Saves are asynchronous: on a loaded machine step 5's commit may land steps later. A
      // SIGKILL before any commit would leave nothing to resume from; wait for the first.
      if (sig == SIGKILL) {
        EXPECT_TRUE(c.WaitOutput("MUSTER_CHECKPOINT step=", Clock::now() + 60s)) << c.Output();
      }
      c.Kill(sig);
      int code = c.WaitExit(Clock::now() + 30s);
      if (sig == SIGKILL) {
        EXPECT_EQ(code, 128 + SIGKILL) << c.Output();
      } else {
        EXPECT_EQ(code, 3) << "a notice exits 3 after its checkpoint\n" << c.Output();
        EXPECT_NE(c.Output().find("MUSTER_PREEMPTED"), std::string::npos) << c.Output();
      }
    }
    auto ck = checkpoint::Checkpointer::Create({.dir = dir});
    EXPECT_TRUE(ck.ok()) << ck.status();
    auto latest = (*ck)->LatestStep();
    EXPECT_TRUE(latest.ok()) << latest.status();
    *resumed_from = latest.ok() ? static_cast<int>(*latest) : -1;
    std::string out;
    int code = RunToEnd(argv, &out, {{"MUSTER_RESUME_STEP", std::to_string(*resumed_from)}});
    EXPECT_EQ(code, 0) << out;
    EXPECT_NE(out.find("resumed from step " + std::to_string(*resumed_from)), std::string::npos)
        << out;
    return out;
  }

  static int RandomStep(int lo, int hi) {
    std::random_device rd;
    int s = std::uniform_int_distribution<int>(lo, hi)(rd);
    std::cout << "killing at step " << s << "\n";
    return s;
  }

  static fs::path* root_;
};
fs::path* FinetuneTest::root_ = nullptr;

TEST_F(FinetuneTest, FullKilledWithSigkillAndResumedIsBitIdentical) {
  const std::string want = Uninterrupted("full", Dir("full-ref"));
  ASSERT_EQ(want.size(), 16u);
  int from = -1;
  std::string out =
      KilledAndResumed("full", Dir("full-kill"), RandomStep(6, kSteps - 2), SIGKILL, &from);
  EXPECT_GE(from, 5);
  EXPECT_EQ(LastField(out, "MUSTER_DONE", "param_digest"), want) << out;
}

TEST_F(FinetuneTest, LoraKilledWithSigkillAndResumedIsBitIdenticalAndSavesOnlyAdapters) {
  const std::string want = Uninterrupted("lora", Dir("lora-ref"));
  ASSERT_EQ(want.size(), 16u);
  int from = -1;
  std::string out =
      KilledAndResumed("lora", Dir("lora-kill"), RandomStep(6, kSteps - 2), SIGKILL, &from);
  EXPECT_EQ(LastField(out, "MUSTER_DONE", "param_digest"), want) << out;

  // The LoRA checkpoint holds the adapters and the optimizer state, and names its base.
  auto ck = checkpoint::Checkpointer::Create({.dir = Dir("lora-ref")});
  ASSERT_TRUE(ck.ok());
  auto m = (*ck)->ReadManifest(kSteps);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_FALSE(m->tensors.empty());
  for (const auto& t : m->tensors) {
    EXPECT_TRUE(t.name == "optimizer" || t.name.find(".lora_") != std::string::npos) << t.name;
  }
  EXPECT_NE(m->UserMetadata().find("\"base\""), std::string::npos) << m->UserMetadata();
}

TEST_F(FinetuneTest, SigtermNoticeCheckpointsTheCurrentStepAndLosesNothing) {
  const std::string want = Uninterrupted("full", Dir("term-ref"));
  int from = -1;
  std::string out =
      KilledAndResumed("full", Dir("term"), RandomStep(6, kSteps - 3), SIGTERM, &from);
  // The notice's checkpoint is not on the every-5 grid unless the notice landed there by chance:
  // it is the step the ranks agreed on right after the notice.
  EXPECT_GT(from, 6);
  EXPECT_EQ(LastField(out, "MUSTER_DONE", "param_digest"), want) << out;
}

TEST_F(FinetuneTest, NoticeFileCheckpointsAndStops) {
  const std::string notice = Dir("notice-file");
  std::vector<std::string> argv =
      Args({"--mode", "lora", "--base", Base(), "--steps", "1000", "--ckpt-every", "0",
            "--notice-file", notice, "--checkpoint-dir", Dir("notice")});
  Child c(argv, {});
  ASSERT_TRUE(c.WaitOutput("MUSTER_PROGRESS step=3 ", Clock::now() + 60s)) << c.Output();
  { std::ofstream(notice) << "preempt\n"; }
  EXPECT_EQ(c.WaitExit(Clock::now() + 30s), 3) << c.Output();
  const std::string step = LastField(c.Output(), "MUSTER_PREEMPTED", "step");
  ASSERT_FALSE(step.empty()) << c.Output();
  EXPECT_EQ(LastField(c.Output(), "MUSTER_CHECKPOINT", "step"), step) << c.Output();
}

TEST_F(FinetuneTest, LoraRefusesToResumeOnADifferentBase) {
  std::string out;
  ASSERT_EQ(RunToEnd(Args({"--mode", "lora", "--base", Base(), "--steps", "3", "--checkpoint-dir",
                           Dir("lora-other")}),
                     &out),
            0)
      << out;
  // Another base of the same shape: pretrained with another seed.
  ASSERT_EQ(RunToEnd(Args({"--pretrain", "--steps", "2", "--seed", "99", "--d-model", "32",
                           "--layers", "2", "--seq-len", "32", "--checkpoint-dir", Dir("base2")}),
                     &out),
            0)
      << out;
  int code = RunToEnd(Args({"--mode", "lora", "--base", Dir("base2"), "--steps", "6",
                            "--checkpoint-dir", Dir("lora-other"), "--resume", "latest"}),
                      &out);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("holds LoRA adapters for a base with parameter digest"), std::string::npos)
      << out;
}

TEST_F(FinetuneTest, BadInputGetsAClearError) {
  std::string out;
  EXPECT_EQ(
      RunToEnd(Args({"--mode", "full", "--steps", "3", "--checkpoint-dir", Dir("bad")}), &out), 2);
  EXPECT_NE(out.find("needs --base"), std::string::npos) << out;
  EXPECT_EQ(
      RunToEnd(Args({"--pretrain", "--data", Dir("no-such-file"), "--checkpoint-dir", Dir("bad")}),
               &out),
      2);
  EXPECT_NE(out.find("neither a file nor a directory"), std::string::npos) << out;
  EXPECT_EQ(RunToEnd(Args({"--pretrain"}), &out, {{"MUSTER_CHECKPOINT_DIR", ""}}), 2);
  EXPECT_NE(out.find("no checkpoint dir"), std::string::npos) << out;
}

// In-memory snapshots every step, handed to an agent's snapshot server hosted here (as the
// node's agent hosts it): a SIGKILL at a random step loses at most one step (the newest frame the
// agent holds), and the run resumed from that frame (the env the agent gives a snapshot resume)
// ends bit-identical to an uninterrupted run without snapshots.
TEST_F(FinetuneTest, SnapshotsEveryStepKilledWithSigkillResumeFromMemoryBitIdentical) {
  node_agent::SnapshotStore store({.memory_limit = uint64_t{256} << 20, .keep_steps = 2});
  auto server = node_agent::SnapshotServer::Start(Dir("snap-agent") + "/snapshots.sock", &store);
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
  // Full fine-tune (every parameter and its AdamW state in the snapshot), then LoRA (the
  // adapters and theirs; the frozen base comes from --base and is checked by the digest).
  for (const std::string mode : {"lora", "full"}) {
    SCOPED_TRACE(mode);
    const std::string want = Uninterrupted(mode, Dir("snap-ref-" + mode));
    ASSERT_EQ(want.size(), 16u);
    argv = Args({"--mode", mode, "--base", Base(), "--steps", std::to_string(kSteps),
                 "--ckpt-every", "5", "--checkpoint-dir", Dir("snap-kill-" + mode)});
    env = {{"MUSTER_JOB_ID", "ftsnap-" + mode},
           {"MUSTER_ATTEMPT", "0"},
           {"MUSTER_SNAPSHOT_EVERY", "1"},
           {"MUSTER_SNAPSHOT_SOCKET", (*server)->socket_path()}};
    const int at = RandomStep(8, kSteps - 3);
    {
      Child c(argv, env);
      ASSERT_TRUE(
          c.WaitOutput("MUSTER_PROGRESS step=" + std::to_string(at) + " ", Clock::now() + 60s))
          << c.Output();
      c.Kill(SIGKILL);
      EXPECT_EQ(c.WaitExit(Clock::now() + 30s), 128 + SIGKILL) << c.Output();
    }
    int64_t held = -1;
    for (const auto& h : store.Held("ftsnap-" + mode)) held = std::max(held, h.step);
    std::cout << mode << ": killed after step " << at << "; the agent holds step " << held << "\n";
    ASSERT_GE(held, at - 1) << "more than one step lost";

    env["MUSTER_ATTEMPT"] = "1";
    env["MUSTER_RESUME_SNAPSHOT_STEP"] = std::to_string(held);
    env["MUSTER_RESUME_SNAPSHOT_ATTEMPT"] = "0";
    env["MUSTER_RESUME_STEP"] = "5";  // the volume's step, as the agent also passes it
    std::string out;
    ASSERT_EQ(RunToEnd(argv, &out, env), 0) << out;
    EXPECT_NE(out.find("resumed from the in-memory snapshot of step " + std::to_string(held)),
              std::string::npos)
        << out;
    EXPECT_EQ(LastField(out, "MUSTER_DONE", "param_digest"), want) << out;
  }
  std::string out;

  // A step the agent does not hold, and a snapshot of another kind of run (full weights, asked
  // for by a LoRA run): the rank stops, non-zero, naming the snapshot, and trains nothing.
  env["MUSTER_ATTEMPT"] = "2";
  env["MUSTER_RESUME_SNAPSHOT_STEP"] = "999";
  EXPECT_EQ(RunToEnd(argv, &out, env), 1) << out;
  EXPECT_NE(out.find("cannot resume from the in-memory snapshot of step 999"), std::string::npos)
      << out;
  EXPECT_EQ(out.find("MUSTER_PROGRESS"), std::string::npos) << out;
  // (The agent keeps two steps per rank: by now the resumed attempt's last two.)
  env["MUSTER_RESUME_SNAPSHOT_STEP"] = std::to_string(kSteps);
  env["MUSTER_RESUME_SNAPSHOT_ATTEMPT"] = "1";
  std::vector<std::string> lora =
      Args({"--mode", "lora", "--base", Base(), "--steps", std::to_string(kSteps),
            "--checkpoint-dir", Dir("snap-lora")});
  EXPECT_EQ(RunToEnd(lora, &out, env), 1) << out;
  EXPECT_NE(out.find("cannot resume from the in-memory snapshot of step " + std::to_string(kSteps)),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("MUSTER_PROGRESS"), std::string::npos) << out;
}

// An agent that refuses every snapshot (its memory limit is smaller than one): training goes on
// and ends, and the rank says the agent keeps none.
TEST_F(FinetuneTest, SnapshotsTheAgentRefusesDoNotStopTrainingAndAreReported) {
  node_agent::SnapshotStore store({.memory_limit = 1024, .keep_steps = 2});
  auto server = node_agent::SnapshotServer::Start(Dir("snap-small") + "/snapshots.sock", &store);
  ASSERT_TRUE(server.ok()) << server.status();
  std::string out;
  ASSERT_EQ(RunToEnd(Args({"--mode", "lora", "--base", Base(), "--steps", "14", "--checkpoint-dir",
                           Dir("snap-refused")}),
                     &out,
                     {{"MUSTER_JOB_ID", "ftsnap-small"},
                      {"MUSTER_SNAPSHOT_EVERY", "1"},
                      {"MUSTER_SNAPSHOT_SOCKET", (*server)->socket_path()}}),
            0)
      << out;
  EXPECT_EQ(LastField(out, "MUSTER_DONE", "step"), "14") << out;
  EXPECT_NE(out.find("the agent has kept none of the last 10"), std::string::npos) << out;
  EXPECT_NE(out.find("the last in-memory snapshot was not handed to the agent"), std::string::npos)
      << out;
  EXPECT_TRUE(store.Held("ftsnap-small").empty());
}

// Two ranks over Gloo, rendezvousing through a CURVE store hosted here as `muster run` would.
TEST_F(FinetuneTest, TwoRanksKilledMidRunResumeAtWorldSizeOneAndTheLossCarriesOn) {
  Reactor reactor("ft-test");
  auto zap = ZapAuthenticator::Create(reactor);
  ASSERT_TRUE(zap.ok()) << zap.status();
  auto server = collectives::RendezvousServer::Create(reactor, zap->get(), {});
  ASSERT_TRUE(server.ok()) << server.status();
  reactor.Start();
  auto creds = (*server)->AddScope("ft", 0);
  ASSERT_TRUE(creds.ok()) << creds.status();

  const std::string dir = Dir("np2");
  std::vector<std::string> argv =
      Args({"--mode", "full", "--base", Base(), "--steps", std::to_string(kSteps), "--ckpt-every",
            "5", "--checkpoint-dir", dir});
  std::string before;
  {
    std::vector<std::unique_ptr<Child>> ranks;
    for (int r = 0; r < 2; ++r) {
      ranks.push_back(
          std::make_unique<Child>(argv, std::map<std::string, std::string>{
                                            {"RANK", std::to_string(r)},
                                            {"WORLD_SIZE", "2"},
                                            {"LOCAL_RANK", std::to_string(r)},
                                            {"LOCAL_WORLD_SIZE", "2"},
                                            {"MASTER_ADDR", "127.0.0.1"},
                                            {"MUSTER_JOB_ID", "ft"},
                                            {"MUSTER_ATTEMPT", "0"},
                                            {"MUSTER_RDZV_ENDPOINT", (*server)->endpoint()},
                                            {"MUSTER_RDZV_KEY", *creds},
                                            {"MUSTER_COLL_TIMEOUT_MS", "20000"},
                                        }));
    }
    const int at = RandomStep(11, 20);
    ASSERT_TRUE(ranks[0]->WaitOutput("MUSTER_PROGRESS step=" + std::to_string(at) + " ",
                                     Clock::now() + 60s))
        << ranks[0]->Output() << "\nrank 1:\n"
        << ranks[1]->Output();
    for (auto& r : ranks) r->Kill(SIGKILL);
    for (auto& r : ranks) EXPECT_EQ(r->WaitExit(Clock::now() + 30s), 128 + SIGKILL);
    before = ranks[0]->Output();
  }
  reactor.Call("teardown", [&] {
    server->reset();
    zap->reset();
  });
  reactor.Stop();

  std::string out;
  // "latest" is the example's flag value, not a value of MUSTER_RESUME_STEP (a step or empty).
  std::vector<std::string> resume_argv = argv;
  resume_argv.insert(resume_argv.end(), {"--resume", "latest"});
  ASSERT_EQ(RunToEnd(resume_argv, &out), 0) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("resumed from step (\\d+)"))) << out;
  const int from = std::stoi(m[1]);
  ASSERT_GE(from, 10) << out;
  auto loss_before = Losses(before);
  auto loss_after = Losses(out);
  ASSERT_TRUE(loss_before.count(from)) << before;
  ASSERT_TRUE(loss_after.count(from + 1)) << out;
  // The same global batch and data order at either world size: the first step after the resume
  // continues the curve (within the step-to-step noise of a small batch), it does not restart it.
  const double first_loss = loss_before.begin()->second;
  EXPECT_LT(std::abs(loss_after[from + 1] - loss_before[from]), 0.35 * loss_before[from])
      << "before:\n"
      << before << "\nafter:\n"
      << out;
  EXPECT_LT(loss_after[from + 1], first_loss) << before << out;
  EXPECT_EQ(LastField(out, "MUSTER_DONE", "step"), std::to_string(kSteps)) << out;
}

}  // namespace
}  // namespace muster::finetune
