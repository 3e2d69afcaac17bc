// The Coordinator's lifecycle on an injected clock, without sockets: heartbeat timeout, time
// limit, restart backoff, quarantine of a node that keeps failing, stale reports.

#include "coordinator/coordinator.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "common/curve.h"
#include "common/wire.h"

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("muster-coord-unit-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
    Open();
  }
  void TearDown() override {
    coord_.reset();
    fs::remove_all(dir_);
  }
  void Open() {
    coord_.reset();
    CoordinatorOptions o;
    o.clock = [this] { return now_; };
    o.heartbeat_timeout = 5s;
    o.quarantine.failures_to_quarantine = 2;
    auto c = Coordinator::Create(*StateStore::Open(dir_), o);
    ASSERT_TRUE(c.ok()) << c.status();
    coord_ = std::move(*c);
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

  std::string Register(const std::string& name) {
    proto::Envelope e;
    auto* l = e.mutable_agent_register()->mutable_labels();
    l->set_name(name);
    l->set_provider("aws");
    l->set_gpus(8);
    l->set_slots(8);
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

  // Moves the clock in 1 s steps, heartbeating like a live agent; returns the actions received.
  std::vector<proto::AgentAction> Advance(const std::string& node, const std::string& session,
                                          int seconds) {
    std::vector<proto::AgentAction> got;
    for (int i = 0; i <= seconds; ++i) {
      auto a = Heartbeat(node, session);
      got.insert(got.end(), a.begin(), a.end());
      if (i == seconds) break;
      now_ += 1s;
      coord_->Tick();
    }
    return got;
  }

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

  void Report(const std::string& node, const std::string& session, const std::string& job,
              int attempt, bool started, int exit_code, bool all_exited) {
    proto::Envelope e = ReportFrom(node, session, job, attempt);
    auto* r = e.mutable_agent_report();
    r->set_started(started);
    if (all_exited) {
      r->add_exits()->set_exit_code(exit_code);
      r->set_all_exited(true);
    }
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }

  // An agent on `provider` mounting volume "ckpt" and serving it for replication.
  std::string RegisterWithVolume(const std::string& name, const std::string& provider) {
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

  // A checkpoint report: a commit on `node`'s volume, a verified replica there, or a copy that
  // was superseded by `superseded_by`.
  void ReportCheckpoint(const std::string& node, const std::string& session, const std::string& job,
                        int attempt, int64_t step, bool replica, int64_t superseded_by = 0) {
    proto::Envelope e = ReportFrom(node, session, job, attempt);
    auto* r = e.mutable_agent_report();
    r->set_checkpoint_step(step);
    r->set_checkpoint_volume("ckpt");
    r->set_checkpoint_replica(replica);
    r->set_replicate_superseded_by(superseded_by);
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }

  std::string Events(const std::string& job) {
    proto::Envelope e;
    e.mutable_events_request()->set_job_id(job);
    std::string out;
    proto::Envelope reply = Call(e);
    for (const auto& ev : reply.events_reply().events())
      out += ev.kind() + " [" + ev.node() + "] " + ev.message() + "\n";
    return out;
  }

  TimePoint now_ = TimePoint{} + std::chrono::hours(490000);
  fs::path dir_;
  std::unique_ptr<Coordinator> coord_;
};

TEST_F(CoordinatorTest, HeartbeatTimeoutOnTheInjectedClockRequeues) {
  std::string s0 = Register("n0");
  std::string id = Submit("name: j\ncommand: x\n");
  auto actions = Heartbeat("n0", s0);
  ASSERT_EQ(actions.size(), 1u);
  ASSERT_TRUE(actions[0].has_start());
  Report("n0", s0, id, 1, true, 0, false);
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING);
  now_ += 4s;
  coord_->Tick();
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING) << "4 s < 5 s timeout";
  now_ += 2s;
  coord_->Tick();
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING) << "lost node: requeued";
  EXPECT_EQ(st.preemptions(), 1);
  EXPECT_EQ(Heartbeat("n0", s0).size(), 0u);  // the old session is gone
  proto::Envelope hb;
  hb.mutable_agent_heartbeat()->set_node("n0");
  hb.mutable_agent_heartbeat()->set_session_id(s0);
  EXPECT_EQ(ErrorToStatus(Call(hb).error()).code(), StatusCode::kNotFound);
  // It comes back at once, but the job is not placed again until the lost agent's lease (8 s,
  // counted from its last reply) has surely run out and its ranks are stopped: no split brain.
  std::string s1 = Register("n0");
  coord_->Tick();
  EXPECT_TRUE(Heartbeat("n0", s1).empty()) << "placed while the old ranks may still run";
  now_ += 4s;
  coord_->Tick();
  actions = Heartbeat("n0", s1);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].start().attempt(), 2);
}

// Exit 75 (a peer failed) stops the gang but is not the failure: a node lost afterwards is the
// cause (not counted against max_restarts); with no other cause, the 75 is the failure.
TEST_F(CoordinatorTest, PeerFailureExitWaitsForTheRealCause) {
  std::string s0 = Register("n0");
  std::string s1 = Register("n1");
  std::string id = Submit("name: j\ncommand: x\nnodes: 2\n");
  ASSERT_EQ(Heartbeat("n0", s0).size(), 1u);
  ASSERT_EQ(Heartbeat("n1", s1).size(), 1u);
  Report("n0", s0, id, 1, true, 0, false);
  Report("n1", s1, id, 1, true, 0, false);
  Report("n0", s0, id, 1, false, 75, true);  // rank 0's collective failed
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_REQUEUED) << "the gang is stopped";
  EXPECT_EQ(st.restarts(), 0);
  // n1's agent dies: no more heartbeats from it.
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    Heartbeat("n0", s0);
    coord_->Tick();
  }
  st = Status(id);
  EXPECT_EQ(st.restarts(), 0) << "a lost node is not the job's failure: " << st.DebugString();
  EXPECT_EQ(st.preemptions(), 1);

  // Second job: the 75 and nothing else (the other node's rank stopped by its agent).
  std::string s2 = Register("n2");
  std::string id2 = Submit("name: k\ncommand: x\nnodes: 2\nrestart:\n  max_restarts: 0\n");
  (void)s2;
  for (int i = 0; i < 20 && Status(id2).attempt() == 0; ++i) {
    now_ += 1s;
    Heartbeat("n0", s0);
    Heartbeat("n2", s2);
    coord_->Tick();
  }
  st = Status(id2);
  ASSERT_EQ(st.attempt(), 1) << st.DebugString();
  const std::string a = st.nodes(0), b = st.nodes(1);
  const std::string sa = a == "n0" ? s0 : s2, sb = b == "n0" ? s0 : s2;
  Report(a, sa, id2, 1, true, 0, false);
  Report(b, sb, id2, 1, true, 0, false);
  Report(a, sa, id2, 1, false, 75, true);
  proto::Envelope e;
  auto* r = e.mutable_agent_report();
  r->set_node(b);
  r->set_session_id(sb);
  r->set_job_id(id2);
  r->set_attempt(1);
  auto* x = r->add_exits();
  x->set_exit_code(-1);
  x->set_signal(15);
  x->set_stopped_by_agent(true);
  r->set_all_exited(true);
  Call(e);
  st = Status(id2);
  EXPECT_EQ(st.state(), proto::JOB_FAILED) << st.DebugString();
  EXPECT_NE(st.detail().find("exited 75 (a peer failed)"), std::string::npos) << st.detail();
}

TEST_F(CoordinatorTest, TimeLimitStopsAndFails) {
  std::string s = Register("n0");
  std::string id = Submit("name: t\ncommand: x\ntime_limit: 60s\n");
  ASSERT_EQ(Heartbeat("n0", s).size(), 1u);
  Report("n0", s, id, 1, true, 0, false);
  EXPECT_TRUE(Advance("n0", s, 59).empty());
  auto actions = Advance("n0", s, 2);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].stop().reason(), proto::STOP_TIME_LIMIT);
  Report("n0", s, id, 1, false, 143, true);
  EXPECT_EQ(Status(id).state(), proto::JOB_FAILED);
  EXPECT_EQ(Status(id).detail(), "time limit");
}

TEST_F(CoordinatorTest, RestartBackoffAndQuarantineOfAFailingNode) {
  std::string s = Register("n0");
  std::string id = Submit("name: f\ncommand: x\nrestart:\n  max_restarts: 5\n  backoff: 10s\n");
  ASSERT_EQ(Heartbeat("n0", s).size(), 1u);
  Report("n0", s, id, 1, true, 1, true);
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING);
  EXPECT_EQ(st.pending_reason(), "waiting: restart backoff, 10 s left");
  EXPECT_TRUE(Advance("n0", s, 9).empty()) << "still backing off";
  auto actions = Advance("n0", s, 1);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].start().attempt(), 2);
  Report("n0", s, id, 2, true, 1, true);  // second failure on n0: quarantined (policy: 2)
  proto::Envelope nodes;
  nodes.mutable_nodes_request();
  auto n = Call(nodes).nodes_reply().nodes(0);
  EXPECT_EQ(n.state(), proto::NODE_QUARANTINED);
  EXPECT_EQ(n.quarantines(), 1);
  // The backoff doubles to 20 s, but the 60 s quarantine holds the only node longer.
  EXPECT_TRUE(Advance("n0", s, 21).empty());
  EXPECT_EQ(Status(id).pending_reason(), "waiting: 0 of 1 nodes free on provider aws");
  actions = Advance("n0", s, 40);
  ASSERT_EQ(actions.size(), 1u) << "quarantine over";
  EXPECT_EQ(actions[0].start().attempt(), 3);
}

TEST_F(CoordinatorTest, StaleAttemptReportsAreIgnoredAndStateSurvivesReopen) {
  std::string s = Register("n0");
  std::string id = Submit("name: s\ncommand: x\n");
  ASSERT_EQ(Heartbeat("n0", s).size(), 1u);
  Report("n0", s, id, 7, true, 1, true);  // attempt 7 never existed
  EXPECT_EQ(Status(id).state(), proto::JOB_SCHEDULED);
  EXPECT_EQ(Status(id).restarts(), 0);
  Open();  // a restarted coordinator
  EXPECT_EQ(Status(id).state(), proto::JOB_SCHEDULED);
  EXPECT_EQ(Status(id).attempt(), 1);
}

TEST_F(CoordinatorTest, MalformedRequestsGetErrors) {
  proto::Envelope e;
  e.mutable_submit_request();
  EXPECT_EQ(ErrorToStatus(Call(e).error()).code(), StatusCode::kInvalidArgument);
  proto::Envelope reg;
  reg.mutable_agent_register();
  EXPECT_EQ(ErrorToStatus(Call(reg).error()).code(), StatusCode::kInvalidArgument);
  proto::Envelope pong;
  pong.mutable_pong();
  EXPECT_EQ(ErrorToStatus(Call(pong).error()).code(), StatusCode::kInvalidArgument);
  proto::Envelope drain;
  drain.mutable_drain_request()->set_node("nope");
  EXPECT_EQ(ErrorToStatus(Call(drain).error()).code(), StatusCode::kNotFound);
}

// A rank that exits 75 (its collective failed because a peer did) is not the failure: when the
// peer's node turns out lost, the job is requeued as a lost node (not counted, nobody blamed);
// only when no cause shows up does the exit 75 count.
TEST_F(CoordinatorTest, PeerFailureExitsAloneCountBlamingNoNode) {
  std::string s0 = Register("n0"), s1 = Register("n1");
  std::string id = Submit("name: p\ncommand: x\nnodes: 2\nrestart:\n  backoff: 1s\n");
  ASSERT_EQ(Heartbeat("n0", s0).size(), 1u);
  ASSERT_EQ(Heartbeat("n1", s1).size(), 1u);
  Report("n0", s0, id, 1, true, 0, false);
  Report("n1", s1, id, 1, true, 0, false);
  ASSERT_EQ(Status(id).state(), proto::JOB_RUNNING);
  // n1 dies; n0's rank sees it first and exits 75.
  Report("n0", s0, id, 1, false, 75, true);
  EXPECT_EQ(Status(id).restarts(), 0);
  Advance("n0", s0, 6);  // n1's heartbeats stopped: lost after 5 s
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING);
  EXPECT_EQ(st.restarts(), 0) << "a lost node is not the application's fault";
  EXPECT_EQ(st.preemptions(), 1);

  // Attempt 2: both ranks exit 75 and nothing else happens: that counts, blaming no node.
  s1 = Register("n1");
  now_ += 4s;  // past the wait for the lost node's lease
  coord_->Tick();
  ASSERT_EQ(Heartbeat("n0", s0).size(), 1u);
  ASSERT_EQ(Heartbeat("n1", s1).size(), 1u);
  Report("n0", s0, id, 2, true, 0, false);
  Report("n1", s1, id, 2, true, 0, false);
  Report("n0", s0, id, 2, false, 75, true);
  Report("n1", s1, id, 2, false, 75, true);
  st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING);
  EXPECT_EQ(st.restarts(), 1);
  EXPECT_EQ(st.preemptions(), 1);
}

// Commits come faster than the copy to the other provider: the agent there copies one step at
// a time and reports the ones it skips as superseded. The requeued job waits for the newest
// step asked for: the copy of an older step that was already running does not end the wait,
// and a superseded step is never recorded as committed there.
TEST_F(CoordinatorTest, ARequeuedJobWaitsForTheNewestStepNotAnOlderCopy) {
  std::string s0 = RegisterWithVolume("aws-1", "aws");
  std::string id = Submit("name: j\ncommand: x\ncheckpoint:\n  volume: ckpt\n  every: 10\n");
  auto actions = Heartbeat("aws-1", s0);
  ASSERT_EQ(actions.size(), 1u);
  ASSERT_TRUE(actions[0].has_start());
  Report("aws-1", s0, id, 1, true, 0, false);
  std::string s1 = RegisterWithVolume("gcp-1", "gcp");
  for (int64_t step : {10, 15, 20}) ReportCheckpoint("aws-1", s0, id, 1, step, false);
  std::vector<int64_t> asked;
  for (const auto& a : Heartbeat("gcp-1", s1)) {
    if (a.has_replicate()) asked.push_back(a.replicate().step());
  }
  EXPECT_EQ(asked, (std::vector<int64_t>{10, 15, 20}));
  // gcp-1's agent copies 10, skips 15 for 20. aws-1 is lost meanwhile.
  ReportCheckpoint("gcp-1", s1, id, 0, 15, false, /*superseded_by=*/20);
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    Heartbeat("gcp-1", s1);
    coord_->Tick();
  }
  ASSERT_EQ(Status(id).state(), proto::JOB_PENDING);
  ReportCheckpoint("gcp-1", s1, id, 0, 10, /*replica=*/true);
  for (int i = 0; i < 10; ++i) {
    now_ += 1s;
    coord_->Tick();
    for (const auto& a : Heartbeat("gcp-1", s1)) {
      ASSERT_FALSE(a.has_start()) << "placed before step 20 reached gcp\n" << Events(id);
    }
  }
  ReportCheckpoint("gcp-1", s1, id, 0, 20, /*replica=*/true);
  coord_->Tick();
  bool started = false;
  for (const auto& a : Heartbeat("gcp-1", s1)) {
    if (!a.has_start()) continue;
    started = true;
    EXPECT_EQ(a.start().resume_step(), 20) << Events(id);
  }
  EXPECT_TRUE(started) << Events(id);
  std::string events = Events(id);
  EXPECT_NE(events.find("replicate_superseded [gcp-1] step 15 to volume ckpt of provider gcp: "
                        "step 20 is copied instead"),
            std::string::npos)
      << events;
  EXPECT_EQ(events.find("step 15 on volume ckpt of provider gcp"), std::string::npos) << events;
}

// `muster run` through the coordinator submits an interactive job: it lives while its client
// keeps asking about it, and each rank's stdout and stderr are kept apart for that client.
TEST_F(CoordinatorTest, AnInteractiveJobIsCancelledWhenItsClientGoesAway) {
  std::string s0 = Register("n0");
  proto::Envelope e;
  auto* spec = e.mutable_submit_request()->mutable_spec();
  spec->set_name("run");
  spec->add_command("x");
  spec->set_nodes(1);
  spec->set_ranks_per_node(1);
  spec->set_interactive(true);
  spec->set_checkpoint_keep(3);
  auto r = Call(e);
  ASSERT_TRUE(r.has_submit_reply()) << r.DebugString();
  std::string id = r.submit_reply().job_id();
  auto actions = Heartbeat("n0", s0);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_TRUE(actions[0].start().split_streams());
  Report("n0", s0, id, 1, true, 0, false);
  for (int i = 0; i < 30; ++i) {  // the client asks every second: the job runs on
    now_ += 1s;
    coord_->Tick();
    Heartbeat("n0", s0);
    ASSERT_EQ(Status(id).state(), proto::JOB_RUNNING);
  }
  for (int i = 0; i < 16; ++i) {  // then it stops asking
    now_ += 1s;
    coord_->Tick();
    Heartbeat("n0", s0);
  }
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_CANCELLED);
  EXPECT_EQ(st.detail(), "interactive client went away");
  // A batch job is neither cancelled for it nor given split logs.
  std::string batch = Submit("name: b\ncommand: x\n");
  for (const auto& a : Heartbeat("n0", s0)) {
    if (a.has_start()) EXPECT_FALSE(a.start().split_streams());
  }
}

// A job id becomes a directory on the target's volume: a report naming "../x" or an absolute
// path is never turned into a transfer.
TEST_F(CoordinatorTest, AHostileJobIdInACheckpointReportIsNeverReplicated) {
  std::string s0 = RegisterWithVolume("aws-1", "aws");
  std::string s1 = RegisterWithVolume("gcp-1", "gcp");
  for (const char* job : {"../x", "/abs", "a/../../b"}) {
    ReportCheckpoint("aws-1", s0, job, 1, 10, false);
  }
  for (const auto& a : Heartbeat("gcp-1", s1)) {
    EXPECT_FALSE(a.has_replicate()) << "asked to copy " << a.replicate().job_id();
  }
  for (const auto& a : Heartbeat("aws-1", s0)) {
    EXPECT_FALSE(a.has_allow_transfer()) << "asked to serve " << a.allow_transfer().job_id();
  }
}

// The transfer key of a copy is revoked at the source when the target reports the copy's
// outcome, and the keys of copies still running when the job ends are revoked then.
TEST_F(CoordinatorTest, TransferKeysAreRevokedWhenTheCopyOrTheJobEnds) {
  std::string s0 = RegisterWithVolume("aws-1", "aws");
  std::string id = Submit("name: j\ncommand: x\ncheckpoint:\n  volume: ckpt\n  every: 10\n");
  ASSERT_EQ(Heartbeat("aws-1", s0).size(), 1u);
  Report("aws-1", s0, id, 1, true, 0, false);
  std::string s1 = RegisterWithVolume("gcp-1", "gcp");
  // Commits of steps 10 and 20: one grant at the source and one copy at the target each.
  for (int64_t step : {10, 20}) ReportCheckpoint("aws-1", s0, id, 1, step, false);
  std::map<int64_t, std::string> key_of_step;  // public half, from the secret the target got
  for (const auto& a : Heartbeat("gcp-1", s1)) {
    if (!a.has_replicate()) continue;
    auto pub = PublicKeyFromSecret(a.replicate().client_secret());
    ASSERT_TRUE(pub.ok());
    key_of_step[a.replicate().step()] = *pub;
  }
  ASSERT_EQ(key_of_step.size(), 2u);
  std::set<std::string> allowed;
  for (const auto& a : Heartbeat("aws-1", s0)) {
    if (a.has_allow_transfer()) allowed.insert(a.allow_transfer().client_public_key());
  }
  EXPECT_EQ(allowed, (std::set<std::string>{key_of_step[10], key_of_step[20]}));
  // Step 10 copied: its key, and only its key, is revoked at the source.
  proto::Envelope e = ReportFrom("gcp-1", s1, id, 0);
  e.mutable_agent_report()->set_checkpoint_step(10);
  e.mutable_agent_report()->set_checkpoint_volume("ckpt");
  e.mutable_agent_report()->set_checkpoint_replica(true);
  e.mutable_agent_report()->set_transfer_key(key_of_step[10]);
  ASSERT_TRUE(Call(e).has_agent_report_reply());
  std::vector<std::string> revoked;
  auto collect = [&] {
    for (const auto& a : Heartbeat("aws-1", s0)) {
      if (!a.has_revoke_transfer()) continue;
      EXPECT_EQ(a.revoke_transfer().job_id(), id);
      revoked.push_back(a.revoke_transfer().client_public_key());
    }
  };
  collect();
  EXPECT_EQ(revoked, std::vector<std::string>{key_of_step[10]});
  // The job is cancelled while step 20 is still copied: that key is revoked too.
  proto::Envelope cancel;
  cancel.mutable_cancel_request()->set_job_id(id);
  Call(cancel);
  coord_->Tick();
  collect();
  EXPECT_EQ(revoked, (std::vector<std::string>{key_of_step[10], key_of_step[20]}));
  coord_->Tick();
  collect();
  EXPECT_EQ(revoked.size(), 2u) << "each key is revoked once";
}

}  // namespace
}  // namespace muster::coordinator
