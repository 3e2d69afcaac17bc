// The in-memory RendezvousStore (ranks as threads of one process): the same contract as the ZeroMQ
// store (tests/unit/rendezvous_server_test.cc), without sockets.

#include <gtest/gtest.h>

#include <atomic>
#include <limits>
#include <thread>

#include "collectives/rendezvous_store.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

TEST(InMemoryStoreTest, SetGetAddCompareSetAndTimeouts) {
  auto s = NewInMemoryRendezvousStore();
  ASSERT_TRUE(s->Set("k", std::string("v\0x", 3)).ok());
  EXPECT_EQ(*s->Get("k", 0ms), std::string("v\0x", 3));
  EXPECT_EQ(*s->Add("n", 5), 5);
  EXPECT_EQ(*s->Add("n", -2), 3);
  EXPECT_EQ(s->Add("k", 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*s->CompareSet("leader", "", "r3"), "r3");
  EXPECT_EQ(*s->CompareSet("leader", "", "r5"), "r3");
  EXPECT_EQ(*s->Get("leader", 0ms), "r3");
  auto t0 = Clock::now();
  EXPECT_EQ(s->Get("never", 100ms).status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_GE(Clock::now() - t0, 95ms);
  EXPECT_EQ(s->Wait({"k", "never"}, 10ms).code(), StatusCode::kDeadlineExceeded);
}

// As the ZeroMQ store (StoreServerValidationTest.AddRefusesToOverflow): a counter never wraps,
// and only a whole decimal integer counts as one.
TEST(InMemoryStoreTest, AddRefusesToOverflowAndNonIntegers) {
  auto s = NewInMemoryRendezvousStore();
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(*s->Add("n", kMax), kMax);
  auto over = s->Add("n", 1);
  EXPECT_EQ(over.status().code(), StatusCode::kInvalidArgument) << over.status();
  EXPECT_NE(over.status().message().find("overflows"), std::string::npos) << over.status();
  EXPECT_EQ(*s->Get("n", 0ms), std::to_string(kMax)) << "the counter is unchanged";
  EXPECT_EQ(*s->Add("m", std::numeric_limits<int64_t>::min()), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(s->Add("m", -1).status().code(), StatusCode::kInvalidArgument);
  for (const char* text : {"12abc", " 7", "+7", "", "99999999999999999999"}) {
    ASSERT_TRUE(s->Set("t", text).ok());
    EXPECT_EQ(s->Add("t", 1).status().code(), StatusCode::kInvalidArgument) << "'" << text << "'";
  }
}

TEST(InMemoryStoreTest, GetWaitsForTheSet) {
  auto s = NewInMemoryRendezvousStore();
  StatusOr<std::string> got = InternalError("not run");
  std::thread t([&] { got = s->Get("addr", 10s); });
  ASSERT_TRUE(s->Set("addr", "tcp://x:1").ok());
  t.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "tcp://x:1");
}

TEST(InMemoryStoreTest, AllGatherGivesEveryRankAllEntriesInRankOrder) {
  constexpr int kN = 8;
  auto s = NewInMemoryRendezvousStore();
  std::vector<StatusOr<std::vector<std::string>>> got(kN, InternalError("not run"));
  std::vector<std::thread> threads;
  for (int r = kN - 1; r >= 0; --r) {
    threads.emplace_back(
        [&, r] { got[r] = s->AllGather("addrs", r, kN, "rank-" + std::to_string(r), 10s); });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kN; ++r) {
    ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status();
    ASSERT_EQ(got[r]->size(), size_t{kN});
    for (int e = 0; e < kN; ++e) EXPECT_EQ((*got[r])[e], "rank-" + std::to_string(e));
  }
  // One rank alone completes a gather of one.
  EXPECT_EQ(*s->AllGather("solo", 0, 1, "me", 0ms), std::vector<std::string>{"me"});
  EXPECT_EQ(s->AllGather("addrs", 0, kN, "x", 1s).status().code(), StatusCode::kInvalidArgument)
      << "names are single use";
}

TEST(InMemoryStoreTest, AllGatherRefusesBadArguments) {
  auto s = NewInMemoryRendezvousStore();
  EXPECT_EQ(s->AllGather("g", 2, 2, "v", 1s).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s->AllGather("g", -1, 2, "v", 1s).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s->AllGather("g", 0, 0, "v", 1s).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s->AllGather("g", 0, kMaxGatherRanks + 1, "v", 1s).status().code(),
            StatusCode::kInvalidArgument);
  StatusOr<std::vector<std::string>> first = InternalError("not run");
  std::atomic<bool> done{false};
  std::thread t([&] {
    first = s->AllGather("g", 0, 2, "a", 10s);
    done = true;
  });
  // Until rank 0 is in, rank 1's mismatched n cannot be detected; retry until it is refused.
  auto deadline = Clock::now() + 5s;
  StatusCode code = StatusCode::kOk;
  while (Clock::now() < deadline) {
    auto wrong = s->AllGather("g", 1, 3, "b", 0ms);
    code = wrong.status().code();
    if (code == StatusCode::kInvalidArgument) break;
    std::this_thread::yield();
  }
  EXPECT_EQ(code, StatusCode::kInvalidArgument);
  EXPECT_EQ(s->AllGather("g", 0, 2, "again", 0ms).status().code(), StatusCode::kInvalidArgument)
      << "rank 0 has already contributed";
  EXPECT_FALSE(done.load());
  auto second = s->AllGather("g", 1, 2, "b", 10s);
  t.join();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(*second, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(*first, *second);
}

TEST(InMemoryStoreTest, AllGatherTimeoutWithdrawsTheEntry) {
  auto s = NewInMemoryRendezvousStore();
  auto t0 = Clock::now();
  auto late = s->AllGather("g", 0, 2, "stale", 100ms);
  EXPECT_GE(Clock::now() - t0, 95ms);
  EXPECT_EQ(late.status().code(), StatusCode::kDeadlineExceeded) << late.status();
  StatusOr<std::vector<std::string>> r1 = InternalError("not run");
  std::thread t([&] { r1 = s->AllGather("g", 1, 2, "b", 10s); });
  auto r0 = s->AllGather("g", 0, 2, "fresh", 10s);
  t.join();
  ASSERT_TRUE(r0.ok()) << r0.status();
  EXPECT_EQ(*r0, (std::vector<std::string>{"fresh", "b"}));
  EXPECT_EQ(*r1, *r0);
}

TEST(InMemoryStoreTest, BarrierReleasesAllAndTimesOut) {
  constexpr int kN = 4;
  auto s = NewInMemoryRendezvousStore();
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kN; ++i) threads.emplace_back([&] { ok += s->Barrier("b", kN, 10s).ok(); });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kN);
  EXPECT_EQ(s->Barrier("partial", 2, 50ms).code(), StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace muster::collectives
