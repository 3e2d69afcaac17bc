// Idle release and checkpoint copies: an on-demand node that runs no job but serves a
// checkpoint copy in flight (the target receiving it) is not released as idle until the copy is
// done; its idle clock starts then. A real Coordinator on an injected clock, its ProviderManager
// over a fake provider that records what it is told to release.

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class ReleaseRecorder : public providers::Provider {
 public:
  explicit ReleaseRecorder(providers::ProviderConfig c) : config_(std::move(c)) {}
  const providers::ProviderConfig& config() const override { return config_; }
  Status Request(const providers::NodeGroupRequest&) override { return Status::Ok(); }
  void Cancel(uint64_t) override {}
  void Release(const std::string& node) override { released->push_back(node); }
  std::vector<providers::RequestFailure> Poll() override { return {}; }
  std::vector<std::string>* released = nullptr;

 private:
  providers::ProviderConfig config_;
};

class CopyReleaseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("durable2-copy-release-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
    CoordinatorOptions o;
    o.clock = [this] { return now_; };
    auto c = Coordinator::Create(*CoordinatorDb::Open(dir_), o);
    ASSERT_TRUE(c.ok()) << c.status();
    coord_ = std::move(*c);
    providers::ProviderConfig gcp;
    gcp.name = "gcp";
    gcp.kind = "local";
    gcp.idle_timeout = 2s;
    gcp.node.slots = 8;
    gcp.node.volumes["ckpt"] = "/vol";
    providers::ProvidersConfig config;
    config.providers.push_back(gcp);
    auto fake = std::make_unique<ReleaseRecorder>(gcp);
    fake->released = &released_;
    std::map<std::string, std::unique_ptr<providers::Provider>> m;
    m["gcp"] = std::move(fake);
    coord_->SetProviders(std::make_unique<providers::ProviderManager>(config, std::move(m)));
  }
  void TearDown() override {
    coord_.reset();
    fs::remove_all(dir_);
  }
  proto::Envelope Call(proto::Envelope req) {
    proto::Envelope out;
    coord_->Handle("test", std::move(req), [&](proto::Envelope e) { out = std::move(e); });
    return out;
  }
  std::string Register(const std::string& name, const std::string& provider) {
    proto::Envelope e;
    auto* l = e.mutable_agent_register()->mutable_labels();
    l->set_name(name);
    l->set_provider(provider);
    l->set_gpus(8);
    l->set_slots(8);
    auto* v = l->add_volumes();
    v->set_name("ckpt");
    v->set_path("/vol/" + name);
    l->set_transfer_endpoint("tcp://" + name + ":7071");
    l->set_transfer_key("key-of-" + name);
    auto r = Call(e);
    EXPECT_TRUE(r.has_agent_registered()) << r.DebugString();
    return r.agent_registered().session_id();
  }
  std::vector<proto::AgentAction> Heartbeat(const std::string& node, const std::string& session) {
    proto::Envelope e;
    e.mutable_agent_heartbeat()->set_node(node);
    e.mutable_agent_heartbeat()->set_session_id(session);
    auto r = Call(e);
    return {r.agent_heartbeat_reply().actions().begin(), r.agent_heartbeat_reply().actions().end()};
  }
  proto::Envelope Report(const std::string& node, const std::string& session,
                         const std::string& job, int attempt) {
    proto::Envelope e;
    auto* r = e.mutable_agent_report();
    r->set_node(node);
    r->set_session_id(session);
    r->set_job_id(job);
    r->set_attempt(attempt);
    return e;
  }
  std::string Events() {
    proto::Envelope e;
    e.mutable_events_request();
    auto r = Call(e);
    std::string out;
    for (const auto& ev : r.events_reply().events()) {
      out += ev.kind() + " " + ev.node() + ": " + ev.message() + "\n";
    }
    return out;
  }
  // Heartbeats both nodes (so neither times out) and ticks the coordinator at `now_`.
  void TickAll() {
    Heartbeat("aws-1", sa_);
    Heartbeat("gcp-1", sg_);
    coord_->Tick();
  }

  TimePoint now_ = TimePoint{} + std::chrono::hours(490000);
  fs::path dir_;
  std::unique_ptr<Coordinator> coord_;
  std::vector<std::string> released_;
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
