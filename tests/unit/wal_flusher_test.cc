// WalFlusher with a flush the test controls: what it counts durable, a flush that has to be
// tried again, a latched error, Sync, and the last flush when it stops.

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
  WalFlusher f(1ms, [&](int) -> StatusOr<bool> {
    ++calls;
    return true;
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

TEST(WalFlusherTest, AFlushThatLeftSomethingIsTriedAgain) {
  std::atomic<int> calls{0};
  WalFlusher f(1ms, [&](int) -> StatusOr<bool> { return ++calls >= 3; });
  f.NoteCommit(1);
  ASSERT_TRUE(WaitFor([&] { return f.durable() == 1; }));
  EXPECT_EQ(calls.load(), 3);
}

TEST(WalFlusherTest, AFailedFlushIsLatchedAndNeverTriedAgain) {
  std::atomic<int> calls{0};
  WalFlusher f(1ms, [&](int) -> StatusOr<bool> {
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

// Sync returns once what was noted before it is durable: it flushes on the caller's thread
// (the interval here is an hour), hands the flush the log's size as last noted, and returns the
// latched error once one is.
TEST(WalFlusherTest, SyncFlushesNowAndReturnsTheLatchedError) {
  std::atomic<int> calls{0};
  std::atomic<int> pages_seen{0};
  std::atomic<bool> fail{false};
  WalFlusher f(1h, [&](int pages) -> StatusOr<bool> {
    ++calls;
    pages_seen = pages;
    if (fail) return InternalError("fdatasync: No space left on device");
    return true;
  });
  EXPECT_TRUE(f.Sync().ok());  // nothing noted: nothing to do
  EXPECT_EQ(calls.load(), 0);
  f.NoteCommit(7);
  f.NoteCommit(12);
  EXPECT_TRUE(f.Sync().ok());
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(pages_seen.load(), 12);
  EXPECT_EQ(f.durable(), 2u);
  fail = true;
  f.NoteCommit(13);
  Status st = f.Sync();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("No space left"), std::string::npos) << st;
  EXPECT_EQ(f.error().message(), st.message());
}

TEST(WalFlusherTest, StoppingFlushesWhatWasNoted) {
  std::atomic<int> flushed{0};
  {
    WalFlusher f(1h, [&](int) -> StatusOr<bool> {
      ++flushed;
      return true;
    });
    f.NoteCommit(1);
  }
  EXPECT_EQ(flushed.load(), 1);
}

}  // namespace
}  // namespace muster::coordinator
