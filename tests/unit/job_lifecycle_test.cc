// The job lifecycle's rules (coordinator/job_lifecycle.h), table-driven: an attempt's facts as
// the agents would report them, and the decision when every node has stopped.

#include "coordinator/job_lifecycle.h"

#include <gtest/gtest.h>

#include <functional>

namespace muster::coordinator {
namespace {

using K = AttemptEndDecision::Kind;
using Q = AttemptEndDecision::Queue;

constexpr int64_t kNow = 1'000'000;

proto::RankExit Exit(int rank, int code, int signal = 0, bool stopped_by_agent = false) {
  proto::RankExit x;
  x.set_rank(rank);
  x.set_exit_code(code);
  x.set_signal(signal);
  x.set_stopped_by_agent(stopped_by_agent);
  return x;
}

// A 2-node job, 1 rank per node, on attempt 3 after 1 restart and 1 preemption.
JobRecord Job() {
  JobRecord r;
  r.id = "j-1";
  r.state = proto::JOB_RUNNING;
  r.attempt = 3;
  r.restarts = 1;
  r.preemptions = 1;
  r.nodes = {"a", "b"};
  r.spec.set_ranks_per_node(1);
  r.spec.set_max_restarts(3);
  r.spec.set_restart_backoff_s(10);
  r.not_before_ms = 42;
  return r;
}

struct Case {
  std::string name;
  std::function<void(AttemptState&, JobRecord&, int& start_retries, bool& replicating)> facts;
  K kind;
  proto::JobState state;
  Q queue;
  int32_t restarts, preemptions;
  int start_retries;
  int64_t not_before_ms;
  std::string blame;
  std::vector<AttemptEndDecision::Event> events;
  std::string outcome;
  std::string detail;  // the job's detail afterwards ("=" : unchanged)
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// Both nodes done; the facts are recorded the way the coordinator records them.
std::vector<Case> Cases() {
  const LifecycleTiming t;
  return {
      {"EveryRankExitsZero",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_EQ(a.RecordExit("a", Exit(0, 0)).kind, ExitVerdict::Kind::kNone);
         EXPECT_EQ(a.RecordExit("b", Exit(1, 0)).kind, ExitVerdict::Kind::kNone);
       },
       K::kSucceeded,
       proto::JOB_SUCCEEDED,
       Q::kRelease,
       1,
       1,
       0,
       42,
       "",
       {{"succeeded", "attempt 3: every rank exited 0"}},
       "succeeded",
       "every rank exited 0"},
      {"NoticeThenCheckpointAndExit3",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_TRUE(a.RecordStop(proto::STOP_NODE_PREEMPTED, kNow + 5000, true));
         EXPECT_EQ(a.checkpoint_deadline_ms, kNow + 5000);
         a.RecordExit("a", Exit(0, 3, 0, true));
         a.RecordExit("b", Exit(1, 3, 0, true));
       },
       K::kPreempted,
       proto::JOB_PENDING,
       Q::kRequeue,
       1,
       2,
       0,
       42,
       "",
       {{"requeued", "after attempt 3 (preempted); not counted against max_restarts"}},
       "preempted",
       "="},
      {"NoticeThenKilledAtTheDeadline",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         a.RecordStop(proto::STOP_NODE_PREEMPTED, kNow + 5000, true);
         a.RecordExit("a", Exit(0, 0));  // one rank had finished
         a.RecordExit("b", Exit(1, -1, 9, true));
       },
       K::kPreempted,
       proto::JOB_PENDING,
       Q::kRequeue,
       1,
       2,
       0,
       42,
       "",
       {{"requeued", "after attempt 3 (preempted); not counted against max_restarts"}},
       "preempted",
       "="},
      // Exit 0 is success (docs/env-contract.md): ranks that finish the job while a notice is
      // pending have finished it; requeueing them ran the job again from its last checkpoint.
      // The coordinator stopped nothing, yet the ranks were killed: their agents' lease ran out
      // (the coordinator answered no heartbeat in time). Not a success: placed again.
      {"RanksStoppedByTheirAgentsAreRequeuedNotSucceeded",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_EQ(a.RecordExit("a", Exit(0, -1, 15, true)).kind, ExitVerdict::Kind::kNone);
         EXPECT_EQ(a.RecordExit("b", Exit(1, -1, 15, true)).kind, ExitVerdict::Kind::kNone);
       },
       K::kPreempted,
       proto::JOB_PENDING,
       Q::kRequeue,
       1,
       2,
       0,
       42,
       "",
       {{"requeued",
         "after attempt 3 (its ranks were stopped by their agents, not by the coordinator: a "
         "lease that ran out, or an agent shut down); not counted against max_restarts"}},
       "preempted",
       "its ranks were stopped by their agents, unasked (a lease ran out?)"},
      {"RanksStoppedByTheirAgentsWhileCopyingWaitForTheCopies",
       [](AttemptState& a, JobRecord&, int&, bool& replicating) {
         a.RecordExit("a", Exit(0, -1, 15, true));
         a.RecordExit("b", Exit(1, -1, 15, true));
         replicating = true;
       },
       K::kPreempted,
       proto::JOB_PENDING,
       Q::kRelease,
       1,
       2,
       0,
       42,
       "",
       {{"requeued",
         "after attempt 3 (its ranks were stopped by their agents, not by the coordinator: a "
         "lease that ran out, or an agent shut down); not counted against max_restarts"}},
       "preempted",
       "its ranks were stopped by their agents, unasked (a lease ran out?)"},
      {"EveryRankExitsZeroAfterANotice",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         a.RecordStop(proto::STOP_NODE_PREEMPTED, kNow + 5000, true);
         a.RecordExit("a", Exit(0, 0, 0, true));
         a.RecordExit("b", Exit(1, 0, 0, true));
       },
       K::kSucceeded,
       proto::JOB_SUCCEEDED,
       Q::kRelease,
       1,
       1,
       0,
       42,
       "",
       {{"succeeded", "attempt 3: every rank exited 0"}},
       "succeeded",
       "every rank exited 0"},
      {"SchedulerPreemptionWaitsForItsCopies",
       [](AttemptState& a, JobRecord&, int&, bool& replicating) {
         a.RecordStop(proto::STOP_PREEMPTED, kNow + 5000, true);
         a.RecordExit("a", Exit(0, -1, 15, true));
         a.RecordExit("b", Exit(1, -1, 15, true));
         replicating = true;
       },
       K::kPreempted,
       proto::JOB_PENDING,
       Q::kRelease,
       1,
       2,
       0,
       42,
       "",
       {{"requeued", "after attempt 3 (preempted); not counted against max_restarts"}},
       "preempted",
       "="},
      {"NodeLostWaitsForItsLease",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_TRUE(a.RecordNodeLost("node b lost (no heartbeat for 5001 ms)"));
         EXPECT_TRUE(a.RecordStop(proto::STOP_PEER_FAILED, 0, true));
         a.RecordExit("a", Exit(0, -1, 15, true));
       },
       K::kNodeLost,
       proto::JOB_PENDING,
       Q::kRelease,
       1,
       2,
       0,
       kNow + (t.lease_ms - t.heartbeat_timeout_ms) + 500,
       "",
       {{"requeued",
         "after attempt 3 (node b lost (no heartbeat for 5001 ms)); not counted against "
         "max_restarts"}},
       "node_lost",
       "="},
      // Its agent's connection closed: the agent process is gone, its ranks with it; no lease
      // to wait for (docs/protocol.md, "Dead or silent").
      {"NodeWhoseAgentIsGoneIsRequeuedAtOnce",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_TRUE(a.RecordNodeLost("node b lost (agent gone)", false, /*agent_gone=*/true));
         EXPECT_TRUE(a.RecordStop(proto::STOP_PEER_FAILED, 0, true));
         a.RecordExit("a", Exit(0, -1, 15, true));
       },
       K::kNodeLost,
       proto::JOB_PENDING,
       Q::kRequeue,
       1,
       2,
       0,
       42,
       "",
       {{"requeued",
         "after attempt 3 (node b lost (agent gone)); not counted against max_restarts"}},
       "node_lost",
       "="},
      // One node gone, another silent: the silent one may still run its ranks; the fence holds,
      // whichever was lost first.
      {"GoneAndSilentNodesStillWaitForTheLease",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_TRUE(a.RecordNodeLost("node b lost (agent gone)", false, /*agent_gone=*/true));
         EXPECT_FALSE(a.RecordNodeLost("node a lost (no heartbeat for 5001 ms)"));
         a.RecordStop(proto::STOP_PEER_FAILED, 0, true);
       },
       K::kNodeLost,
       proto::JOB_PENDING,
       Q::kRelease,
       1,
       2,
       0,
       kNow + (t.lease_ms - t.heartbeat_timeout_ms) + 500,
       "",
       {{"requeued",
         "after attempt 3 (node b lost (agent gone)); not counted against max_restarts"}},
       "node_lost",
       "="},
      {"PeerFailureThenNodeLostBlamesTheLoss",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         auto v = a.RecordExit("a", Exit(0, kPeerFailureExitCode));
         EXPECT_EQ(v.kind, ExitVerdict::Kind::kPeerFailure);
         EXPECT_TRUE(v.first_peer_failure);
         EXPECT_TRUE(v.stop_gang);
         a.RecordStop(proto::STOP_PEER_FAILED, 0, true);
         EXPECT_TRUE(a.RecordNodeLost("node b lost (x)"));
       },
       K::kNodeLost,
       proto::JOB_PENDING,
       Q::kRelease,
       1,
       2,
       0,
       kNow + (t.lease_ms - t.heartbeat_timeout_ms) + 500,
       "",
       {{"requeued", "after attempt 3 (node b lost (x)); not counted against max_restarts"}},
       "node_lost",
       "="},
      {"AppFailureRestartsWithDoublingBackoff",
       [](AttemptState& a, JobRecord&, int& start_retries, bool&) {
         start_retries = 2;
         auto v = a.RecordExit("b", Exit(1, 1));
         EXPECT_EQ(v.kind, ExitVerdict::Kind::kRankFailed);
         EXPECT_TRUE(v.stop_gang);
         a.RecordStop(proto::STOP_PEER_FAILED, 0, true);
         // The rest of the gang, stopped by its agent: not a cause.
         EXPECT_EQ(a.RecordExit("a", Exit(0, -1, 15, true)).kind, ExitVerdict::Kind::kNone);
       },
       K::kRestart,
       proto::JOB_PENDING,
       Q::kRelease,
       2,
       1,
       0,
       kNow + 20000,
       "b",
       {{"requeued", "restart 2 of 3 in 20000 ms"}},
       "failed",
       "rank 1 on b exited 1"},
      {"AppFailureAfterMaxRestartsFails",
       [](AttemptState& a, JobRecord& r, int&, bool&) {
         r.restarts = 3;
         a.RecordExit("a", Exit(0, -1, 11));
         // A second failure is a consequence of the first.
         EXPECT_EQ(a.RecordExit("b", Exit(1, 1)).kind, ExitVerdict::Kind::kNone);
       },
       K::kFailed,
       proto::JOB_FAILED,
       Q::kRelease,
       4,
       1,
       0,
       42,
       "a",
       {{"failed", "rank 0 on a killed by signal 11; 3 restart(s) used of 3"}},
       "failed",
       "rank 0 on a killed by signal 11"},
      {"PeerFailureAloneFailsBlamingNoNode",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         a.RecordExit("a", Exit(0, kPeerFailureExitCode));
         a.RecordStop(proto::STOP_PEER_FAILED, 0, true);
         auto v = a.RecordExit("b", Exit(1, kPeerFailureExitCode));
         EXPECT_EQ(v.kind, ExitVerdict::Kind::kPeerFailure);
         EXPECT_FALSE(v.first_peer_failure);
         EXPECT_FALSE(v.stop_gang) << "stopped already";
       },
       K::kRestart,
       proto::JOB_PENDING,
       Q::kRelease,
       2,
       1,
       0,
       kNow + 20000,
       "",
       {{"requeued", "restart 2 of 3 in 20000 ms"}},
       "failed",
       "rank 0 on a exited 75 (a peer failed)"},
      {"RetryableStartErrorRetriesAtOnce",
       [](AttemptState& a, JobRecord&, int& start_retries, bool&) {
         start_retries = kMaxStartRetries - 1;
         EXPECT_TRUE(a.RecordStartError("a", "port 29503 in use", true, start_retries));
         EXPECT_FALSE(a.RecordStartError("b", "later", false, start_retries)) << "not the cause";
       },
       K::kStartRetry,
       proto::JOB_PENDING,
       Q::kRequeue,
       1,
       1,
       kMaxStartRetries,
       42,
       "",
       {{"requeued",
         "after attempt 3 (node a could not start: port 29503 in use); retried on other ports, "
         "not counted against max_restarts"}},
       "start_retry",
       "="},
      {"FailedLaunchPreflightIsPlacedAgainWithoutTheBlamedNode",
       [](AttemptState& a, JobRecord&, int& start_retries, bool&) {
         EXPECT_TRUE(a.RecordStartError("b", "launch preflight: node b cannot reach node a", true,
                                        start_retries));
         a.preflight = true;
       },
       K::kStartRetry,
       proto::JOB_PENDING,
       Q::kRequeue,
       1,
       1,
       1,
       42,
       "",
       {{"requeued",
         "after attempt 3 (node b could not start: launch preflight: node b cannot reach node a); "
         "placed again at once without that node, not counted against max_restarts"}},
       "start_retry",
       "="},
      {"RetryableStartErrorPastTheLimitIsAFailure",
       [](AttemptState& a, JobRecord&, int& start_retries, bool&) {
         start_retries = kMaxStartRetries;
         a.RecordStartError("a", "port 29503 in use", true, start_retries);
       },
       K::kRestart,
       proto::JOB_PENDING,
       Q::kRelease,
       2,
       1,
       0,
       kNow + 20000,
       "a",
       {{"requeued", "restart 2 of 3 in 20000 ms"}},
       "failed",
       "node a could not start: port 29503 in use"},
      {"CancelWinsOverEverything",
       [](AttemptState& a, JobRecord& r, int&, bool&) {
         a.RecordExit("a", Exit(0, 1));
         r.state = proto::JOB_CANCELLED;
         r.detail = "cancelled";
         EXPECT_FALSE(a.RecordStop(proto::STOP_CANCELLED, kNow + 5000, true));
         EXPECT_EQ(a.stop, proto::STOP_CANCELLED) << "a cancel overrides the first reason";
         EXPECT_EQ(a.checkpoint_deadline_ms, 0);
       },
       K::kCancelled,
       proto::JOB_CANCELLED,
       Q::kRelease,
       1,
       1,
       0,
       42,
       "",
       {},
       "cancelled",
       "="},
      {"TimeLimitFails",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         EXPECT_FALSE(a.RecordStop(proto::STOP_TIME_LIMIT, 0, true));
         a.RecordExit("a", Exit(0, -1, 15, true));
         a.RecordExit("b", Exit(1, -1, 15, true));
       },
       K::kTimeLimit,
       proto::JOB_FAILED,
       Q::kRelease,
       1,
       1,
       0,
       42,
       "",
       {{"failed", "time limit reached"}},
       "failed",
       "time limit"},
      {"NodeReRegisteredBeforeStartingOverridesTheCause",
       [](AttemptState& a, JobRecord&, int&, bool&) {
         a.RecordExit("a", Exit(0, 1));
         EXPECT_FALSE(a.RecordNodeLost("node b lost (x)")) << "a cause is known";
         EXPECT_TRUE(a.RecordNodeLost("node b re-registered before starting", true));
       },
       K::kNodeLost,
       proto::JOB_PENDING,
       Q::kRelease,
       1,
       2,
       0,
       kNow + (t.lease_ms - t.heartbeat_timeout_ms) + 500,
       "",
       {{"requeued",
         "after attempt 3 (node b re-registered before starting); not counted against "
         "max_restarts"}},
       "node_lost",
       "="},
  };
}

class DecideAttemptEndTest : public ::testing::TestWithParam<Case> {};

TEST_P(DecideAttemptEndTest, Decides) {
  const Case& c = GetParam();
  AttemptState a;
  JobRecord r = Job();
  int start_retries = 0;
  bool replicating = false;
  c.facts(a, r, start_retries, replicating);
  a.done = {"a", "b"};
  const std::string detail_before = r.detail;
  AttemptEndDecision d = DecideAttemptEnd(a, r, start_retries, replicating, kNow, {});
  EXPECT_EQ(AttemptEndKindName(d.kind), AttemptEndKindName(c.kind));
  EXPECT_EQ(d.state, c.state) << proto::JobState_Name(d.state);
  EXPECT_EQ(d.queue, c.queue);
  EXPECT_EQ(d.restarts, c.restarts);
  EXPECT_EQ(d.preemptions, c.preemptions);
  EXPECT_EQ(d.start_retries, c.start_retries);
  EXPECT_EQ(d.not_before_ms, c.not_before_ms);
  EXPECT_EQ(d.blame_node, c.blame);
  EXPECT_EQ(d.credit_nodes, c.kind == K::kSucceeded);
  EXPECT_EQ(d.events, c.events);
  EXPECT_EQ(d.outcome, c.outcome);
  if (c.detail == "=") {
    EXPECT_FALSE(d.set_detail) << d.detail;
  } else {
    EXPECT_TRUE(d.set_detail);
    EXPECT_EQ(d.detail, c.detail);
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, DecideAttemptEndTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

TEST(JobLifecycleTest, AllRanksMustReportZeroForANoticeToEndInSuccess) {
  JobRecord r = Job();
  r.spec.set_ranks_per_node(2);  // 4 ranks
  AttemptState a;
  a.RecordStop(proto::STOP_NODE_PREEMPTED, kNow + 1000, true);
  a.RecordExit("a", Exit(0, 0, 0, true));
  a.RecordExit("a", Exit(0, 0, 0, true));  // reported twice: one rank
  a.RecordExit("a", Exit(1, 0, 0, true));
  a.RecordExit("b", Exit(2, 0, 0, true));
  a.done = {"a", "b"};
  EXPECT_EQ(DecideAttemptEnd(a, r, 0, false, kNow, {}).kind, K::kPreempted)
      << "rank 3 never reported an exit";
  a.RecordExit("b", Exit(3, 0, 0, true));
  EXPECT_EQ(DecideAttemptEnd(a, r, 0, false, kNow, {}).kind, K::kSucceeded);
}

// Attempts stopped by their agents' leases are requeued freely kLeaseRequeues times in a row;
// the next is a failure (restart with backoff, counted, no node blamed). Preemptions and lost
// nodes carry the count on; a success, a failure or a cancel ends it.
TEST(JobLifecycleTest, LeaseStopsAreRequeuedFreelyAFewTimesInARowThenCountAsAFailure) {
  auto stopped_by_agents = [] {
    AttemptState a;
    a.RecordExit("a", Exit(0, -1, 15, true));
    a.RecordExit("b", Exit(1, -1, 15, true));
    a.done = {"a", "b"};
    return a;
  };
  JobRecord r = Job();
  for (int i = 0; i < kLeaseRequeues; ++i) {
    AttemptEndDecision d = DecideAttemptEnd(stopped_by_agents(), r, 0, false, kNow, {}, i);
    EXPECT_EQ(d.kind, K::kPreempted) << i;
    EXPECT_EQ(d.restarts, 1) << i;
    EXPECT_EQ(d.lease_requeues, i + 1);
  }
  AttemptEndDecision d =
      DecideAttemptEnd(stopped_by_agents(), r, 0, false, kNow, {}, kLeaseRequeues);
  EXPECT_EQ(d.kind, K::kRestart);
  EXPECT_EQ(d.restarts, 2);
  EXPECT_EQ(d.preemptions, 1);
  EXPECT_EQ(d.lease_requeues, 0);
  EXPECT_EQ(d.blame_node, "");
  EXPECT_EQ(d.not_before_ms, kNow + 20000);  // restart 2: 10 s backoff doubled
  EXPECT_EQ(d.outcome, "failed");
  EXPECT_NE(d.detail.find("stopped by their agents, unasked, 4 times in a row"), std::string::npos)
      << d.detail;
  EXPECT_EQ(d.attempt_detail, d.detail);
  EXPECT_TRUE(d.stopped_by_agents) << "not a failed snapshot resume";
  // A node lost in between does not end the run of lease stops; a clean attempt does.
  AttemptState lost;
  lost.RecordNodeLost("node b lost", false, true);
  lost.done = {"a", "b"};
  EXPECT_EQ(DecideAttemptEnd(lost, r, 0, false, kNow, {}, 2).lease_requeues, 2);
  AttemptState ok;
  ok.RecordExit("a", Exit(0, 0));
  ok.RecordExit("b", Exit(1, 0));
  ok.done = {"a", "b"};
  EXPECT_EQ(DecideAttemptEnd(ok, r, 0, false, kNow, {}, 2).lease_requeues, 0);
}

TEST(JobLifecycleTest, TheEarliestCheckpointDeadlineWinsAndNeedsAVolume) {
  AttemptState a;
  a.RecordStop(proto::STOP_NODE_PREEMPTED, 5000, false);
  EXPECT_EQ(a.checkpoint_deadline_ms, 0) << "no volume: nothing to checkpoint to";
  a.RecordStop(proto::STOP_NODE_PREEMPTED, 5000, true);
  a.RecordStop(proto::STOP_PREEMPTED, 7000, true);
  a.RecordStop(proto::STOP_PREEMPTED, 3000, true);
  EXPECT_EQ(a.checkpoint_deadline_ms, 3000);
  EXPECT_EQ(a.stop, proto::STOP_NODE_PREEMPTED) << "the first reason stays";
}

TEST(JobLifecycleTest, BackoffDoublesUpToAnHour) {
  JobRecord r = Job();
  r.spec.set_max_restarts(100);
  r.spec.set_restart_backoff_s(1000);
  r.restarts = 10;
  AttemptState a;
  a.RecordExit("a", Exit(0, 1));
  a.done = {"a", "b"};
  auto d = DecideAttemptEnd(a, r, 0, false, kNow, {});
  EXPECT_EQ(d.kind, K::kRestart);
  EXPECT_EQ(d.not_before_ms, kNow + 4000 * 1000) << "1000 s doubles twice, then passes an hour";
}

TEST(JobLifecycleTest, ALeaseNoLongerThanTheTimeoutNeedsNoWait) {
  JobRecord r = Job();
  AttemptState a;
  a.RecordNodeLost("node b lost (x)");
  a.done = {"a", "b"};
  auto d = DecideAttemptEnd(a, r, 0, false, kNow, {5000, 5000});
  EXPECT_EQ(d.kind, K::kNodeLost);
  EXPECT_EQ(d.queue, Q::kRequeue);
  EXPECT_EQ(d.not_before_ms, 42);
}

}  // namespace
}  // namespace muster::coordinator
