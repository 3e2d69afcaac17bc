// In-memory snapshots through a real agent runner and a real rank process: a job that asks for
// them (StartAssignment.snapshot_every_steps) gets the env (MUSTER_SNAPSHOT_EVERY,
// MUSTER_SNAPSHOT_SOCKET), its rank's snapshots land in the agent's SnapshotStore and come back
// bit for bit (tests/runtime/snapshot_rank.cc); they are kept when the attempt fails (a resume
// needs them) and dropped when it succeeds. An agent without snapshot memory runs the job
// without them.

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <set>

#include "checkpoint/snapshot_channel.h"
#include "common/reactor.h"
#include "node_agent/assignment_runner.h"
#include "tests/testing/wait_until.h"

namespace muster::node_agent {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class SnapshotRunnerTest : public ::testing::Test {
 protected:
  void Make(uint64_t snapshot_memory) {
    // Short: the snapshot socket's path must fit a sockaddr_un.
    static int n = 0;
    dir_ = fs::temp_directory_path() /
           ("snapshots-rt-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "work");
    reactor_ = std::make_unique<Reactor>("snapshot-runner-test");
    proto::NodeLabels labels;
    labels.set_name("n1");
    labels.set_provider("aws");
    labels.set_address("127.0.0.1");
    AssignmentRunner::Options o;
    o.work_dir = dir_ / "work";
    o.insecure = true;
    o.stop_grace = 200ms;
    o.snapshot_memory = snapshot_memory;
    AssignmentRunner::Outputs out;
    out.report = [this](proto::AgentReport r) { reports_.push_back(std::move(r)); };
    out.send = [](proto::Envelope) {};
    out.prune = [](const std::string&, int) {};
    out.replicate = [](const proto::ReplicateCheckpoint&) {};
    out.guard = [](pid_t, const std::string&) {};
    out.unguard = [](pid_t) {};
    auto runner = AssignmentRunner::Create(*reactor_, nullptr, labels, o, std::move(out));
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = std::move(*runner);
    reactor_->Start();
  }
  void TearDown() override {
    if (reactor_) {
      reactor_->Call("teardown", [this] { runner_.reset(); });
      reactor_->Stop();
    }
    fs::remove_all(dir_);
  }
  // Runs one assignment of `ranks` ranks of muster-snapshot-rank to the end; returns the exits.
  std::vector<proto::RankExit> Run(const std::string& job, int ranks, int64_t every,
                                   int exit_code) {
    proto::AgentAction a;
    auto* s = a.mutable_start();
    s->set_job_id(job);
    s->set_attempt(1);
    s->set_nnodes(1);
    s->set_ranks_per_node(ranks);
    s->set_master_addr("127.0.0.1");
    s->set_master_port(29500);
    s->set_rendezvous_port(29501);
    s->set_resume_step(-1);
    s->set_snapshot_every_steps(every);
    for (std::string c :
         {std::string(MUSTER_SNAPSHOT_RANK_BIN), std::string("5"), std::to_string(exit_code)}) {
      s->add_command(c);
    }
    reactor_->Call("act", [&] { runner_->OnAction(a); });
    std::vector<proto::RankExit> exits;
    testing::WaitUntil(
        [&] {
          return reactor_->Call("poll", [&] {
            for (const auto& r : reports_) {
              if (r.job_id() == job && r.all_exited()) return true;
            }
            return false;
          });
        },
        std::chrono::steady_clock::now() + 20s);
    reactor_->Call("exits", [&] {
      for (const auto& r : reports_) {
        if (r.job_id() != job) continue;
        for (const auto& x : r.exits()) exits.push_back(x);
      }
    });
    return exits;
  }

  fs::path dir_;
  std::unique_ptr<Reactor> reactor_;
  std::unique_ptr<AssignmentRunner> runner_;
  std::vector<proto::AgentReport> reports_;  // reactor thread only
};

TEST_F(SnapshotRunnerTest, ARanksSnapshotsReachItsAgentAndAreKeptWhileTheJobMayResume) {
  ASSERT_NO_FATAL_FAILURE(Make(64 << 20));
  ASSERT_NE(runner_->snapshots(), nullptr);
  auto exits = Run("snap-fail", 2, 2, /*exit_code=*/3);
  ASSERT_EQ(exits.size(), 2u);
  for (const auto& x : exits) EXPECT_EQ(x.exit_code(), 3) << "rank " << x.rank();
  // Step 4 of each rank (K=2, 5 steps; step 2 too unless step 4 replaced it before it was
  // sent), kept after the failure for the resume.
  std::set<int> newest;
  for (const auto& h : runner_->snapshots()->Held("snap-fail")) {
    EXPECT_EQ(h.attempt, 1);
    EXPECT_EQ(h.world_size, 2);
    EXPECT_TRUE(h.step == 2 || h.step == 4) << h.step;
    if (h.step == 4) newest.insert(h.rank);
  }
  EXPECT_EQ(newest, (std::set<int>{0, 1}));
}

TEST_F(SnapshotRunnerTest, AJobThatSucceedsHasItsSnapshotsDropped) {
  ASSERT_NO_FATAL_FAILURE(Make(64 << 20));
  auto exits = Run("snap-ok", 1, 1, 0);
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_EQ(exits[0].exit_code(), 0);
  EXPECT_TRUE(runner_->snapshots()->Held("snap-ok").empty());
  EXPECT_EQ(runner_->snapshots()->used_bytes(), 0u);
}

TEST_F(SnapshotRunnerTest, SnapshotsThatDoNotFitAreRefusedToTheRankWithTheReason) {
  ASSERT_NO_FATAL_FAILURE(Make(4096));  // a 4 KiB tensor x 2 steps does not fit
  auto exits = Run("snap-big", 1, 1, 0);
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_EQ(exits[0].exit_code(), 6);
  EXPECT_EQ(runner_->snapshots()->used_bytes(), 0u);
  EXPECT_EQ(runner_->snapshots()->reserved_bytes(), 0u);
}

// Only the agent's own ranks may use its snapshot socket, each for its own frames: this test
// process (the agent's user, so the directory lets it reach the socket) is refused, for a job
// that exists too, and nothing is kept.
TEST_F(SnapshotRunnerTest, AProcessThatIsNotARankIsRefusedTheSocket) {
  ASSERT_NO_FATAL_FAILURE(Make(64 << 20));
  auto exits = Run("snap-kept", 1, 1, 3);  // its snapshots are kept after the failure
  ASSERT_EQ(exits.size(), 1u);
  ASSERT_FALSE(runner_->snapshots()->Held("snap-kept").empty());
  auto client =
      checkpoint::SnapshotClient::Connect((dir_ / "work" / "snapshots" / "s.sock").string());
  ASSERT_TRUE(client.ok()) << client.status();
  checkpoint::SnapshotKey key{
      .job = "snap-kept", .attempt = 1, .rank = 0, .world_size = 1, .step = 1000};
  Status put = (*client)->Put(key, "not a rank's");
  EXPECT_EQ(put.code(), StatusCode::kFailedPrecondition) << put;
  EXPECT_NE(put.message().find("permission denied: process " + std::to_string(::getpid()) +
                               " is not a rank this agent started"),
            std::string::npos)
      << put;
  auto got = (*client)->Get(key, 1 << 20);
  EXPECT_EQ(got.status().code(), StatusCode::kFailedPrecondition) << got.status();
  EXPECT_FALSE(runner_->snapshots()->Get("snap-kept", 0, 1000).ok());
}

// The coordinator's DropSnapshots (the job ended, or its next attempt runs elsewhere) frees
// what a failed attempt left here, reservations included; another job's frames stay.
TEST_F(SnapshotRunnerTest, DropSnapshotsFreesTheJobsFramesAndReservations) {
  ASSERT_NO_FATAL_FAILURE(Make(64 << 20));
  ASSERT_EQ(Run("snap-a", 1, 1, 3).size(), 1u);
  ASSERT_EQ(Run("snap-b", 1, 1, 3).size(), 1u);
  ASSERT_FALSE(runner_->snapshots()->Held("snap-a").empty());
  const uint64_t reserved = runner_->snapshots()->reserved_bytes();
  proto::AgentAction drop;
  drop.mutable_drop_snapshots()->set_job_id("snap-a");
  reactor_->Call("drop", [&] { runner_->OnAction(drop); });
  EXPECT_TRUE(runner_->snapshots()->Held("snap-a").empty());
  EXPECT_FALSE(runner_->snapshots()->Held("snap-b").empty());
  EXPECT_LT(runner_->snapshots()->reserved_bytes(), reserved);
  auto jobs = runner_->snapshots()->Jobs();
  EXPECT_EQ(jobs, std::vector<std::string>{"snap-b"});
}

TEST(RankTrustTest, ARankMayUseOnlyItsOwnFramesOfItsOwnJob) {
  RankTrust trust(std::chrono::milliseconds(20));
  checkpoint::SnapshotKey key{.job = "j", .attempt = 1, .rank = 1, .world_size = 2, .step = 3};
  EXPECT_EQ(trust.Check(::getpid(), key).code(), StatusCode::kFailedPrecondition);
  trust.Add(::getpgid(0), "j", 1);  // this process's group stands for a rank's
  EXPECT_TRUE(trust.Check(::getpid(), key).ok());
  key.rank = 0;
  EXPECT_NE(trust.Check(::getpid(), key).message().find("is rank 1 of job j, not rank 0 of job j"),
            std::string::npos);
  key.rank = 1;
  key.job = "other";
  EXPECT_EQ(trust.Check(::getpid(), key).code(), StatusCode::kFailedPrecondition);
  trust.Remove(::getpgid(0));
  key.job = "j";
  EXPECT_EQ(trust.Check(::getpid(), key).code(), StatusCode::kFailedPrecondition);
}

// A rank runs as soon as it is spawned: it may ask before the runner recorded it (a restore at
// its very start raced the runner and was refused, exit 7, in the netns cluster).
TEST(RankTrustTest, ARankThatAsksBeforeItIsRecordedIsWaitedFor) {
  posix_spawnattr_t attr;
  ASSERT_EQ(posix_spawnattr_init(&attr), 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);  // leads its own group, as the supervisor's ranks do
  char sleep_bin[] = "/bin/sleep", arg[] = "30";
  char* argv[] = {sleep_bin, arg, nullptr};
  pid_t child = -1;
  ASSERT_EQ(posix_spawn(&child, "/bin/sleep", nullptr, &attr, argv, environ), 0);
  posix_spawnattr_destroy(&attr);
  struct Reap {
    pid_t pid;
    ~Reap() {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  } reap{child};

  RankTrust trust(std::chrono::milliseconds(20000));
  checkpoint::SnapshotKey key{.job = "j", .attempt = 1, .rank = 0, .world_size = 1, .step = 1};
  auto checked = std::async(std::launch::async, [&] { return trust.Check(child, key); });
  ASSERT_TRUE(testing::WaitUntil([&] { return trust.waiting() == 1; }, 10s));
  trust.Add(child, "j", 0);
  ASSERT_EQ(checked.wait_for(10s), std::future_status::ready);
  EXPECT_TRUE(checked.get().ok());

  // Not one of its ranks, ever: refused once the wait is over.
  RankTrust brief(std::chrono::milliseconds(50));
  EXPECT_NE(brief.Check(child, key).message().find("is not a rank this agent started"),
            std::string::npos);
}

TEST_F(SnapshotRunnerTest, WithoutSnapshotMemoryTheJobRunsWithoutSnapshots) {
  ASSERT_NO_FATAL_FAILURE(Make(0));
  EXPECT_EQ(runner_->snapshots(), nullptr);
  auto exits = Run("snap-none", 1, 1, 0);
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_EQ(exits[0].exit_code(), 5);  // the rank was offered no snapshots
}

}  // namespace
}  // namespace muster::node_agent
