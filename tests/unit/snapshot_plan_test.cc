// The coordinator's snapshot plan (coordinator/snapshot_plan.h): the ring of peer copies, what
// the agents' reports add up to, and where a resumed attempt's ranks get their frames.

#include "coordinator/snapshot_plan.h"

#include <gtest/gtest.h>

namespace muster::coordinator {
namespace {

proto::SnapshotHeld Held(const std::string& job, int rank, int attempt, int64_t step,
                         int world = 2) {
  proto::SnapshotHeld h;
  h.set_job_id(job);
  h.set_rank(rank);
  h.set_world_size(world);
  h.set_attempt(attempt);
  h.set_step(step);
  return h;
}

SnapshotBook::Held List(std::initializer_list<proto::SnapshotHeld> v) {
  SnapshotBook::Held out;
  for (const auto& h : v) *out.Add() = h;
  return out;
}

std::vector<proto::AgentAction> Starts(size_t n) {
  std::vector<proto::AgentAction> v(n);
  for (auto& a : v) a.mutable_start();
  return v;
}

TEST(SnapshotBookTest, ReportsReplaceWhatANodeSaidAndALostNodeIsForgotten) {
  SnapshotBook book;
  book.ReplaceNode("a", List({Held("j", 0, 1, 10), Held("k", 0, 1, 3)}));
  book.ReplaceNode("b", List({Held("j", 1, 1, 10)}));
  EXPECT_EQ(book.Of("j").size(), 2u);
  // A heartbeat replaces everything of the node; an all-exited report one job only.
  book.ReplaceNode("a", List({Held("j", 0, 1, 11)}));
  EXPECT_EQ(book.Of("k").size(), 0u);
  book.ReplaceJob("b", "j", List({Held("j", 1, 1, 11), Held("j", 0, 1, 11)}));
  auto j = book.Of("j");
  ASSERT_EQ(j.size(), 3u);
  book.ForgetNode("b");
  j = book.Of("j");
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0].node, "a");
  EXPECT_EQ(j[0].step, 11);
}

TEST(SnapshotBookTest, HoldersOutsideAnAttemptAreTakenOnce) {
  SnapshotBook book;
  book.ReplaceNode("a", List({Held("j", 0, 1, 10)}));
  book.ReplaceNode("b", List({Held("j", 1, 1, 10), Held("k", 0, 1, 3)}));
  book.ReplaceNode("c", List({Held("k", 1, 1, 3)}));
  EXPECT_EQ(book.TakeHoldersExcept("j", {"a", "c"}), std::vector<std::string>{"b"});
  EXPECT_TRUE(book.TakeHoldersExcept("j", {"a", "c"}).empty());
  EXPECT_EQ(book.Of("k").size(), 2u);  // another job's frames stay
  EXPECT_EQ(book.TakeHoldersExcept("k", {}), (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(book.Of("j").size(), 1u);
}

// What the pins are decided from: the book's jobs per node, the nodes that reported (with
// nothing, too), and each frame's `pinned` as reported; and the action the pinner makes.
TEST(SnapshotBookTest, PinsAreDecidedFromTheReportsAndSentAsAnAction) {
  SnapshotBook book;
  auto pinned = [](proto::SnapshotHeld h) {
    h.set_pinned(true);
    return h;
  };
  book.ReplaceNode(
      "a", List({pinned(Held("j", 0, 1, 10)), pinned(Held("j", 1, 1, 10)), Held("k", 0, 1, 3)}));
  book.ReplaceNode("b", List({pinned(Held("j", 1, 1, 10)), pinned(Held("j", 0, 1, 10))}));
  book.ReplaceNode("c", List({}));
  EXPECT_EQ(book.JobsOf("a"), (std::vector<std::string>{"j", "k"}));
  EXPECT_TRUE(book.JobsOf("c").empty());
  EXPECT_EQ(book.Reported(), (std::set<std::string>{"a", "b", "c"}));
  ASSERT_EQ(book.Of("j").size(), 4u);
  EXPECT_TRUE(book.Of("j")[0].pinned);
  EXPECT_FALSE(book.Of("k")[0].pinned);

  SnapshotPinner pinner;
  EXPECT_FALSE(pinner.Decide("j", 2, book.Of("j"), book.Reported(), {"a", "b", "d"}).has_value())
      << "d has not reported";
  auto a = pinner.Decide("j", 2, book.Of("j"), book.Reported(), {"a", "b"});
  ASSERT_TRUE(a.has_value() && a->has_snapshot_pins());
  EXPECT_EQ(a->snapshot_pins().job_id(), "j");
  EXPECT_EQ(a->snapshot_pins().kept_attempt(), 1);
  EXPECT_EQ(a->snapshot_pins().kept_step(), 10);
  EXPECT_EQ(a->snapshot_pins().candidate_step(), -1);
  book.ForgetNode("c");
  EXPECT_EQ(book.Reported(), (std::set<std::string>{"a", "b"}));
}

TEST(SnapshotPlanTest, EachNodeCopiesToTheNextNodeRankInARing) {
  std::vector<SnapshotNode> nodes = {
      {"a", "tcp://a:1", "ka"}, {"b", "tcp://b:1", "kb"}, {"c", "tcp://c:1", "kc"}};
  auto starts = Starts(3);
  auto c = PlanSnapshots(nodes, 1, {}, std::nullopt, starts);
  EXPECT_EQ(c.source, ResumeChoice::Source::kFresh);
  EXPECT_EQ(starts[0].start().snapshot_peer_endpoint(), "tcp://b:1");
  EXPECT_EQ(starts[1].start().snapshot_peer_key(), "kc");
  EXPECT_EQ(starts[2].start().snapshot_peer_endpoint(), "tcp://a:1");
  EXPECT_EQ(starts[0].start().snapshot_sources_size(), 0);
  // One node: no peer. A node without snapshot memory: none to it, none from it.
  auto one = Starts(1);
  PlanSnapshots({nodes[0]}, 2, {}, std::nullopt, one);
  EXPECT_TRUE(one[0].start().snapshot_peer_endpoint().empty());
  auto two = Starts(2);
  PlanSnapshots({nodes[0], {"x", "", ""}}, 1, {}, std::nullopt, two);
  EXPECT_TRUE(two[0].start().snapshot_peer_endpoint().empty());
  EXPECT_TRUE(two[1].start().snapshot_peer_endpoint().empty());
}

// Node b was lost; a held its own frames and b's (the peer copy); the new attempt runs on a and
// c. Rank 0 restores on a from a's memory; rank 1, now on c, is fetched from a. The snapshot is
// newer than the volume's step, so it wins.
TEST(SnapshotPlanTest, ASnapshotResumeListsEachRanksHoldersOwnNodeFirst) {
  std::vector<SnapshotHolding> held = {
      {"a", 0, 2, 1, 14}, {"a", 1, 2, 1, 14}, {"b", 1, 2, 1, 15}, {"c", 0, 2, 1, 14}};
  std::vector<SnapshotNode> nodes = {{"c", "tcp://c:1", "kc"}, {"a", "tcp://a:1", "ka"}};
  auto starts = Starts(2);
  auto c = PlanSnapshots(nodes, 1, held, /*volume_step=*/10, starts);
  ASSERT_EQ(c.source, ResumeChoice::Source::kSnapshot) << c.reason;
  EXPECT_EQ(c.step, 14);
  EXPECT_EQ(c.attempt, 1);
  const auto& s0 = starts[0].start();  // node c, rank 0
  EXPECT_EQ(s0.snapshot_resume_step(), 14);
  EXPECT_EQ(s0.snapshot_resume_attempt(), 1);
  ASSERT_EQ(s0.snapshot_sources_size(), 2);
  EXPECT_EQ(s0.snapshot_sources(0).node(), "c");  // its own copy first
  EXPECT_EQ(s0.snapshot_sources(1).node(), "a");
  const auto& s1 = starts[1].start();  // node a, rank 1
  ASSERT_EQ(s1.snapshot_sources_size(), 1);
  EXPECT_EQ(s1.snapshot_sources(0).rank(), 1);
  EXPECT_EQ(s1.snapshot_sources(0).node(), "a");
  EXPECT_EQ(s1.snapshot_sources(0).endpoint(), "tcp://a:1");
  EXPECT_EQ(SnapshotResumeEvent(2, c, 10),
            "attempt 2 resumes from step 14 (in-memory snapshot of attempt 1 on nodes a,c; the "
            "volume has step 10)");
}

// Frames held only by a node outside the new attempt do not count (its agent is not admitted);
// a volume step newer than every complete set wins.
TEST(SnapshotPlanTest, FramesOutsideTheAttemptOrOlderThanTheVolumeAreNotUsed) {
  std::vector<SnapshotHolding> held = {{"a", 0, 2, 1, 14}, {"b", 1, 2, 1, 14}};
  std::vector<SnapshotNode> nodes = {{"a", "tcp://a:1", "ka"}, {"c", "tcp://c:1", "kc"}};
  auto starts = Starts(2);
  auto c = PlanSnapshots(nodes, 1, held, 10, starts);
  EXPECT_EQ(c.source, ResumeChoice::Source::kVolume);
  EXPECT_EQ(starts[0].start().snapshot_sources_size(), 0);
  EXPECT_EQ(starts[1].start().snapshot_sources_size(), 0);
  held.push_back({"c", 1, 2, 1, 14});
  auto again = Starts(2);
  EXPECT_EQ(PlanSnapshots(nodes, 1, held, 15, again).source, ResumeChoice::Source::kVolume);
  EXPECT_EQ(PlanSnapshots(nodes, 1, held, 13, again).source, ResumeChoice::Source::kSnapshot);
}

}  // namespace
}  // namespace muster::coordinator
