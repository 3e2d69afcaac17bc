// The gang scheduler's rules, one test each, on an injected clock.

#include "coordinator/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

namespace muster::coordinator {
namespace {

using std::chrono::seconds;

TimePoint T(int s) { return TimePoint{} + std::chrono::hours(1000) + seconds(s); }

NodeSpec N(std::string name, std::string provider, std::string island = "a",
           std::vector<std::string> volumes = {"ckpt"}, std::string gpu = "h100", int gpus = 8) {
  NodeSpec s;
  s.name = std::move(name);
  s.provider = std::move(provider);
  s.region = "r1";
  s.island = std::move(island);
  s.gpu_type = std::move(gpu);
  s.gpus = gpus;
  s.slots = 8;
  s.volumes = std::move(volumes);
  return s;
}

JobRequest J(std::string id, int nodes, int priority = 0, uint64_t seq = 0) {
  static uint64_t next = 1;
  JobRequest j;
  j.id = std::move(id);
  j.nodes = nodes;
  j.ranks_per_node = 8;
  j.gpu_type = "h100";
  j.gpus_per_node = 8;
  j.priority = priority;
  j.seq = seq ? seq : next++;
  j.checkpoint_volume = "ckpt";
  return j;
}

std::set<std::string> Providers(const Scheduler& s, const std::vector<std::string>& nodes) {
  std::set<std::string> out;
  for (const auto& n : nodes) out.insert((*s.GetNode(n, T(0))).spec.provider);
  return out;
}

TEST(SchedulerTest, AllOrNothingGangOnOneProvider) {
  Scheduler s;
  s.UpsertNode(N("aws-0", "aws"));
  s.UpsertNode(N("aws-1", "aws"));
  s.UpsertNode(N("gcp-0", "gcp"));
  s.UpsertNode(N("gcp-1", "gcp"));
  ASSERT_TRUE(s.Submit(J("three", 3)).ok());
  ASSERT_TRUE(s.Submit(J("two", 2)).ok());
  Decisions d = s.Schedule(T(0));
  // 4 nodes free, but no provider has 3: "three" gets nothing at all, "two" gets one provider.
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].job, "two");
  EXPECT_EQ(Providers(s, d.placements[0].nodes).size(), 1u);
  EXPECT_TRUE(s.IsPending("three"));
  EXPECT_TRUE(s.AllocationOf("three").empty());
}

TEST(SchedulerTest, AnExcludedNodeIsNeverPlacedForThatJobButStaysFreeForOthers) {
  Scheduler s;
  for (int i = 0; i < 3; ++i) s.UpsertNode(N("aws-" + std::to_string(i), "aws"));
  ASSERT_TRUE(s.Submit(J("a", 2)).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  std::string bad = d.placements[0].nodes[1];
  // The preflight blamed `bad`: the job is placed again without it.
  ASSERT_TRUE(s.Exclude("a", bad).ok());
  ASSERT_TRUE(s.Requeue("a").ok());
  d = s.Schedule(T(1));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(std::count(d.placements[0].nodes.begin(), d.placements[0].nodes.end(), bad), 0);
  // With a second exclusion only one node is left for it: it waits, and another job may take
  // an excluded node (one with a higher priority, so a's reservation does not hold it).
  ASSERT_TRUE(s.Exclude("a", d.placements[0].nodes[0]).ok());
  ASSERT_TRUE(s.Requeue("a").ok());
  ASSERT_TRUE(s.Submit(J("b", 1, 1)).ok());
  d = s.Schedule(T(2));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].job, "b");
  EXPECT_TRUE(s.IsPending("a"));
  EXPECT_EQ(s.Exclude("nope", bad).code(), StatusCode::kNotFound);
}

TEST(SchedulerTest, FragmentationTwoHalfGangsNeverDeadlock) {
  // Two gangs that each need all 4 nodes: a scheduler that hands out nodes one at a time can
  // give each half and deadlock. Here the first gets all 4 and the second waits, whole.
  Scheduler s;
  for (int i = 0; i < 4; ++i) s.UpsertNode(N("n" + std::to_string(i), "aws"));
  ASSERT_TRUE(s.Submit(J("a", 4)).ok());
  ASSERT_TRUE(s.Submit(J("b", 4)).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].job, "a");
  EXPECT_EQ(d.placements[0].nodes.size(), 4u);
  EXPECT_TRUE(s.AllocationOf("b").empty());
  EXPECT_EQ(s.PendingReason("b"), "waiting: 0 of 4 nodes free on provider aws");
  ASSERT_TRUE(s.Release("a").ok());
  d = s.Schedule(T(1));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].job, "b");
  EXPECT_EQ(d.placements[0].nodes.size(), 4u);
}

TEST(SchedulerTest, PendingReasonNamesProviderAndIsland) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws", "a"));
  s.UpsertNode(N("a1", "aws", "a"));
  s.UpsertNode(N("a2", "aws", "a"));
  s.UpsertNode(N("a3", "aws", "a"));
  JobRequest small = J("small", 2);
  small.island = IslandPolicy::kRequired;
  JobRequest big = J("big", 4);
  big.island = IslandPolicy::kRequired;
  ASSERT_TRUE(s.Submit(small).ok());
  ASSERT_TRUE(s.Submit(big).ok());
  s.Schedule(T(0));
  EXPECT_TRUE(s.IsRunning("small"));
  EXPECT_EQ(s.PendingReason("big"), "waiting: 2 of 4 nodes free on provider aws, island a");
}

TEST(SchedulerTest, IslandRequiredPreferredAny) {
  Scheduler s;
  s.UpsertNode(N("x0", "aws", "x"));
  s.UpsertNode(N("x1", "aws", "x"));
  s.UpsertNode(N("y0", "aws", "y"));
  s.UpsertNode(N("y1", "aws", "y"));
  s.UpsertNode(N("y2", "aws", "y"));
  JobRequest req = J("req", 4);
  req.island = IslandPolicy::kRequired;
  ASSERT_TRUE(s.Submit(req).ok());
  Decisions d = s.Schedule(T(0));
  EXPECT_TRUE(d.placements.empty()) << "no island has 4 nodes";
  EXPECT_EQ(s.PendingReason("req"), "waiting: no island has 4 registered nodes that fit this job");
  ASSERT_TRUE(s.CancelPending("req").ok());

  JobRequest pref = J("pref", 3);
  pref.island = IslandPolicy::kPreferred;
  ASSERT_TRUE(s.Submit(pref).ok());
  d = s.Schedule(T(1));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].nodes, (std::vector<std::string>{"y0", "y1", "y2"}));
  ASSERT_TRUE(s.Release("pref").ok());

  JobRequest pref4 = J("pref4", 4);
  pref4.island = IslandPolicy::kPreferred;
  ASSERT_TRUE(s.Submit(pref4).ok());
  d = s.Schedule(T(2));
  ASSERT_EQ(d.placements.size(), 1u) << "preferred spans islands when no island can hold it";
  EXPECT_EQ(d.placements[0].nodes.size(), 4u);
}

TEST(SchedulerTest, EveryNodeMountsTheCheckpointVolume) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws", "a", {"ckpt"}));
  s.UpsertNode(N("a1", "aws", "a", {"other"}));
  s.UpsertNode(N("a2", "aws", "a", {"ckpt", "other"}));
  JobRequest j = J("j", 2);
  ASSERT_TRUE(s.Submit(j).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].nodes, (std::vector<std::string>{"a0", "a2"}));
  JobRequest j3 = J("j3", 3);
  Status st = s.Feasible(j3);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("volume ckpt"), std::string::npos) << st;
}

TEST(SchedulerTest, PriorityThenSubmissionOrder) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws"));
  ASSERT_TRUE(s.Submit(J("low-first", 1, 0, 1)).ok());
  ASSERT_TRUE(s.Submit(J("high", 1, 5, 2)).ok());
  ASSERT_TRUE(s.Submit(J("low-second", 1, 0, 3)).ok());
  EXPECT_EQ(s.Schedule(T(0)).placements.at(0).job, "high");
  ASSERT_TRUE(s.Release("high").ok());
  EXPECT_EQ(s.Schedule(T(1)).placements.at(0).job, "low-first");
  ASSERT_TRUE(s.Release("low-first").ok());
  EXPECT_EQ(s.Schedule(T(2)).placements.at(0).job, "low-second");
}

TEST(SchedulerTest, BackfillOnlyWhereItCannotDelayTheHead) {
  Scheduler s;
  for (int i = 0; i < 4; ++i) s.UpsertNode(N("a" + std::to_string(i), "aws"));
  s.UpsertNode(N("g0", "gcp"));
  JobRequest running = J("running", 2);
  running.time_limit = seconds(100);
  ASSERT_TRUE(s.Submit(running).ok());
  ASSERT_EQ(s.Schedule(T(0)).placements.size(), 1u);
  // Head needs all 4 aws nodes: it can start at t=100 when `running` ends.
  ASSERT_TRUE(s.Submit(J("head", 4, 0)).ok());
  JobRequest long_job = J("long", 1);  // no time limit: would hold an aws node past t=100
  long_job.providers = {"aws"};
  JobRequest short_job = J("short", 1);
  short_job.providers = {"aws"};
  short_job.time_limit = seconds(50);  // ends at t=60 < 100: cannot delay the head
  JobRequest other = J("other", 1);
  other.providers = {"gcp"};  // outside the head's nodes
  ASSERT_TRUE(s.Submit(long_job).ok());
  ASSERT_TRUE(s.Submit(short_job).ok());
  ASSERT_TRUE(s.Submit(other).ok());
  Decisions d = s.Schedule(T(10));
  std::set<std::string> placed;
  for (auto& p : d.placements) placed.insert(p.job);
  EXPECT_EQ(placed, (std::set<std::string>{"short", "other"}));
  EXPECT_NE(s.PendingReason("long").find("held for higher-priority job head"), std::string::npos)
      << s.PendingReason("long");
  // Once the short job and the running one finish, the head starts on time.
  ASSERT_TRUE(s.Release("short").ok());
  ASSERT_TRUE(s.Release("running").ok());
  d = s.Schedule(T(100));
  ASSERT_FALSE(d.placements.empty());
  EXPECT_EQ(d.placements[0].job, "head");
}

TEST(SchedulerTest, BackfillUsesNodesTheHeadWillNotNeed) {
  Scheduler s;
  for (int i = 0; i < 6; ++i) s.UpsertNode(N("a" + std::to_string(i), "aws"));
  JobRequest running = J("running", 4);
  running.time_limit = seconds(100);
  ASSERT_TRUE(s.Submit(running).ok());
  s.Schedule(T(0));
  ASSERT_TRUE(s.Submit(J("head", 5)).ok());  // at t=100: 6 free, needs 5: one extra
  ASSERT_TRUE(s.Submit(J("fill1", 1)).ok());
  ASSERT_TRUE(s.Submit(J("fill2", 1)).ok());
  Decisions d = s.Schedule(T(1));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].job, "fill1");
  EXPECT_TRUE(s.IsPending("fill2"));
}

TEST(SchedulerTest, HigherPriorityPreemptsLowerAndHoldsTheNodes) {
  Scheduler s;
  for (int i = 0; i < 4; ++i) s.UpsertNode(N("a" + std::to_string(i), "aws"));
  ASSERT_TRUE(s.Submit(J("low1", 2, 0)).ok());
  ASSERT_TRUE(s.Submit(J("low2", 2, 1)).ok());
  ASSERT_EQ(s.Schedule(T(0)).placements.size(), 2u);
  ASSERT_TRUE(s.Submit(J("urgent", 2, 10)).ok());
  ASSERT_TRUE(s.Submit(J("filler", 2, 0)).ok());
  Decisions d = s.Schedule(T(1));
  EXPECT_TRUE(d.placements.empty());
  ASSERT_EQ(d.preemptions.size(), 1u);
  EXPECT_EQ(d.preemptions[0].victim, "low1") << "the lowest priority goes first";
  EXPECT_EQ(d.preemptions[0].for_job, "urgent");
  EXPECT_EQ(s.PendingReason("urgent"), "waiting: preempting lower-priority job(s) low1");
  // A second pass while low1 stops preempts nothing more.
  EXPECT_TRUE(s.Schedule(T(2)).preemptions.empty());
  ASSERT_TRUE(s.Requeue("low1").ok());
  d = s.Schedule(T(3));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].job, "urgent") << "the filler may not take the freed nodes";
  EXPECT_TRUE(s.IsPending("low1"));
}

TEST(SchedulerTest, EqualPriorityNeverPreempts) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws"));
  ASSERT_TRUE(s.Submit(J("first", 1, 3)).ok());
  s.Schedule(T(0));
  ASSERT_TRUE(s.Submit(J("second", 1, 3)).ok());
  EXPECT_TRUE(s.Schedule(T(1)).preemptions.empty());
}

TEST(SchedulerTest, QuarantineWithExponentialBackoff) {
  QuarantinePolicy p;
  p.failures_to_quarantine = 2;
  p.failure_window = seconds(60);
  p.quarantine_base = seconds(10);
  p.quarantine_max = seconds(25);
  Scheduler s(p);
  s.UpsertNode(N("bad", "aws"));
  EXPECT_FALSE(s.RecordNodeFailure("bad", T(0)));
  auto until = s.RecordNodeFailure("bad", T(1));
  ASSERT_TRUE(until);
  EXPECT_EQ(*until, T(11));
  EXPECT_EQ((*s.GetNode("bad", T(5))).state, NodeState::kQuarantined);
  ASSERT_TRUE(s.Submit(J("j", 1)).ok());
  EXPECT_TRUE(s.Schedule(T(5)).placements.empty());
  EXPECT_EQ(s.PendingReason("j"), "waiting: 0 of 1 nodes free on provider aws");
  EXPECT_EQ(s.Schedule(T(11)).placements.size(), 1u) << "quarantine expires";
  ASSERT_TRUE(s.Release("j").ok());
  // Second quarantine doubles (20 s), third is capped (25 s).
  s.RecordNodeFailure("bad", T(20));
  EXPECT_EQ(*s.RecordNodeFailure("bad", T(21)), T(41));
  s.RecordNodeFailure("bad", T(50));
  EXPECT_EQ(*s.RecordNodeFailure("bad", T(51)), T(76));
  // Failures further apart than the window never quarantine.
  s.UpsertNode(N("flaky", "aws"));
  EXPECT_FALSE(s.RecordNodeFailure("flaky", T(100)));
  EXPECT_FALSE(s.RecordNodeFailure("flaky", T(200)));
  s.RecordNodeSuccess("flaky");
  EXPECT_FALSE(s.RecordNodeFailure("flaky", T(201)));
}

TEST(SchedulerTest, DrainingAndDownNodesGetNoNewWork) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws"));
  s.UpsertNode(N("a1", "aws"));
  ASSERT_TRUE(s.SetNodeState("a0", NodeState::kDraining).ok());
  ASSERT_TRUE(s.SetNodeState("a1", NodeState::kDown).ok());
  ASSERT_TRUE(s.Submit(J("j", 1)).ok());
  EXPECT_TRUE(s.Schedule(T(0)).placements.empty());
  ASSERT_TRUE(s.SetNodeState("a0", NodeState::kUp).ok());
  EXPECT_EQ(s.Schedule(T(1)).placements.at(0).nodes, std::vector<std::string>{"a0"});
  EXPECT_EQ(s.SetNodeState("nope", NodeState::kUp).code(), StatusCode::kNotFound);
}

TEST(SchedulerTest, RefusesJobsNoNodeSetCouldEverHold) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws", "a"));
  s.UpsertNode(N("a1", "aws", "b"));
  s.UpsertNode(N("g0", "gcp", "a"));
  EXPECT_TRUE(s.Feasible(J("ok", 2)).ok());
  Status st = s.Feasible(J("three", 3));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("the most on one provider is 2 (aws)"), std::string::npos) << st;
  JobRequest isl = J("isl", 2);
  isl.island = IslandPolicy::kRequired;
  st = s.Feasible(isl);
  EXPECT_NE(st.message().find("on one island"), std::string::npos) << st;
  JobRequest a100 = J("a100", 1);
  a100.gpu_type = "a100";
  st = s.Feasible(a100);
  EXPECT_NE(st.message().find("no registered node fits"), std::string::npos) << st;
  JobRequest bad = J("bad", 0);
  EXPECT_EQ(s.Feasible(bad).code(), StatusCode::kInvalidArgument);
  // Busy or down nodes still count: a job that fits later is not refused.
  ASSERT_TRUE(s.SetNodeState("a0", NodeState::kDown).ok());
  EXPECT_TRUE(s.Feasible(J("later", 2)).ok());
}

TEST(SchedulerTest, PinnedHostsKeepTheirOrder) {
  Scheduler s;
  s.UpsertNode(N("a0", "aws"));
  s.UpsertNode(N("a1", "aws"));
  s.UpsertNode(N("g0", "gcp"));
  JobRequest j = J("pinned", 2);
  j.hosts = {"a1", "a0"};
  ASSERT_TRUE(s.Feasible(j).ok());
  ASSERT_TRUE(s.Submit(j).ok());
  EXPECT_EQ(s.Schedule(T(0)).placements.at(0).nodes, (std::vector<std::string>{"a1", "a0"}));
  JobRequest split = J("split", 2);
  split.hosts = {"a0", "g0"};
  EXPECT_NE(s.Feasible(split).message().find("one provider"), std::string::npos);
}

TEST(SchedulerTest, RestoreRunningAfterRestart) {
  Scheduler s;
  ASSERT_TRUE(s.RestoreRunning(J("r", 2), {"a0", "a1"}).ok());
  EXPECT_TRUE(s.IsRunning("r"));
  EXPECT_EQ((*s.GetNode("a0", T(0))).state, NodeState::kDown) << "until its agent registers";
  s.UpsertNode(N("a0", "aws"));
  s.UpsertNode(N("a1", "aws"));
  EXPECT_EQ((*s.GetNode("a0", T(0))).job, "r");
  ASSERT_TRUE(s.Submit(J("next", 1)).ok());
  EXPECT_TRUE(s.Schedule(T(0)).placements.empty()) << "restored nodes are busy";
}

// --- hot spares ---

JobRequest WithSpares(JobRequest j, int spares, IslandPolicy island = IslandPolicy::kAny) {
  j.spares = spares;
  j.island = island;
  return j;
}

TEST(SchedulerTest, SparesAreHeldOnTheGangsProviderAndIslandAndNeverGivenToAnotherJob) {
  Scheduler s;
  s.UpsertNode(N("aws-0", "aws", "a"));
  s.UpsertNode(N("aws-1", "aws", "a"));
  s.UpsertNode(N("aws-2", "aws", "b"));
  s.UpsertNode(N("aws-3", "aws", "a"));
  s.UpsertNode(N("gcp-0", "gcp", "a"));
  ASSERT_TRUE(s.Submit(WithSpares(J("ft", 2), 1, IslandPolicy::kRequired)).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].nodes, (std::vector<std::string>{"aws-0", "aws-1"}));
  EXPECT_EQ(d.placements[0].spares, (std::vector<std::string>{"aws-3"}))
      << "island a, like the gang";
  EXPECT_EQ(s.AllocationOf("ft"), (std::vector<std::string>{"aws-0", "aws-1"}));
  EXPECT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-3"}));
  auto v = *s.GetNode("aws-3", T(0));
  EXPECT_EQ(v.job, "ft");
  EXPECT_TRUE(v.spare);
  EXPECT_FALSE((*s.GetNode("aws-0", T(0))).spare);
  // Two one-node jobs: only aws-2 and gcp-0 are free; the spare is never handed out, even to
  // a higher-priority job (it may preempt the whole job, not borrow its spare).
  ASSERT_TRUE(s.Submit(J("a", 1, 5)).ok());
  ASSERT_TRUE(s.Submit(J("b", 1, 5)).ok());
  ASSERT_TRUE(s.Submit(J("c", 1, 0)).ok());
  d = s.Schedule(T(1));
  std::set<std::string> used;
  for (const auto& p : d.placements) used.insert(p.nodes.begin(), p.nodes.end());
  EXPECT_EQ(used, (std::set<std::string>{"aws-2", "gcp-0"}));
  EXPECT_TRUE(s.IsPending("c"));
  EXPECT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-3"}));
  // Released with the job.
  ASSERT_TRUE(s.Release("ft").ok());
  EXPECT_EQ((*s.GetNode("aws-3", T(2))).job, "");
  EXPECT_FALSE((*s.GetNode("aws-3", T(2))).spare);
}

// A gang never waits for its spares: a job that lost its spare and was placed again, or one
// whose spares do not fit yet, starts on its gang alone and gets its spares as nodes free up.
TEST(SchedulerTest, AGangStartsAloneWhenItsSparesDoNotFitAndGetsThemLater) {
  Scheduler s;
  for (int i = 0; i < 3; ++i) s.UpsertNode(N("aws-" + std::to_string(i), "aws"));
  ASSERT_TRUE(s.Submit(WithSpares(J("ft", 3), 1)).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].nodes.size(), 3u);
  EXPECT_TRUE(d.placements[0].spares.empty());
  EXPECT_EQ(s.SpareRequests().size(), 1u) << "it asks for the spare it lacks";
  s.UpsertNode(N("aws-3", "aws"));
  d = s.Schedule(T(1));
  ASSERT_EQ(d.spares_held.size(), 1u);
  EXPECT_EQ(d.spares_held[0].node, "aws-3");
  EXPECT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-3"}));
}

TEST(SchedulerTest, ASpareTakesTheLostNodesRankPreferringItsIsland) {
  Scheduler s;
  s.UpsertNode(N("aws-0", "aws", "a"));
  s.UpsertNode(N("aws-1", "aws", "a"));
  s.UpsertNode(N("aws-2", "aws", "b"));
  s.UpsertNode(N("aws-3", "aws", "a"));
  ASSERT_TRUE(s.Submit(WithSpares(J("ft", 2), 2)).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  ASSERT_EQ(d.placements[0].nodes, (std::vector<std::string>{"aws-0", "aws-1"}));
  ASSERT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-2", "aws-3"}));
  ASSERT_TRUE(s.SetNodeState("aws-1", NodeState::kDown).ok());
  // aws-2 comes first by name, but aws-3 shares the lost node's island.
  auto spare = s.TakeSpare("ft", "aws-1");
  ASSERT_TRUE(spare.ok()) << spare.status();
  EXPECT_EQ(*spare, "aws-3");
  EXPECT_EQ(s.AllocationOf("ft"), (std::vector<std::string>{"aws-0", "aws-3"})) << "node rank 1";
  EXPECT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-2"}));
  EXPECT_EQ((*s.GetNode("aws-1", T(1))).job, "") << "the lost node is no longer the job's";
  EXPECT_FALSE((*s.GetNode("aws-3", T(1))).spare);
  // Next: the other island's spare; then none is left.
  EXPECT_EQ(*s.TakeSpare("ft", "aws-0"), "aws-2");
  EXPECT_EQ(s.AllocationOf("ft"), (std::vector<std::string>{"aws-2", "aws-3"}));
  EXPECT_EQ(s.TakeSpare("ft", "aws-3").status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.TakeSpare("ft", "aws-1").status().code(), StatusCode::kNotFound) << "not in gang";
  EXPECT_EQ(s.TakeSpare("nope", "aws-2").status().code(), StatusCode::kNotFound);
}

// After a coordinator restart: a restored spare is the job's again (idle, never free, not
// refilled), before and after its agent registers; one held by a job already is refused.
TEST(SchedulerTest, ARestoredSpareIsHeldForItsJobAgain) {
  Scheduler s;
  s.UpsertNode(N("aws-0", "aws"));
  s.UpsertNode(N("aws-2", "aws"));
  ASSERT_TRUE(s.RestoreRunning(WithSpares(J("ft", 2), 1), {"aws-0", "aws-1"}).ok());
  EXPECT_EQ(s.RestoreSpare("ft", "aws-0").code(), StatusCode::kFailedPrecondition) << "in the gang";
  EXPECT_EQ(s.RestoreSpare("nope", "aws-2").code(), StatusCode::kNotFound);
  ASSERT_TRUE(s.RestoreSpare("ft", "aws-3").ok()) << "not registered yet: known by name";
  EXPECT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-3"}));
  EXPECT_EQ(s.RestoreSpare("ft", "aws-2").code(), StatusCode::kFailedPrecondition)
      << "it asks for one spare";
  EXPECT_TRUE(s.SpareRequests().empty()) << "not short of spares";
  s.UpsertNode(N("aws-3", "aws"));
  auto v = *s.GetNode("aws-3", T(0));
  EXPECT_EQ(v.job, "ft");
  EXPECT_TRUE(v.spare);
  ASSERT_TRUE(s.Submit(J("w", 1)).ok());
  Decisions d = s.Schedule(T(0));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].nodes, (std::vector<std::string>{"aws-2"})) << "not the spare";
  EXPECT_TRUE(d.spares_held.empty());
  EXPECT_EQ(*s.TakeSpare("ft", "aws-1"), "aws-3");
}

// A spare whose node is down (a restored spare whose agent is not back yet) never replaces a
// lost node.
TEST(SchedulerTest, OnlyASpareThatIsUpReplacesALostNode) {
  Scheduler s;
  for (int i = 0; i < 4; ++i) s.UpsertNode(N("aws-" + std::to_string(i), "aws"));
  ASSERT_TRUE(s.Submit(WithSpares(J("ft", 2), 2)).ok());
  ASSERT_EQ(s.Schedule(T(0)).placements.size(), 1u);
  ASSERT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-2", "aws-3"}));
  ASSERT_TRUE(s.SetNodeState("aws-2", NodeState::kDown).ok());
  EXPECT_EQ(*s.TakeSpare("ft", "aws-1"), "aws-3");
  // Only a spare that is down is left: none can replace a lost node.
  auto none = s.TakeSpare("ft", "aws-0");
  EXPECT_EQ(none.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(none.status().message().find("no spare that is up (held: aws-2)"), std::string::npos)
      << none.status();
  EXPECT_EQ(s.AllocationOf("ft"), (std::vector<std::string>{"aws-0", "aws-3"})) << "unchanged";
  EXPECT_EQ(s.SparesOf("ft"), (std::vector<std::string>{"aws-2"}));
}

TEST(SchedulerTest, AJobShortOfSparesGetsNewOnesOnItsProviderAndIslandAfterTheQueue) {
  Scheduler s;
  s.UpsertNode(N("aws-0", "aws", "a"));
  s.UpsertNode(N("aws-1", "aws", "a"));
  s.UpsertNode(N("aws-2", "aws", "a"));
  ASSERT_TRUE(s.Submit(WithSpares(J("ft", 2), 1, IslandPolicy::kRequired)).ok());
  ASSERT_EQ(s.Schedule(T(0)).placements.size(), 1u);
  ASSERT_TRUE(s.SetNodeState("aws-0", NodeState::kDown).ok());
  ASSERT_EQ(*s.TakeSpare("ft", "aws-0"), "aws-2");
  // Free now: a node of another provider and one of another island: neither may be its spare.
  s.UpsertNode(N("gcp-0", "gcp", "a"));
  s.UpsertNode(N("aws-9", "aws", "b"));
  Decisions d = s.Schedule(T(1));
  EXPECT_TRUE(d.spares_held.empty());
  EXPECT_TRUE(s.SparesOf("ft").empty());
  // A node on its island: held as the new spare, unless a pending job takes it first.
  s.UpsertNode(N("aws-5", "aws", "a"));
  JobRequest one = J("one", 1);
  one.providers = {"aws"};
  ASSERT_TRUE(s.Submit(one).ok());
  d = s.Schedule(T(2));
  ASSERT_EQ(d.placements.size(), 1u);
  EXPECT_EQ(d.placements[0].nodes[0], "aws-5") << "island a packs first";
  EXPECT_TRUE(d.spares_held.empty()) << "the queue comes before spares";
  ASSERT_TRUE(s.Release("one").ok());
  d = s.Schedule(T(3));
  ASSERT_EQ(d.spares_held.size(), 1u);
  EXPECT_EQ(d.spares_held[0].job, "ft");
  EXPECT_EQ(s.SparesOf("ft").size(), 1u);
  std::string spare = s.SparesOf("ft")[0];
  EXPECT_EQ((*s.GetNode(spare, T(3))).spec.provider, "aws");
  EXPECT_EQ((*s.GetNode(spare, T(3))).spec.island, "a");
  EXPECT_TRUE(s.Schedule(T(4)).spares_held.empty()) << "full again: no more";
  // A lost spare: dropped, and replaced in the next pass when a node is free.
  ASSERT_TRUE(s.SetNodeState(spare, NodeState::kDown).ok());
  ASSERT_TRUE(s.DropSpare("ft", spare).ok());
  EXPECT_TRUE(s.SparesOf("ft").empty());
  EXPECT_EQ(s.DropSpare("ft", spare).code(), StatusCode::kNotFound);
}

TEST(SchedulerTest, FeasibleRefusesMoreSparesThanAnyGroupCanHoldWithTheReason) {
  Scheduler s;
  for (int i = 0; i < 4; ++i) s.UpsertNode(N("aws-" + std::to_string(i), "aws"));
  s.UpsertNode(N("gcp-0", "gcp"));
  EXPECT_TRUE(s.Feasible(WithSpares(J("ok", 3), 1)).ok());
  Status st = s.Feasible(WithSpares(J("big", 3), 2));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("5 (3 for the gang + 2 spares)"), std::string::npos) << st;
  EXPECT_NE(st.message().find("the most on one provider is 4 (aws)"), std::string::npos) << st;
  JobRequest pinned = WithSpares(J("pinned", 1), 1);
  pinned.hosts = {"aws-0"};
  EXPECT_EQ(s.Feasible(pinned).code(), StatusCode::kInvalidArgument);
}

TEST(SchedulerTest, SpareRequestsSayWhatARunningJobLacksOnItsGangsProvider) {
  Scheduler s;
  s.UpsertNode(N("gcp-0", "gcp"));
  s.UpsertNode(N("gcp-1", "gcp"));
  s.UpsertNode(N("gcp-2", "gcp"));
  ASSERT_TRUE(s.Submit(WithSpares(J("ft", 2), 1)).ok());
  ASSERT_EQ(s.Schedule(T(0)).placements.size(), 1u);
  EXPECT_TRUE(s.SpareRequests().empty()) << "it holds its spare";
  ASSERT_TRUE(s.SetNodeState("gcp-0", NodeState::kDown).ok());
  ASSERT_TRUE(s.TakeSpare("ft", "gcp-0").ok());
  auto r = s.SpareRequests();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].id, "ft");
  EXPECT_EQ(r[0].nodes, 1);
  EXPECT_EQ(r[0].spares, 0);
  EXPECT_EQ(r[0].providers, (std::vector<std::string>{"gcp"}));
  ASSERT_TRUE(s.Release("ft").ok());
  EXPECT_TRUE(s.SpareRequests().empty()) << "a job that ended asks for nothing";
}

}  // namespace
}  // namespace muster::coordinator
