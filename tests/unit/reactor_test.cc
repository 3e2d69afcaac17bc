#include "common/reactor.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
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

// Its context terminated under it (zmq_ctx_shutdown), the loop ends on ETERM; from then on it
// refuses posts as a stopped one does (accepted, they would never run, and a Call would wait
// for ever).
TEST(ReactorTest, ALoopEndedByItsContextsTerminationRefusesLaterPosts) {
  zmq::context_t ctx(1);
  Reactor reactor("test", &ctx);
  {
    zmq::socket_t pull(ctx, zmq::socket_type::pull);
    pull.bind("inproc://reactor-eterm");
    reactor.AddSocket(pull, "pull", [] {});
    reactor.Start();
    EXPECT_EQ(reactor.Call("up", [] { return 1; }), 1);
    ctx.shutdown();
    for (auto until = std::chrono::steady_clock::now() + 10s;
         reactor.running() && std::chrono::steady_clock::now() < until;) {
      std::this_thread::sleep_for(5ms);
    }
    EXPECT_FALSE(reactor.running());
    EXPECT_FALSE(reactor.Post("late", [] {}));
    reactor.Stop();
    reactor.RemoveSocket(pull);  // stopped: from this thread
  }
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

// A send on a socket processes that socket's pending commands, among them the one that said a
// message arrived, and with it the signal on the socket's ZMQ_FD. The loop must still see the
// message: it asks every socket after a pass that ran anything, not only those whose
// descriptor fired.
TEST(ReactorTest, AMessageWhoseSignalASendTookIsStillHandled) {
  Reactor reactor("test");
  zmq::socket_t a(reactor.context(), zmq::socket_type::pair);
  zmq::socket_t b(reactor.context(), zmq::socket_type::pair);
  a.bind("inproc://reactor-test-swallow");
  b.connect("inproc://reactor-test-swallow");
  Latch got(1);
  std::string seen;
  reactor.AddSocket(a, "a", [&] {
    zmq::message_t m;
    while (a.recv(m, zmq::recv_flags::dontwait)) {
      seen = m.to_string();
      got.CountDown();
    }
  });
  reactor.Start();
  // The loop has asked `a` once and waits. Now a closure on the loop lets the peer's message
  // arrive (inproc: the command reaches `a`'s mailbox at once), then sends on `a`, which
  // processes that command (libzmq does so on a send once ~1 ms has passed since it last did).
  Latch sent(1);
  reactor.Post("send", [&] {
    b.send(zmq::buffer(std::string_view("from b")));
    std::this_thread::sleep_for(5ms);
    a.send(zmq::buffer(std::string_view("from a")));
    sent.CountDown();
  });
  ASSERT_TRUE(sent.Wait(5s));
  EXPECT_TRUE(got.Wait(5s)) << "the message that arrived before the send was never handled";
  reactor.Call("remove", [&] { reactor.RemoveSocket(a); });
  reactor.Stop();
  EXPECT_EQ(seen, "from b");
  zmq::message_t m;
  EXPECT_TRUE(b.recv(m, zmq::recv_flags::dontwait));
}

// Sockets and plain fds are handled in the order they were added; a handler that removes a
// later one in the same pass keeps it from running, and a pipe at EOF reaches its handler.
TEST(ReactorTest, HandlersRunInRegistrationOrderAndARemovedOneDoesNot) {
  Reactor reactor("test");
  int p1[2], p2[2], p3[2];
  ASSERT_EQ(pipe(p1), 0);
  ASSERT_EQ(pipe(p2), 0);
  ASSERT_EQ(pipe(p3), 0);
  std::vector<std::string> order;  // reactor thread only
  Latch done(1);
  auto drain = [](int fd) {
    char buf[16];
    return read(fd, buf, sizeof(buf));
  };
  reactor.AddFd(p1[0], "p1", [&] {
    drain(p1[0]);
    order.push_back("p1");
    reactor.RemoveFd(p2[0]);
  });
  reactor.AddFd(p2[0], "p2", [&] {
    drain(p2[0]);
    order.push_back("p2");
  });
  reactor.AddFd(p3[0], "p3", [&] {
    ssize_t n = drain(p3[0]);
    order.push_back(n == 0 ? "p3 eof" : "p3");
    if (n == 0) {
      reactor.RemoveFd(p3[0]);
      done.CountDown();
    }
  });
  // All three readable before the loop's first pass: one pass sees them all.
  ASSERT_EQ(write(p3[1], "x", 1), 1);
  ASSERT_EQ(write(p2[1], "x", 1), 1);
  ASSERT_EQ(write(p1[1], "x", 1), 1);
  close(p3[1]);
  reactor.Start();
  ASSERT_TRUE(done.Wait(5s));
  reactor.Call("remove", [&] { reactor.RemoveFd(p1[0]); });
  reactor.Stop();
  EXPECT_EQ(order, (std::vector<std::string>{"p1", "p3", "p3 eof"}));
  for (int fd : {p1[0], p1[1], p2[0], p2[1], p3[0]}) close(fd);
}

// Thousands of sockets on one loop: each is handled when its message comes, and removing them
// all leaves the loop serving posts.
TEST(ReactorTest, ManySocketsEachHandled) {
  Reactor reactor("test");
  constexpr int kSockets = 300;
  std::vector<std::unique_ptr<zmq::socket_t>> pulls, pushes;
  Latch got(kSockets);
  std::vector<int> counts(kSockets, 0);
  for (int i = 0; i < kSockets; ++i) {
    pulls.push_back(std::make_unique<zmq::socket_t>(reactor.context(), zmq::socket_type::pull));
    std::string ep = "inproc://reactor-test-many-" + std::to_string(i);
    pulls.back()->bind(ep);
    zmq::socket_t* s = pulls.back().get();
    reactor.AddSocket(*s, "pull" + std::to_string(i), [&, s, i] {
      zmq::message_t m;
      while (s->recv(m, zmq::recv_flags::dontwait)) {
        if (++counts[i] == 1) got.CountDown();
      }
    });
    pushes.push_back(std::make_unique<zmq::socket_t>(reactor.context(), zmq::socket_type::push));
    pushes.back()->connect(ep);
  }
  reactor.Start();
  // From this thread, while the loop waits: each arrival must wake it.
  for (int i = kSockets - 1; i >= 0; --i) {
    pushes[i]->send(zmq::buffer(std::string_view("m")));
    if (i % 50 == 0) std::this_thread::sleep_for(2ms);
  }
  ASSERT_TRUE(got.Wait(10s));
  reactor.Call("remove", [&] {
    for (auto& s : pulls) reactor.RemoveSocket(*s);
  });
  EXPECT_EQ(reactor.Call("after", [] { return 1; }), 1);
  reactor.Stop();
  for (int c : counts) EXPECT_EQ(c, 1);
}

// The same descriptor added twice: both handlers run when it is readable, as with two separate
// descriptors, and removing it removes both.
TEST(ReactorTest, ADescriptorAddedTwiceRunsBothHandlers) {
  Reactor reactor("test");
  int p[2];
  ASSERT_EQ(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
  std::atomic<int> first{0}, second{0};
  Latch both(2);
  auto drain = [&] {
    char buf[16];
    while (read(p[0], buf, sizeof(buf)) > 0) {
    }
  };
  reactor.AddFd(p[0], "first", [&] {
    drain();
    if (first++ == 0) both.CountDown();
  });
  reactor.AddFd(p[0], "second", [&] {
    drain();
    if (second++ == 0) both.CountDown();
  });
  reactor.Start();
  ASSERT_EQ(write(p[1], "x", 1), 1);
  EXPECT_TRUE(both.Wait(5s));
  reactor.Call("remove", [&] { reactor.RemoveFd(p[0]); });
  int f = first, s = second;
  ASSERT_EQ(write(p[1], "y", 1), 1);
  EXPECT_EQ(reactor.Call("after", [] { return 1; }), 1);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(first, f);
  EXPECT_EQ(second, s);
  reactor.Stop();
  close(p[0]);
  close(p[1]);
}

// A socket and its own ZMQ_FD added as a plain fd share one entry of the epoll set; removing the
// socket hands the entry to the fd's registration, whose handler still runs.
TEST(ReactorTest, RemovingOneOfTwoRegistrationsOfADescriptorKeepsTheOther) {
  Reactor reactor("test");
  zmq::socket_t pull(reactor.context(), zmq::socket_type::pull);
  pull.bind("inproc://reactor-test-shared");
  zmq::socket_t push(reactor.context(), zmq::socket_type::push);
  push.connect("inproc://reactor-test-shared");
  const int fd = pull.get(zmq::sockopt::fd);
  std::atomic<int> by_socket{0}, by_fd{0};
  Latch got(1);
  auto drain = [&](std::atomic<int>& count) {
    zmq::message_t m;
    while (pull.recv(m, zmq::recv_flags::dontwait)) {
      if (++count == 1 && &count == &by_fd) got.CountDown();
    }
  };
  reactor.AddSocket(pull, "socket", [&] { drain(by_socket); });
  reactor.AddFd(fd, "fd", [&] { drain(by_fd); });
  reactor.Start();
  reactor.Call("remove", [&] { reactor.RemoveSocket(pull); });
  push.send(zmq::buffer(std::string_view("m")));
  EXPECT_TRUE(got.Wait(5s)) << "the fd's registration lost its entry with the socket's removal";
  reactor.Call("remove", [&] { reactor.RemoveFd(fd); });
  reactor.Stop();
  EXPECT_EQ(by_socket, 0);
  EXPECT_EQ(by_fd, 1);
}

}  // namespace
}  // namespace muster
