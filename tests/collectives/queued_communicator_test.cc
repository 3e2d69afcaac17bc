// QueuedCommunicator: collectives run one at a time in issue order, on the worker or on a
// caller that waits without a deadline; the first failure fails the rest. A fake backend whose
// "collective" records its order, thread and overlap (the real backends are covered by the
// conformance suite with real processes).

#include "collectives/queued_communicator.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;

class FakeQueued final : public QueuedCommunicator {
 public:
  explicit FakeQueued(bool with_worker) {
    if (with_worker) StartWorker();
  }
  ~FakeQueued() override { StopWorker(); }

  Backend backend() const override { return Backend::kGloo; }
  int rank() const override { return 0; }
  int size() const override { return 1; }

  // Each "collective" is one of these: records itself, fails if asked to.
  std::unique_ptr<Work> Op(int id, bool fail = false, std::chrono::microseconds spin = 0us) {
    return Enqueue([=, this]() -> Status {
      int now = ++in_flight_;
      max_in_flight_ = std::max(max_in_flight_.load(), now);
      auto until = std::chrono::steady_clock::now() + spin;
      while (std::chrono::steady_clock::now() < until) {
      }
      {
        std::lock_guard<std::mutex> l(mu_);
        order_.push_back(id);
        threads_.push_back(std::this_thread::get_id());
      }
      --in_flight_;
      return fail ? AbortedError("op " + std::to_string(id) + " failed") : Status::Ok();
    });
  }

  std::unique_ptr<Work> AllReduce(void*, size_t, DType, ReduceOp) override { return Op(-1); }
  std::unique_ptr<Work> Broadcast(void*, size_t, DType, int) override { return Op(-1); }
  std::unique_ptr<Work> AllGather(const void*, void*, size_t, DType) override { return Op(-1); }
  std::unique_ptr<Work> ReduceScatter(const void*, void*, size_t, DType, ReduceOp) override {
    return Op(-1);
  }
  std::unique_ptr<Work> Barrier() override { return Op(-1); }

  int on_caller = 0;  // RunOnCaller calls
  std::mutex mu_;
  std::vector<int> order_;
  std::vector<std::thread::id> threads_;
  std::atomic<int> in_flight_{0}, max_in_flight_{0};

 protected:
  Status RunOnCaller(const std::function<Status()>& fn) override {
    ++on_caller;
    return fn();
  }
};

TEST(QueuedCommunicatorTest, AWaitWithoutDeadlineRunsTheQueueInOrderOnTheCaller) {
  FakeQueued c(/*with_worker=*/false);  // only callers can run collectives
  auto a = c.Op(1), b = c.Op(2), d = c.Op(3);
  EXPECT_FALSE(a->Done());
  // A deadline never runs a collective on the caller: it times out here.
  EXPECT_EQ(d->Wait(std::chrono::steady_clock::now() + 50ms).code(), StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(b->Wait().ok());  // runs 1 and 2, in order; not 3
  EXPECT_TRUE(a->Done());
  EXPECT_FALSE(d->Done());
  ASSERT_TRUE(d->Wait().ok());
  EXPECT_EQ(c.order_, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(c.on_caller, 3);
  for (auto id : c.threads_) EXPECT_EQ(id, std::this_thread::get_id());
}

TEST(QueuedCommunicatorTest, TheFirstFailureFailsQueuedAndLaterCollectives) {
  FakeQueued c(/*with_worker=*/false);
  auto a = c.Op(1, /*fail=*/true), b = c.Op(2);
  Status sb = b->Wait();
  EXPECT_EQ(sb.code(), StatusCode::kAborted);
  EXPECT_NE(sb.message().find("op 1 failed"), std::string::npos) << sb;
  EXPECT_EQ(a->Wait().code(), StatusCode::kAborted);
  EXPECT_EQ(c.Op(3)->Wait().code(), StatusCode::kAborted);
  EXPECT_EQ(c.order_, (std::vector<int>{1}));  // 2 and 3 never ran
}

TEST(QueuedCommunicatorTest, WorkerAndWaitingCallersNeverOverlapAndKeepIssueOrder) {
  FakeQueued c(/*with_worker=*/true);
  constexpr int kOps = 400;
  std::vector<std::unique_ptr<Work>> works;
  for (int i = 0; i < kOps; ++i) works.push_back(c.Op(i, false, 20us));
  // Waiters on several threads, with and without deadlines, while the worker runs the queue.
  std::vector<std::thread> waiters;
  std::atomic<int> failed{0};
  for (int t = 0; t < 4; ++t) {
    waiters.emplace_back([&, t] {
      for (int i = kOps - 1 - t; i >= 0; i -= 4) {
        Status s = (i % 3 == 0) ? works[i]->Wait(std::chrono::steady_clock::now() + 30s)
                                : works[i]->Wait();
        if (!s.ok()) ++failed;
      }
    });
  }
  for (auto& w : waiters) w.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(c.max_in_flight_, 1);
  std::vector<int> expected(kOps);
  for (int i = 0; i < kOps; ++i) expected[i] = i;
  EXPECT_EQ(c.order_, expected);
}

TEST(QueuedCommunicatorTest, AnIssuedCollectiveProgressesWithoutAWait) {
  FakeQueued c(/*with_worker=*/true);
  auto w = c.Op(7);
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!w->Done() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_TRUE(w->Done());  // the worker ran it: nobody waited
  EXPECT_EQ(c.on_caller, 0);
}

TEST(QueuedCommunicatorTest, DestroyingRunsWhatIsQueued) {
  std::unique_ptr<Work> w;
  {
    FakeQueued c(/*with_worker=*/true);
    for (int i = 0; i < 10; ++i) w = c.Op(i, false, 100us);
  }
  EXPECT_TRUE(w->Done());
  EXPECT_TRUE(w->Wait().ok());
}

}  // namespace
}  // namespace muster::collectives
