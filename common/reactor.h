#pragma once

// Reactor: the one thread of a daemon that owns all of its ZeroMQ sockets.
//
// Other threads never touch those sockets; they Post() named closures, which run on the
// reactor thread in FIFO order, or schedule timers, which run in deadline order (FIFO among
// equal deadlines). Sockets and plain file descriptors are registered with a handler that runs
// when they become readable. Blocking work (fork/exec, waitpid, disk I/O) belongs on other
// threads, which Post their results back.
//
// Thread-safety: Post, PostAt, PostAfter, CancelTimer, Stop and InReactorThread are
// thread-safe. AddSocket, AddFd and Remove* must run on the reactor thread (or before Start).
// Closures and handlers must not block: the name of one that runs longer than 100 ms is logged.
// A socket or fd is removed (RemoveSocket, RemoveFd) before its owner closes it (or once the
// reactor has stopped): the epoll set holds descriptors, not sockets.
//
// How it waits: one epoll set holds the wake eventfd, every plain fd and every socket's
// ZMQ_FD. A ZeroMQ socket's ZMQ_FD only says that commands reached the socket; whether it holds
// a message is ZMQ_EVENTS, which processes those commands (two system calls when there are
// none). Any operation on a socket may process its commands too, and so take the signal a
// message arrival left on its ZMQ_FD without the descriptor ever firing again for that message.
// Sockets are only operated on by code the loop runs, so after a pass that ran any closure,
// timer or handler the loop asks every socket once, before it waits; after a pass that ran
// nothing it asks only those whose descriptor fired. (zmq_poll, used before, asked every socket
// twice per wake-up and rebuilt its descriptor list each call.)

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "common/logging.h"
#include "common/status.h"

namespace muster {

class Reactor {
 public:
  using Clock = std::chrono::steady_clock;
  using TimerId = uint64_t;
  using Closure = std::function<void()>;

  // `name` appears in logs. The reactor uses `context` if given (not owned; must outlive the
  // reactor), else makes its own.
  explicit Reactor(std::string name, zmq::context_t* context = nullptr);
  // Stops and joins the thread. Sockets registered with AddSocket are not owned and must be
  // closed by their owners after Stop (or inside a closure on the reactor).
  ~Reactor();

  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // Starts the reactor thread. REQUIRES: not started.
  void Start();

  // Asks the loop to finish after the closure now running; joins unless called on the reactor
  // thread. Closures posted afterwards are dropped. Idempotent.
  void Stop();

  bool InReactorThread() const;
  bool running() const;

  // Returns false (and drops `fn`) once Stop has been called. Closures accepted before Stop
  // still run before the loop exits.
  bool Post(std::string name, Closure fn);
  TimerId PostAt(Clock::time_point when, std::string name, Closure fn);
  TimerId PostAfter(Clock::duration delay, std::string name, Closure fn);
  // A timer that has fired or been cancelled is ignored.
  void CancelTimer(TimerId id);

  // Runs `fn` on the reactor thread and waits for its result. From the reactor thread it runs
  // `fn` inline. REQUIRES: the reactor is running (or called on the reactor thread).
  template <typename F>
  auto Call(std::string name, F fn) -> decltype(fn());

  // `on_readable` runs on the reactor whenever `socket` has a message; it should drain what is
  // there (recv with dontwait). The socket is not owned.
  void AddSocket(zmq::socket_t& socket, std::string name, Closure on_readable);
  void RemoveSocket(zmq::socket_t& socket);
  void AddFd(int fd, std::string name, Closure on_readable);
  void RemoveFd(int fd);

  zmq::context_t& context() { return *context_; }
  const std::string& name() const { return name_; }

 private:
  struct Timer {
    Clock::time_point when;
    uint64_t seq;
    TimerId id;
    bool operator>(const Timer& o) const { return when != o.when ? when > o.when : seq > o.seq; }
  };
  struct Pollable {
    uint64_t id = 0;  // the epoll registration's tag
    zmq::socket_t* socket = nullptr;
    int fd = -1;  // the plain descriptor, or the socket's ZMQ_FD
    std::string name;
    Closure on_readable;
    bool removed = false;
    bool shares_fd = false;  // another registration has the same fd (added twice)
    bool ready = false;      // Loop only: found readable this pass
  };
  struct Named {
    std::string name;
    Closure fn;
  };

  void Loop();
  void Wake();
  void Watch(std::shared_ptr<Pollable> p);
  void Unwatch(const std::shared_ptr<Pollable>& p);
  // Whether `p`'s socket has a message (ZMQ_EVENTS, which processes the socket's commands).
  // Sets *terminated when its context is gone.
  bool SocketReadable(const Pollable& p, bool* terminated);
  void RunNamed(const std::string& name, const Closure& fn);

  const std::string name_;
  std::unique_ptr<zmq::context_t> owned_context_;
  zmq::context_t* context_;
  int wake_fd_ = -1;   // eventfd: Post and timers from other threads wake the poll.
  int epoll_fd_ = -1;  // the wake fd, every plain fd and every socket's ZMQ_FD
  std::thread thread_;
  std::thread::id thread_id_;

  mutable std::mutex mu_;
  bool stopping_ = false;                                                  // GUARDED_BY(mu_)
  bool started_ = false;                                                   // GUARDED_BY(mu_)
  std::vector<Named> posted_;                                              // GUARDED_BY(mu_)
  std::priority_queue<Timer, std::vector<Timer>, std::greater<>> timers_;  // GUARDED_BY(mu_)
  std::map<TimerId, Named> timer_fns_;  // GUARDED_BY(mu_); absent once fired or cancelled
  uint64_t next_timer_seq_ = 1;         // GUARDED_BY(mu_)

  // Reactor thread only.
  std::vector<std::shared_ptr<Pollable>> pollables_;  // in registration order
  std::map<uint64_t, std::shared_ptr<Pollable>> by_id_;
  uint64_t next_pollable_id_ = 1;  // 0 tags the wake fd
  bool warned_unknown_ = false;
};

template <typename F>
auto Reactor::Call(std::string name, F fn) -> decltype(fn()) {
  using R = decltype(fn());
  if (InReactorThread()) return fn();
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  if constexpr (std::is_void_v<R>) {
    bool accepted = Post(std::move(name), [&] {
      fn();
      std::lock_guard<std::mutex> l(m);
      done = true;
      cv.notify_all();
    });
    MUSTER_CHECK(accepted) << "Reactor::Call on a stopped reactor";
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return done; });
  } else {
    std::optional<R> result;
    bool accepted = Post(std::move(name), [&] {
      R r = fn();
      std::lock_guard<std::mutex> l(m);
      result.emplace(std::move(r));
      done = true;
      cv.notify_all();
    });
    MUSTER_CHECK(accepted) << "Reactor::Call on a stopped reactor";
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return done; });
    return std::move(*result);
  }
}

}  // namespace muster
