#pragma once

// QueuedCommunicator: the base of backends whose library calls block (Gloo, MPI). Collectives
// are queued, in issue order, and run one at a time: by a worker thread, so that a caller who
// issues a collective and goes on computing gets it done in the background, or by the caller
// itself when it waits without a deadline for a collective the worker has not picked up yet
// (the caller then runs the queue up to and including its own collective, in order). The
// second saves the hand-off to the worker and back, a thread wake-up each way, on every
// blocking collective: tens to hundreds of microseconds on a busy host, the whole cost of a
// small allreduce. So that the worker does not snatch a collective its caller is about to wait
// for, it leaves a freshly queued one to a waiting caller for kClaimWindow first. After the first
// failure the communicator is failed: queued and later collectives fail at once with that first
// error.
//
// Thread-safety: Enqueue and the Works' Wait are thread-safe; collectives never overlap.

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "collectives/communicator.h"

namespace muster::collectives {

class QueuedCommunicator : public Communicator {
 public:
  ~QueuedCommunicator() override;

 protected:
  QueuedCommunicator() = default;
  // Starts the worker. REQUIRES: called once, by the subclass's factory.
  void StartWorker();
  // Stops the worker after the queued collectives. Subclasses call it first in their
  // destructors, before tearing down what the collectives use.
  void StopWorker();
  // Queues `fn` to run on the worker (or on the thread that waits for it).
  std::unique_ptr<Work> Enqueue(std::function<Status()> fn);
  // Runs `fn` on a caller's thread rather than the worker: a backend that needs a thread set
  // up (signals blocked, say) does it here.
  virtual Status RunOnCaller(const std::function<Status()>& fn) { return fn(); }

 private:
  struct State;
  class QueuedWork;
  struct Item {
    std::function<Status()> fn;
    std::shared_ptr<State> state;
    std::chrono::steady_clock::time_point enqueued;
  };
  void Loop();
  // On the caller's thread: runs the queue up to and including `state`'s collective whenever
  // no collective is running; returns once `state`'s has been taken (by the worker or here).
  void Help(const std::shared_ptr<State>& state);
  // Runs one item taken from the queue. REQUIRES: `running_` set by the caller, `l` held;
  // releases it while `fn` runs.
  void RunItem(std::unique_lock<std::mutex>& l, Item item, bool on_caller);

  std::mutex mu_;
  std::condition_variable work_cv_;  // for the worker: something to run, or stop
  std::condition_variable idle_cv_;  // for helpers: running_ went false
  std::deque<Item> queue_;           // GUARDED_BY(mu_)
  bool running_ = false;             // GUARDED_BY(mu_): a collective is running (worker or caller)
  int helpers_ = 0;        // GUARDED_BY(mu_): callers waiting in Help for running_ to drop
  bool stopping_ = false;  // GUARDED_BY(mu_)
  Status failed_;          // GUARDED_BY(mu_)
  std::thread worker_;
};

}  // namespace muster::collectives
