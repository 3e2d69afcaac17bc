// The agent's reliability pieces: the lease watchdog (also with the agent's reactor stalled on
// purpose), the outbox's bound, and the checks and retention it applies to checkpoint steps.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "checkpoint/checkpointer.h"
#include "coordinator/client.h"
#include "coordinator/server.h"
#include "node_agent/agent.h"
#include "node_agent/checkpoint_steps.h"
#include "node_agent/lease_watchdog.h"
#include "node_agent/outbox.h"
#include "tests/testing/port_range.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

using testing::WaitUntil;

bool Gone(pid_t pid) {
  // Reaps it if it is our child; a zombie counts as gone.
  int st = 0;
  if (::waitpid(pid, &st, WNOHANG) == pid) return true;
  if (::kill(pid, 0) != 0) return true;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(in)), {});
  auto p = s.rfind(')');
  return p != std::string::npos && p + 2 < s.size() && s[p + 2] == 'Z';
}

// A process leading its own group, with a member that ignores SIGTERM (so only SIGKILL ends
// the group): returns the leader's pid; *member gets the other's.
pid_t StartGroup(pid_t* member) {
  int fds[2];
  EXPECT_EQ(::pipe(fds), 0);
  pid_t leader = ::fork();
  if (leader == 0) {
    ::setpgid(0, 0);
    pid_t m = ::fork();
    if (m == 0) {
      ::signal(SIGTERM, SIG_IGN);
      for (;;) ::pause();
    }
    (void)!::write(fds[1], &m, sizeof(m));
    for (;;) ::pause();
  }
  ::setpgid(leader, leader);
  ::close(fds[1]);
  EXPECT_EQ(::read(fds[0], member, sizeof(*member)), static_cast<ssize_t>(sizeof(*member)));
  ::close(fds[0]);
  return leader;
}

// ---- LeaseTimeline: the lease's decisions on a fake clock (no sleeps, no processes)

using node_agent::LeaseTimeline;
using Action = LeaseTimeline::Action;

TEST(LeaseTimelineTest, TermAtLeaseMinusGraceKillAtTheLeaseThenExpiredUntilFed) {
  LeaseTimeline t(300ms);
  const Clock::time_point t0{};  // any origin: the timeline only compares time points
  auto at = [&](std::chrono::milliseconds d) { return t0 + d; };
  t.Feed(at(0ms), 1000ms);
  auto s = t.Advance(at(10ms));
  EXPECT_EQ(s.action, Action::kWait);
  ASSERT_TRUE(s.wake);
  EXPECT_EQ(*s.wake, at(700ms));
  EXPECT_EQ(t.Advance(at(699ms)).action, Action::kWait);
  s = t.Advance(at(700ms));
  EXPECT_EQ(s.action, Action::kTerm);
  EXPECT_EQ(s.silent, 700ms);
  s = t.Advance(at(701ms));  // SIGTERM is given once per expiry
  EXPECT_EQ(s.action, Action::kWait);
  ASSERT_TRUE(s.wake);
  EXPECT_EQ(*s.wake, at(1000ms));
  EXPECT_FALSE(t.expired());
  EXPECT_EQ(t.Advance(at(1000ms)).action, Action::kKill);
  EXPECT_TRUE(t.expired());
  s = t.Advance(at(5000ms));  // expired: nothing more until the next Feed
  EXPECT_EQ(s.action, Action::kWait);
  EXPECT_FALSE(s.wake);
  EXPECT_FALSE(t.armed());
  t.Feed(at(5000ms), 1000ms);
  EXPECT_FALSE(t.expired());
  EXPECT_EQ(*t.Advance(at(5000ms)).wake, at(5700ms));
}

TEST(LeaseTimelineTest, FeedingKeepsItQuietAndAFeedAfterTheTermCancelsTheKill) {
  LeaseTimeline t(300ms);
  const Clock::time_point t0{};
  for (int i = 0; i < 20; ++i) {  // fed every 100 ms with a 1 s lease: never due
    auto now = t0 + i * 100ms;
    t.Feed(now, 1000ms);
    EXPECT_EQ(t.Advance(now + 99ms).action, Action::kWait) << i;
  }
  auto fed = t0 + 1900ms;
  EXPECT_EQ(t.Advance(fed + 700ms).action, Action::kTerm);
  // The coordinator answers between the SIGTERM and the lease's end: no SIGKILL.
  t.Feed(fed + 800ms, 1000ms);
  auto s = t.Advance(fed + 1000ms);
  EXPECT_EQ(s.action, Action::kWait);
  EXPECT_EQ(*s.wake, fed + 800ms + 700ms);
  // A late answer to an older request does not move the lease back.
  t.Feed(fed, 1000ms);
  EXPECT_EQ(*t.Advance(fed + 1000ms).wake, fed + 800ms + 700ms);
}

TEST(LeaseTimelineTest, GraceIsCappedAtHalfTheLeaseAndNoLeaseNeverActs) {
  LeaseTimeline t(5000ms);
  const Clock::time_point t0{};
  auto s = t.Advance(t0 + 3600s);  // no lease handed out yet
  EXPECT_EQ(s.action, Action::kWait);
  EXPECT_FALSE(s.wake);
  t.Feed(t0, 0ms);  // a registration without a lease: still none
  EXPECT_FALSE(t.Advance(t0 + 3600s).wake);
  t.Feed(t0, 1000ms);
  EXPECT_EQ(*t.Advance(t0).wake, t0 + 500ms);
  EXPECT_EQ(t.Advance(t0 + 500ms).action, Action::kTerm);
  EXPECT_EQ(t.Advance(t0 + 1000ms).action, Action::kKill);
}

// ---- LeaseWatchdog

TEST(LeaseWatchdogTest, StopsTheGroupsWhenTheLeaseRunsOutAndNotBefore) {
  std::atomic<int> expiries{0};
  node_agent::LeaseWatchdog w(300ms, [&](std::chrono::milliseconds) { ++expiries; });
  pid_t member = 0;
  pid_t leader = StartGroup(&member);
  w.AddGroup(leader, "test rank");
  // Fed every 100 ms with a 1 s lease: the group lives on.
  auto start = Clock::now();
  while (Clock::now() - start < 1200ms) {
    w.Feed(Clock::now(), 1000ms);
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_FALSE(Gone(leader));
  EXPECT_EQ(expiries.load(), 0);
  // No more feeding: SIGTERM at lease - grace, SIGKILL of what is left (the member that ignores
  // SIGTERM) at the lease; nothing of the group outlives it by more than scheduling slop.
  auto fed = Clock::now();
  w.Feed(fed, 1000ms);
  ASSERT_TRUE(WaitUntil([&] { return Gone(leader) && Gone(member); }, 3s));
  auto took = Clock::now() - fed;
  EXPECT_GE(took, 650ms);  // SIGTERM at 700 ms, SIGKILL at 1000 ms
  EXPECT_LE(took, 1000ms + 700ms);
  EXPECT_TRUE(WaitUntil([&] { return w.expired(); }, 1s));
  EXPECT_EQ(expiries.load(), 1);
  // While expired, a group added is killed at once; a Feed ends the expiry.
  pid_t member2 = 0;
  pid_t leader2 = StartGroup(&member2);
  w.AddGroup(leader2, "late rank");
  EXPECT_TRUE(WaitUntil([&] { return Gone(leader2) && Gone(member2); }, 1s));
  w.Feed(Clock::now(), 1000ms);
  EXPECT_FALSE(w.expired());
}

// The agent is told of the expiry before the ranks are signalled, so that it can mark their
// exits as its own doing before it sees them (AssignmentRunner::OnLeaseExpired runs on the
// reactor, which sees the exits after it).
TEST(LeaseWatchdogTest, TheExpiryIsToldBeforeTheRanksAreSignalled) {
  pid_t member = 0;
  pid_t leader = StartGroup(&member);
  std::atomic<int> alive_when_told{-1};
  node_agent::LeaseWatchdog w(100ms, [&](std::chrono::milliseconds) {
    std::this_thread::sleep_for(200ms);  // a SIGTERM sent before this would have ended it
    alive_when_told = Gone(leader) ? 0 : 1;
  });
  w.AddGroup(leader, "rank");
  w.Feed(Clock::now(), 400ms);
  ASSERT_TRUE(WaitUntil([&] { return Gone(leader) && Gone(member); }, 5s));
  EXPECT_EQ(alive_when_told.load(), 1);
}

TEST(LeaseWatchdogTest, NoLeaseNoExpiry) {
  node_agent::LeaseWatchdog w(100ms, nullptr);
  pid_t member = 0;
  pid_t leader = StartGroup(&member);
  w.AddGroup(leader, "rank");
  std::this_thread::sleep_for(300ms);  // nothing may happen: no lease was handed out yet
  EXPECT_FALSE(Gone(leader));
  EXPECT_FALSE(w.expired());
  w.RemoveGroup(leader);
  EXPECT_EQ(w.groups(), 0u);
  ::kill(-leader, SIGKILL);
  ::waitpid(leader, nullptr, 0);
}

// ---- The agent's lease with its reactor stalled on purpose

TEST(AgentLeaseTest, RanksAreStoppedWithinTheLeaseEvenWhenTheReactorIsStalled) {
  fs::path dir = fs::temp_directory_path() / ("muster-stall-" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "coord");
  muster::testing::PortRange ports;
  coordinator::ServerOptions so;
  so.data_dir = dir / "coord";
  so.listen = "tcp://127.0.0.1:*";
  so.insecure = true;
  so.coordinator.heartbeat_interval = 100ms;
  so.coordinator.heartbeat_timeout = 1000ms;
  so.coordinator.lease = 1500ms;
  so.coordinator.rendezvous_port_base = ports.base();
  auto server = coordinator::CoordinatorServer::Start(so);
  ASSERT_TRUE(server.ok()) << server.status();

  node_agent::AgentOptions ao;
  ao.coordinator = (*server)->endpoint();
  ao.insecure = true;
  ao.labels.set_name("stalled-1");
  ao.labels.set_provider("aws");
  ao.labels.set_slots(1);
  ao.work_dir = dir / "agent";
  ao.stop_grace = 400ms;
  auto agent = node_agent::Agent::Start(ao);
  ASSERT_TRUE(agent.ok()) << agent.status();
  ASSERT_TRUE(WaitUntil([&] { return (*agent)->registered(); }, 10s));

  coordinator::ClientOptions co;
  co.endpoint = (*server)->endpoint();
  co.insecure = true;
  auto client = coordinator::CoordinatorClient::Connect(co);
  ASSERT_TRUE(client.ok()) << client.status();
  fs::path pidfile = dir / "rank.pid";
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml(
      "name: stalled\ncommand: [\"/bin/sh\", \"-c\", \"trap '' TERM; echo $$ > " +
      pidfile.string() + "; while true; do sleep 0.1; done\"]\nnodes: 1\nranks_per_node: 1\n");
  auto reply = (*client)->Call(submit);
  ASSERT_TRUE(reply.ok()) << reply.status();
  ASSERT_TRUE(WaitUntil(
      [&] {
        std::ifstream in(pidfile);
        pid_t p = 0;
        return static_cast<bool>(in >> p) && p > 0;
      },
      15s));
  pid_t rank = 0;
  std::ifstream(pidfile) >> rank;
  ASSERT_FALSE(Gone(rank));

  // Stall the reactor: heartbeats stop (they need it), and so would a lease check run there.
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> stalled{false};
  auto stalled_at = Clock::now();
  (*agent)->RunOnReactorForTesting([&, released] {
    stalled = true;
    released.wait();
  });
  ASSERT_TRUE(WaitUntil([&] { return stalled.load(); }, 5s));
  // The rank ignores SIGTERM: only the watchdog's SIGKILL at the lease ends it. Its last
  // answered heartbeat was at most one interval before the stall.
  bool stopped = WaitUntil([&] { return Gone(rank); }, 1500ms + 400ms + 1500ms);
  auto took = Clock::now() - stalled_at;
  release.set_value();
  EXPECT_TRUE(stopped) << "the rank outlived the lease while the reactor was stalled";
  EXPECT_LE(took, 1500ms + 400ms + 500ms)
      << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms";
  agent->reset();
  server->reset();
  fs::remove_all(dir);
}

// ---- Outbox

proto::Envelope LogChunk(size_t bytes) {
  proto::Envelope e;
  e.mutable_agent_log_chunk()->set_data(std::string(bytes, 'x'));
  return e;
}

proto::Envelope Commit(const std::string& job, int64_t step) {
  proto::Envelope e;
  e.mutable_agent_report()->set_job_id(job);
  e.mutable_agent_report()->set_checkpoint_step(step);
  e.mutable_agent_report()->set_checkpoint_volume("ckpt");
  return e;
}

proto::Envelope Exit(const std::string& job, int rank) {
  proto::Envelope e;
  e.mutable_agent_report()->set_job_id(job);
  e.mutable_agent_report()->add_exits()->set_rank(rank);
  return e;
}

TEST(OutboxTest, LogChunksAreBoundedWhileExitsAndCommitsAreAllKeptInOrder) {
  node_agent::Outbox box(1 << 20);
  box.Push(LogChunk(100));  // the front: may be on its way, never dropped
  for (int i = 0; i < 1000; ++i) {
    box.Push(LogChunk(64 << 10));
    if (i % 10 == 0) box.Push(Commit("j", i + 1));
    if (i % 100 == 0) box.Push(Exit("j", i));
  }
  EXPECT_LE(box.log_bytes(), (1u << 20) + 200);
  EXPECT_GT(box.dropped_log_chunks(), 900u);
  std::vector<int64_t> commits;
  std::vector<int> exits;
  ASSERT_TRUE(box.front().has_agent_log_chunk());
  EXPECT_EQ(box.front().agent_log_chunk().data().size(), 100u);
  while (!box.empty()) {
    const auto& e = box.front();
    if (e.has_agent_report() && e.agent_report().checkpoint_step() > 0) {
      commits.push_back(e.agent_report().checkpoint_step());
    }
    if (e.has_agent_report() && e.agent_report().exits_size() > 0) {
      exits.push_back(e.agent_report().exits(0).rank());
    }
    box.pop_front();
  }
  ASSERT_EQ(commits.size(), 100u);
  for (size_t i = 0; i < commits.size(); ++i) EXPECT_EQ(commits[i], 10 * i + 1);
  ASSERT_EQ(exits.size(), 10u);
  for (size_t i = 0; i < exits.size(); ++i) EXPECT_EQ(exits[i], 100 * i);
  EXPECT_EQ(box.log_bytes(), 0u);
}

TEST(OutboxTest, ARepeatedReportIsCoalescedWhileItWaits) {
  node_agent::Outbox box;
  // A rank printing the same commit line over and over while the coordinator is away.
  for (int i = 0; i < 100000; ++i) box.Push(Commit("j", 7));
  EXPECT_EQ(box.size(), 1u);
  EXPECT_EQ(box.coalesced(), 99999u);
  box.Push(Commit("j", 8));
  box.Push(Commit("k", 7));
  EXPECT_EQ(box.size(), 3u);
  box.pop_front();
  // Once taken by the coordinator it is news again.
  EXPECT_TRUE(box.Push(Commit("j", 7)));
}

// ---- Checkpoint steps: good, resume choice, retention

class CheckpointStepsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("muster-steps-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void Write(int64_t step) {
    checkpoint::CheckpointerOptions o;
    o.dir = dir_.string();
    o.direct_io = false;
    auto ck = checkpoint::Checkpointer::Create(o);
    ASSERT_TRUE(ck.ok()) << ck.status();
    std::vector<float> w(1024, static_cast<float>(step));
    checkpoint::SaveState s;
    s.tensors.push_back(
        checkpoint::TensorRef::Replicated("w", checkpoint::DType::kF32, {1024}, w.data()));
    ASSERT_TRUE((*ck)->Save(step, s).ok());
    ASSERT_TRUE((*ck)->Wait().ok());
  }
  fs::path Step(int64_t step) { return dir_ / checkpoint::StepDirName(step); }

  fs::path dir_;
};

TEST_F(CheckpointStepsTest, AStepIsGoodOnlyWithEveryShardOfTheManifestsSize) {
  Write(10);
  Write(20);
  Write(30);
  EXPECT_TRUE(node_agent::StepIsGood(dir_.string(), 10).ok());
  // Never written.
  EXPECT_EQ(node_agent::StepIsGood(dir_.string(), 999999).code(), StatusCode::kNotFound);
  // A shard missing, or of another size than the MANIFEST says.
  fs::remove(Step(20) / "shard-00000.bin");
  Status missing = node_agent::StepIsGood(dir_.string(), 20);
  EXPECT_EQ(missing.code(), StatusCode::kDataLoss);
  EXPECT_NE(missing.message().find("shard-00000.bin"), std::string::npos) << missing;
  fs::resize_file(Step(30) / "shard-00000.bin", 100);
  EXPECT_NE(node_agent::StepIsGood(dir_.string(), 30).message().find("has 100 bytes"),
            std::string::npos);
  EXPECT_EQ(node_agent::GoodSteps(dir_.string()), std::vector<int64_t>({10}));
}

TEST_F(CheckpointStepsTest, AFifoOrASymlinkInAStepNeitherBlocksNorCounts) {
  Write(10);
  Write(20);
  // A FIFO as MANIFEST: opening it for reading would block; the check must not.
  fs::remove(Step(20) / "MANIFEST");
  ASSERT_EQ(::mkfifo((Step(20) / "MANIFEST").c_str(), 0600), 0);
  auto f =
      std::async(std::launch::async, [&] { return node_agent::StepIsGood(dir_.string(), 20); });
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << "blocked on a FIFO MANIFEST";
  EXPECT_NE(f.get().message().find("not a regular file"), std::string::npos);
  // A shard that is a symlink to a file of the right size elsewhere.
  fs::rename(Step(10) / "shard-00000.bin", dir_ / "outside.bin");
  fs::create_symlink(dir_ / "outside.bin", Step(10) / "shard-00000.bin");
  EXPECT_FALSE(node_agent::StepIsGood(dir_.string(), 10).ok());
}

TEST_F(CheckpointStepsTest, AResumeStepThatIsNotThereFallsBackToTheNewestGoodOrFresh) {
  Write(10);
  Write(20);
  auto same = node_agent::ChooseResumeStep(dir_.string(), 20);
  EXPECT_EQ(same.step, 20);
  EXPECT_TRUE(same.problem.empty());
  auto fresh = node_agent::ChooseResumeStep(dir_.string(), -1);
  EXPECT_EQ(fresh.step, -1);
  EXPECT_TRUE(fresh.problem.empty());
  // A forged commit: the catalog says 999999.
  auto forged = node_agent::ChooseResumeStep(dir_.string(), 999999);
  EXPECT_EQ(forged.step, 20);
  EXPECT_NE(forged.problem.find("does not exist"), std::string::npos) << forged.problem;
  // The newest is broken: the one before it.
  fs::remove(Step(20) / "shard-00000.bin");
  EXPECT_EQ(node_agent::ChooseResumeStep(dir_.string(), 20).step, 10);
  // Nothing good left: fresh, and why.
  fs::remove(Step(10) / "shard-00000.bin");
  auto none = node_agent::ChooseResumeStep(dir_.string(), 20);
  EXPECT_EQ(none.step, -1);
  EXPECT_FALSE(none.problem.empty());
  // No directory at all.
  EXPECT_EQ(node_agent::ChooseResumeStep((dir_ / "nope").string(), 5).step, -1);
}

TEST_F(CheckpointStepsTest, KeepRetainsTheNewestGoodStepsAndNeverTheLastGoodOne) {
  for (int64_t s : {1, 2, 3, 4, 5}) Write(s);
  fs::create_directories(dir_ / (checkpoint::StepDirName(6) + ".tmp"));  // a copy in progress
  auto removed = node_agent::PruneSteps(dir_.string(), 2);
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, std::vector<int64_t>({1, 2, 3}));
  EXPECT_EQ(node_agent::GoodSteps(dir_.string()), std::vector<int64_t>({5, 4}));
  EXPECT_TRUE(fs::exists(dir_ / (checkpoint::StepDirName(6) + ".tmp")));
  // Newer steps that are broken do not count: keep 1 leaves the newest good one alone.
  Write(7);
  Write(8);
  fs::remove(Step(7) / "shard-00000.bin");
  fs::remove(Step(8) / "shard-00000.bin");
  removed = node_agent::PruneSteps(dir_.string(), 1);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, std::vector<int64_t>({4}));
  EXPECT_EQ(node_agent::GoodSteps(dir_.string()), std::vector<int64_t>({5}));
  // keep 0: everything stays.
  EXPECT_TRUE(node_agent::PruneSteps(dir_.string(), 0)->empty());
}

}  // namespace
}  // namespace muster
