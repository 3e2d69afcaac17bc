#include "collectives/queued_communicator.h"

namespace muster::collectives {

namespace {
// How long a freshly queued collective is left to a caller that waits for it, before the
// worker runs it: longer than a caller takes from issuing a collective to waiting for it,
// short beside what a collective overlapped with computation takes.
constexpr std::chrono::microseconds kClaimWindow{50};
}  // namespace

struct QueuedCommunicator::State {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;   // GUARDED_BY(mu)
  Status status;       // GUARDED_BY(mu)
  bool queued = true;  // GUARDED_BY(the communicator's mu_): not yet taken from the queue

  void Complete(Status s) {
    std::lock_guard<std::mutex> l(mu);
    status = std::move(s);
    done = true;
    cv.notify_all();
  }
};

class QueuedCommunicator::QueuedWork final : public Work {
 public:
  QueuedWork(QueuedCommunicator* owner, std::shared_ptr<State> s)
      : owner_(owner), s_(std::move(s)) {}
  Status Wait(std::chrono::steady_clock::time_point deadline) override {
    // Without a deadline the caller may run the collective itself (a deadline could not cut a
    // collective running on the caller's thread short; it is bounded by the backend's timeout).
    if (deadline == std::chrono::steady_clock::time_point::max() && !Done()) owner_->Help(s_);
    std::unique_lock<std::mutex> l(s_->mu);
    if (deadline == std::chrono::steady_clock::time_point::max()) {
      s_->cv.wait(l, [&] { return s_->done; });
    } else if (!s_->cv.wait_until(l, deadline, [&] { return s_->done; })) {
      return DeadlineExceededError("collective still running at the caller's deadline");
    }
    return s_->status;
  }
  bool Done() override {
    std::lock_guard<std::mutex> l(s_->mu);
    return s_->done;
  }

 private:
  QueuedCommunicator* owner_;  // outlives every Work not yet done (StopWorker drains the queue)
  std::shared_ptr<State> s_;
};

QueuedCommunicator::~QueuedCommunicator() { StopWorker(); }

void QueuedCommunicator::StartWorker() {
  worker_ = std::thread([this] { Loop(); });
}

void QueuedCommunicator::StopWorker() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
    work_cv_.notify_all();
  }
  if (worker_.joinable()) worker_.join();
}

std::unique_ptr<Work> QueuedCommunicator::Enqueue(std::function<Status()> fn) {
  auto state = std::make_shared<State>();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!failed_.ok()) {
      state->queued = false;
      state->Complete(failed_);
    } else if (stopping_) {
      state->queued = false;
      state->Complete(AbortedError("communicator is shutting down"));
    } else {
      queue_.push_back({std::move(fn), state, std::chrono::steady_clock::now()});
      if (!running_) work_cv_.notify_one();
    }
  }
  return std::make_unique<QueuedWork>(this, std::move(state));
}

void QueuedCommunicator::RunItem(std::unique_lock<std::mutex>& l, Item item, bool on_caller) {
  item.state->queued = false;
  Status st;
  if (!failed_.ok()) {
    st = failed_;
  } else {
    l.unlock();
    st = on_caller ? RunOnCaller(item.fn) : item.fn();
    l.lock();
    if (!st.ok() && failed_.ok()) {
      failed_ = Status(st.code(), "communicator failed earlier: " + st.message());
    }
  }
  running_ = false;
  if (helpers_ > 0) idle_cv_.notify_all();
  if (!queue_.empty()) work_cv_.notify_one();
  l.unlock();
  item.state->Complete(std::move(st));
  l.lock();
}

void QueuedCommunicator::Help(const std::shared_ptr<State>& state) {
  std::unique_lock<std::mutex> l(mu_);
  while (state->queued) {
    if (running_) {
      ++helpers_;
      idle_cv_.wait(l);
      --helpers_;
      continue;
    }
    running_ = true;
    Item item = std::move(queue_.front());
    queue_.pop_front();
    RunItem(l, std::move(item), /*on_caller=*/true);
  }
}

void QueuedCommunicator::Loop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    work_cv_.wait(l,
                  [&] { return (stopping_ && queue_.empty()) || (!queue_.empty() && !running_); });
    if (queue_.empty()) return;
    // Leave a fresh collective to the caller that is about to wait for it.
    auto claim_until = queue_.front().enqueued + kClaimWindow;
    if (!stopping_ && std::chrono::steady_clock::now() < claim_until) {
      work_cv_.wait_until(l, claim_until);
      continue;
    }
    running_ = true;
    Item item = std::move(queue_.front());
    queue_.pop_front();
    RunItem(l, std::move(item), /*on_caller=*/false);
  }
}

}  // namespace muster::collectives
