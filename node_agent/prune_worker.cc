#include "node_agent/prune_worker.h"

#include <fmt/ranges.h>

#include "node_agent/checkpoint_steps.h"

namespace muster::node_agent {

PruneWorker::PruneWorker() {
  thread_ = std::thread([this] { Loop(); });
}

PruneWorker::~PruneWorker() { Stop(); }

void PruneWorker::Queue(const std::string& job_dir, int keep) {
  if (keep <= 0) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    queue_[job_dir] = keep;
  }
  cv_.notify_all();
}

void PruneWorker::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void PruneWorker::Loop() {
  for (;;) {
    std::string dir;
    int keep = 0;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop
      dir = queue_.begin()->first;
      keep = queue_.begin()->second;
      queue_.erase(queue_.begin());
    }
    auto removed = PruneSteps(dir, keep);
    if (!removed.ok()) {
      logger_->warn("checkpoint.keep {} on {}: {}", keep, dir, removed.status().ToString());
    } else if (!removed->empty()) {
      logger_->info("checkpoint.keep {} on {}: removed step(s) {}", keep, dir,
                    fmt::join(*removed, ","));
    }
  }
}

}  // namespace muster::node_agent
