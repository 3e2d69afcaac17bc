// AssignmentRunner on its own: its decisions with a reactor and no coordinator, no session and
// (except the last test) no rank process: what it reports for starts it refuses, notices, log
// fetches, and one short rank's start, progress and exit.

#include "node_agent/assignment_runner.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "common/reactor.h"

namespace muster::node_agent {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class AssignmentRunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("agentsplit-runner-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "work");
    fs::create_directories(dir_ / "vol");
    reactor_ = std::make_unique<Reactor>("runner-test");
    proto::NodeLabels labels;
    labels.set_name("n1");
    labels.set_provider("aws");
    labels.set_address("127.0.0.1");
    auto* v = labels.add_volumes();
    v->set_name("ckpt");
    v->set_path((dir_ / "vol").string());
    AssignmentRunner::Options o;
    o.work_dir = dir_ / "work";
    o.insecure = true;
    o.stop_grace = 200ms;
    AssignmentRunner::Outputs out;
    // All outputs run on the reactor thread; the test reads them there too (Call).
    out.report = [this](proto::AgentReport r) { reports_.push_back(std::move(r)); };
    out.send = [this](proto::Envelope e) { sent_.push_back(std::move(e)); };
    out.prune = [](const std::string&, int) {};
    out.replicate = [this](const proto::ReplicateCheckpoint& r) { replicate_.push_back(r); };
    out.guard = [this](pid_t pgid, const std::string&) { guarded_.push_back(pgid); };
    out.unguard = [this](pid_t pgid) { unguarded_.push_back(pgid); };
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

  void Act(const proto::AgentAction& a) {
    reactor_->Call("act", [&] { runner_->OnAction(a); });
  }
  std::vector<proto::AgentReport> Reports() {
    return reactor_->Call("reports", [this] { return reports_; });
  }
  static proto::AgentAction Start(const std::string& job, std::vector<std::string> command,
                                  const std::string& volume = "") {
    proto::AgentAction a;
    auto* s = a.mutable_start();
    s->set_job_id(job);
    s->set_attempt(1);
    s->set_nnodes(1);
    s->set_ranks_per_node(1);
    s->set_node_rank(0);
    s->set_master_addr("127.0.0.1");
    s->set_master_port(29500);
    s->set_rendezvous_port(29501);
    s->set_resume_step(-1);
    s->set_checkpoint_volume(volume);
    for (auto& c : command) s->add_command(c);
    return a;
  }
  template <typename F>
  bool WaitUntil(F pred, std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (reactor_->Call("poll", pred)) return true;
      if (std::chrono::steady_clock::now() >= end) return false;
      std::this_thread::sleep_for(20ms);
    }
  }

  fs::path dir_;
  std::unique_ptr<Reactor> reactor_;
  std::unique_ptr<AssignmentRunner> runner_;
  // Reactor thread only.
  std::vector<proto::AgentReport> reports_;
  std::vector<proto::Envelope> sent_;
  std::vector<proto::ReplicateCheckpoint> replicate_;
  std::vector<pid_t> guarded_, unguarded_;
};

TEST_F(AssignmentRunnerTest, StartsItCannotRunAreClearStartErrorsAndSpawnNothing) {
  Act(Start("../escape", {"/bin/true"}));
  Act(Start("no-command", {}));
  Act(Start("no-volume", {"/bin/true"}, "elsewhere"));
  auto r = Reports();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_NE(r[0].start_error().find("job id"), std::string::npos) << r[0].start_error();
  EXPECT_EQ(r[1].start_error(), "empty command or no ranks");
  EXPECT_EQ(r[2].start_error(), "volume elsewhere is not mounted here");
  for (const auto& x : r) {
    EXPECT_TRUE(x.all_exited());
    EXPECT_FALSE(x.start_retryable());
  }
  EXPECT_TRUE(reactor_->Call("idle", [this] { return runner_->Idle(); }));
  EXPECT_TRUE(reactor_->Call("running", [this] { return runner_->Running().empty(); }));
  EXPECT_TRUE(reactor_->Call("guarded", [this] { return guarded_.empty(); }));
}

TEST_F(AssignmentRunnerTest, ANoticeIsReportedOnceAndRefusesLaterStarts) {
  PreemptionNotice n;
  n.source = "file";
  n.detail = "test";
  n.deadline = std::chrono::system_clock::now() + 30s;
  reactor_->Call("notice", [&] { runner_->OnNotice(n); });
  reactor_->Call("notice", [&] { runner_->OnNotice(n); });  // the first notice counts
  Act(Start("later", {"/bin/true"}));
  auto r = Reports();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_GT(r[0].notice_deadline_ms(), 0);
  EXPECT_EQ(r[0].notice_source(), "file: test");
  EXPECT_EQ(r[1].job_id(), "later");
  EXPECT_EQ(r[1].start_error(), "node has a preemption notice (file)");
}

TEST_F(AssignmentRunnerTest, FetchLogAnswersDataErrorsAndRestartsARotatedLog) {
  fs::path log = dir_ / "work" / "logs" / "job" / "attempt-2" / "rank-3.log";
  fs::create_directories(log.parent_path());
  std::ofstream(log) << "hello world\n";
  auto fetch = [&](const std::string& job, int64_t offset) {
    proto::AgentAction a;
    auto* f = a.mutable_fetch_log();
    f->set_fetch_id(7);
    f->set_job_id(job);
    f->set_attempt(2);
    f->set_rank(3);
    f->set_offset(offset);
    Act(a);
    return reactor_->Call("sent", [this] { return sent_.back().agent_log_chunk(); });
  };
  auto c = fetch("job", 6);
  EXPECT_EQ(c.data(), "world\n");
  EXPECT_EQ(c.next_offset(), 12);
  EXPECT_TRUE(c.eof());  // nothing of that attempt runs here
  EXPECT_EQ(c.node(), "n1");
  EXPECT_EQ(c.fetch_id(), 7u);
  c = fetch("job", 1000);  // past the end: rotated since, read from the start
  EXPECT_EQ(c.data(), "hello world\n");
  c = fetch("other", 0);
  EXPECT_EQ(c.error(), "no log for rank 3 of other attempt 2 on n1");
  EXPECT_TRUE(fetch("../job", 0).eof());
  EXPECT_NE(fetch("../job", 0).error().find("job id"), std::string::npos);
  EXPECT_TRUE(Reports().empty());  // log chunks are not reports
}

TEST_F(AssignmentRunnerTest, ReplicationsAreHandedOnAndAShortRankIsReportedEndToEnd) {
  proto::AgentAction rep;
  rep.mutable_replicate()->set_job_id("j");
  rep.mutable_replicate()->set_step(4);
  Act(rep);
  EXPECT_EQ(reactor_->Call("rep", [this] { return replicate_.size(); }), 1u);

  Act(Start("short", {"/bin/sh", "-c", "echo 'MUSTER_PROGRESS step=3 loss=0.5'; exit 3"}));
  ASSERT_TRUE(WaitUntil(
      [this] {
        return !reports_.empty() && reports_.back().all_exited() && unguarded_.size() == 1;
      },
      10s));
  auto r = Reports();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_TRUE(r[0].started());
  ASSERT_EQ(r[1].exits_size(), 1);
  EXPECT_EQ(r[1].exits(0).rank(), 0);
  EXPECT_EQ(r[1].exits(0).exit_code(), 3);
  EXPECT_FALSE(r[1].exits(0).stopped_by_agent());
  EXPECT_EQ(reactor_->Call("g", [this] { return guarded_; }),
            reactor_->Call("u", [this] { return unguarded_; }));
  auto progress = reactor_->Call("p", [this] { return runner_->TakeProgress(); });
  ASSERT_EQ(progress.count("short"), 1u);
  EXPECT_EQ(progress["short"].step(), 3);
  EXPECT_DOUBLE_EQ(progress["short"].loss(), 0.5);
  EXPECT_TRUE(reactor_->Call("p", [this] { return runner_->TakeProgress().empty(); }));
  // A heartbeat that failed gives it back; newer progress taken since would win.
  reactor_->Call("back", [&] { runner_->ReturnProgress(progress); });
  EXPECT_EQ(reactor_->Call("p", [this] { return runner_->TakeProgress().size(); }), 1u);
  EXPECT_TRUE(reactor_->Call("idle", [this] { return runner_->Idle(); }));
}

}  // namespace
}  // namespace muster::node_agent
