#pragma once

// A fake device for restore tests on machines without a GPU. "Device memory" is host memory;
// copies run as late as the DeviceCopier protocol allows (when their slot is awaited, or at
// Finish), in the order they were enqueued, as on one CUDA stream. So a pipeline that refilled
// a slot before awaiting its copies, or returned before Finish, would deliver the wrong bytes,
// and a test that compares the destination catches it. It can also fail the n-th copy.
//
// Thread-safety: thread-safe.

#include <cstring>
#include <deque>
#include <mutex>
#include <string>

#include "checkpoint/device_copier.h"

namespace muster::checkpoint::testing {

class LazyFakeDevice final : public DeviceCopier {
 public:
  bool WantsPinnedStaging() const override { return false; }

  Status Begin(int slots) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!queue_.empty()) return InternalError("fake device: Begin with copies still queued");
    if (slots < 1) return InternalError("fake device: Begin with no slots");
    slots_ = slots;
    ++begun_;
    return Status::Ok();
  }

  Status CopyAsync(int slot, void* dst, const void* src, size_t n) override {
    std::lock_guard<std::mutex> l(mu_);
    if (slot < 0 || slot >= slots_) return InternalError("fake device: bad slot");
    if (fail_copy_ >= 0 && copies_ == fail_copy_) {
      ++copies_;
      return InternalError("fake device: copy " + std::to_string(fail_copy_) + " failed");
    }
    ++copies_;
    queue_.push_back({slot, dst, src, n, false});
    return Status::Ok();
  }

  Status Release(int slot) override {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back({slot, nullptr, nullptr, 0, true});
    return Status::Ok();
  }

  Status AwaitSlot(int slot) override {
    std::lock_guard<std::mutex> l(mu_);
    // Run the queue up to the last release of `slot`.
    size_t last = queue_.size();
    for (size_t i = 0; i < queue_.size(); ++i)
      if (queue_[i].mark && queue_[i].slot == slot) last = i;
    if (last == queue_.size()) return Status::Ok();
    RunLocked(last + 1);
    return Status::Ok();
  }

  Status Finish() override {
    std::lock_guard<std::mutex> l(mu_);
    RunLocked(queue_.size());
    ++finished_;
    return Status::Ok();
  }

  // The `n`-th CopyAsync (from 0) fails.
  void FailCopy(int n) {
    std::lock_guard<std::mutex> l(mu_);
    fail_copy_ = n;
  }
  uint64_t bytes_copied() const {
    std::lock_guard<std::mutex> l(mu_);
    return bytes_;
  }
  size_t queued() const {
    std::lock_guard<std::mutex> l(mu_);
    return queue_.size();
  }
  int begun() const {
    std::lock_guard<std::mutex> l(mu_);
    return begun_;
  }
  int finished() const {
    std::lock_guard<std::mutex> l(mu_);
    return finished_;
  }

 private:
  struct Op {
    int slot;
    void* dst;
    const void* src;
    size_t n;
    bool mark;
  };
  void RunLocked(size_t n) {
    for (size_t i = 0; i < n; ++i) {
      const Op& op = queue_.front();
      if (!op.mark) {
        std::memcpy(op.dst, op.src, op.n);
        bytes_ += op.n;
      }
      queue_.pop_front();
    }
  }

  mutable std::mutex mu_;
  std::deque<Op> queue_;
  int slots_ = 0;
  int fail_copy_ = -1;
  int copies_ = 0;
  uint64_t bytes_ = 0;
  int begun_ = 0;
  int finished_ = 0;
};

}  // namespace muster::checkpoint::testing
