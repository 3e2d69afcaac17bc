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

}  // namespace
}  // namespace muster::coordinator
