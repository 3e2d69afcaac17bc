#include "common/reactor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace muster {
namespace {

using namespace std::chrono_literals;

// Waits (without sleeping) until `pred` holds or `timeout` passes.
class Latch {
 public:
  explicit Latch(int n) : n_(n) {}
  void CountDown() {
    std::lock_guard<std::mutex> l(mu_);
    if (--n_ <= 0) cv_.notify_all();
  }
  bool Wait(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] { return n_ <= 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
};

TEST(ReactorTest, TimersFireInDeadlineOrderOnTheReactorThread) {
  Reactor reactor("test");
  std::vector<int> order;  // written on the reactor thread only
  std::vector<bool> on_reactor;
  Latch done(5);
  auto base = Reactor::Clock::now() + 50ms;
  // Scheduled out of order, with two equal deadlines (FIFO among them).
  int deltas[] = {40, 10, 30, 10, 20};
  for (int i = 0; i < 5; ++i) {
    reactor.PostAt(base + std::chrono::milliseconds(deltas[i]), "t" + std::to_string(i), [&, i] {
      order.push_back(i);
      on_reactor.push_back(reactor.InReactorThread());
      done.CountDown();
    });
  }
  reactor.Start();
  ASSERT_TRUE(done.Wait(5s));
  reactor.Stop();
  EXPECT_EQ(order, (std::vector<int>{1, 3, 4, 2, 0}));
  for (bool b : on_reactor) EXPECT_TRUE(b);
}

TEST(ReactorTest, PostedClosuresRunInOrderOnTheReactorThread) {
  Reactor reactor("test");
  reactor.Start();
  std::vector<int> seen;
  std::atomic<int> off_thread{0};
  Latch done(1);
  std::thread poster([&] {
    for (int i = 0; i < 1000; ++i) {
      reactor.Post("p", [&, i] {
        if (!reactor.InReactorThread()) off_thread++;
        seen.push_back(i);
        if (i == 999) done.CountDown();
      });
    }
  });
  poster.join();
  ASSERT_TRUE(done.Wait(5s));
  reactor.Stop();
  EXPECT_EQ(off_thread.load(), 0);
  ASSERT_EQ(seen.size(), 1000u);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(seen[i], i);
}

TEST(ReactorTest, CancelledTimerNeverRuns) {
  Reactor reactor("test");
  reactor.Start();
  std::atomic<bool> cancelled_ran{false};
  Latch done(1);
  auto id = reactor.PostAfter(20ms, "cancelled", [&] { cancelled_ran = true; });
  reactor.CancelTimer(id);
  reactor.PostAfter(60ms, "later", [&] { done.CountDown(); });
  ASSERT_TRUE(done.Wait(5s));
  reactor.Stop();
  EXPECT_FALSE(cancelled_ran.load());
}

TEST(ReactorTest, CallReturnsTheValueComputedOnTheReactor) {
  Reactor reactor("test");
  reactor.Start();
  auto [value, on_reactor] =
      reactor.Call("compute", [&] { return std::make_pair(42, reactor.InReactorThread()); });
  EXPECT_EQ(value, 42);
  EXPECT_TRUE(on_reactor);
}

TEST(ReactorTest, StopDropsLaterPostsAndIsIdempotent) {
  Reactor reactor("test");
  reactor.Start();
  reactor.Stop();
  EXPECT_FALSE(reactor.Post("late", [] {}));
  reactor.Stop();
}

TEST(ReactorTest, ThrowingClosureDoesNotKillTheLoop) {
  Reactor reactor("test");
  reactor.Start();
  reactor.Post("throws", [] { throw std::runtime_error("boom"); });
  EXPECT_EQ(reactor.Call("after", [] { return 7; }), 7);
}

TEST(ReactorTest, SocketHandlerRunsWhenReadable) {
  Reactor reactor("test");
  zmq::socket_t pull(reactor.context(), zmq::socket_type::pull);
  pull.bind("inproc://reactor-test");
  Latch got(3);
  std::vector<std::string> msgs;
  reactor.AddSocket(pull, "pull", [&] {
    zmq::message_t m;
    while (pull.recv(m, zmq::recv_flags::dontwait)) {
      msgs.push_back(m.to_string());
      got.CountDown();
    }
  });
  reactor.Start();
  zmq::socket_t push(reactor.context(), zmq::socket_type::push);
  push.connect("inproc://reactor-test");
  for (const char* s : {"a", "b", "c"}) push.send(zmq::buffer(std::string_view(s)));
  ASSERT_TRUE(got.Wait(5s));
  reactor.Call("remove", [&] { reactor.RemoveSocket(pull); });
  reactor.Stop();
  EXPECT_EQ(msgs, (std::vector<std::string>{"a", "b", "c"}));
}

}  // namespace
}  // namespace muster
