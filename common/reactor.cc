#include "common/reactor.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "common/logging.h"

namespace muster {
namespace {
constexpr auto kSlowClosure = std::chrono::milliseconds(100);
}

Reactor::Reactor(std::string name, zmq::context_t* context) : name_(std::move(name)) {
  if (context == nullptr) {
    owned_context_ = std::make_unique<zmq::context_t>();
    context_ = owned_context_.get();
  } else {
    context_ = context;
  }
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  MUSTER_CHECK(wake_fd_ >= 0) << "eventfd: " << errno;
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  MUSTER_CHECK(epoll_fd_ >= 0) << "epoll_create1: " << errno;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  MUSTER_CHECK(epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev) == 0) << "epoll_ctl: " << errno;
}

Reactor::~Reactor() {
  Stop();
  if (epoll_fd_ >= 0) close(epoll_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void Reactor::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  MUSTER_CHECK(!started_) << "reactor " << name_ << " started twice";
  started_ = true;
  thread_ = std::thread([this] { Loop(); });
  thread_id_ = thread_.get_id();
}

void Reactor::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  Wake();
  if (thread_.joinable() && !InReactorThread()) thread_.join();
}

bool Reactor::InReactorThread() const { return std::this_thread::get_id() == thread_id_; }

bool Reactor::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return started_ && !stopping_;
}

void Reactor::Wake() {
  uint64_t one = 1;
  ssize_t n = write(wake_fd_, &one, sizeof(one));
  (void)n;  // EAGAIN means the counter is already non-zero: the loop will wake anyway.
}

bool Reactor::Post(std::string name, Closure fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    posted_.push_back({std::move(name), std::move(fn)});
  }
  Wake();
  return true;
}

Reactor::TimerId Reactor::PostAt(Clock::time_point when, std::string name, Closure fn) {
  TimerId id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    id = next_timer_seq_++;
    timers_.push({when, id, id});
    timer_fns_.emplace(id, Named{std::move(name), std::move(fn)});
  }
  Wake();
  return id;
}

Reactor::TimerId Reactor::PostAfter(Clock::duration delay, std::string name, Closure fn) {
  return PostAt(Clock::now() + delay, std::move(name), std::move(fn));
}

void Reactor::CancelTimer(TimerId id) {
  std::lock_guard<std::mutex> lock(mu_);
  timer_fns_.erase(id);
}

void Reactor::Watch(std::shared_ptr<Pollable> p) {
  p->id = next_pollable_id_++;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = p->id;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, p->fd, &ev) != 0) {
    if (errno == EEXIST) {
      // The same descriptor twice (a socket or fd added again): the set holds it once, under
      // the first registration's id, and an event for it runs every registration of it.
      for (const auto& q : pollables_) {
        if (q->fd == p->fd) q->shares_fd = p->shares_fd = true;
      }
    } else {
      // EBADF/EPERM (not a descriptor epoll can watch) is a caller's bug; ENOMEM/ENOSPC
      // (max_user_watches) leaves nothing that would ever run its handler.
      MUSTER_CHECK(false) << name_ << ": cannot watch '" << p->name << "' (fd " << p->fd
                          << "): " << std::strerror(errno);
    }
  }
  by_id_[p->id] = p;
  pollables_.push_back(std::move(p));
}

// REQUIRES: `p` is no longer in pollables_.
void Reactor::Unwatch(const std::shared_ptr<Pollable>& p) {
  p->removed = true;
  by_id_.erase(p->id);
  auto other = std::find_if(pollables_.begin(), pollables_.end(),
                            [&](const auto& q) { return q->fd == p->fd; });
  if (other == pollables_.end()) {
    // Fails only when the owner broke the contract and closed the descriptor first (see the
    // header): then the set dropped it with its last reference, unless another descriptor
    // shares its open file, in which case its events come under an id no longer known.
    (void)epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, p->fd, nullptr);
    return;
  }
  // Another registration of the same descriptor stays: the set's entry is now under its id.
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = (*other)->id;
  (void)epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, p->fd, &ev);
}

void Reactor::AddSocket(zmq::socket_t& socket, std::string name, Closure on_readable) {
  auto p = std::make_shared<Pollable>();
  p->socket = &socket;
  p->fd = socket.get(zmq::sockopt::fd);
  p->name = std::move(name);
  p->on_readable = std::move(on_readable);
  Watch(std::move(p));
}

void Reactor::RemoveSocket(zmq::socket_t& socket) {
  auto it = std::stable_partition(pollables_.begin(), pollables_.end(),
                                  [&](const auto& p) { return p->socket != &socket; });
  std::vector<std::shared_ptr<Pollable>> gone(it, pollables_.end());
  pollables_.erase(it, pollables_.end());
  for (const auto& p : gone) Unwatch(p);
}

void Reactor::AddFd(int fd, std::string name, Closure on_readable) {
  auto p = std::make_shared<Pollable>();
  p->fd = fd;
  p->name = std::move(name);
  p->on_readable = std::move(on_readable);
  Watch(std::move(p));
}

void Reactor::RemoveFd(int fd) {
  auto it = std::stable_partition(pollables_.begin(), pollables_.end(), [&](const auto& p) {
    return p->socket != nullptr || p->fd != fd;
  });
  std::vector<std::shared_ptr<Pollable>> gone(it, pollables_.end());
  pollables_.erase(it, pollables_.end());
  for (const auto& p : gone) Unwatch(p);
}

bool Reactor::SocketReadable(const Pollable& p, bool* terminated) {
  uint32_t events = 0;
  size_t size = sizeof(events);
  if (zmq_getsockopt(p.socket->handle(), ZMQ_EVENTS, &events, &size) != 0) {
    if (zmq_errno() == ETERM) {
      *terminated = true;
    } else if (zmq_errno() != EINTR) {  // EINTR: its descriptor stays readable; asked again
      log::Get("reactor")->error("{}: events of '{}': {}", name_, p.name,
                                 zmq_strerror(zmq_errno()));
    }
    return false;
  }
  return (events & ZMQ_POLLIN) != 0;
}

void Reactor::RunNamed(const std::string& name, const Closure& fn) {
  auto start = Clock::now();
  try {
    fn();
  } catch (const std::exception& e) {
    // A handler that lets an exception escape has a bug, but the daemon keeps serving.
    log::Get("reactor")->error("{}: closure '{}' threw: {}", name_, name, e.what());
  }
  auto took = Clock::now() - start;
  if (took > kSlowClosure) {
    log::Get("reactor")->warn("{}: closure '{}' blocked the loop for {} ms", name_, name,
                              std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
  }
}

void Reactor::Loop() {
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  std::vector<std::shared_ptr<Pollable>> ready;
  // Whether the last pass ran anything: then every socket is asked (see the header).
  bool ran = true;
  for (;;) {
    long timeout_ms = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) break;
      if (!posted_.empty()) {
        timeout_ms = 0;
      } else {
        while (!timers_.empty() && !timer_fns_.count(timers_.top().id)) timers_.pop();
        if (!timers_.empty()) {
          auto wait = timers_.top().when - Clock::now();
          auto ms = std::chrono::ceil<std::chrono::milliseconds>(wait).count();
          timeout_ms = ms < 0 ? 0 : std::min<long>(ms, std::numeric_limits<int>::max());
        }
      }
    }

    bool terminated = false;
    ready.clear();
    if (ran) {
      for (const auto& p : pollables_) {
        if (p->socket != nullptr && SocketReadable(*p, &terminated)) {
          p->ready = true;
          ready.push_back(p);
        }
      }
      if (terminated) break;
      if (!ready.empty()) timeout_ms = 0;
    }

    int n = epoll_wait(epoll_fd_, events, kMaxEvents, static_cast<int>(timeout_ms));
    if (n < 0) {
      if (errno != EINTR)
        log::Get("reactor")->error("{}: epoll_wait: {}", name_, std::strerror(errno));
      n = 0;
    }
    for (int i = 0; i < n; ++i) {
      if (events[i].data.u64 == 0) {
        uint64_t v;
        ssize_t r = read(wake_fd_, &v, sizeof(v));
        (void)r;
        continue;
      }
      auto it = by_id_.find(events[i].data.u64);
      if (it == by_id_.end()) {
        // Removed in this pass (its registration went with it), or closed before it was removed
        // while another descriptor shares its file: then it keeps firing; say so once.
        if (!warned_unknown_) {
          warned_unknown_ = true;
          log::Get("reactor")->warn(
              "{}: an event for a descriptor no longer registered (closed before RemoveFd or "
              "RemoveSocket?)",
              name_);
        }
        continue;
      }
      auto mark = [&](const std::shared_ptr<Pollable>& p) {
        if (p->ready) return;
        // A plain fd at EOF or in error (EPOLLHUP, EPOLLERR) is readable to its handler, which
        // must see it. A socket's descriptor only says that commands came: ask it.
        if (p->socket != nullptr && !SocketReadable(*p, &terminated)) return;
        p->ready = true;
        ready.push_back(p);
      };
      mark(it->second);
      if (it->second->shares_fd) {
        const int fd = it->second->fd;
        for (const auto& q : pollables_) {
          if (q->fd == fd) mark(q);
        }
      }
    }
    if (terminated) break;
    // In registration order, as before.
    if (ready.size() > 1) {
      std::sort(ready.begin(), ready.end(),
                [](const auto& a, const auto& b) { return a->id < b->id; });
    }
    ran = !ready.empty();

    // Posted closures, in order.
    std::vector<Named> posted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      posted.swap(posted_);
    }
    ran = ran || !posted.empty();
    for (const Named& n : posted) RunNamed(n.name, n.fn);

    // Due timers, in deadline order.
    for (;;) {
      Named due;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (timers_.empty() || timers_.top().when > Clock::now()) break;
        TimerId id = timers_.top().id;
        timers_.pop();
        auto it = timer_fns_.find(id);
        if (it == timer_fns_.end()) continue;  // cancelled
        due = std::move(it->second);
        timer_fns_.erase(it);
      }
      ran = true;
      RunNamed(due.name, due.fn);
    }

    // Readable sockets and fds. A handler may add or remove pollables; a removed one's handler
    // is not called (each is held here, so its closure outlives its removal).
    for (const auto& p : ready) {
      p->ready = false;
      if (!p->removed) RunNamed(p->name, p->on_readable);
    }
  }

  // Closures accepted before Stop still run (Call() waits on them). A loop that ended on its
  // own (its context terminated: ETERM) refuses later ones too, as a stopped one does: accepted,
  // they would never run and a Call would wait for ever.
  std::vector<Named> posted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      log::Get("reactor")->warn("{}: its ZeroMQ context was terminated; the loop has ended", name_);
    }
    stopping_ = true;
    posted.swap(posted_);
  }
  for (const Named& n : posted) RunNamed(n.name, n.fn);
}

}  // namespace muster
