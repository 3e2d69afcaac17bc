#include "common/reactor.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

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
}

Reactor::~Reactor() {
  Stop();
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

void Reactor::AddSocket(zmq::socket_t& socket, std::string name, Closure on_readable) {
  pollables_.push_back({&socket, -1, std::move(name), std::move(on_readable)});
  pollables_changed_ = true;
}

void Reactor::RemoveSocket(zmq::socket_t& socket) {
  std::erase_if(pollables_, [&](const Pollable& p) { return p.socket == &socket; });
  pollables_changed_ = true;
}

void Reactor::AddFd(int fd, std::string name, Closure on_readable) {
  pollables_.push_back({nullptr, fd, std::move(name), std::move(on_readable)});
  pollables_changed_ = true;
}

void Reactor::RemoveFd(int fd) {
  std::erase_if(pollables_, [&](const Pollable& p) { return p.socket == nullptr && p.fd == fd; });
  pollables_changed_ = true;
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
  std::vector<zmq::pollitem_t> items;
  std::vector<Pollable> snapshot;
  pollables_changed_ = true;
  for (;;) {
    if (pollables_changed_) {
      snapshot = pollables_;
      items.clear();
      items.push_back({nullptr, wake_fd_, ZMQ_POLLIN, 0});
      for (const Pollable& p : snapshot) {
        items.push_back({p.socket ? p.socket->handle() : nullptr, p.fd, ZMQ_POLLIN, 0});
      }
      pollables_changed_ = false;
    }

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
          timeout_ms = ms < 0 ? 0 : ms;
        }
      }
    }

    int rc = zmq_poll(items.data(), static_cast<int>(items.size()), timeout_ms);
    if (rc < 0) {
      if (zmq_errno() == EINTR) continue;
      if (zmq_errno() == ETERM) break;
      log::Get("reactor")->error("{}: zmq_poll: {}", name_, zmq_strerror(zmq_errno()));
      continue;
    }
    if (items[0].revents & ZMQ_POLLIN) {
      uint64_t v;
      ssize_t n = read(wake_fd_, &v, sizeof(v));
      (void)n;
    }

    // Posted closures, in order.
    std::vector<Named> posted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      posted.swap(posted_);
    }
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
      RunNamed(due.name, due.fn);
    }

    // Readable sockets and fds. A handler may add or remove pollables; the snapshot keeps
    // this pass consistent, and a removed pollable's handler is not called.
    for (size_t i = 0; i < snapshot.size(); ++i) {
      // A pipe at EOF reports POLLHUP, which zmq_poll gives as ZMQ_POLLERR: the handler must see
      // it.
      if (!(items[i + 1].revents & (ZMQ_POLLIN | ZMQ_POLLERR))) continue;
      const Pollable& p = snapshot[i];
      bool still_registered = std::any_of(pollables_.begin(), pollables_.end(), [&](auto& q) {
        return q.socket == p.socket && q.fd == p.fd;
      });
      if (still_registered) RunNamed(p.name, p.on_readable);
    }
  }

  // Closures accepted before Stop still run (Call() waits on them).
  std::vector<Named> posted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    posted.swap(posted_);
  }
  for (const Named& n : posted) RunNamed(n.name, n.fn);
}

}  // namespace muster
