#pragma once

// PruneWorker: applies a job's checkpoint.keep (PruneSteps, checkpoint_steps.h) to its
// directory on a volume, on a thread of its own so that listing and deleting steps never
// stalls the agent's reactor. Requests for the same directory coalesce (the newest keep wins);
// the order among directories is by name.
//
// Ownership: owns its thread. Thread-safety: every method is thread-safe. Stop() drains what
// is queued, then joins; the destructor calls it.

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/logging.h"

namespace muster::node_agent {

class PruneWorker {
 public:
  PruneWorker();
  ~PruneWorker();
  PruneWorker(const PruneWorker&) = delete;
  PruneWorker& operator=(const PruneWorker&) = delete;

  // Keeps the newest `keep` good steps of `job_dir`; keep <= 0: nothing to do.
  void Queue(const std::string& job_dir, int keep);

  // No new work is awaited; returns once the queue is drained and the thread joined.
  void Stop();

 private:
  void Loop();

  std::shared_ptr<spdlog::logger> logger_ = log::Get("agent");
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;                 // GUARDED_BY(mu_)
  std::map<std::string, int> queue_;  // GUARDED_BY(mu_): job directory -> keep
  std::thread thread_;
};

}  // namespace muster::node_agent
