// In-memory snapshots: the frame codec (checkpoint/snapshot_frame.h), the agent's bounded store
// (node_agent/snapshots/snapshot_store.h) and the coordinator's choice of resume step
// (coordinator/snapshot_resume.h).

#include "node_agent/snapshots/snapshot_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/manifest.h"  // Xxh3
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

// A frame around `payload` itself (its buffer kept, as the agent's reads keep theirs).
SnapshotFrame FrameWithPayload(int rank, int64_t step, std::string payload) {
  SnapshotFrame f;
  f.key = Key(rank, step);
  f.payload_xxh3 = checkpoint::Xxh3(payload.data(), payload.size());
  f.payload = std::move(payload);
  return f;
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
  SnapshotStore store({.memory_limit = 1000, .keep_steps = 2, .window_steps = 2});
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

// A frame a decoder has just checked is kept without a second hash, and the caller gets the
// frame as kept (what the local server hands the forwarder); one the rules drop at once (a late
// old step past the window) is not handed back. Put itself still checks.
TEST(SnapshotStoreTest, PutDecodedKeepsACheckedFrameAndHandsItBack) {
  SnapshotStore store({.memory_limit = 1000, .keep_steps = 2, .window_steps = 2});
  std::shared_ptr<const SnapshotFrame> held;
  ASSERT_TRUE(store.PutDecoded(Frame(0, 20, 100), &held).ok());
  ASSERT_TRUE(held);
  EXPECT_EQ(held->key, Key(0, 20));
  EXPECT_EQ(held->payload, std::string(100, 'a'));
  auto got = store.Get("ft-1", 0, 20);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->get(), held.get());  // the same frame: no copy
  ASSERT_TRUE(store.PutDecoded(Frame(0, 30, 100), &held).ok());
  ASSERT_TRUE(store.PutDecoded(Frame(0, 10, 100), &held).ok());  // older than both kept
  EXPECT_FALSE(held);
  EXPECT_EQ(store.Get("ft-1", 0, 10).status().code(), StatusCode::kNotFound);
  SnapshotFrame bad = Frame(0, 40, 100);
  bad.payload[0] ^= 1;
  EXPECT_EQ(store.Put(std::move(bad)).code(), StatusCode::kDataLoss);
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

// What an agent holds when the copies of its peer's ranks are slower than the steps: its own
// ranks (2, 3 of 4) hand it a frame every step; the peer's (0, 1) arrive 3 steps late and only
// every 4th step (the forwarder keeps the newest unsent frame per rank). With 16 MiB/rank every
// 50 ms in `muster-bench recovery` the newest 2 steps per rank then shared no step, and the
// gang resumed from the volume. The store must keep the own ranks' steps that the copies reach.
TEST(SnapshotStoreTest, KeepsACompleteStepWhenThePeersCopiesLagAndAreThinned) {
  SnapshotStore store({.memory_limit = 1 << 20, .keep_steps = 2, .window_steps = 8});
  int64_t newest_copy = -1;
  for (int64_t step = 1; step <= 30; ++step) {
    for (int rank : {2, 3}) ASSERT_TRUE(store.Put(Frame(rank, step, 100)).ok());
    if (step % 4 == 0) {
      newest_copy = step - 3;
      for (int rank : {0, 1}) ASSERT_TRUE(store.Put(Frame(rank, newest_copy, 100)).ok());
    }
  }
  EXPECT_EQ(store.complete_step("ft-1"), newest_copy);
  std::vector<SnapshotHolding> held;
  for (const auto& h : store.Held("ft-1")) {
    held.push_back({"b", h.rank, h.world_size, h.attempt, h.step});
  }
  // The peer node "a" is lost: this agent alone holds a complete set, of the newest copy's step.
  ResumeChoice c = ChooseResume(4, held, {"a"}, 20);
  EXPECT_EQ(c.source, ResumeChoice::Source::kSnapshot) << c.reason;
  EXPECT_EQ(c.step, newest_copy) << c.reason;
  // Within the window: at most 8 steps per rank.
  for (int rank = 0; rank < 4; ++rank) {
    int n = 0;
    for (const auto& h : store.Held("ft-1")) n += h.rank == rank;
    EXPECT_LE(n, 8) << "rank " << rank;
  }
}

// With no room beyond the reservations, the complete step still stays: a rank's newer frames
// replace its other ones until the step its peers reached is complete again.
TEST(SnapshotStoreTest, TheCompleteStepIsNotDroppedUntilANewerOneIsComplete) {
  SnapshotStore store({.memory_limit = 1000, .keep_steps = 2, .window_steps = 2});
  for (int rank : {0, 1}) ASSERT_TRUE(store.Put(Frame(rank, 10, 100)).ok());
  EXPECT_EQ(store.complete_step("ft-1"), 10);
  for (int64_t step : {11, 12, 13}) ASSERT_TRUE(store.Put(Frame(0, step, 100)).ok());
  auto steps_of = [&](int rank) {
    std::vector<int64_t> out;
    for (const auto& h : store.Held("ft-1"))
      if (h.rank == rank) out.push_back(h.step);
    return out;
  };
  EXPECT_EQ(steps_of(0), (std::vector<int64_t>{10, 13}));
  ASSERT_TRUE(store.Put(Frame(1, 13, 100)).ok());
  EXPECT_EQ(store.complete_step("ft-1"), 13);
  ASSERT_TRUE(store.Put(Frame(0, 14, 100)).ok());
  EXPECT_EQ(steps_of(0), (std::vector<int64_t>{13, 14}));
  EXPECT_EQ(store.used_bytes(), 400u);
  EXPECT_EQ(store.extra_bytes(), 0u);
}

// The window uses only memory that no reservation holds, and gives it back to one.
TEST(SnapshotStoreTest, TheWindowGivesItsMemoryBackToAReservation) {
  SnapshotStore store({.memory_limit = 1000, .keep_steps = 2, .window_steps = 8});
  for (int64_t step = 1; step <= 8; ++step) ASSERT_TRUE(store.Put(Frame(0, step, 100)).ok());
  EXPECT_EQ(store.Held("ft-1").size(), 8u);
  EXPECT_EQ(store.reserved_bytes(), 200u);
  EXPECT_EQ(store.extra_bytes(), 600u);
  ASSERT_TRUE(store.Put(Frame(0, 9, 100)).ok());
  EXPECT_EQ(store.Held("ft-1").size(), 8u) << "never more than the window";
  // Another job reserves 600: the window shrinks to what is left (1000 - 800 = 2 extra steps).
  ASSERT_TRUE(store.Reserve("ft-2", 0, 300).ok());
  EXPECT_EQ(store.reserved_bytes(), 800u);
  EXPECT_LE(store.reserved_bytes() + store.extra_bytes(), 1000u);
  auto held = store.Held("ft-1");
  ASSERT_EQ(held.size(), 4u);
  EXPECT_EQ(held.front().step, 6);
  EXPECT_EQ(held.back().step, 9);
  // ft-2's frames fill its reservation; ft-1 keeps at least its own.
  for (int64_t step = 1; step <= 2; ++step) {
    ASSERT_TRUE(store.Put(Frame(0, step, 300, 0, "ft-2")).ok());
  }
  EXPECT_LE(store.used_bytes(), 1000u);
  EXPECT_GE(store.Held("ft-1").size(), 2u);
  EXPECT_EQ(store.Held("ft-2").size(), 2u);
  store.DropJob("ft-2");
  store.DropJob("ft-1");
  EXPECT_EQ(store.used_bytes(), 0u);
  EXPECT_EQ(store.extra_bytes(), 0u);
  EXPECT_EQ(store.reserved_bytes(), 0u);
}

// Random puts, reservations and drops over several jobs: the accounting stays exact and within
// the limit, no rank holds more than the window, and the complete step's frames are all held.
TEST(SnapshotStoreTest, RandomOperationsKeepTheAccountingWithinTheLimit) {
  std::mt19937 rng(20261130);
  for (int keep : {1, 2, 3}) {
    SnapshotStore store({.memory_limit = 4000, .keep_steps = keep, .window_steps = 5});
    bool saw_extra = false, saw_complete = false;
    for (int op = 0; op < 3000; ++op) {
      const std::string job = "ft-" + std::to_string(1 + rng() % 3);
      const int rank = static_cast<int>(rng() % 4);
      const int r = static_cast<int>(rng() % 100);
      if (r < 80) {
        (void)store.Put(
            Frame(rank, 1 + rng() % 40, 10 + rng() % 200, static_cast<int>(rng() % 3), job));
      } else if (r < 90) {
        (void)store.Reserve(job, rank, rng() % 700);
      } else if (r < 93) {
        store.DropJob(job);
      } else {
        auto held = store.Held(job);
        if (!held.empty()) (void)store.Get(job, held[0].rank, held[0].step);
      }
      uint64_t held_bytes = 0;
      for (const auto& j : store.Jobs()) {
        std::map<int, int> per_rank;
        std::map<int64_t, std::set<int>> ranks_at;
        for (const auto& h : store.Held(j)) {
          held_bytes += h.bytes;
          per_rank[h.rank]++;
          ranks_at[h.step].insert(h.rank);
        }
        for (const auto& [rk, n] : per_rank) {
          ASSERT_LE(n, std::max(keep, 5)) << "job " << j << " rank " << rk << " op " << op;
        }
        const int64_t c = store.complete_step(j);
        saw_complete = saw_complete || (c >= 0 && per_rank.size() > 1);
        if (c >= 0) {
          ASSERT_TRUE(ranks_at.count(c)) << "complete step " << c << " of " << j << " op " << op;
        }
      }
      ASSERT_EQ(held_bytes, store.used_bytes()) << "op " << op;
      ASSERT_LE(store.used_bytes(), 4000u) << "op " << op;
      ASSERT_LE(store.reserved_bytes() + store.extra_bytes(), 4000u) << "op " << op;
      saw_extra = saw_extra || store.extra_bytes() > 0;
    }
    EXPECT_TRUE(saw_extra) << "keep " << keep << ": the window was never used";
    EXPECT_TRUE(saw_complete) << "keep " << keep << ": no step was ever complete";
  }
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
  EXPECT_EQ(store.reserved_bytes(), 300u);  // keep_steps is 3 by default
  EXPECT_EQ(store.Jobs(), std::vector<std::string>{"ft-2"});
}

// Pins (SetPins): the kept step's frames outlive the window and are reported pinned until other
// pins replace them; then the window drops them like any other.
TEST(SnapshotStoreTest, APinnedStepOutlivesTheWindowUntilThePinsChange) {
  SnapshotStore store({.memory_limit = 1 << 20, .keep_steps = 3, .window_steps = 3});
  EXPECT_FALSE(store.SetPins("ft-1", {0, 2}, {})) << "nothing of the job here yet";
  for (int64_t step = 1; step <= 3; ++step) ASSERT_TRUE(store.Put(Frame(0, step, 10)).ok());
  ASSERT_TRUE(store.SetPins("ft-1", {.attempt = 0, .step = 2}, {}));
  for (int64_t step = 4; step <= 12; ++step) ASSERT_TRUE(store.Put(Frame(0, step, 10)).ok());
  std::map<int64_t, bool> held;
  for (const auto& h : store.Held("ft-1")) held[h.step] = h.pinned;
  EXPECT_EQ(held, (std::map<int64_t, bool>{{2, true}, {11, false}, {12, false}}));
  // A pin of another attempt covers nothing of attempt 0.
  ASSERT_TRUE(store.SetPins("ft-1", {.attempt = 1, .step = 11}, {}));
  for (const auto& h : store.Held("ft-1")) EXPECT_FALSE(h.pinned) << "step " << h.step;
  ASSERT_TRUE(store.SetPins("ft-1", {.attempt = 0, .step = 11}, {.attempt = 0, .step = 12}));
  for (int64_t step = 13; step <= 20; ++step) ASSERT_TRUE(store.Put(Frame(0, step, 10)).ok());
  held.clear();
  for (const auto& h : store.Held("ft-1")) held[h.step] = h.pinned;
  EXPECT_EQ(held, (std::map<int64_t, bool>{{11, true}, {12, true}, {20, false}}));
  store.DropJob("ft-1");
  ASSERT_TRUE(store.Put(Frame(0, 1, 10)).ok());
  for (const auto& h : store.Held("ft-1")) EXPECT_FALSE(h.pinned) << "pins go with the job";
}

// With keep_steps 2 a candidate is not protected (no reserved room for it), so it is not
// reported pinned either: the coordinator then never keeps it.
TEST(SnapshotStoreTest, ACandidateIsProtectedOnlyWithThreeReservedSteps) {
  SnapshotStore store({.memory_limit = 1 << 20, .keep_steps = 2, .window_steps = 2});
  for (int64_t step = 1; step <= 2; ++step) ASSERT_TRUE(store.Put(Frame(0, step, 10)).ok());
  ASSERT_TRUE(store.SetPins("ft-1", {}, {.attempt = 0, .step = 1}));
  for (const auto& h : store.Held("ft-1")) EXPECT_FALSE(h.pinned);
  ASSERT_TRUE(store.Put(Frame(0, 3, 10)).ok());
  for (const auto& h : store.Held("ft-1")) EXPECT_NE(h.step, 1);
}

// The memory bound holds with pins: with no room beyond the reservations (3 frames per rank),
// the newest, the kept and the candidate frames of a rank fit, the complete step gives way to
// the kept one, and nothing passes the limit.
TEST(SnapshotStoreTest, PinsStayWithinTheReservation) {
  SnapshotStore store({.memory_limit = 2 * 3 * 100, .keep_steps = 3, .window_steps = 8});
  // Own rank 2 every step; the peer's rank 0 at steps 1 and 4.
  for (int64_t step = 1; step <= 4; ++step) {
    ASSERT_TRUE(store.Put(Frame(2, step, 100)).ok());
    if (step == 1 || step == 4) ASSERT_TRUE(store.Put(Frame(0, step, 100)).ok());
  }
  ASSERT_EQ(store.complete_step("ft-1"), 4);
  ASSERT_TRUE(store.SetPins("ft-1", {.attempt = 0, .step = 1}, {.attempt = 0, .step = 4}));
  for (int64_t step = 5; step <= 9; ++step) {
    ASSERT_TRUE(store.Put(Frame(2, step, 100)).ok());
    EXPECT_LE(store.used_bytes(), store.memory_limit()) << "step " << step;
  }
  std::set<int64_t> rank2;
  for (const auto& h : store.Held("ft-1")) {
    if (h.rank == 2) rank2.insert(h.step);
  }
  EXPECT_EQ(rank2, (std::set<int64_t>{1, 4, 9}));
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

// A dropped frame's payload buffer is handed to the next frame read (TakeBuffer), so a rank's
// every-step snapshot reuses memory already mapped; a frame still held elsewhere (a forwarder's
// queue) gives its buffer back only when that holder lets go.
TEST(SnapshotStoreTest, DroppedPayloadsAreReusedForTheNextFrame) {
  SnapshotStore store({.memory_limit = 64 << 20, .keep_steps = 1, .window_steps = 1});
  ASSERT_TRUE(store.Put(Frame(0, 1, 1 << 20)).ok());
  auto first = store.Get("ft-1", 0, 1);
  ASSERT_TRUE(first.ok());
  const char* first_bytes = (*first)->payload.data();
  // Held here too: step 2 drops step 1 from the store, but its buffer stays with us.
  ASSERT_TRUE(store.Put(Frame(0, 2, 1 << 20)).ok());
  std::string fresh = store.TakeBuffer(1 << 20);
  EXPECT_NE(fresh.data(), first_bytes);
  EXPECT_EQ(fresh.size(), 1u << 20);
  first->reset();  // the last holder: its payload goes to the pool
  std::string reused = store.TakeBuffer((1 << 20) - 100);
  EXPECT_EQ(reused.data(), first_bytes);
  EXPECT_EQ(reused.size(), (1u << 20) - 100);
  // A larger request than any pooled buffer gets a buffer of its size all the same.
  ASSERT_TRUE(store.Put(Frame(0, 3, 1 << 20)).ok());  // drops step 2: pooled
  std::string larger = store.TakeBuffer(2 << 20);
  EXPECT_EQ(larger.size(), 2u << 20);
}

// A rank's payload varies by a few bytes from step to step (its metadata): a buffer pooled from
// one step's frame still holds the next one's, a byte larger. And a pool full of buffers too
// small for today's frames makes room for the newer ones (the oldest go), so it keeps being used.
TEST(SnapshotStoreTest, PooledBuffersFitFramesAFewBytesLargerAndTheOldestGoWhenFull) {
  SnapshotStore store({.memory_limit = 256 << 20});
  constexpr uint64_t kN = 1663800;  // the fine-tune's 1608 KiB payload
  EXPECT_GE(SnapshotStore::BufferCapacity(kN), kN + 4096);
  EXPECT_EQ(SnapshotStore::BufferCapacity(kN) % 4096, 0u);
  EXPECT_EQ(SnapshotStore::BufferCapacity(UINT64_MAX - 1), UINT64_MAX - 1);
  {
    // Frames of kN and kN + 1 bytes, alternately: each step's frame reuses a dropped one's.
    SnapshotStore s1({.memory_limit = 256 << 20, .keep_steps = 1, .window_steps = 1});
    ASSERT_TRUE(s1.Put(Frame(0, 1, kN)).ok());
    const char* bytes = nullptr;
    {
      auto held = s1.Get("ft-1", 0, 1);
      ASSERT_TRUE(held.ok());
      bytes = (*held)->payload.data();
    }
    // Frame() builds its payload itself: the store's own buffers are what TakeBuffer hands out.
    std::string b = s1.TakeBuffer(kN + 1);  // none pooled yet: a new one, with room
    EXPECT_GE(b.capacity(), SnapshotStore::BufferCapacity(kN + 1));
    const char* taken = b.data();
    ASSERT_TRUE(s1.PutDecoded(FrameWithPayload(0, 2, std::move(b))).ok());  // drops step 1
    std::string again = s1.TakeBuffer(kN);
    EXPECT_EQ(again.data(), bytes) << "step 1's buffer is the only one pooled";
    ASSERT_TRUE(s1.PutDecoded(FrameWithPayload(0, 3, std::move(again))).ok());  // drops step 2
    std::string larger = s1.TakeBuffer(kN + 2);  // step 2's, made with room
    EXPECT_EQ(larger.data(), taken);
  }
  {
    // A frame just under the pool's bound (a quarter of the limit) gets no room past it: its
    // buffer must still be one the pool takes back.
    SnapshotStore s2({.memory_limit = 4 << 20});
    std::string near = s2.TakeBuffer((1 << 20) - 100);
    EXPECT_LE(near.capacity(), 1u << 20);
  }
  // A full pool of buffers too small for the frames of now.
  std::vector<std::string> small;
  for (size_t i = 0; i < SnapshotStore::kPooledBuffers; ++i) {
    small.push_back(store.TakeBuffer(1 << 20));
  }
  std::vector<const char*> small_bytes;
  for (auto& b : small) {
    small_bytes.push_back(b.data());
    ASSERT_TRUE(store
                    .PutDecoded(FrameWithPayload(0, 10 + static_cast<int64_t>(&b - &small[0]),
                                                 std::move(b)))
                    .ok());
  }
  store.DropJob("ft-1");  // every buffer pooled
  std::string big = store.TakeBuffer(2 << 20);
  const char* big_bytes = big.data();
  for (const char* p : small_bytes) EXPECT_NE(big_bytes, p);
  ASSERT_TRUE(store.PutDecoded(FrameWithPayload(0, 50, std::move(big))).ok());
  store.DropJob("ft-1");  // the pool was full: the oldest small one made room
  std::string next = store.TakeBuffer((2 << 20) + 1);
  EXPECT_EQ(next.data(), big_bytes);
}

// FramesAt: where a peer's deduplicated put finds chunks. The frames of any rank at the step and
// attempt; when none is held but another rank's older frame is (its frame of the step is due),
// a wait until one is put or the deadline passes; no wait when nothing of the job is due.
TEST(SnapshotStoreTest, FramesAtFindsTheStepsFramesAndWaitsOnlyForOneThatIsDue) {
  using Clock = std::chrono::steady_clock;
  SnapshotStore store({.memory_limit = 1 << 20});
  // Nothing of the job: no wait, even with a long deadline.
  auto t0 = Clock::now();
  EXPECT_TRUE(store.FramesAt("ft-1", 0, 5, 1, t0 + std::chrono::seconds(30)).empty());
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(10));

  ASSERT_TRUE(store.Put(Frame(0, 5, 100)).ok());
  ASSERT_TRUE(store.Put(Frame(2, 5, 100, 1)).ok());  // attempt 1: not attempt 0's
  auto at5 = store.FramesAt("ft-1", 0, 5, 1, Clock::now());
  ASSERT_EQ(at5.size(), 1u);
  EXPECT_EQ(at5[0]->key, Key(0, 5));
  EXPECT_EQ(store.FramesAt("ft-1", 1, 5, 1, Clock::now()).size(), 1u);

  // Step 6 of attempt 1 for rank 1: rank 2 (attempt 1, step 5) has an older frame, so its step 6
  // is due. A short deadline passes empty-handed; a put during a long one ends the wait at once.
  t0 = Clock::now();
  EXPECT_TRUE(store.FramesAt("ft-1", 1, 6, 1, t0 + std::chrono::milliseconds(30)).empty());
  EXPECT_GE(Clock::now() - t0, std::chrono::milliseconds(30));
  std::thread put([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_TRUE(store.Put(Frame(2, 6, 100, 1)).ok());
  });
  t0 = Clock::now();
  auto at6 = store.FramesAt("ft-1", 1, 6, 1, t0 + std::chrono::seconds(30));
  put.join();
  ASSERT_EQ(at6.size(), 1u);
  EXPECT_EQ(at6[0]->key, Key(2, 6, 1));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(10));
  // Only the offered rank's own older frames: nothing is due from anyone else.
  SnapshotStore alone({.memory_limit = 1 << 20});
  ASSERT_TRUE(alone.Put(Frame(1, 5, 100)).ok());
  t0 = Clock::now();
  EXPECT_TRUE(alone.FramesAt("ft-1", 0, 6, 1, t0 + std::chrono::seconds(30)).empty());
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(10));
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
