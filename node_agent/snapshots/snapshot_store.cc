#include "node_agent/snapshots/snapshot_store.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "checkpoint/manifest.h"  // Xxh3
#include "common/logging.h"

namespace muster::node_agent {
namespace {

std::string Bytes(uint64_t n) { return std::to_string(n) + " bytes"; }

}  // namespace

SnapshotStore::SnapshotStore(SnapshotStoreOptions options) : options_(options) {
  MUSTER_CHECK(options_.keep_steps >= 1) << "SnapshotStore: keep_steps must be >= 1";
  pool_->max_bytes = options_.memory_limit / 4;
}

void SnapshotStore::BufferPool::Give(std::string&& b) {
  std::vector<std::string> dropped;  // freed outside the lock
  std::lock_guard<std::mutex> l(mu);
  if (b.capacity() < (64u << 10) || b.capacity() > max_bytes) {
    dropped.push_back(std::move(b));
    return;
  }
  // Full: the oldest buffers go first, so the pool follows the sizes frames have now (a pool
  // kept full of buffers a byte too small for today's frames would never be used again).
  while (!buffers.empty() &&
         (buffers.size() >= kPooledBuffers || bytes + b.capacity() > max_bytes)) {
    bytes -= buffers.front().capacity();
    dropped.push_back(std::move(buffers.front()));
    buffers.erase(buffers.begin());
  }
  bytes += b.capacity();
  buffers.push_back(std::move(b));
}

uint64_t SnapshotStore::BufferCapacity(uint64_t n) {
  // Room for frames a little larger than this one (a rank's payload varies by a few bytes of
  // metadata from step to step), in whole pages.
  constexpr uint64_t kPage = 4096;
  const uint64_t room = std::max<uint64_t>(kPage, n / 256);
  if (n > UINT64_MAX - room - kPage) return n;
  return (n + room + kPage - 1) / kPage * kPage;
}

std::string SnapshotStore::TakeBuffer(uint64_t n) {
  std::string b;
  {
    std::lock_guard<std::mutex> l(pool_->mu);
    // The smallest that holds n.
    size_t best = pool_->buffers.size();
    for (size_t i = 0; i < pool_->buffers.size(); ++i) {
      if (pool_->buffers[i].capacity() >= n &&
          (best == pool_->buffers.size() ||
           pool_->buffers[i].capacity() < pool_->buffers[best].capacity())) {
        best = i;
      }
    }
    if (best < pool_->buffers.size()) {
      b = std::move(pool_->buffers[best]);
      pool_->buffers.erase(pool_->buffers.begin() + static_cast<std::ptrdiff_t>(best));
      pool_->bytes -= b.capacity();
    }
  }
  // None large enough: a new one with some room, so the next frames fit it when it is pooled.
  // (No more than the pool takes back, for a frame the pool could hold at all.)
  if (b.capacity() < n && n >= (64u << 10)) {
    uint64_t cap = BufferCapacity(n);
    if (n <= pool_->max_bytes) cap = std::min(cap, pool_->max_bytes);
    b.reserve(cap);
  }
  // Shrinking writes nothing; growing within the capacity zero-fills only the gap.
  b.resize(n);
  return b;
}

Status SnapshotStore::ReserveLocked(const std::string& job, JobState& js, int32_t rank,
                                    uint64_t per_step) {
  RankSlot& slot = js.ranks[rank];
  uint64_t want = per_step * static_cast<uint64_t>(options_.keep_steps);
  if (per_step != 0 && want / per_step != static_cast<uint64_t>(options_.keep_steps)) {
    want = UINT64_MAX;
  }
  if (want <= slot.reserved) return Status::Ok();
  uint64_t others = reserved_ - slot.reserved;
  if (want > options_.memory_limit || others > options_.memory_limit - want) {
    if (slot.reserved == 0 && slot.frames.empty()) js.ranks.erase(rank);
    return FailedPreconditionError(
        "snapshots of job " + job + " do not fit in this agent's snapshot memory: rank " +
        std::to_string(rank) + " needs " + std::to_string(options_.keep_steps) + " x " +
        Bytes(per_step) + ", " + Bytes(others) + " are reserved already, and the limit is " +
        Bytes(options_.memory_limit) +
        " (raise the agent's --snapshot-memory or snapshot less often)");
  }
  extra_ -= Extra(slot);
  reserved_ = others + want;
  slot.reserved = want;
  extra_ += Extra(slot);
  DropExtrasLocked(0);  // the window gives back the room a reservation takes
  return Status::Ok();
}

Status SnapshotStore::Reserve(const std::string& job, int32_t rank, uint64_t bytes_per_step) {
  Lock lock(*this);
  return ReserveLocked(job, jobs_[job], rank, bytes_per_step);
}

void SnapshotStore::EraseLocked(RankSlot& slot, int64_t step) {
  auto it = slot.frames.find(step);
  if (it == slot.frames.end()) return;
  const uint64_t size = it->second->payload.size();
  extra_ -= Extra(slot);
  used_ -= size;
  slot.used -= size;
  dropped_.push_back(std::move(it->second));  // freed once mu_ is released (Lock)
  slot.frames.erase(it);
  extra_ += Extra(slot);
}

bool SnapshotStore::PinnedLocked(const JobState& js, const checkpoint::SnapshotFrame& f) const {
  auto is = [&](const Pin& p) {
    return p.step >= 0 && f.key.step == p.step && f.key.attempt == p.attempt;
  };
  return is(js.kept) || (options_.keep_steps >= 3 && is(js.candidate));
}

bool SnapshotStore::DropOldestLocked(const JobState& js, RankSlot& slot) {
  if (slot.frames.size() < 2) return false;  // the newest frame always stays
  const int64_t newest = slot.frames.rbegin()->first;
  // The complete step is kept unless a kept pin covers a frame of this rank (see the rules).
  auto k = js.kept.step >= 0 ? slot.frames.find(js.kept.step) : slot.frames.end();
  const bool kept_here = k != slot.frames.end() && k->second->key.attempt == js.kept.attempt;
  const int64_t complete = options_.keep_steps >= 2 && !kept_here ? js.complete_step : -1;
  for (const auto& [step, f] : slot.frames) {
    if (step == newest) break;
    if (step == complete || PinnedLocked(js, *f)) continue;
    EraseLocked(slot, step);
    return true;
  }
  return false;
}

void SnapshotStore::DropExtrasLocked(uint64_t room) {
  const uint64_t limit = options_.memory_limit;
  for (auto& [job, js] : jobs_) {
    for (auto& [rank, slot] : js.ranks) {
      while (extra_ > 0 && reserved_ + extra_ + room > limit && Extra(slot) > 0) {
        if (!DropOldestLocked(js, slot)) break;
      }
    }
  }
}

void SnapshotStore::UpdateCompleteLocked(JobState& js) {
  js.complete_step = -1;
  auto has = [&](const RankSlot& slot, int64_t step) {
    auto it = slot.frames.find(step);
    return it != slot.frames.end() && it->second->key.attempt == js.newest_attempt;
  };
  std::vector<const RankSlot*> slots;  // the ranks with a frame of the newest attempt
  for (const auto& [rank, slot] : js.ranks) {
    for (const auto& [step, f] : slot.frames) {
      if (f->key.attempt == js.newest_attempt) {
        slots.push_back(&slot);
        break;
      }
    }
  }
  if (slots.empty()) return;
  for (auto it = slots[0]->frames.rbegin(); it != slots[0]->frames.rend(); ++it) {
    if (it->second->key.attempt != js.newest_attempt) continue;
    bool all = true;
    for (const RankSlot* other : slots) all = all && has(*other, it->first);
    if (all) {
      js.complete_step = it->first;
      return;
    }
  }
}

Status SnapshotStore::Put(checkpoint::SnapshotFrame frame) {
  if (checkpoint::Xxh3(frame.payload.data(), frame.payload.size()) != frame.payload_xxh3) {
    return DataLossError("snapshot of job " + frame.key.job + " rank " +
                         std::to_string(frame.key.rank) + " step " +
                         std::to_string(frame.key.step) + " fails its xxh3 checksum");
  }
  return PutDecoded(std::move(frame));
}

Status SnapshotStore::PutDecoded(checkpoint::SnapshotFrame frame,
                                 std::shared_ptr<const checkpoint::SnapshotFrame>* held) {
  const checkpoint::SnapshotKey key = frame.key;
  Lock lock(*this);
  JobState& js = jobs_[key.job];
  Status s = PutLocked(js, std::move(frame), held);
  if (!s.ok() && js.ranks.empty()) jobs_.erase(key.job);
  if (s.ok()) put_.notify_all();
  return s;
}

std::vector<std::shared_ptr<const checkpoint::SnapshotFrame>> SnapshotStore::FramesAt(
    const std::string& job, int32_t attempt, int64_t step, int32_t for_rank,
    std::chrono::steady_clock::time_point wait_until) const {
  std::vector<std::shared_ptr<const checkpoint::SnapshotFrame>> out;
  std::unique_lock<std::mutex> l(mu_);
  for (bool last = false;; last = put_.wait_until(l, wait_until) == std::cv_status::timeout) {
    out.clear();
    auto j = jobs_.find(job);
    if (j == jobs_.end()) return out;
    bool coming = false;  // another rank's frame of an older step is held
    for (const auto& [rank, slot] : j->second.ranks) {
      auto f = slot.frames.find(step);
      if (f != slot.frames.end() && f->second->key.attempt == attempt) {
        out.push_back(f->second);
      } else if (rank != for_rank && !slot.frames.empty() && slot.frames.begin()->first < step) {
        coming = true;
      }
    }
    if (!out.empty() || !coming || last) return out;
  }
}

Status SnapshotStore::PutLocked(JobState& js, checkpoint::SnapshotFrame frame,
                                std::shared_ptr<const checkpoint::SnapshotFrame>* held) {
  const checkpoint::SnapshotKey key = frame.key;
  if (key.attempt < js.newest_attempt) {
    return AbortedError("snapshot of job " + key.job + " attempt " + std::to_string(key.attempt) +
                        " is stale: attempt " + std::to_string(js.newest_attempt) +
                        " has snapshots here");
  }
  js.newest_attempt = key.attempt;
  MUSTER_RETURN_IF_ERROR(ReserveLocked(key.job, js, key.rank, frame.payload.size()));
  RankSlot& slot = js.ranks[key.rank];
  // A resumed attempt overwrites what its predecessor saved at or past this step.
  for (auto it = slot.frames.lower_bound(key.step); it != slot.frames.end();) {
    const int64_t step = it->first;
    const bool drop = it->second->key.attempt < key.attempt || step == key.step;
    ++it;
    if (drop) EraseLocked(slot, step);
  }
  const uint64_t size = frame.payload.size();
  extra_ -= Extra(slot);
  used_ += size;
  slot.used += size;
  // When the last holder lets go of the frame, its payload goes back to the pool (TakeBuffer).
  std::shared_ptr<const checkpoint::SnapshotFrame> kept(
      new checkpoint::SnapshotFrame(std::move(frame)),
      [pool = pool_](const checkpoint::SnapshotFrame* f) {
        // Allocated non-const just above: taking its payload back is allowed.
        pool->Give(std::move(const_cast<checkpoint::SnapshotFrame*>(f)->payload));
        delete f;
      });
  slot.frames[key.step] = kept;
  extra_ += Extra(slot);
  UpdateCompleteLocked(js);
  // The reserved steps, the window while unreserved memory allows; never the pinned steps or
  // the complete step (see the rules; with a single reserved step only the newest one).
  const size_t keep = static_cast<size_t>(options_.keep_steps);
  const size_t window = std::max(keep, static_cast<size_t>(std::max(0, options_.window_steps)));
  while (slot.frames.size() > keep &&
         (slot.frames.size() > window || reserved_ + extra_ > options_.memory_limit)) {
    if (!DropOldestLocked(js, slot)) break;
  }
  DropExtrasLocked(0);
  if (held != nullptr) {
    // Not when the rules dropped it at once (an old step arriving late).
    auto it = slot.frames.find(key.step);
    *held = it != slot.frames.end() && it->second == kept ? kept : nullptr;
  }
  return Status::Ok();
}

StatusOr<std::shared_ptr<const checkpoint::SnapshotFrame>> SnapshotStore::Get(
    const std::string& job, int32_t rank, int64_t step) {
  std::shared_ptr<const checkpoint::SnapshotFrame> f;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto j = jobs_.find(job);
    if (j != jobs_.end()) {
      auto r = j->second.ranks.find(rank);
      if (r != j->second.ranks.end()) {
        auto s = r->second.frames.find(step);
        if (s != r->second.frames.end()) f = s->second;
      }
    }
  }
  std::string what =
      "snapshot of job " + job + " rank " + std::to_string(rank) + " step " + std::to_string(step);
  if (!f) return NotFoundError(what + " is not held by this agent");
  if (checkpoint::Xxh3(f->payload.data(), f->payload.size()) != f->payload_xxh3) {
    Lock lock(*this);
    auto j = jobs_.find(job);
    if (j != jobs_.end()) {
      auto r = j->second.ranks.find(rank);
      if (r != j->second.ranks.end()) {
        auto s = r->second.frames.find(step);
        if (s != r->second.frames.end() && s->second == f) {
          EraseLocked(r->second, step);
          UpdateCompleteLocked(j->second);
        }
      }
    }
    return DataLossError(what + " no longer matches its xxh3 checksum; dropped");
  }
  return f;
}

std::vector<HeldSnapshot> SnapshotStore::Held(const std::string& job) const {
  std::vector<HeldSnapshot> out;
  std::lock_guard<std::mutex> lock(mu_);
  auto j = jobs_.find(job);
  if (j == jobs_.end()) return out;
  for (const auto& [rank, slot] : j->second.ranks) {
    for (const auto& [step, f] : slot.frames) {
      out.push_back({.rank = rank,
                     .world_size = f->key.world_size,
                     .attempt = f->key.attempt,
                     .step = step,
                     .bytes = f->payload.size(),
                     .pinned = PinnedLocked(j->second, *f)});
    }
  }
  return out;
}

std::vector<std::string> SnapshotStore::Jobs() const {
  std::vector<std::string> out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [job, js] : jobs_) out.push_back(job);
  return out;
}

void SnapshotStore::DropJob(const std::string& job) {
  Lock lock(*this);
  auto j = jobs_.find(job);
  if (j == jobs_.end()) return;
  for (auto& [rank, slot] : j->second.ranks) {
    extra_ -= Extra(slot);
    reserved_ -= slot.reserved;
    used_ -= slot.used;
    for (auto& [step, f] : slot.frames) dropped_.push_back(std::move(f));
  }
  jobs_.erase(j);
}

bool SnapshotStore::SetPins(const std::string& job, Pin kept, Pin candidate) {
  std::lock_guard<std::mutex> lock(mu_);
  auto j = jobs_.find(job);
  if (j == jobs_.end()) return false;
  j->second.kept = kept.step >= 0 ? kept : Pin{};
  j->second.candidate = candidate.step >= 0 ? candidate : Pin{};
  return true;
}

uint64_t SnapshotStore::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

uint64_t SnapshotStore::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
}

uint64_t SnapshotStore::extra_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return extra_;
}

int64_t SnapshotStore::complete_step(const std::string& job) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto j = jobs_.find(job);
  return j == jobs_.end() ? -1 : j->second.complete_step;
}

}  // namespace muster::node_agent
