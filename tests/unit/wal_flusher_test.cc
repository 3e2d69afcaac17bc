// WalFlusher with a flush the test controls: what it counts durable, a latched error, its stats,
// and the last flush when it stops.

#include "coordinator/wal_flusher.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace muster::coordinator {
namespace {

using namespace std::chrono_literals;

bool WaitFor(const std::function<bool()>& done) {
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

TEST(WalFlusherTest, CountsDurableWhatWasNotedBeforeAFlushThatCompleted) {
  std::atomic<int> calls{0};
  WalFlusher f(1ms, [&](int) -> Status {
    ++calls;
    return Status::Ok();
  });
  EXPECT_EQ(f.durable(), 0u);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(calls.load(), 0);  // nothing noted: no flush
  f.NoteCommit(1);
  f.NoteCommit(1);
  EXPECT_EQ(f.committed(), 2u);
  ASSERT_TRUE(WaitFor([&] { return f.durable() == 2; }));
  EXPECT_TRUE(f.error().ok());
}

TEST(WalFlusherTest, AFailedFlushIsLatchedAndNeverTriedAgain) {
  std::atomic<int> calls{0};
  WalFlusher f(1ms, [&](int) -> Status {
    ++calls;
    return InternalError("fsync: Input/output error");
  });
  f.NoteCommit(1);
  ASSERT_TRUE(WaitFor([&] { return !f.error().ok(); }));
  EXPECT_NE(f.error().message().find("Input/output error"), std::string::npos);
  f.NoteCommit(1);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(f.durable(), 0u);
}

// What /metrics shows of it: commits, durable, the log's pages, how long flushes took, failed.
TEST(WalFlusherTest, StatsSayHowFarDurabilityTrailsAndHowLongFlushesTook) {
  std::atomic<bool> fail{false};
  WalFlusher f(1ms, [&](int) -> Status {
    std::this_thread::sleep_for(30ms);
    return fail ? InternalError("fsync: Input/output error") : Status::Ok();
  });
  f.NoteCommit(7);
  ASSERT_TRUE(WaitFor([&] { return f.stats().durable == 1; }));
  WalFlusher::Stats s = f.stats();
  EXPECT_EQ(s.committed, 1u);
  EXPECT_EQ(s.log_pages, 7);
  EXPECT_FALSE(s.failed);
  EXPECT_GE(s.last_flush_seconds, 0.03);
  EXPECT_GE(s.max_flush_seconds, s.last_flush_seconds);
  fail = true;
  f.NoteCommit(9);
  ASSERT_TRUE(WaitFor([&] { return f.stats().failed; }));
  s = f.stats();
  EXPECT_EQ(s.committed, 2u);
  EXPECT_EQ(s.durable, 1u);
  EXPECT_EQ(s.log_pages, 9);
}

TEST(WalFlusherTest, StoppingFlushesWhatWasNoted) {
  std::atomic<int> flushed{0};
  {
    WalFlusher f(1h, [&](int) -> Status {
      ++flushed;
      return Status::Ok();
    });
    f.NoteCommit(1);
  }
  EXPECT_EQ(flushed.load(), 1);
}

}  // namespace
}  // namespace muster::coordinator
