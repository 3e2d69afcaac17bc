// Durable writes never fail silently (coordinator.h, "Durable writes"): for each mutation of the
// coordinator, a FaultInjectionCoordinatorDb fails its writes one at a time (write N of the
// mutation, for every N it makes), and the test checks the latch: the error names the failed
// write, the request that hit it and every later change are refused with it, no later write
// reaches the store, reads and `muster status` keep working and show it, and nothing in memory
// (job records, quarantines, drains, start actions sent to agents) claims what the store does
// not have.

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <random>

#include "common/wire.h"
#include "coordinator/coordinator.h"
#include "coordinator/fault_injection_coordinator_db.h"

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class Harness {
 public:
  Harness() {
    dir_ = fs::temp_directory_path() / ("muster-coord-durable-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
    auto base = CoordinatorDb::Open(dir_);
    EXPECT_TRUE(base.ok()) << base.status();
    auto fault = std::make_unique<FaultInjectionCoordinatorDb>(std::move(*base));
    fault_ = fault.get();
    auto c = Coordinator::Create(std::move(fault), Options());
    EXPECT_TRUE(c.ok()) << c.status();
    coord_ = std::move(*c);
  }
  ~Harness() {
    coord_.reset();
    fs::remove_all(dir_);
  }

  CoordinatorOptions Options() {
    CoordinatorOptions o;
    o.clock = [this] { return now_; };
    o.heartbeat_timeout = 5s;
    o.quarantine.failures_to_quarantine = 1;  // the first failure quarantines: a node write
    return o;
  }

  proto::Envelope Call(proto::Envelope req) {
    proto::Envelope out;
    bool replied = false;
    coord_->Handle("test", std::move(req), [&](proto::Envelope e) {
      out = std::move(e);
      replied = true;
    });
    EXPECT_TRUE(replied);
    return out;
  }
  static Status ErrorOf(const proto::Envelope& e) {
    return e.has_error() ? ErrorToStatus(e.error()) : Status::Ok();
  }

  proto::Envelope RegisterRequest(const std::string& name) {
    proto::Envelope e;
    auto* l = e.mutable_agent_register()->mutable_labels();
    l->set_name(name);
    l->set_provider("aws");
    l->set_gpus(8);
    l->set_slots(8);
    l->add_volumes()->set_name("ckpt");
    return e;
  }
  proto::Envelope Register(const std::string& name) {
    proto::Envelope r = Call(RegisterRequest(name));
    if (r.has_agent_registered()) sessions_[name] = r.agent_registered().session_id();
    return r;
  }
  proto::Envelope SubmitRequest(const std::string& yaml) {
    proto::Envelope e;
    e.mutable_submit_request()->set_yaml(yaml);
    return e;
  }
  std::string Submit(const std::string& yaml) {
    proto::Envelope r = Call(SubmitRequest(yaml));
    EXPECT_TRUE(r.has_submit_reply()) << r.DebugString();
    return r.submit_reply().job_id();
  }
  std::vector<proto::AgentAction> Heartbeat(const std::string& node) {
    proto::Envelope e;
    e.mutable_agent_heartbeat()->set_node(node);
    e.mutable_agent_heartbeat()->set_session_id(sessions_[node]);
    auto r = Call(e);
    return {r.agent_heartbeat_reply().actions().begin(), r.agent_heartbeat_reply().actions().end()};
  }
  proto::Envelope Report(const std::string& node, const std::string& job, int attempt,
                         const std::function<void(proto::AgentReport*)>& fill) {
    proto::Envelope e;
    auto* r = e.mutable_agent_report();
    r->set_node(node);
    r->set_session_id(sessions_[node]);
    r->set_job_id(job);
    r->set_attempt(attempt);
    fill(r);
    return Call(e);
  }
  static void Exit(proto::AgentReport* r, int code) {
    r->add_exits()->set_exit_code(code);
    r->set_all_exited(true);
  }
  proto::StatusReply StatusOfAll() {
    proto::Envelope e;
    e.mutable_status_request();
    proto::Envelope r = Call(e);
    EXPECT_TRUE(r.has_status_reply()) << r.DebugString();
    return r.status_reply();
  }

  // A job on n0, started; returns its id.
  std::string RunningJob(const std::string& extra = "") {
    Register("n0");
    std::string id = Submit("name: j\ncommand: x\n" + extra);
    auto a = Heartbeat("n0");
    EXPECT_EQ(a.size(), 1u);
    EXPECT_TRUE(
        Report("n0", id, 1, [](auto* r) { r->set_started(true); }).has_agent_report_reply());
    return id;
  }

  TimePoint now_ = TimePoint{} + std::chrono::hours(490000);
  fs::path dir_;
  FaultInjectionCoordinatorDb* fault_ = nullptr;
  std::unique_ptr<Coordinator> coord_;
  std::map<std::string, std::string> sessions_;
  std::string job_;  // the setup's job, if any
};

struct Mutation {
  std::string name;
  std::function<void(Harness&)> setup;
  // The mutation: a request's reply, or nullopt for Tick's own changes.
  std::function<std::optional<proto::Envelope>(Harness&)> act;
};

void PrintTo(const Mutation& m, std::ostream* os) { *os << m.name; }

std::vector<Mutation> Mutations() {
  auto nothing = [](Harness&) {};
  auto running = [](Harness& h) { h.job_ = h.RunningJob(); };
  return {
      {"RegisterBindsAndStoresTheNode", nothing, [](Harness& h) { return h.Register("n0"); }},
      {"SubmitStoresAndStartsTheJob", [](Harness& h) { h.Register("n0"); },
       [](Harness& h) { return h.Call(h.SubmitRequest("name: s\ncommand: x\n")); }},
      {"StartedReport",
       [](Harness& h) {
         h.Register("n0");
         h.job_ = h.Submit("name: j\ncommand: x\n");
         h.Heartbeat("n0");
       },
       [](Harness& h) { return h.Report("n0", h.job_, 1, [](auto* r) { r->set_started(true); }); }},
      {"EveryRankExitedZero", running,
       [](Harness& h) { return h.Report("n0", h.job_, 1, [](auto* r) { Harness::Exit(r, 0); }); }},
      {"ARankFailedQuarantinesAndRestarts", running,
       [](Harness& h) { return h.Report("n0", h.job_, 1, [](auto* r) { Harness::Exit(r, 1); }); }},
      {"CancelARunningJob", running,
       [](Harness& h) {
         proto::Envelope e;
         e.mutable_cancel_request()->set_job_id(h.job_);
         return h.Call(e);
       }},
      {"CancelAPendingJob",
       [](Harness& h) {
         h.RunningJob();
         h.job_ = h.Submit("name: p\ncommand: x\n");  // waits: n0 is busy
       },
       [](Harness& h) {
         proto::Envelope e;
         e.mutable_cancel_request()->set_job_id(h.job_);
         return h.Call(e);
       }},
      {"DrainANode", [](Harness& h) { h.Register("n0"); },
       [](Harness& h) {
         proto::Envelope e;
         e.mutable_drain_request()->set_node("n0");
         e.mutable_drain_request()->set_drain(true);
         return h.Call(e);
       }},
      {"ForgetANode",
       [](Harness& h) {
         h.Register("n0");
         h.Register("n1");
         h.coord_->AgentGone("n1", h.sessions_["n1"], "its agent's connections closed");
       },
       [](Harness& h) {
         proto::Envelope e;
         e.mutable_forget_node_request()->set_node("n1");
         return h.Call(e);
       }},
      {"ACheckpointCommit",
       [](Harness& h) { h.job_ = h.RunningJob("checkpoint:\n  volume: ckpt\n"); },
       [](Harness& h) {
         return h.Report("n0", h.job_, 1, [](auto* r) {
           r->set_checkpoint_step(10);
           r->set_checkpoint_volume("ckpt");
         });
       }},
      {"ACommitStartsACopyToAnotherProvider",
       [](Harness& h) {
         proto::Envelope src = h.RegisterRequest("n0");
         src.mutable_agent_register()->mutable_labels()->set_transfer_endpoint("tcp://127.0.0.1:1");
         src.mutable_agent_register()->mutable_labels()->set_transfer_key("key-of-n0");
         h.sessions_["n0"] = h.Call(src).agent_registered().session_id();
         h.job_ = h.Submit("name: j\ncommand: x\ncheckpoint:\n  volume: ckpt\n");
         EXPECT_EQ(h.Heartbeat("n0").size(), 1u);
         h.Report("n0", h.job_, 1, [](auto* r) { r->set_started(true); });
         proto::Envelope target = h.RegisterRequest("z0");
         target.mutable_agent_register()->mutable_labels()->set_provider("gcp");
         h.sessions_["z0"] = h.Call(target).agent_registered().session_id();
       },
       [](Harness& h) {
         return h.Report("n0", h.job_, 1, [](auto* r) {
           r->set_checkpoint_step(10);
           r->set_checkpoint_volume("ckpt");
         });
       }},
      {"AResumeFallback", running,
       [](Harness& h) {
         return h.Report("n0", h.job_, 1, [](auto* r) {
           r->set_resume_fallback("step 7 is not good here");
           r->set_resume_fallback_step(5);
         });
       }},
      {"APreflightVerdict",
       [](Harness& h) {
         h.Register("n0");
         h.job_ = h.Submit("name: pf\ncommand: x\n");
         EXPECT_EQ(h.Heartbeat("n0").size(), 1u);
       },
       [](Harness& h) {
         return h.Report("n0", h.job_, 1, [](auto* r) {
           r->set_start_error("no GPU visible");
           r->set_preflight_failed(true);
           r->set_preflight_blamed_rank(0);
           Harness::Exit(r, 1);
         });
       }},
      {"APreemptionNotice", running,
       [](Harness& h) {
         proto::Envelope e;
         e.mutable_preempt_node_request()->set_node("n0");
         e.mutable_preempt_node_request()->set_notice_ms(30000);
         return h.Call(e);
       }},
      {"AnAgentsNotice", running,
       [](Harness& h) {
         return h.Report("n0", "", 0, [&](auto* r) {
           r->set_notice_deadline_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         (h.now_ + 30s).time_since_epoch())
                                         .count());
           r->set_notice_source("test");
         });
       }},
      {"TickLosesASilentNode", running,
       [](Harness& h) -> std::optional<proto::Envelope> {
         h.now_ += 6s;
         h.coord_->Tick();
         return std::nullopt;
       }},
      {"TickEnforcesATimeLimit",
       [](Harness& h) {
         h.job_ = h.RunningJob("time_limit: 10s\n");
         for (int i = 0; i < 9; ++i) {
           h.now_ += 1s;
           h.Heartbeat("n0");
           h.coord_->Tick();
         }
       },
       [](Harness& h) -> std::optional<proto::Envelope> {
         h.now_ += 2s;
         h.Heartbeat("n0");
         h.coord_->Tick();
         return std::nullopt;
       }},
  };
}

// Nothing in memory claims what the store does not have.
void ExpectMemoryMatchesTheStore(Harness& h, const std::vector<proto::AgentAction>& sent) {
  proto::StatusReply st = h.StatusOfAll();
  auto stored = h.fault_->LoadJobs();
  ASSERT_TRUE(stored.ok()) << stored.status();
  std::map<std::string, JobRecord> by_id;
  for (auto& j : *stored) by_id[j.id] = j;
  EXPECT_EQ(static_cast<size_t>(st.jobs_size()), by_id.size());
  for (const auto& j : st.jobs()) {
    SCOPED_TRACE("job " + j.job_id());
    auto it = by_id.find(j.job_id());
    ASSERT_NE(it, by_id.end()) << "the coordinator shows a job the store does not have";
    const JobRecord& r = it->second;
    EXPECT_EQ(proto::JobState_Name(j.state()), proto::JobState_Name(r.state));
    EXPECT_EQ(j.attempt(), r.attempt);
    EXPECT_EQ(j.restarts(), r.restarts);
    EXPECT_EQ(j.preemptions(), r.preemptions);
    EXPECT_EQ(std::vector<std::string>(j.nodes().begin(), j.nodes().end()), r.nodes);
    EXPECT_EQ(j.detail(), r.detail);
    EXPECT_EQ(j.resume_step(), r.resume_step);
  }
  auto nodes = h.fault_->LoadNodes();
  ASSERT_TRUE(nodes.ok());
  proto::Envelope req;
  req.mutable_nodes_request();
  proto::Envelope shown = h.Call(req);
  std::map<std::string, NodeRecord> stored_nodes;
  for (auto& n : *nodes) stored_nodes[n.labels.name()] = n;
  // A node the store has is not dropped from memory (`muster node forget` deletes it there
  // first).
  for (const auto& [name, n] : stored_nodes) {
    EXPECT_TRUE(std::any_of(shown.nodes_reply().nodes().begin(), shown.nodes_reply().nodes().end(),
                            [&](const auto& s) { return s.labels().name() == name; }))
        << name << " is stored but not shown";
  }
  for (const auto& n : shown.nodes_reply().nodes()) {
    auto it = stored_nodes.find(n.labels().name());
    if (it == stored_nodes.end()) {
      EXPECT_NE(n.state(), proto::NODE_UP) << n.labels().name() << " is up but not stored";
      continue;
    }
    EXPECT_EQ(n.quarantines(), it->second.quarantines) << n.labels().name();
    if (!n.job_id().empty()) {  // the scheduler's allocation: a job the store has on the node
      auto j = by_id.find(n.job_id());
      ASSERT_NE(j, by_id.end()) << n.job_id();
      EXPECT_NE(std::find(j->second.nodes.begin(), j->second.nodes.end(), n.labels().name()),
                j->second.nodes.end())
          << n.labels().name() << " runs " << n.job_id() << " as the store does not have it";
    }
    EXPECT_EQ(n.quarantined_until_ms(), it->second.quarantined_until_ms);
    if (it->second.state == proto::NODE_UP) {
      EXPECT_NE(n.state(), proto::NODE_DRAINING) << "drained, but the store says up";
    }
  }
  // An agent is told to start only an attempt the store has as scheduled or running.
  for (const auto& a : sent) {
    if (!a.has_start()) continue;
    auto it = by_id.find(a.start().job_id());
    ASSERT_NE(it, by_id.end());
    EXPECT_EQ(a.start().attempt(), it->second.attempt);
    EXPECT_TRUE(it->second.state == proto::JOB_SCHEDULED || it->second.state == proto::JOB_RUNNING)
        << proto::JobState_Name(it->second.state);
  }
}

class DurableWriteTest : public ::testing::TestWithParam<Mutation> {};

TEST_P(DurableWriteTest, EachFailedWriteLatchesAndNothingClaimsWhatTheStoreLacks) {
  const Mutation& m = GetParam();
  int writes = 0;
  std::vector<std::string> log;
  {
    Harness h;
    m.setup(h);
    int before = h.fault_->writes();
    auto reply = m.act(h);
    if (reply) {
      ASSERT_TRUE(Harness::ErrorOf(*reply).ok()) << Harness::ErrorOf(*reply);
    }
    ASSERT_TRUE(h.coord_->write_error().ok());
    writes = h.fault_->writes() - before;
    log.assign(h.fault_->write_log().begin() + before, h.fault_->write_log().end());
  }
  ASSERT_GT(writes, 0) << "the mutation writes nothing";
  for (int n = 1; n <= writes; ++n) {
    SCOPED_TRACE(fmt::format("write {} of {}: {}", n, writes, log[n - 1]));
    Harness h;
    m.setup(h);
    ASSERT_TRUE(h.coord_->write_error().ok());
    h.fault_->FailWrite(h.fault_->writes() + n);  // only that one: later ones would succeed
    auto reply = m.act(h);

    // The latch, naming the failed write.
    const Status latched = h.coord_->write_error();
    ASSERT_FALSE(latched.ok()) << "write " << n << " failed silently";
    EXPECT_NE(latched.message().find("injected fault: write"), std::string::npos) << latched;
    EXPECT_NE(latched.message().find(h.dir_.string()), std::string::npos) << latched;
    const int at_latch = h.fault_->writes();
    if (reply) {
      Status st = Harness::ErrorOf(*reply);
      EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
      EXPECT_NE(st.message().find(latched.message()), std::string::npos) << st;
    }

    // Every later change is refused with it, and reaches no store.
    for (proto::Envelope later :
         {h.SubmitRequest("name: later\ncommand: x\n"), h.RegisterRequest("n9")}) {
      Status st = Harness::ErrorOf(h.Call(later));
      EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
      EXPECT_NE(st.message().find("refuses changes since a durable write failed"),
                std::string::npos)
          << st;
      EXPECT_NE(st.message().find(latched.message()), std::string::npos) << st;
    }
    if (!h.job_.empty()) {
      Status st = Harness::ErrorOf(h.Report("n0", h.job_, 1, [](auto* r) { Harness::Exit(r, 0); }));
      EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
    }
    std::vector<proto::AgentAction> sent = h.Heartbeat("n0");  // heartbeats still work
    h.now_ += 60s;
    h.coord_->Tick();  // no lost node, no start, nothing written
    EXPECT_EQ(h.fault_->writes(), at_latch) << h.fault_->write_log().back();

    // Reads work, and the status shows the latch.
    proto::StatusReply st = h.StatusOfAll();
    EXPECT_EQ(st.write_error(), latched.message());
    proto::Envelope events;
    events.mutable_events_request();
    EXPECT_TRUE(h.Call(events).has_events_reply());

    ExpectMemoryMatchesTheStore(h, sent);
  }
}

INSTANTIATE_TEST_SUITE_P(Mutations, DurableWriteTest, ::testing::ValuesIn(Mutations()),
                         [](const auto& info) { return info.param.name; });

// A coordinator whose store fails a write during its restore does not start: a job restored
// as pending (it was scheduled on no nodes), and one whose stored spec is no longer valid
// (restored as failed).
TEST(DurableWriteRestoreTest, AFailedWriteDuringRestoreFailsTheStart) {
  auto valid = ParseJobSpec("name: r\ncommand: x\n");
  ASSERT_TRUE(valid.ok()) << valid.status();
  proto::JobSpec invalid = JobSpecToProto(*valid);
  invalid.set_nodes(0);
  for (const proto::JobSpec& spec : {JobSpecToProto(*valid), invalid}) {
    SCOPED_TRACE(spec.DebugString());
    fs::path dir =
        fs::temp_directory_path() / ("muster-coord-durable-restore-" + std::to_string(getpid()));
    fs::remove_all(dir);
    {
      auto store = CoordinatorDb::Open(dir);
      ASSERT_TRUE(store.ok());
      JobRecord j;
      j.spec = spec;
      j.state = proto::JOB_SCHEDULED;
      ASSERT_TRUE((*store)->InsertJob(&j).ok());
    }
    auto fault = std::make_unique<FaultInjectionCoordinatorDb>(*CoordinatorDb::Open(dir));
    fault->FailWrite(1);
    auto c = Coordinator::Create(std::move(fault), {});
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("injected fault"), std::string::npos) << c.status();
    fs::remove_all(dir);
  }
}

}  // namespace
}  // namespace muster::coordinator
