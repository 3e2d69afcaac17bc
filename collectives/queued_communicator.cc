#include "collectives/queued_communicator.h"

namespace muster::collectives {

struct QueuedCommunicator::State {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;  // GUARDED_BY(mu)
  Status status;      // GUARDED_BY(mu)

  void Complete(Status s) {
    std::lock_guard<std::mutex> l(mu);
    status = std::move(s);
    done = true;
    cv.notify_all();
  }
};

class QueuedCommunicator::QueuedWork final : public Work {
 public:
  explicit QueuedWork(std::shared_ptr<State> s) : s_(std::move(s)) {}
  Status Wait(std::chrono::steady_clock::time_point deadline) override {
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
    cv_.notify_all();
  }
  if (worker_.joinable()) worker_.join();
}

std::unique_ptr<Work> QueuedCommunicator::Enqueue(std::function<Status()> fn) {
  auto state = std::make_shared<State>();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!failed_.ok()) {
      state->Complete(failed_);
    } else if (stopping_) {
      state->Complete(AbortedError("communicator is shutting down"));
    } else {
      queue_.emplace_back(std::move(fn), state);
      cv_.notify_all();
    }
  }
  return std::make_unique<QueuedWork>(std::move(state));
}

void QueuedCommunicator::Loop() {
  for (;;) {
    std::function<Status()> fn;
    std::shared_ptr<State> state;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      fn = std::move(queue_.front().first);
      state = std::move(queue_.front().second);
      queue_.pop_front();
      if (!failed_.ok()) {
        l.unlock();
        state->Complete(failed_);
        continue;
      }
    }
    Status st = fn();
    if (!st.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      if (failed_.ok()) {
        failed_ = Status(st.code(), "communicator failed earlier: " + st.message());
      }
    }
    state->Complete(std::move(st));
  }
}

}  // namespace muster::collectives
