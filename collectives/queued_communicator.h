#pragma once

// QueuedCommunicator: the base of backends whose library calls block (Gloo, MPI). Collectives
// are queued, in issue order, to one worker thread that makes the blocking calls; each returns
// a Work completed by the worker. After the first failure the communicator is failed: queued
// and later collectives fail at once with that first error.
//
// Thread-safety: Enqueue is thread-safe.

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
  // Queues `fn` to run on the worker.
  std::unique_ptr<Work> Enqueue(std::function<Status()> fn);

 private:
  struct State;
  class QueuedWork;
  void Loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<Status()>, std::shared_ptr<State>>> queue_;  // GUARDED_BY(mu_)
  bool stopping_ = false;                                                         // GUARDED_BY(mu_)
  Status failed_;                                                                 // GUARDED_BY(mu_)
  std::thread worker_;
};

}  // namespace muster::collectives
