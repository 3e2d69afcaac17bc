#include "checkpoint/restore_pipeline.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "checkpoint/checkpoint_dir.h"
#include "common/logging.h"

namespace muster::checkpoint {

namespace {

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

bool Aligned(uint64_t v) { return v % kDirectIoAlignment == 0; }
bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kDirectIoAlignment == 0; }

}  // namespace

RestorePlanBuilder::RestorePlanBuilder(const Manifest& m, uint64_t window_bytes)
    : m_(m), window_bytes_(window_bytes) {}

void RestorePlanBuilder::AddRun(int shard, uint64_t file_off, uint64_t len, char* dst,
                                MemoryKind kind, const std::string* tensor) {
  if (!plan_.error.ok()) return;
  uint64_t end = 0;
  if (shard < 0 || static_cast<size_t>(shard) >= m_.shards.size() ||
      __builtin_add_overflow(file_off, len, &end) || end > m_.shards[shard].size) {
    plan_.error = DataLossError("restore of step " + std::to_string(m_.step) + ": tensor '" +
                                (tensor ? *tensor : std::string("?")) + "': byte range [" +
                                std::to_string(file_off) + ", +" + std::to_string(len) +
                                ") is outside its shard file");
    return;
  }
  plan_.run_bytes += len;
  // Split at multiples of the window size, so every piece fits one window.
  uint64_t off = file_off;
  while (off < end) {
    const uint64_t cut = std::min(end, (off / window_bytes_ + 1) * window_bytes_);
    AddPiece(shard, off, cut - off, dst + (off - file_off), kind, tensor);
    off = cut;
  }
}

void RestorePlanBuilder::AddPiece(int shard, uint64_t file_off, uint64_t len, char* dst,
                                  MemoryKind kind, const std::string* tensor) {
  const uint64_t bs = m_.block_size;
  const uint64_t size = m_.shards[shard].size;
  const uint64_t a = file_off / bs * bs;
  const uint64_t b = std::min(size, AlignUp(file_off + len, bs));
  if (!plan_.windows.empty()) {
    RestoreWindow& w = plan_.windows.back();
    const uint64_t new_end = std::max(w.end, b);
    if (w.shard == shard && w.kind == kind && w.tensor == tensor && a >= w.begin && a <= w.end &&
        new_end - w.begin <= window_bytes_) {
      w.end = new_end;
      plan_.max_window = std::max(plan_.max_window, w.end - w.begin);
      RestoreRun& last = plan_.runs.back();
      if (last.file_off + last.len == file_off && last.dst + last.len == dst) {
        last.len += len;  // contiguous in the file and in the destination: one copy
      } else {
        plan_.runs.push_back({file_off, len, dst});
        ++w.num_runs;
      }
      return;
    }
  }
  RestoreWindow w;
  w.shard = shard;
  w.begin = a;
  w.end = b;
  w.first_run = plan_.runs.size();
  w.num_runs = 1;
  w.kind = kind;
  w.tensor = tensor;
  plan_.windows.push_back(w);
  plan_.runs.push_back({file_off, len, dst});
  plan_.max_window = std::max(plan_.max_window, b - a);
}

namespace {

// The ring of staging slots shared by the reader threads. A slot whose device copies may still
// be running is awaited (DeviceCopier::AwaitSlot) by the reader that takes it next.
class SlotRing {
 public:
  SlotRing(char* base, uint64_t slot_bytes, int slots, DeviceCopier* device)
      : base_(base), slot_bytes_(slot_bytes), device_(device), pending_(slots, 0) {
    for (int s = slots - 1; s >= 0; --s) free_.push_back(s);
  }

  // A free slot whose memory may be overwritten.
  StatusOr<int> Acquire() {
    int s;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return !free_.empty(); });
      s = free_.back();
      free_.pop_back();
    }
    if (pending_[s]) {
      pending_[s] = 0;
      if (Status st = device_->AwaitSlot(s); !st.ok()) {
        Put(s);
        return st;
      }
    }
    return s;
  }

  // Returns `s` to the ring; `copied_to_device`: copies out of it were enqueued.
  Status Release(int s, bool copied_to_device) {
    Status st;
    if (copied_to_device) {
      st = device_->Release(s);
      pending_[s] = 1;  // even on error: Finish() waits for whatever was enqueued
    }
    Put(s);
    return st;
  }

  char* data(int s) const { return base_ + static_cast<uint64_t>(s) * slot_bytes_; }
  uint64_t slot_bytes() const { return slot_bytes_; }

 private:
  void Put(int s) {
    {
      std::lock_guard<std::mutex> l(mu_);
      free_.push_back(s);
    }
    cv_.notify_one();
  }

  char* base_;
  uint64_t slot_bytes_;
  DeviceCopier* device_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> free_;  // GUARDED_BY(mu_)
  // Per slot (bytes, not bits: holders of different slots write at once), touched only by the
  // thread holding the slot; the ring's mutex orders successive holders.
  std::vector<uint8_t> pending_;
};

class Pipeline {
 public:
  Pipeline(const RestorePlan& plan, const RestoreIo& io, SlotRing* ring)
      : plan_(plan), io_(io), m_(*io.manifest), ring_(ring) {}

  void Worker() {
    for (;;) {
      const size_t i = next_++;
      if (i >= plan_.windows.size() || failed_) return;
      Status st = Window(plan_.windows[i]);
      if (!st.ok()) {
        std::lock_guard<std::mutex> l(err_mu_);
        if (err_.ok()) err_ = st;
        failed_ = true;
        return;
      }
    }
  }

  Status error() {
    std::lock_guard<std::mutex> l(err_mu_);
    return err_;
  }

 private:
  std::string Where(const RestoreWindow& w) const {
    return "step " + std::to_string(io_.step) + ": tensor '" + *w.tensor + "'";
  }

  // Reads shard bytes [a, b) into `into` and checks their blocks (a is block-aligned).
  Status ReadChecked(const RestoreWindow& w, uint64_t a, uint64_t b, char* into) {
    const ShardEntry& shard = m_.shards[w.shard];
    ReadableFile* f = io_.files.at(w.shard);
    if (auto it = io_.direct_files.find(w.shard); it != io_.direct_files.end() &&
                                                  it->second->direct() && Aligned(a) &&
                                                  Aligned(b - a) && Aligned(into)) {
      f = it->second;
    }
    if (Status st = f->Read(a, into, b - a); !st.ok()) {
      return st.WithContext(Where(w) + ": " + shard.file);
    }
    return CheckBlocks(m_, shard, a, into, b - a);
  }

  Status Window(const RestoreWindow& w) {
    const ShardEntry& shard = m_.shards[w.shard];
    const uint64_t bs = m_.block_size;
    if (w.kind == MemoryKind::kHost && w.num_runs == 1) {
      const RestoreRun& r = plan_.runs[w.first_run];
      const uint64_t s = r.file_off, e = r.file_off + r.len;
      const uint64_t fb = AlignUp(s, bs), lb = e == shard.size ? e : e / bs * bs;
      auto dit = io_.direct_files.find(w.shard);
      const bool can_direct = dit != io_.direct_files.end() && dit->second->direct();
      // With O_DIRECT available, a destination that is not aligned where the whole blocks land
      // goes through the (aligned) slot: an extra memcpy beats buffered reads.
      if (fb < lb && (Aligned(r.dst + (fb - s)) || !can_direct)) return HostDirect(w, r, fb, lb);
    }
    MUSTER_ASSIGN_OR_RETURN(int slot, ring_->Acquire());
    char* buf = ring_->data(slot);
    Status st = ReadChecked(w, w.begin, w.end, buf);
    bool enqueued = false;
    for (size_t i = 0; st.ok() && i < w.num_runs; ++i) {
      const RestoreRun& r = plan_.runs[w.first_run + i];
      const char* src = buf + (r.file_off - w.begin);
      if (w.kind == MemoryKind::kHost) {
        std::memcpy(r.dst, src, r.len);
      } else {
        enqueued = true;
        st = io_.device->CopyAsync(slot, r.dst, src, r.len);
        if (!st.ok()) st = st.WithContext(Where(w));
      }
    }
    Status rel = ring_->Release(slot, enqueued);
    return st.ok() ? rel : st;
  }

  // The whole blocks [fb, lb) of run `r` go straight into its (host) destination; only the
  // partial blocks at either end pass through a slot.
  Status HostDirect(const RestoreWindow& w, const RestoreRun& r, uint64_t fb, uint64_t lb) {
    const ShardEntry& shard = m_.shards[w.shard];
    const uint64_t bs = m_.block_size;
    const uint64_t s = r.file_off, e = r.file_off + r.len;
    MUSTER_RETURN_IF_ERROR(ReadChecked(w, fb, lb, r.dst + (fb - s)));
    if (s == fb && lb == e) return Status::Ok();
    MUSTER_ASSIGN_OR_RETURN(int slot, ring_->Acquire());
    char* buf = ring_->data(slot);
    Status st;
    if (s < fb) {
      st = ReadChecked(w, fb - bs, fb, buf);
      if (st.ok()) std::memcpy(r.dst, buf + (s - (fb - bs)), fb - s);
    }
    if (st.ok() && lb < e) {
      st = ReadChecked(w, lb, std::min(shard.size, lb + bs), buf);
      if (st.ok()) std::memcpy(r.dst + (lb - s), buf, e - lb);
    }
    Status rel = ring_->Release(slot, false);
    return st.ok() ? rel : st;
  }

  const RestorePlan& plan_;
  const RestoreIo& io_;
  const Manifest& m_;
  SlotRing* ring_;
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex err_mu_;
  Status err_;  // GUARDED_BY(err_mu_)
};

}  // namespace

namespace {

// Every window inside its shard file and within the slot size, every run inside its window:
// what the pipeline's pointer arithmetic relies on.
Status CheckPlan(const RestorePlan& plan, const RestoreIo& io) {
  const Manifest& m = *io.manifest;
  for (const auto& w : plan.windows) {
    if (w.shard < 0 || static_cast<size_t>(w.shard) >= m.shards.size() ||
        !io.files.count(w.shard)) {
      return InternalError("restore plan: a window names shard " + std::to_string(w.shard) +
                           ", which has no open file");
    }
    const uint64_t size = m.shards[w.shard].size;
    if (w.begin > w.end || w.end > size || w.end - w.begin > plan.max_window ||
        w.begin % m.block_size != 0 || w.first_run > plan.runs.size() ||
        w.num_runs > plan.runs.size() - w.first_run) {
      return InternalError("restore plan: a window of " + m.shards[w.shard].file +
                           " is outside the file or the plan");
    }
    for (size_t i = 0; i < w.num_runs; ++i) {
      const RestoreRun& r = plan.runs[w.first_run + i];
      if (r.file_off < w.begin || r.file_off > w.end || r.len > w.end - r.file_off) {
        return InternalError("restore plan: a run of " + m.shards[w.shard].file +
                             " is outside its window");
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status ExecuteRestorePlan(const RestorePlan& plan, const RestoreIo& io) {
  MUSTER_RETURN_IF_ERROR(plan.error);
  if (plan.windows.empty()) return Status::Ok();
  MUSTER_RETURN_IF_ERROR(CheckPlan(plan, io));
  bool any_device = false;
  for (const auto& w : plan.windows) any_device |= w.kind != MemoryKind::kHost;
  if (any_device && !io.device) {
    return InternalError("restore: device destinations but no device copier");
  }
  // No more threads or slots than windows (a small restore allocates a small ring).
  const int windows = static_cast<int>(std::min<size_t>(plan.windows.size(), 4096));
  const int threads = std::clamp(io.threads, 1, windows);
  // Host copies are synchronous: a slot per reader is all they use. Device copies run behind
  // the reads: two more slots let readers go on while earlier slots drain.
  const int slots =
      std::clamp(io.slots > 0 ? io.slots : threads + (any_device ? 2 : 0), 1, windows);
  // Edge blocks of the host shortcut also need a slot of at least one block.
  const uint64_t slot_bytes =
      AlignUp(std::max(plan.max_window, io.manifest->block_size), kDirectIoAlignment);
  if (any_device) {
    if (Status st = io.device->Begin(slots); !st.ok()) {
      return st.WithContext("restore of step " + std::to_string(io.step));
    }
  }
  if (Status st =
          io.ring->Reserve(slot_bytes * slots, any_device && io.device->WantsPinnedStaging());
      !st.ok()) {
    if (any_device) io.device->Finish().IgnoreError();
    return st;
  }
  SlotRing ring(io.ring->data(), slot_bytes, slots, io.device);
  Pipeline p(plan, io, &ring);
  std::vector<std::thread> ts;
  for (int i = 1; i < threads; ++i) ts.emplace_back([&] { p.Worker(); });
  p.Worker();
  for (auto& t : ts) t.join();
  Status st = p.error();
  if (any_device) {
    // Every copy out of the ring must be over before the ring is reused or freed.
    Status fin = io.device->Finish();
    if (st.ok() && !fin.ok()) st = fin.WithContext("restore of step " + std::to_string(io.step));
  }
  return st;
}

}  // namespace muster::checkpoint
