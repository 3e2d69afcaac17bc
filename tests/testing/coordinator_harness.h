#pragma once

// An in-process Coordinator for unit tests: on an injected clock (now_), over a database in a
// fresh temporary directory, driven through Coordinator::Handle without sockets, with the
// messages an agent and a user send. A fixture derives from it (beside ::testing::Test) and keeps
// the helpers of its own tests; the test bodies use now_, coord_ and the helpers below directly.
//
// Thread-safety: one test thread. Header-only: the tests that use it link muster_coordinator.

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::testing {

// A provider that records the nodes it is told to release and does nothing else.
class ReleaseRecorder : public coordinator::providers::Provider {
 public:
  ReleaseRecorder(coordinator::providers::ProviderConfig c, std::vector<std::string>* released)
      : config_(std::move(c)), released_(released) {}
  const coordinator::providers::ProviderConfig& config() const override { return config_; }
  Status Request(const coordinator::providers::NodeGroupRequest&) override { return Status::Ok(); }
  void Cancel(uint64_t) override {}
  void Release(const std::string& node) override { released_->push_back(node); }
  std::vector<coordinator::providers::RequestFailure> Poll() override { return {}; }

 private:
  coordinator::providers::ProviderConfig config_;
  std::vector<std::string>* released_;
};

// What a test agent registers with, besides its name, 8 GPUs and 8 slots.
struct AgentLabels {
  std::string provider = "aws";
  std::string island;       // none when empty
  std::string address;      // none when empty
  bool volume = false;      // volume "ckpt" at /vol/<name>
  bool transfer = false;    // transfer endpoint tcp://<name>:7071, key "key-of-<name>"
  bool snapshots = false;   // snapshot endpoint tcp://<name>:7100, "snapshot-key-of-<name>"
  std::string running_job;  // re-registers running attempt `running_attempt` of this job
  int running_attempt = 1;
  int running_rank = 0;  // as that attempt's node rank
};

class CoordinatorHarness {
 public:
  // `prefix`: the temporary directory's name starts with it.
  explicit CoordinatorHarness(const std::string& prefix)
      : dir_(std::filesystem::temp_directory_path() /
             (prefix + "-" + std::to_string(getpid()) + "-" +
              std::to_string(std::random_device{}()))) {}
  ~CoordinatorHarness() {
    coord_.reset();
    std::filesystem::remove_all(dir_);
  }
  CoordinatorHarness(const CoordinatorHarness&) = delete;
  CoordinatorHarness& operator=(const CoordinatorHarness&) = delete;

  // A coordinator over the database in dir_, on now_'s clock (o.clock is replaced). Called
  // again, it is a restart: the old object is dropped as it is (every write was durable when
  // made, so this is what kill -9 leaves) and the new one restores from the database.
  ::testing::AssertionResult Open(coordinator::CoordinatorOptions o = {}) {
    coord_.reset();
    o.clock = [this] { return now_; };
    auto db = coordinator::CoordinatorDb::Open(dir_);
    if (!db.ok()) return ::testing::AssertionFailure() << db.status().ToString();
    auto c = coordinator::Coordinator::Create(std::move(*db), o);
    if (!c.ok()) return ::testing::AssertionFailure() << c.status().ToString();
    coord_ = std::move(*c);
    return ::testing::AssertionSuccess();
  }

  // Provider "gcp" (kind local, 8 slots, `idle_timeout`; volume "ckpt" at /vol when `volume`)
  // whose releases are recorded in released_.
  void UseReleaseRecorder(std::chrono::seconds idle_timeout, bool volume) {
    coordinator::providers::ProviderConfig gcp;
    gcp.name = "gcp";
    gcp.kind = "local";
    gcp.idle_timeout = idle_timeout;
    gcp.node.slots = 8;
    if (volume) gcp.node.volumes["ckpt"] = "/vol";
    coordinator::providers::ProvidersConfig config;
    config.providers.push_back(gcp);
    std::map<std::string, std::unique_ptr<coordinator::providers::Provider>> m;
    m["gcp"] = std::make_unique<ReleaseRecorder>(gcp, &released_);
    coord_->SetProviders(
        std::make_unique<coordinator::providers::ProviderManager>(config, std::move(m)));
  }

  // `req` as `caller`; the reply, which every request these tests make gets before Handle
  // returns (a parked poll would fail the test).
  proto::Envelope CallAs(const coordinator::Caller& caller, proto::Envelope req) {
    return Replied(
        [&](coordinator::Coordinator::Reply r) { coord_->Handle(caller, std::move(req), r); });
  }
  // The same with every right and no key (Handle's insecure-caller form).
  proto::Envelope Call(proto::Envelope req) {
    return Replied(
        [&](coordinator::Coordinator::Reply r) { coord_->Handle("test", std::move(req), r); });
  }

  static proto::Envelope RegisterRequest(const std::string& name, const AgentLabels& a) {
    proto::Envelope e;
    if (!a.running_job.empty()) {
      auto* ra = e.mutable_agent_register()->add_running();
      ra->set_job_id(a.running_job);
      ra->set_attempt(a.running_attempt);
      ra->set_node_rank(a.running_rank);
    }
    auto* l = e.mutable_agent_register()->mutable_labels();
    l->set_name(name);
    l->set_provider(a.provider);
    if (!a.island.empty()) l->set_island(a.island);
    l->set_gpus(8);
    l->set_slots(8);
    if (!a.address.empty()) l->set_address(a.address);
    if (a.volume) {
      auto* v = l->add_volumes();
      v->set_name("ckpt");
      v->set_path("/vol/" + name);
    }
    if (a.transfer) {
      l->set_transfer_endpoint("tcp://" + name + ":7071");
      l->set_transfer_key("key-of-" + name);
    }
    if (a.snapshots) {
      l->set_snapshot_endpoint("tcp://" + name + ":7100");
      l->set_snapshot_key("snapshot-key-of-" + name);
    }
    return e;
  }
  // Registers agent `name`; its session id.
  std::string Register(const std::string& name, const AgentLabels& a = {}) {
    auto r = Call(RegisterRequest(name, a));
    EXPECT_TRUE(r.has_agent_registered()) << r.DebugString();
    return r.agent_registered().session_id();
  }

  static proto::Envelope HeartbeatRequest(const std::string& node, const std::string& session) {
    proto::Envelope e;
    e.mutable_agent_heartbeat()->set_node(node);
    e.mutable_agent_heartbeat()->set_session_id(session);
    return e;
  }
  // A heartbeat of `node`; the actions it gets back.
  std::vector<proto::AgentAction> Heartbeat(const std::string& node, const std::string& session) {
    return ActionsOf(Call(HeartbeatRequest(node, session)));
  }
  static std::vector<proto::AgentAction> ActionsOf(const proto::Envelope& reply) {
    const auto& a = reply.agent_heartbeat_reply().actions();
    return {a.begin(), a.end()};
  }

  // An AgentReport from `node` about `job`'s `attempt`, to fill in.
  static proto::Envelope ReportFrom(const std::string& node, const std::string& session,
                                    const std::string& job, int attempt) {
    proto::Envelope e;
    auto* r = e.mutable_agent_report();
    r->set_node(node);
    r->set_session_id(session);
    r->set_job_id(job);
    r->set_attempt(attempt);
    return e;
  }

  // Submits a job spec; its id.
  std::string Submit(const std::string& yaml) {
    proto::Envelope e;
    e.mutable_submit_request()->set_yaml(yaml);
    auto r = Call(e);
    EXPECT_TRUE(r.has_submit_reply()) << r.DebugString();
    return r.submit_reply().job_id();
  }

  proto::JobStatus Status(const std::string& id) {
    proto::Envelope e;
    e.mutable_status_request()->set_job_id(id);
    return Call(e).status_reply().jobs(0);
  }

  // The events of `job` (every event when empty), one per line: "kind [node] message".
  std::string Events(const std::string& job = "") {
    proto::Envelope e;
    e.mutable_events_request()->set_job_id(job);
    std::string out;
    const proto::Envelope reply = Call(e);
    for (const auto& ev : reply.events_reply().events())
      out += ev.kind() + " [" + ev.node() + "] " + ev.message() + "\n";
    return out;
  }

  // `req` with every right; nullopt when the coordinator parks it (a log request it asks the
  // node for, a poll): its reply, if any, comes from a later Handle or Tick and is dropped.
  std::optional<proto::Envelope> CallOrPark(proto::Envelope req) {
    auto out = std::make_shared<std::optional<proto::Envelope>>();  // outlives a late reply
    coord_->Handle("test", std::move(req), [out](proto::Envelope e) { *out = std::move(e); });
    return *out;
  }

  template <typename F>
  static proto::Envelope Replied(F&& handle) {
    // Shared with the reply: one that comes after this returns (a parked request) must not
    // write into a frame that is gone; the EXPECT below fails the test instead.
    auto out = std::make_shared<std::optional<proto::Envelope>>();
    handle([out](proto::Envelope e) { *out = std::move(e); });
    EXPECT_TRUE(out->has_value());
    return out->value_or(proto::Envelope());
  }

  coordinator::TimePoint now_ = coordinator::TimePoint{} + std::chrono::hours(490000);
  const std::filesystem::path dir_;
  std::unique_ptr<coordinator::Coordinator> coord_;
  std::vector<std::string> released_;  // by UseReleaseRecorder's provider
};

}  // namespace muster::testing
