// Idle release and checkpoint copies: an on-demand node that runs no job but serves a
// checkpoint copy in flight (the target receiving it) is not released as idle until the copy is
// done; its idle clock starts then. A real Coordinator on an injected clock, its ProviderManager
// over a fake provider that records what it is told to release.

#include <gtest/gtest.h>

#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"
#include "tests/testing/coordinator_harness.h"

namespace muster::coordinator {
namespace {

using namespace std::chrono_literals;

class CopyReleaseTest : public ::testing::Test, public testing::CoordinatorHarness {
 protected:
  CopyReleaseTest() : CoordinatorHarness("durable2-copy-release") {}
  void SetUp() override {
    ASSERT_TRUE(Open());
    UseReleaseRecorder(2s, /*volume=*/true);
  }
  std::string Register(const std::string& name, const std::string& provider) {
    return CoordinatorHarness::Register(name,
                                        {.provider = provider, .volume = true, .transfer = true});
  }
  proto::Envelope Report(const std::string& node, const std::string& session,
                         const std::string& job, int attempt) {
    return ReportFrom(node, session, job, attempt);
  }
  // Heartbeats both nodes (so neither times out) and ticks the coordinator at `now_`.
  void TickAll() {
    Heartbeat("aws-1", sa_);
    Heartbeat("gcp-1", sg_);
    coord_->Tick();
  }

  std::string sa_, sg_;
};

TEST_F(CopyReleaseTest, AnIdleNodeReceivingACopyIsReleasedOnlyAfterTheCopyIsDone) {
  sa_ = Register("aws-1", "aws");  // static: not an on-demand provider
  sg_ = Register("gcp-1", "gcp");  // on demand, idle
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml(
      "name: ft\ncommand: x\nplacement:\n  providers: [aws]\ncheckpoint:\n  volume: ckpt\n");
  auto r = Call(submit);
  ASSERT_TRUE(r.has_submit_reply()) << r.DebugString();
  const std::string id = r.submit_reply().job_id();
  coord_->Tick();
  auto actions = Heartbeat("aws-1", sa_);
  ASSERT_EQ(actions.size(), 1u);
  ASSERT_TRUE(actions[0].has_start());
  auto started = Report("aws-1", sa_, id, 1);
  started.mutable_agent_report()->set_started(true);
  Call(started);

  // A commit on aws: its copy goes to gcp-1, the only node of another provider mounting ckpt.
  auto commit = Report("aws-1", sa_, id, 1);
  commit.mutable_agent_report()->set_checkpoint_step(10);
  commit.mutable_agent_report()->set_checkpoint_volume("ckpt");
  Call(commit);
  bool replicate = false;
  for (const auto& a : Heartbeat("gcp-1", sg_)) replicate |= a.has_replicate();
  ASSERT_TRUE(replicate) << Events();

  // Far past idle_timeout while the copy runs: not released.
  for (int i = 0; i < 5; ++i) {
    now_ += 1s;
    TickAll();
  }
  EXPECT_TRUE(released_.empty()) << Events();
  EXPECT_EQ(Events().find("node_released"), std::string::npos) << Events();

  // The copy is done: the node idles from now, and goes back after idle_timeout.
  auto done = Report("gcp-1", sg_, id, 1);
  done.mutable_agent_report()->set_checkpoint_step(10);
  done.mutable_agent_report()->set_checkpoint_volume("ckpt");
  done.mutable_agent_report()->set_checkpoint_replica(true);
  auto reply = Call(done);
  ASSERT_FALSE(reply.has_error()) << reply.DebugString();
  now_ += 1s;
  TickAll();
  EXPECT_TRUE(released_.empty()) << "its idle clock starts when the copy is done";
  for (int i = 0; i < 3 && released_.empty(); ++i) {
    now_ += 1s;
    TickAll();
  }
  EXPECT_EQ(released_, (std::vector<std::string>{"gcp-1"})) << Events();
}

}  // namespace
}  // namespace muster::coordinator
