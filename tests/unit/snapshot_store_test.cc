// In-memory snapshots: the frame codec (checkpoint/snapshot_frame.h), the agent's bounded store
// (node_agent/snapshots/snapshot_store.h) and the coordinator's choice of resume step
// (coordinator/snapshot_resume.h).

#include "node_agent/snapshots/snapshot_store.h"

#include <gtest/gtest.h>

#include <string>

#include "checkpoint/snapshot_frame.h"
#include "coordinator/snapshot_resume.h"

namespace muster {
namespace {

using checkpoint::DecodeSnapshotFrame;
using checkpoint::EncodeSnapshotFrame;
using checkpoint::SnapshotFrame;
using checkpoint::SnapshotKey;
using coordinator::ChooseResume;
using coordinator::ResumeChoice;
using coordinator::SnapshotHolding;
using node_agent::SnapshotStore;

SnapshotKey Key(int rank, int64_t step, int attempt = 0, int world = 4, std::string job = "ft-1") {
  return {.job = job, .attempt = attempt, .rank = rank, .world_size = world, .step = step};
}

SnapshotFrame Frame(int rank, int64_t step, size_t bytes, int attempt = 0,
                    std::string job = "ft-1") {
  std::string payload(bytes, static_cast<char>('a' + rank));
  auto enc = EncodeSnapshotFrame(Key(rank, step, attempt, 4, job), payload);
  EXPECT_TRUE(enc.ok()) << enc.status().ToString();
  auto f = DecodeSnapshotFrame(*enc, 1 << 30);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  return *f;
}

TEST(SnapshotFrameTest, RoundTrips) {
  auto enc = EncodeSnapshotFrame(Key(3, 120, 2), std::string("state\0bytes", 11));
  ASSERT_TRUE(enc.ok());
  auto f = DecodeSnapshotFrame(*enc, 1024);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->key, Key(3, 120, 2));
  EXPECT_EQ(f->payload, std::string("state\0bytes", 11));
}

TEST(SnapshotFrameTest, RefusesWhatIsWrongAndNamesIt) {
  std::string good = *EncodeSnapshotFrame(Key(1, 10), "payload");
  auto expect = [](std::string bytes, uint64_t limit, const std::string& words) {
    auto f = DecodeSnapshotFrame(bytes, limit);
    ASSERT_FALSE(f.ok()) << words;
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(f.status().message().find(words), std::string::npos) << f.status().ToString();
  };
  std::string b = good;
  b[0] = 'X';
  expect(b, 1024, "magic");
  b = good;
  b[48 + 5 + 2] ^= 1;  // a payload byte
  expect(b, 1024, "xxh3");
  expect(good, 3, "exceeds the limit");
  expect(good.substr(0, good.size() - 1), 1024, "the header says");
  expect(good.substr(0, 20), 1024, "shorter than its header");
  b = good;
  b[20] = 4;  // rank 4 of world size 4
  expect(b, 1024, "rank 4");
  b = good;
  b[48] = '/';  // the job id
  expect(b, 1024, "job id");
  EXPECT_FALSE(EncodeSnapshotFrame(Key(0, 1, 0, 4, "../x"), "p").ok());
  EXPECT_FALSE(EncodeSnapshotFrame(Key(0, -1), "p").ok());
}

TEST(SnapshotStoreTest, KeepsTheNewestStepsPerRankWithinItsReservation) {
  SnapshotStore store({.memory_limit = 1000, .keep_steps = 2});
  for (int64_t step : {10, 20, 30}) ASSERT_TRUE(store.Put(Frame(0, step, 100)).ok());
  auto held = store.Held("ft-1");
  ASSERT_EQ(held.size(), 2u);
  EXPECT_EQ(held[0].step, 20);
  EXPECT_EQ(held[1].step, 30);
  EXPECT_EQ(store.used_bytes(), 200u);
  EXPECT_EQ(store.reserved_bytes(), 200u);
  auto f = store.Get("ft-1", 0, 30);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)->payload, std::string(100, 'a'));
  EXPECT_EQ(store.Get("ft-1", 0, 10).status().code(), StatusCode::kNotFound);
}

TEST(SnapshotStoreTest, RefusesWhatDoesNotFitWithAClearMessageAndKeepsNothingOfIt) {
  SnapshotStore store({.memory_limit = 1000, .keep_steps = 2});
  ASSERT_TRUE(store.Put(Frame(0, 10, 300)).ok());  // reserves 600
  Status s = store.Put(Frame(1, 10, 300));         // would need 600 more
  ASSERT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("job ft-1"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("rank 1"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("limit is 1000 bytes"), std::string::npos) << s.ToString();
  EXPECT_EQ(store.used_bytes(), 300u);
  EXPECT_EQ(store.reserved_bytes(), 600u);
  EXPECT_EQ(store.Held("ft-1").size(), 1u);
  // A rank's frame growing past what the limit allows is refused too; the old one stays.
  EXPECT_EQ(store.Put(Frame(0, 20, 501)).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(store.Get("ft-1", 0, 10).ok());
  // A reservation made ahead of time is refused the same way.
  EXPECT_EQ(store.Reserve("other", 0, 300).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(store.Reserve("other", 0, 200).ok());
  EXPECT_EQ(store.reserved_bytes(), 1000u);
}

TEST(SnapshotStoreTest, RefusesAPayloadThatFailsItsChecksum) {
  SnapshotStore store({.memory_limit = 1000});
  SnapshotFrame f = Frame(0, 10, 100);
  f.payload[7] ^= 0x20;
  EXPECT_EQ(store.Put(f).code(), StatusCode::kDataLoss);
  EXPECT_EQ(store.used_bytes(), 0u);
  EXPECT_TRUE(store.Jobs().empty());
}

TEST(SnapshotStoreTest, ANewerAttemptOverwritesWhatItsPredecessorSavedPastTheResumePoint) {
  SnapshotStore store({.memory_limit = 10000, .keep_steps = 3});
  for (int64_t step : {10, 20, 30}) ASSERT_TRUE(store.Put(Frame(0, step, 10, 0)).ok());
  ASSERT_TRUE(store.Put(Frame(0, 20, 10, 1)).ok());  // attempt 1 resumed from 10
  auto held = store.Held("ft-1");
  ASSERT_EQ(held.size(), 2u);
  EXPECT_EQ(held[0].step, 10);
  EXPECT_EQ(held[0].attempt, 0);
  EXPECT_EQ(held[1].step, 20);
  EXPECT_EQ(held[1].attempt, 1);
  EXPECT_EQ(store.Put(Frame(0, 40, 10, 0)).code(), StatusCode::kAborted);  // stale attempt
}

TEST(SnapshotStoreTest, DropJobFreesEverything) {
  SnapshotStore store({.memory_limit = 1000});
  ASSERT_TRUE(store.Put(Frame(0, 10, 100)).ok());
  ASSERT_TRUE(store.Put(Frame(1, 10, 100, 0, "ft-2")).ok());
  store.DropJob("ft-1");
  EXPECT_TRUE(store.Held("ft-1").empty());
  EXPECT_EQ(store.used_bytes(), 100u);
  EXPECT_EQ(store.reserved_bytes(), 200u);
  EXPECT_EQ(store.Jobs(), std::vector<std::string>{"ft-2"});
}

// Two nodes of two ranks each; each node holds its own ranks and its peer's.
std::vector<SnapshotHolding> TwoNodes(int64_t a_step, int64_t b_step) {
  std::vector<SnapshotHolding> h;
  for (int r : {0, 1}) {
    h.push_back({"a", r, 4, 0, a_step});
    h.push_back({"b", r, 4, 0, a_step});
  }
  for (int r : {2, 3}) {
    h.push_back({"b", r, 4, 0, b_step});
    h.push_back({"a", r, 4, 0, b_step});
  }
  return h;
}

TEST(ChooseResumeTest, NewestCompleteSetOfSurvivorsWins) {
  auto held = TwoNodes(30, 30);
  held.push_back({"a", 0, 4, 0, 20});
  held.push_back({"a", 1, 4, 0, 20});
  held.push_back({"a", 2, 4, 0, 20});
  held.push_back({"a", 3, 4, 0, 20});
  ResumeChoice c = ChooseResume(4, held, {"b"}, 25);
  EXPECT_EQ(c.source, ResumeChoice::Source::kSnapshot);
  EXPECT_EQ(c.step, 30);
  EXPECT_EQ(c.holders.at(3), std::vector<std::string>{"a"});
  // Step 30 is not complete on the survivors when rank 3's only copy was on the lost node.
  held = TwoNodes(30, 30);
  std::erase_if(held, [](const SnapshotHolding& h) { return h.node == "a" && h.rank == 3; });
  held.push_back({"a", 0, 4, 0, 20});
  held.push_back({"a", 1, 4, 0, 20});
  held.push_back({"a", 2, 4, 0, 20});
  held.push_back({"a", 3, 4, 0, 20});
  c = ChooseResume(4, held, {"b"}, 10);
  EXPECT_EQ(c.source, ResumeChoice::Source::kSnapshot);
  EXPECT_EQ(c.step, 20);
}

TEST(ChooseResumeTest, FallsBackToTheVolumeOnlyWhenNoSetIsCompleteOrItIsNewer) {
  auto held = TwoNodes(30, 20);  // ranks 0-1 at 30, 2-3 at 20: no step complete
  ResumeChoice c = ChooseResume(4, held, {}, 10);
  EXPECT_EQ(c.source, ResumeChoice::Source::kVolume);
  EXPECT_EQ(c.step, 10);
  c = ChooseResume(4, TwoNodes(30, 30), {}, 40);
  EXPECT_EQ(c.source, ResumeChoice::Source::kVolume);
  EXPECT_EQ(c.step, 40);
  c = ChooseResume(4, TwoNodes(30, 30), {}, 30);  // a tie: memory is faster
  EXPECT_EQ(c.source, ResumeChoice::Source::kSnapshot);
  c = ChooseResume(4, TwoNodes(30, 30), {"a", "b"}, std::nullopt);
  EXPECT_EQ(c.source, ResumeChoice::Source::kFresh);
}

TEST(ChooseResumeTest, NeverMixesAttemptsOrWorldSizes) {
  auto held = TwoNodes(30, 30);
  for (auto& h : held) {
    if (h.rank == 2) h.attempt = 1;
    if (h.rank == 3) h.world_size = 8;
  }
  ResumeChoice c = ChooseResume(4, held, {}, 10);
  EXPECT_EQ(c.source, ResumeChoice::Source::kVolume);
}

}  // namespace
}  // namespace muster
