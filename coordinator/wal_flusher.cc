#include "coordinator/wal_flusher.h"

#include <algorithm>

#include "common/logging.h"

namespace muster::coordinator {

WalFlusher::WalFlusher(std::chrono::milliseconds interval, Flush flush)
    : interval_(interval), flush_(std::move(flush)), thread_([this] { Run(); }) {}

WalFlusher::~WalFlusher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void WalFlusher::NoteCommit(int log_pages) {
  std::lock_guard<std::mutex> lock(mu_);
  ++committed_;
  log_pages_ = log_pages;
}

Status WalFlusher::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

uint64_t WalFlusher::committed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return committed_;
}

uint64_t WalFlusher::durable() const {
  std::lock_guard<std::mutex> lock(mu_);
  return durable_;
}

WalFlusher::Stats WalFlusher::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {committed_, durable_, log_pages_, !error_.ok(), last_flush_seconds_, max_flush_seconds_};
}

void WalFlusher::FlushLocked(std::unique_lock<std::mutex>& lock) {
  if (!error_.ok() || durable_ == committed_) return;
  const uint64_t upto = committed_;
  const int pages = log_pages_;
  lock.unlock();
  auto start = std::chrono::steady_clock::now();
  Status done = flush_(pages);
  auto took = std::chrono::steady_clock::now() - start;
  lock.lock();
  last_flush_seconds_ = std::chrono::duration<double>(took).count();
  max_flush_seconds_ = std::max(max_flush_seconds_, last_flush_seconds_);
  if (!done.ok()) {
    error_ = done;
    log::Get("coord.db")
        ->critical(
            "the state database's log could not be made durable: {}; every later change is refused "
            "until the coordinator is restarted on a working disk",
            error_.ToString());
    return;
  }
  durable_ = std::max(durable_, upto);
  if (took > std::chrono::seconds(1)) {
    log::Get("coord.db")
        ->warn(
            "flushing the state database took {} ms (off the serving thread unless a change had to "
            "wait for it)",
            std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
  }
}

void WalFlusher::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    bool stopping = cv_.wait_for(lock, interval_, [this] { return stop_; });
    FlushLocked(lock);  // when stopping too: the last flush
    if (stopping) return;
  }
}

}  // namespace muster::coordinator
