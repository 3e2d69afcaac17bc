// The Coordinator's lifecycle on an injected clock, without sockets: heartbeat timeout, time
// limit, restart backoff, quarantine of a node that keeps failing, stale reports.

#include "coordinator/coordinator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>

#include "common/curve.h"
#include "common/wire.h"
#include "coordinator/providers/provider_manager.h"
#include "tests/testing/coordinator_harness.h"

namespace muster::coordinator {
namespace {

using namespace std::chrono_literals;

class CoordinatorTest : public ::testing::Test, public testing::CoordinatorHarness {
 protected:
  CoordinatorTest() : CoordinatorHarness("muster-coord-unit") {}
  void SetUp() override { Open(); }
  void Open() {
    CoordinatorOptions o;
    o.heartbeat_timeout = 5s;
    o.quarantine.failures_to_quarantine = 2;
    o.current_role = [this](const std::string& key) {
      auto it = current_roles_.find(key);
      return it == current_roles_.end() ? KeyRole::kAgent : it->second;
    };
    ASSERT_TRUE(CoordinatorHarness::Open(o));
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
    return Register(name, {.provider = provider, .volume = true, .transfer = true});
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

  static muster::Status ErrorOf(const proto::Envelope& e) {
    return e.has_error() ? ErrorToStatus(e.error()) : muster::Status::Ok();
  }
  static proto::Envelope RegisterRequest(const std::string& name, const std::string& provider) {
    return CoordinatorHarness::RegisterRequest(name,
                                               {.provider = provider,
                                                .address = "10.0.0." + std::to_string(name.size()),
                                                .volume = true,
                                                .transfer = true});
  }
  // Registers `name` with `caller`'s key; returns the session id ("" if refused).
  std::string RegisterAs(const Caller& caller, const std::string& name,
                         const std::string& provider = "aws") {
    return CallAs(caller, RegisterRequest(name, provider)).agent_registered().session_id();
  }

  const Caller admin_{"admin", "AdminKey000000000000000000000000000000000", KeyRole::kAdmin, ""};
  const Caller alice_{"alice", "AliceKey000000000000000000000000000000000", KeyRole::kClient, ""};
  const Caller bob_{"bob", "BobKey00000000000000000000000000000000000", KeyRole::kClient, ""};
  const Caller agent1_{"node-1", "Agent1Key0000000000000000000000000000000", KeyRole::kAgent, ""};
  const Caller agent2_{"node-2", "Agent2Key0000000000000000000000000000000", KeyRole::kAgent, ""};
  std::map<std::string, KeyRole> current_roles_;  // for CoordinatorOptions::current_role
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
  EXPECT_EQ(Status(id).pending_reason(),
            "waiting: the lost node's lease (it may still run its ranks), 4 s left");
  now_ += 4s;
  coord_->Tick();
  actions = Heartbeat("n0", s1);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].start().attempt(), 2);
}

// Dead or silent (docs/protocol.md): an agent known to be gone (its connections closed) is lost
// at once, and its job is placed again with no lease to wait for; a stale session is ignored.
TEST_F(CoordinatorTest, AnAgentThatIsGoneIsLostAtOnceWithNoLeaseToWaitFor) {
  std::string s0 = Register("n0");
  std::string s1 = Register("n1");
  std::string id = Submit("name: j\ncommand: x\n");
  std::string node = Heartbeat("n0", s0).empty() ? "n1" : "n0";
  std::string other = node == "n0" ? "n1" : "n0";
  std::string session = node == "n0" ? s0 : s1, other_session = node == "n0" ? s1 : s0;
  if (node == "n1") ASSERT_EQ(Heartbeat("n1", s1).size(), 1u);
  Report(node, session, id, 1, true, 0, false);
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING);

  coord_->AgentGone(node, "an-older-session", "gone");
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING) << "another session of the node: ignored";

  coord_->AgentGone(node, session, "its agent's connections closed");
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING) << "lost at once, no heartbeat timeout";
  EXPECT_EQ(st.preemptions(), 1);
  coord_->Tick();
  // Placed again on the other node at once: no lease fence.
  auto actions = Heartbeat(other, other_session);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].start().attempt(), 2);
}

// Progress that a node of the new attempt printed before the attempt began (its ranks of the
// last attempt) is not the new attempt's.
TEST_F(CoordinatorTest, ProgressPrintedBeforeTheAttemptBeganIsNotItsProgress) {
  std::string s0 = Register("n0");
  std::string id = Submit("name: j\ncommand: x\n");
  ASSERT_EQ(Heartbeat("n0", s0).size(), 1u);
  auto now_ms = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(now_.time_since_epoch()).count();
  };
  proto::Envelope hb;
  hb.mutable_agent_heartbeat()->set_node("n0");
  hb.mutable_agent_heartbeat()->set_session_id(s0);
  auto* p = hb.mutable_agent_heartbeat()->add_progress();
  p->set_job_id(id);
  p->set_step(7);
  p->set_time_ms(now_ms() - 1000);  // before attempt 1 was placed
  Call(hb);
  EXPECT_EQ(Status(id).progress().step(), 0) << "printed before the attempt began";
  p->set_time_ms(now_ms());
  Call(hb);
  EXPECT_EQ(Status(id).progress().step(), 7);
  // Earlier than the attempt, but the node reports running it: the agent's clock is behind.
  p->set_step(8);
  p->set_time_ms(now_ms() - 5000);
  auto* r = hb.mutable_agent_heartbeat()->add_running();
  r->set_job_id(id);
  r->set_attempt(1);
  Call(hb);
  EXPECT_EQ(Status(id).progress().step(), 8);
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

// Exit 0 is success (docs/env-contract.md), also after a preemption notice: a job whose ranks
// all finish while the notice runs has finished, and is not run again from its last checkpoint.
TEST_F(CoordinatorTest, RanksThatAllExitZeroAfterANoticeFinishTheJob) {
  std::string s = Register("n0");
  std::string id = Submit("name: z\ncommand: x\n");
  ASSERT_EQ(Heartbeat("n0", s).size(), 1u);
  Report("n0", s, id, 1, true, 0, false);
  proto::Envelope notice = ReportFrom("n0", s, "", 0);
  notice.mutable_agent_report()->set_notice_deadline_ms(
      std::chrono::duration_cast<std::chrono::milliseconds>((now_ + 30s).time_since_epoch())
          .count());
  notice.mutable_agent_report()->set_notice_source("test");
  ASSERT_TRUE(Call(notice).has_agent_report_reply());
  auto stop = Heartbeat("n0", s);
  ASSERT_EQ(stop.size(), 1u);
  EXPECT_EQ(stop[0].stop().reason(), proto::STOP_NODE_PREEMPTED);
  proto::Envelope e = ReportFrom("n0", s, id, 1);
  auto* x = e.mutable_agent_report()->add_exits();
  x->set_exit_code(0);
  x->set_stopped_by_agent(true);  // the agent marks every exit after a notice
  e.mutable_agent_report()->set_all_exited(true);
  ASSERT_TRUE(Call(e).has_agent_report_reply());
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_SUCCEEDED) << st.DebugString();
  EXPECT_EQ(st.preemptions(), 0);
  EXPECT_EQ(st.detail(), "every rank exited 0");
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
  // Attempt 7 never existed: refused, and nothing changes.
  proto::Envelope bogus = ReportFrom("n0", s, id, 7);
  bogus.mutable_agent_report()->set_started(true);
  bogus.mutable_agent_report()->add_exits()->set_exit_code(1);
  bogus.mutable_agent_report()->set_all_exited(true);
  EXPECT_EQ(ErrorOf(Call(bogus)).code(), StatusCode::kFailedPrecondition);
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
// A launch preflight that blames a node: the gang is placed again at once without that node,
// not counted against max_restarts; the node stays usable for other jobs.
TEST_F(CoordinatorTest, APreflightFailureKeepsTheBlamedNodeOffTheJobAndIsNotCounted) {
  std::map<std::string, std::string> sess;
  for (const char* n : {"n0", "n1", "n2"}) sess[n] = Register(n);
  std::string id = Submit("name: pf\ncommand: x\nnodes: 2\nrestart:\n  max_restarts: 0\n");
  for (auto& [n, s] : sess) Heartbeat(n, s);
  auto st = Status(id);
  ASSERT_EQ(st.nodes_size(), 2);
  const std::string master = st.nodes(0), blamed = st.nodes(1);
  for (const auto& n : {master, blamed}) {
    proto::Envelope e = ReportFrom(n, sess[n], id, 1);
    auto* r = e.mutable_agent_report();
    r->set_start_error("node " + blamed + " (10.0.0.2 via eth1) cannot reach node " + master +
                       " at 10.0.0.1:4000: connect timed out after 2000 ms");
    r->set_preflight_failed(true);
    r->set_preflight_blamed_rank(1);
    r->set_all_exited(true);
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }
  std::string events = Events(id);
  EXPECT_NE(events.find("preflight_failed [" + blamed + "] attempt 1 (reported by " + master +
                        "): node " + blamed + " (10.0.0.2 via eth1) cannot reach"),
            std::string::npos)
      << events;
  EXPECT_NE(events.find("node_quarantined [" + blamed + "]"), std::string::npos) << events;
  coord_->Tick();
  st = Status(id);
  EXPECT_EQ(st.attempt(), 2) << events;
  EXPECT_EQ(st.restarts(), 0);
  ASSERT_EQ(st.nodes_size(), 2);
  EXPECT_NE(st.nodes(0), blamed);
  EXPECT_NE(st.nodes(1), blamed);
  // Another job may still use it.
  std::string other = Submit("name: o\ncommand: x\n");
  coord_->Tick();
  st = Status(other);
  ASSERT_EQ(st.nodes_size(), 1);
  EXPECT_EQ(st.nodes(0), blamed);
}

// After a coordinator restart, a node whose attempt's ranks still run keeps them until its
// lease runs out: it has the whole lease (default 8 s, more than the 5 s heartbeat timeout) to
// register again, so a restart on a loaded host stops no gang; one that never comes back is lost
// then, without a lease fence to wait out (its lease has run out with no reply from us), and
// the job is placed again at once.
TEST_F(CoordinatorTest, ARestoredNodeHasItsLeaseToComeBackAndIsLostWithoutAFenceAfterIt) {
  std::map<std::string, std::string> sess;
  for (const char* n : {"n0", "n1", "n2"}) sess[n] = Register(n);
  std::string id = Submit("name: ft\ncommand: x\nnodes: 2\n");
  std::vector<std::string> gang;
  for (const char* n : {"n0", "n1", "n2"}) {
    for (const auto& a : Heartbeat(n, sess[n])) {
      if (a.has_start()) gang.push_back(n);
    }
  }
  ASSERT_EQ(gang.size(), 2u) << Events(id);
  for (size_t rank = 0; rank < gang.size(); ++rank) {
    Report(gang[rank], sess[gang[rank]], id, 1, true, 0, false);
  }
  ASSERT_EQ(Status(id).state(), proto::JOB_RUNNING) << Events(id);
  Open();  // a restarted coordinator
  auto register_running = [&](const std::string& n, int rank) {
    sess[n] = Register(n, {.provider = "aws", .running_job = id, .running_rank = rank});
  };
  register_running(gang[0], 0);
  // 7 s: past the heartbeat timeout, within the lease; the other node is not lost.
  for (int i = 0; i < 7; ++i) {
    now_ += 1s;
    Heartbeat(gang[0], sess[gang[0]]);
    coord_->Tick();
  }
  EXPECT_EQ(Events(id).find("node_lost"), std::string::npos) << Events(id);
  register_running(gang[1], 1);
  for (int i = 0; i < 3; ++i) {
    now_ += 1s;
    for (const auto& n : gang) Heartbeat(n, sess[n]);
    coord_->Tick();
  }
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING) << Events(id);
  EXPECT_EQ(Status(id).attempt(), 1) << Events(id);
  EXPECT_EQ(Events(id).find("node_lost"), std::string::npos) << Events(id);

  // Restarted again, and this time the second node never comes back: lost after the lease
  // (8 s + 0.5 s), not at the heartbeat timeout, and the job is not held for a fence.
  Open();
  register_running(gang[0], 0);
  std::string other;  // the node not in the gang
  for (const char* n : {"n0", "n1", "n2"}) {
    if (std::find(gang.begin(), gang.end(), n) == gang.end()) other = n;
  }
  sess[other] = Register(other);
  for (int i = 0; i < 8; ++i) {
    now_ += 1s;
    Heartbeat(gang[0], sess[gang[0]]);
    Heartbeat(other, sess[other]);
    coord_->Tick();
  }
  EXPECT_EQ(Events(id).find("node_lost"), std::string::npos)
      << "not before its lease" << Events(id);
  now_ += 1s;
  Heartbeat(gang[0], sess[gang[0]]);
  Heartbeat(other, sess[other]);
  coord_->Tick();
  EXPECT_NE(Events(id).find("after the coordinator restarted (its lease has run out)"),
            std::string::npos)
      << Events(id);
  EXPECT_EQ(Status(id).state(), proto::JOB_REQUEUED) << Events(id);
  // The survivor's ranks are stopped; then the job is placed again at once on the nodes up (no
  // fence: the lost node's lease has run out).
  Report(gang[0], sess[gang[0]], id, 1, false, 143, true);
  for (int i = 0; i < 3 && Status(id).attempt() < 2; ++i) {
    Heartbeat(gang[0], sess[gang[0]]);
    Heartbeat(other, sess[other]);
    coord_->Tick();
  }
  auto st = Status(id);
  EXPECT_EQ(st.attempt(), 2) << st.pending_reason() << "\n" << Events(id);
  EXPECT_EQ(st.pending_reason().find("lease"), std::string::npos)
      << "no fence to wait out: " << st.pending_reason();
}

// A spare restored after a coordinator restart whose agent never comes back is lost after the
// heartbeat timeout like any node the coordinator expects (spare_lost), not held forever; while
// its agent is not back it replaces no lost node.
TEST_F(CoordinatorTest, ARestoredSpareWhoseAgentNeverComesBackIsLost) {
  std::map<std::string, std::string> sess;
  for (const char* n : {"n0", "n1", "n2"}) sess[n] = Register(n);
  std::string id = Submit("name: ft\ncommand: x\nnodes: 2\nspares: 1\n");
  for (const char* n : {"n0", "n1"}) {
    Heartbeat(n, sess[n]);
    Report(n, sess[n], id, 1, true, 0, false);
  }
  ASSERT_EQ(Status(id).spares_size(), 1);
  ASSERT_EQ(Status(id).spares(0), "n2");
  Open();  // a restarted coordinator
  ASSERT_EQ(Status(id).spares_size(), 1) << Events(id);
  EXPECT_NE(Events(id).find("spare_restored [n2]"), std::string::npos) << Events(id);
  // The gang's agents come back with their ranks; the spare's never does.
  for (int rank = 0; rank < 2; ++rank) {
    const std::string n = "n" + std::to_string(rank);
    sess[n] = Register(n, {.provider = "aws", .running_job = id, .running_rank = rank});
    ASSERT_FALSE(sess[n].empty());
  }
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    for (const char* n : {"n0", "n1"}) Heartbeat(n, sess[n]);
    coord_->Tick();
  }
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING) << Events(id);
  EXPECT_NE(Events(id).find("spare_lost [n2] spare n2 lost; a new one is requested"),
            std::string::npos)
      << Events(id);
  // Short of a spare now: the next free node is held as its spare.
  ASSERT_TRUE(Register("n3").size() > 0);
  coord_->Tick();
  EXPECT_EQ(Status(id).spares_size(), 1) << Events(id);
  EXPECT_NE(Events(id).find("spare_held [n3]"), std::string::npos) << Events(id);
  auto nodes = Call([] {
    proto::Envelope e;
    e.mutable_nodes_request();
    return e;
  }());
  for (const auto& n : nodes.nodes_reply().nodes()) {
    if (n.labels().name() == "n2") EXPECT_FALSE(n.spare()) << n.DebugString();
  }
}

// With on-demand providers, a spec whose gang and spares no provider can ever hold at once is
// refused at submit, naming each provider and what it can hold: an on-demand provider counts
// its max_nodes, not the nodes registered now (a lost node waiting for its release and its
// replacement are both registered).
TEST_F(CoordinatorTest, SparesBeyondAnOnDemandProvidersMaxNodesAreRefusedAtSubmit) {
  for (const char* n : {"aws-0", "aws-1", "aws-2"}) Register(n);
  providers::ProvidersConfig cfg;
  providers::ProviderConfig aws;
  aws.name = "aws";
  aws.kind = "local";
  aws.max_nodes = 2;
  aws.node.gpus = 8;
  aws.node.slots = 8;
  cfg.providers = {aws};
  coord_->SetProviders(std::make_unique<providers::ProviderManager>(
      cfg, std::map<std::string, std::unique_ptr<providers::Provider>>{}));
  proto::Envelope big;
  big.mutable_submit_request()->set_yaml("name: big\ncommand: x\nnodes: 2\nspares: 1\n");
  muster::Status refused = ErrorOf(Call(big));
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("it needs 3 (2 for the gang + 1 spare) on one provider"),
            std::string::npos)
      << refused;
  EXPECT_NE(refused.message().find("provider aws: 2 (max_nodes 2)"), std::string::npos) << refused;
  Submit("name: fits\ncommand: x\nnodes: 1\nspares: 1\n");
}

// `muster node forget`: a node of an on-demand provider is refused even when disconnected (its
// provider releases it, and a node forgotten first would never be released: its machine would
// run on); a static node nothing needs is forgotten, and a client key may not ask.
TEST_F(CoordinatorTest, NodeForgetLeavesOnDemandNodesToTheirProvider) {
  std::string s0 = Register("aws-0");
  std::string s1 = RegisterWithVolume("gcp-0", "gcp");
  providers::ProvidersConfig cfg;
  providers::ProviderConfig gcp;
  gcp.name = "gcp";
  gcp.kind = "local";
  gcp.node.gpus = 8;
  gcp.node.slots = 8;
  cfg.providers = {gcp};
  coord_->SetProviders(std::make_unique<providers::ProviderManager>(
      cfg, std::map<std::string, std::unique_ptr<providers::Provider>>{}));
  coord_->AgentGone("aws-0", s0, "its agent's connections closed");
  coord_->AgentGone("gcp-0", s1, "its agent's connections closed");
  auto forget = [&](const std::string& node, KeyRole role) {
    proto::Envelope e;
    e.mutable_forget_node_request()->set_node(node);
    proto::Envelope out;
    coord_->Handle(Caller{role == KeyRole::kAdmin ? "root" : "alice", "k", role, ""}, std::move(e),
                   [&](proto::Envelope r) { out = std::move(r); });
    return out;
  };
  muster::Status st = ErrorOf(forget("gcp-0", KeyRole::kAdmin));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_EQ(st.message(),
            "node gcp-0 is not forgotten: it belongs to on-demand provider gcp, which releases "
            "it (and its machine) when it is idle or down");
  st = ErrorOf(forget("aws-0", KeyRole::kClient));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("permission denied"), std::string::npos) << st;
  auto ok = forget("aws-0", KeyRole::kAdmin);
  ASSERT_TRUE(ok.has_forget_node_reply()) << ok.DebugString();
  EXPECT_EQ(ok.forget_node_reply().node(), "aws-0");
  proto::Envelope nodes;
  nodes.mutable_nodes_request();
  auto listed = Call(nodes);
  for (const auto& n : listed.nodes_reply().nodes()) EXPECT_NE(n.labels().name(), "aws-0");
  EXPECT_EQ(listed.nodes_reply().nodes_size(), 1);
}

// Static nodes and an on-demand provider that cannot hold the job either: the refusal names
// both, with what each can ever hold.
TEST_F(CoordinatorTest, ARefusalNamesEachProviderAndWhatItCanEverHold) {
  for (const char* n : {"aws-0", "aws-1", "aws-2"}) Register(n);
  providers::ProvidersConfig cfg;
  providers::ProviderConfig loc;
  loc.name = "loc";
  loc.kind = "local";
  loc.max_nodes = 2;
  loc.node.gpus = 8;
  loc.node.slots = 8;
  cfg.providers = {loc};
  coord_->SetProviders(std::make_unique<providers::ProviderManager>(
      cfg, std::map<std::string, std::unique_ptr<providers::Provider>>{}));
  proto::Envelope big;
  big.mutable_submit_request()->set_yaml("name: big\ncommand: x\nnodes: 3\nspares: 1\n");
  muster::Status refused = ErrorOf(Call(big));
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("it needs 4 (3 for the gang + 1 spare) on one provider"),
            std::string::npos)
      << refused;
  EXPECT_NE(refused.message().find("the most that can ever exist on one provider is 3: provider "
                                   "aws: 3 (3 registered nodes fit); provider loc: 2 (max_nodes "
                                   "2)"),
            std::string::npos)
      << refused;
}

// Hot spares: a lost node of the gang is replaced by the job's spare at once; the survivors and
// the spare stay the job's while the lost node's lease fence runs out, then start without a
// scheduling pass; a new spare is held when a node is free; a spec asking for more spares than
// the nodes can ever hold is refused at submit.
TEST_F(CoordinatorTest, ALostNodeIsReplacedByASpareAfterTheFenceWithoutAPass) {
  std::map<std::string, std::string> sess;
  for (const char* n : {"n0", "n1", "n2"}) sess[n] = Register(n);
  proto::Envelope big;
  big.mutable_submit_request()->set_yaml("name: big\ncommand: x\nnodes: 2\nspares: 2\n");
  muster::Status refused = ErrorOf(Call(big));
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.message().find("4 (2 for the gang + 2 spares)"), std::string::npos) << refused;
  std::string id = Submit("name: ft\ncommand: x\nnodes: 2\nspares: 1\n");
  std::map<std::string, std::vector<proto::AgentAction>> got;
  auto beat = [&](std::vector<std::string> nodes) {
    for (const auto& n : nodes) {
      for (auto& a : Heartbeat(n, sess[n])) got[n].push_back(a);
    }
  };
  beat({"n0", "n1", "n2"});
  ASSERT_EQ(got["n0"].size(), 1u);
  ASSERT_EQ(got["n1"].size(), 1u);
  EXPECT_TRUE(got["n2"].empty()) << "the spare runs nothing";
  Report("n0", sess["n0"], id, 1, true, 0, false);
  Report("n1", sess["n1"], id, 1, true, 0, false);
  auto st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_RUNNING);
  ASSERT_EQ(st.spares_size(), 1);
  EXPECT_EQ(st.spares(0), "n2");
  EXPECT_NE(Events(id).find("spares_held [] holding n2 idle as spare of the gang"),
            std::string::npos)
      << Events(id);
  // n1 stops heartbeating: lost after 5 s.
  got.clear();
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    beat({"n0", "n2"});
    coord_->Tick();
  }
  std::string events = Events(id);
  EXPECT_NE(events.find("spare_replaces [n2] spare n2 replaces lost node n1"), std::string::npos)
      << events;
  EXPECT_NE(events.find("spare_requested [] 0 spare(s) held now; a new one is requested"),
            std::string::npos)
      << events;
  beat({"n0", "n2"});
  ASSERT_EQ(got["n0"].size(), 1u);
  ASSERT_TRUE(got["n0"][0].has_stop());
  proto::Envelope e = ReportFrom("n0", sess["n0"], id, 1);
  auto* x = e.mutable_agent_report()->add_exits();
  x->set_exit_code(-1);
  x->set_stopped_by_agent(true);
  e.mutable_agent_report()->set_all_exited(true);
  ASSERT_TRUE(Call(e).has_agent_report_reply());
  st = Status(id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING);
  EXPECT_NE(st.pending_reason().find("for the lost node's lease, then restarting on the survivors"),
            std::string::npos)
      << st.pending_reason();
  // The survivor and the spare stay the job's during the fence: another job gets neither.
  std::string other = Submit("name: other\ncommand: x\n");
  got.clear();
  now_ += 1s;
  coord_->Tick();
  beat({"n0", "n2"});
  EXPECT_TRUE(got.empty()) << "started inside the lease fence of the lost node";
  EXPECT_EQ(Status(other).state(), proto::JOB_PENDING);
  // The fence (lease 8 s - heartbeat timeout 5 s + 0.5 s after the gang stopped) passes.
  for (int i = 0; i < 3; ++i) {
    now_ += 1s;
    coord_->Tick();
    beat({"n0", "n2"});
  }
  ASSERT_EQ(got["n0"].size(), 1u);
  ASSERT_EQ(got["n2"].size(), 1u);
  ASSERT_TRUE(got["n2"][0].has_start());
  EXPECT_EQ(got["n0"][0].start().attempt(), 2);
  EXPECT_EQ(got["n0"][0].start().node_rank(), 0);
  EXPECT_EQ(got["n2"][0].start().node_rank(), 1) << "the spare takes the lost node's rank";
  events = Events(id);
  EXPECT_NE(events.find("restarting_on_spares [] attempt 2 on n0,n2 without a scheduling pass"),
            std::string::npos)
      << events;
  EXPECT_EQ(Status(id).restarts(), 0) << "a lost node is not counted";
  // New nodes: the pending job comes first; the next one is held as the new spare.
  sess["n3"] = Register("n3");
  coord_->Tick();
  EXPECT_EQ(Status(other).state(), proto::JOB_SCHEDULED);
  sess["n4"] = Register("n4");
  coord_->Tick();
  st = Status(id);
  ASSERT_EQ(st.spares_size(), 1);
  EXPECT_EQ(st.spares(0), "n4");
  EXPECT_NE(Events(id).find("spare_held [n4] node n4 held as a new spare (1 held now)"),
            std::string::npos)
      << Events(id);
  // A lost spare is dropped and requested again.
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    beat({"n0", "n2", "n3"});
    coord_->Tick();
  }
  EXPECT_NE(Events(id).find("spare_lost [n4] spare n4 lost; a new one is requested"),
            std::string::npos)
      << Events(id);
  EXPECT_EQ(Status(id).spares_size(), 0);
}

TEST_F(CoordinatorTest, CancellingAJobWaitingToRestartOnItsSparesFreesThem) {
  std::map<std::string, std::string> sess;
  for (const char* n : {"n0", "n1", "n2"}) sess[n] = Register(n);
  std::string id = Submit("name: ft\ncommand: x\nnodes: 2\nspares: 1\n");
  for (auto& [n, s] : sess) Heartbeat(n, s);
  Report("n0", sess["n0"], id, 1, true, 0, false);
  Report("n1", sess["n1"], id, 1, true, 0, false);
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    Heartbeat("n0", sess["n0"]);
    Heartbeat("n2", sess["n2"]);
    coord_->Tick();
  }
  Report("n0", sess["n0"], id, 1, true, 137, true);
  ASSERT_EQ(Status(id).state(), proto::JOB_PENDING);
  proto::Envelope c;
  c.mutable_cancel_request()->set_job_id(id);
  EXPECT_EQ(Call(c).cancel_reply().state(), proto::JOB_CANCELLED);
  std::string other = Submit("name: other\ncommand: x\nnodes: 2\n");
  coord_->Tick();
  auto st = Status(other);
  EXPECT_EQ(st.state(), proto::JOB_SCHEDULED) << st.pending_reason();
  EXPECT_EQ(st.nodes_size(), 2);
}

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

// A copy to another provider that fails, or whose target restarts mid-copy, is asked again
// with backoff (doubling from 1 s) until it is done, a newer step supersedes it, or it has
// failed 8 times; each outcome is an event.
TEST_F(CoordinatorTest, AnInterruptedCopyIsRetriedWithBackoffUntilDoneSupersededOrFailed) {
  std::string s0 = RegisterWithVolume("aws-1", "aws");
  std::string id = Submit("name: j\ncommand: x\ncheckpoint:\n  volume: ckpt\n  keep: 2\n");
  ASSERT_EQ(Heartbeat("aws-1", s0).size(), 1u);
  Report("aws-1", s0, id, 1, true, 0, false);
  std::string s1 = RegisterWithVolume("gcp-1", "gcp");
  auto copies = [&](const std::string& node, const std::string& session) {
    std::vector<int64_t> steps;
    for (const auto& a : Heartbeat(node, session)) {
      if (!a.has_replicate()) continue;
      steps.push_back(a.replicate().step());
      EXPECT_EQ(a.replicate().checkpoint_keep(), 2);
    }
    return steps;
  };
  auto error = [&](const std::string& session, int64_t step) {
    proto::Envelope e = ReportFrom("gcp-1", session, id, 0);
    e.mutable_agent_report()->set_checkpoint_step(step);
    e.mutable_agent_report()->set_checkpoint_volume("ckpt");
    e.mutable_agent_report()->set_replicate_error("UNAVAILABLE: source gone");
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  };
  // A second passes; the source keeps heartbeating.
  auto tick = [&] {
    now_ += 1s;
    Heartbeat("aws-1", s0);
    coord_->Tick();
  };
  ReportCheckpoint("aws-1", s0, id, 1, 10, false);
  EXPECT_EQ(copies("gcp-1", s1), std::vector<int64_t>({10}));
  // The first try fails: asked again after 1 s, not before.
  error(s1, 10);
  coord_->Tick();
  EXPECT_TRUE(copies("gcp-1", s1).empty());
  tick();
  EXPECT_EQ(copies("gcp-1", s1), std::vector<int64_t>({10}));
  // The target is killed and comes back (a new session) with the copy undone: asked again
  // after 2 s, of the new agent.
  std::string s2 = RegisterWithVolume("gcp-1", "gcp");
  coord_->Tick();
  EXPECT_NE(Events(id).find("target gcp-1 restarted during the copy; try 3 of 8 in 2000 ms"),
            std::string::npos)
      << Events(id);
  tick();
  EXPECT_TRUE(copies("gcp-1", s2).empty());
  tick();
  EXPECT_EQ(copies("gcp-1", s2), std::vector<int64_t>({10}));
  // It lands: done, no more tries.
  ReportCheckpoint("gcp-1", s2, id, 0, 10, /*replica=*/true);
  for (int i = 0; i < 40; ++i) {
    tick();
    EXPECT_TRUE(copies("gcp-1", s2).empty());
  }
  // Step 20 fails; step 30 is committed before its retry: 20 is not tried again.
  ReportCheckpoint("aws-1", s0, id, 1, 20, false);
  EXPECT_EQ(copies("gcp-1", s2), std::vector<int64_t>({20}));
  ReportCheckpoint("aws-1", s0, id, 1, 30, false);
  EXPECT_EQ(copies("gcp-1", s2), std::vector<int64_t>({30}));
  error(s2, 20);
  EXPECT_NE(Events(id).find("step 20 to volume ckpt of provider gcp failed (UNAVAILABLE: source "
                            "gone); not retried: step 30 is copied instead"),
            std::string::npos)
      << Events(id);
  // Step 30 fails every time: 8 tries, then it has failed for good.
  for (int t = 1; t <= 8; ++t) {
    error(s2, 30);
    for (int i = 0; i < 31 && t < 8; ++i) {
      tick();
      auto asked = copies("gcp-1", s2);
      if (!asked.empty()) {
        EXPECT_EQ(asked, std::vector<int64_t>({30}));
        break;
      }
    }
  }
  std::string events = Events(id);
  EXPECT_NE(events.find("replicate_failed [gcp-1] step 30 to volume ckpt of provider gcp: failed "
                        "on gcp-1: UNAVAILABLE: source gone; gave up after 8 tries"),
            std::string::npos)
      << events;
  EXPECT_NE(events.find("try 8 of 8 in 30000 ms"), std::string::npos) << events;
  for (int i = 0; i < 60; ++i) {
    tick();
    EXPECT_TRUE(copies("gcp-1", s2).empty());
  }
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
    if (a.has_start()) {
      EXPECT_FALSE(a.start().split_streams());
    }
  }
}

// Roles: an agent key makes agent requests only, a client key no agent requests and no node
// administration, an admin key no agent requests. Each refusal names key, role and request.
TEST_F(CoordinatorTest, EachRoleMakesOnlyItsOwnRequests) {
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml("name: r\ncommand: x\n");
  muster::Status st = ErrorOf(CallAs(agent1_, submit));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("permission denied: key 'node-1' (role agent) may not submit"),
            std::string::npos)
      << st;
  proto::Envelope status;
  status.mutable_status_request();
  EXPECT_EQ(ErrorOf(CallAs(agent1_, status)).code(), StatusCode::kFailedPrecondition);

  st = ErrorOf(CallAs(alice_, RegisterRequest("n0", "aws")));
  EXPECT_NE(st.message().find("key 'alice' (role client) may not agent register"),
            std::string::npos)
      << st;
  st = ErrorOf(CallAs(admin_, RegisterRequest("n0", "aws")));
  EXPECT_NE(st.message().find("(role admin) may not agent register"), std::string::npos) << st;

  std::string s = RegisterAs(agent1_, "n0");
  ASSERT_FALSE(s.empty());
  proto::Envelope drain;
  drain.mutable_drain_request()->set_node("n0");
  drain.mutable_drain_request()->set_drain(true);
  st = ErrorOf(CallAs(alice_, drain));
  EXPECT_NE(st.message().find("key 'alice' (role client) may not drain"), std::string::npos) << st;
  proto::Envelope preempt;
  preempt.mutable_preempt_node_request()->set_node("n0");
  EXPECT_EQ(ErrorOf(CallAs(alice_, preempt)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorOf(CallAs(agent1_, drain)).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(CallAs(admin_, drain).has_drain_reply());

  // Clients list nodes without where they are; admins see everything.
  proto::Envelope nodes;
  nodes.mutable_nodes_request();
  auto for_client = CallAs(alice_, nodes).nodes_reply();
  ASSERT_EQ(for_client.nodes_size(), 1);
  EXPECT_EQ(for_client.nodes(0).labels().address(), "");
  EXPECT_EQ(for_client.nodes(0).labels().transfer_key(), "");
  EXPECT_EQ(for_client.nodes(0).labels().volumes(0).path(), "");
  auto for_admin = CallAs(admin_, nodes).nodes_reply();
  EXPECT_EQ(for_admin.nodes(0).labels().transfer_key(), "key-of-n0");
}

// A client sees and acts on the jobs it submitted only; an admin on every job.
TEST_F(CoordinatorTest, ClientsSeeAndActOnlyOnTheirOwnJobs) {
  std::string s = RegisterAs(agent1_, "n0");
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml("name: mine\ncommand: x\n");
  std::string id = CallAs(alice_, submit).submit_reply().job_id();
  ASSERT_FALSE(id.empty());

  proto::Envelope status;
  status.mutable_status_request()->set_job_id(id);
  muster::Status st = ErrorOf(CallAs(bob_, status));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("key 'bob' (role client) may not see job " + id), std::string::npos)
      << st;
  EXPECT_EQ(CallAs(alice_, status).status_reply().jobs(0).job_id(), id);
  proto::Envelope all;
  all.mutable_status_request();
  EXPECT_EQ(CallAs(bob_, all).status_reply().jobs_size(), 0);
  EXPECT_EQ(CallAs(alice_, all).status_reply().jobs_size(), 1);
  EXPECT_EQ(CallAs(admin_, all).status_reply().jobs_size(), 1);

  proto::Envelope events;
  events.mutable_events_request()->set_job_id(id);
  EXPECT_EQ(ErrorOf(CallAs(bob_, events)).code(), StatusCode::kFailedPrecondition);
  EXPECT_GT(CallAs(alice_, events).events_reply().events_size(), 0);
  proto::Envelope every_event;
  every_event.mutable_events_request();
  proto::Envelope bobs = CallAs(bob_, every_event);
  for (const auto& ev : bobs.events_reply().events()) {
    ADD_FAILURE() << "bob sees " << ev.kind() << " of job '" << ev.job_id() << "'";
  }
  proto::Envelope alices = CallAs(alice_, every_event);
  EXPECT_GT(alices.events_reply().events_size(), 0);
  for (const auto& ev : alices.events_reply().events()) {
    EXPECT_EQ(ev.job_id(), id) << "clients see no node events";
  }

  proto::Envelope logs;
  logs.mutable_logs_request()->set_job_id(id);
  EXPECT_EQ(ErrorOf(CallAs(bob_, logs)).code(), StatusCode::kFailedPrecondition);

  proto::Envelope cancel;
  cancel.mutable_cancel_request()->set_job_id(id);
  st = ErrorOf(CallAs(bob_, cancel));
  EXPECT_NE(st.message().find("may not cancel job " + id), std::string::npos) << st;
  EXPECT_NE(Status(id).state(), proto::JOB_CANCELLED);
  EXPECT_EQ(CallAs(admin_, cancel).cancel_reply().state(), proto::JOB_CANCELLED);

  // The submitter survives a restart.
  Open();
  EXPECT_EQ(ErrorOf(CallAs(bob_, status)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(CallAs(alice_, status).status_reply().jobs(0).job_id(), id);
}

// The first registration binds a node name to its key, across restarts; another agent key
// cannot take the name nor speak for it with the session id, unless the bound key lost its agent
// role (rotation).
TEST_F(CoordinatorTest, ANodeNameIsBoundToTheKeyThatFirstRegisteredIt) {
  std::string s = RegisterAs(agent1_, "n0");
  ASSERT_FALSE(s.empty());
  std::string id = Submit("name: b\ncommand: x\n");
  ASSERT_EQ(Heartbeat("n0", s).size(), 0u) << "the plain helper uses no key: not n0's";
  proto::Envelope hb;
  hb.mutable_agent_heartbeat()->set_node("n0");
  hb.mutable_agent_heartbeat()->set_session_id(s);
  ASSERT_EQ(CallAs(agent1_, hb).agent_heartbeat_reply().actions_size(), 1);
  proto::Envelope started = ReportFrom("n0", s, id, 1);
  started.mutable_agent_report()->set_started(true);
  ASSERT_TRUE(CallAs(agent1_, started).has_agent_report_reply());
  ASSERT_EQ(Status(id).state(), proto::JOB_RUNNING);

  muster::Status st = ErrorOf(CallAs(agent2_, RegisterRequest("n0", "aws")));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("key 'node-2' (role agent) may not register as node n0"),
            std::string::npos)
      << st;
  EXPECT_EQ(ErrorOf(CallAs(agent2_, hb)).code(), StatusCode::kFailedPrecondition);
  proto::Envelope exit = ReportFrom("n0", s, id, 1);
  exit.mutable_agent_report()->add_exits()->set_exit_code(1);
  exit.mutable_agent_report()->set_all_exited(true);
  EXPECT_EQ(ErrorOf(CallAs(agent2_, exit)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Status(id).state(), proto::JOB_RUNNING) << "the job was not touched";

  Open();  // the binding is in the database
  EXPECT_EQ(ErrorOf(CallAs(agent2_, RegisterRequest("n0", "aws"))).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_FALSE(RegisterAs(agent1_, "n0").empty());

  // agent1's key is removed from authorized_keys: agent2 may take the name now.
  current_roles_[agent1_.public_key] = KeyRole::kNone;
  EXPECT_FALSE(RegisterAs(agent2_, "n0").empty());
  Open();
  EXPECT_EQ(ErrorOf(CallAs(agent1_, RegisterRequest("n0", "aws"))).code(),
            StatusCode::kFailedPrecondition)
      << "the move to agent2 was persisted";
}

// Commits, exits and progress are taken from the nodes of the job's current attempt only; log
// chunks only from the node the fetch was asked of; copy outcomes only from a node that mounts
// the volume, for a step committed on another provider.
TEST_F(CoordinatorTest, ReportsAndLogChunksOnlyFromTheNodesTheyConcern) {
  std::string s1 = RegisterAs(agent1_, "aws-1", "aws");
  std::string id = Submit("name: j\ncommand: x\ncheckpoint:\n  volume: ckpt\n  every: 10\n");
  proto::Envelope hb;
  hb.mutable_agent_heartbeat()->set_node("aws-1");
  hb.mutable_agent_heartbeat()->set_session_id(s1);
  ASSERT_EQ(CallAs(agent1_, hb).agent_heartbeat_reply().actions_size(), 1);
  std::string s2 = RegisterAs(agent2_, "aws-2", "aws");  // an agent outside the attempt

  auto commit = [&](const std::string& node, const std::string& session, int attempt,
                    int64_t step) {
    proto::Envelope e = ReportFrom(node, session, id, attempt);
    e.mutable_agent_report()->set_checkpoint_step(step);
    e.mutable_agent_report()->set_checkpoint_volume("ckpt");
    return e;
  };
  muster::Status st = ErrorOf(CallAs(agent2_, commit("aws-2", s2, 1, 999999)));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("may not report for attempt 1 of job " + id + " as node aws-2"),
            std::string::npos)
      << st;
  EXPECT_EQ(ErrorOf(CallAs(agent1_, commit("aws-1", s1, 2, 999999))).code(),
            StatusCode::kFailedPrecondition)
      << "attempt 2 is not the current attempt";
  proto::Envelope exit = ReportFrom("aws-2", s2, id, 1);
  exit.mutable_agent_report()->add_exits()->set_exit_code(9);
  exit.mutable_agent_report()->set_all_exited(true);
  EXPECT_EQ(ErrorOf(CallAs(agent2_, exit)).code(), StatusCode::kFailedPrecondition);
  // A replica of a step nobody committed.
  proto::Envelope replica = commit("aws-2", s2, 0, 999999);
  replica.mutable_agent_report()->set_checkpoint_replica(true);
  EXPECT_EQ(ErrorOf(CallAs(agent2_, replica)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Events(id).find("999999"), std::string::npos) << Events(id);
  EXPECT_TRUE(CallAs(agent1_, commit("aws-1", s1, 1, 10)).has_agent_report_reply());
  EXPECT_NE(Events(id).find("step 10 on volume ckpt of provider aws"), std::string::npos);

  // Logs of rank 0 are fetched from aws-1; aws-2 cannot answer for it.
  proto::Envelope logs;
  logs.mutable_logs_request()->set_job_id(id);
  proto::Envelope log_reply;
  bool replied = false;
  coord_->Handle(admin_, std::move(logs), [&](proto::Envelope e) {
    log_reply = std::move(e);
    replied = true;
  });
  ASSERT_FALSE(replied);
  auto actions = CallAs(agent1_, hb).agent_heartbeat_reply();
  ASSERT_EQ(actions.actions_size(), 1);
  ASSERT_TRUE(actions.actions(0).has_fetch_log());
  uint64_t fetch = actions.actions(0).fetch_log().fetch_id();
  auto chunk = [&](const std::string& node, const std::string& session, const std::string& data) {
    proto::Envelope e;
    auto* c = e.mutable_agent_log_chunk();
    c->set_node(node);
    c->set_session_id(session);
    c->set_fetch_id(fetch);
    c->set_data(data);
    return e;
  };
  st = ErrorOf(CallAs(agent2_, chunk("aws-2", s2, "forged")));
  EXPECT_NE(st.message().find("may not answer log fetch"), std::string::npos) << st;
  EXPECT_FALSE(replied);
  EXPECT_TRUE(CallAs(agent1_, chunk("aws-1", s1, "real")).has_agent_report_reply());
  ASSERT_TRUE(replied);
  EXPECT_EQ(log_reply.logs_reply().data(), "real");
}

// A job id becomes a directory on the target's volume: a report naming "../x" or an absolute
// path is never turned into a transfer.
TEST_F(CoordinatorTest, AHostileJobIdInACheckpointReportIsNeverReplicated) {
  std::string s0 = RegisterWithVolume("aws-1", "aws");
  std::string s1 = RegisterWithVolume("gcp-1", "gcp");
  for (const char* job : {"../x", "/abs", "a/../../b"}) {
    // No such job runs on aws-1: the report is refused before any copy is considered.
    proto::Envelope e = ReportFrom("aws-1", s0, job, 1);
    e.mutable_agent_report()->set_checkpoint_step(10);
    e.mutable_agent_report()->set_checkpoint_volume("ckpt");
    EXPECT_EQ(ErrorOf(Call(e)).code(), StatusCode::kFailedPrecondition);
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
