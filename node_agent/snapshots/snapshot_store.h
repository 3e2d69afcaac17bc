#pragma once

// SnapshotStore: the in-memory peer snapshots one agent holds, bounded by a memory limit.
//
// Ranks that opted in (the job spec's checkpoint.snapshot_every_steps) hand their checkpoint
// state for a step to their own node's agent as a SnapshotFrame (checkpoint/snapshot_frame.h);
// the agent also keeps the frames a peer agent on another node forwards to it. When a node is
// lost, the coordinator resumes the gang from the newest step that the surviving agents' frames
// cover for every rank (coordinator/snapshot_resume.h), and each rank restores from a copy here.
//
// Rules:
//   - Bounded, never swapped out to disk: every byte held is counted against `memory_limit`.
//     A (job, rank) reserves keep_steps x its frame size when its first frame arrives (or
//     through Reserve, ahead of time); a reservation that would pass the limit is refused with
//     FailedPrecondition naming the job, the rank, the bytes needed and the limit, and nothing
//     is kept for it. A later frame larger than the reservation grows it only if the limit
//     allows, else it is refused the same way.
//   - Checksummed: a frame is kept only once its payload matches its xxh3 (Put), and Get checks
//     it again before handing it out, so a bit flipped in memory is DataLoss, never restored.
//   - Per (job, rank), the newest keep_steps steps are kept, and up to window_steps of the
//     newest while memory that no reservation holds allows (a reservation that needs that room
//     takes it back: the oldest such extra frames go first). A frame of a newer attempt first
//     drops that rank's frames of older attempts at the same or later steps (a resumed gang
//     overwrites the steps that its predecessor saved past the resume point).
//   - Coordinated retention: the newest step at which this store holds a frame of every rank it
//     holds frames of (of the job's newest attempt here) is the job's complete step, and its
//     frames are never the ones dropped to make room, until a newer step is complete. An agent
//     holds its own ranks' frames, which arrive every step, and copies of a peer node's ranks,
//     which arrive late and thinned when the network is slower than the steps
//     (peer_copy.h); without this its own ranks' frames would have moved past every step the
//     copies reached, and no step would be complete here. The window keeps the own ranks'
//     recent steps until the late copies catch up with one of them. With two nodes this makes
//     the survivor of either hold a complete set; with more, only each node's own set: the
//     nodes' complete steps differ, and after a loss the survivors may share none. Hence:
//   - Pins (SetPins; coordinator/snapshot_pin.h decides them from every agent's report): a
//     frame of the job's kept (step, attempt), and with keep_steps >= 3 of its candidate, is
//     never dropped to make room or by the window until SetPins replaces them (a newer attempt
//     that saves the same or a later step still replaces it, as above). Held reports such frames
//     `pinned`: the coordinator relies on that report. While a rank's kept frame is held, the
//     complete step is no longer kept for that rank (the kept pin covers it), so at most the
//     newest, the kept (or the complete) and the candidate frame are protected: keep_steps
//     (3 by default) reserves room for all three, and the memory bound holds.
//     The guarantee this gives, with the ring of copies (peer_copy.h), for any number of nodes:
//     once the coordinator has kept a step whose every rank's frame two agents report pinned,
//     those frames stay until the coordinator keeps a newer such step, so after the loss of any
//     one node the survivors hold a complete set at that step or newer, and the gang resumes
//     from it (or newer) rather than from the volume. Before the first such step (the first
//     heartbeats of an attempt, a new attempt until its first step is pinned, or copies lagging so
//     far that the agents never hold one step all at once) only the rule above holds.
//   - Frames of an attempt older than the newest one seen for the job are refused (Aborted).
//   - DropJob frees everything of a job (the job ended, or was cancelled).
//
// Thread-safety: every method is thread-safe (one mutex; Put copies nothing while holding it
// beyond moving the frame in).

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "checkpoint/snapshot_frame.h"
#include "common/status.h"

namespace muster::node_agent {

struct SnapshotStoreOptions {
  uint64_t memory_limit = 0;  // bytes of payload held at most (0: snapshots refused)
  // Per (job, rank), reserved; >= 1. 3: the newest, the pinned kept step and the candidate
  // (the rules); with 2 a candidate is not protected, so no step is ever kept under a pin.
  int keep_steps = 3;
  // Per (job, rank), the most steps kept in memory that no reservation holds (a value below
  // keep_steps means keep_steps).
  int window_steps = 8;
};

// One frame held, as agents report it to the coordinator.
struct HeldSnapshot {
  int32_t rank = 0;
  int32_t world_size = 0;
  int32_t attempt = 0;
  int64_t step = 0;
  uint64_t bytes = 0;
  bool pinned = false;  // kept under a pin until SetPins replaces it (see the rules)
};

// A (step, attempt) the coordinator pinned. step < 0: none.
struct SnapshotPin {
  int32_t attempt = 0;
  int64_t step = -1;
};

class SnapshotStore {
 public:
  // REQUIRES: options.keep_steps >= 1.
  explicit SnapshotStore(SnapshotStoreOptions options);

  // Reserves room for `rank` of `job` to keep keep_steps frames of `bytes_per_step` each.
  // FailedPrecondition when the limit would be passed (the message says by how much and what
  // else is reserved). A smaller reservation than the current one is a no-op.
  Status Reserve(const std::string& job, int32_t rank, uint64_t bytes_per_step);

  // Keeps `frame` (see the rules above). DataLoss for a payload that fails its checksum;
  // FailedPrecondition when it does not fit; Aborted for a stale attempt.
  Status Put(checkpoint::SnapshotFrame frame);
  // The same for a frame a decoder has just checked (checkpoint::DecodeSnapshot*: its payload
  // matched payload_xxh3 and has not been touched since), without hashing it again; `held`, when
  // given, is set to the frame as kept (null if the rules dropped it at once). REQUIRES: that
  // check; a frame of any other origin goes through Put.
  Status PutDecoded(checkpoint::SnapshotFrame frame,
                    std::shared_ptr<const checkpoint::SnapshotFrame>* held = nullptr);

  // The frame of `rank` of `job` at `step`, checked against its xxh3 again. NotFound when not
  // held; DataLoss when the bytes held no longer match (the frame is then dropped).
  StatusOr<std::shared_ptr<const checkpoint::SnapshotFrame>> Get(const std::string& job,
                                                                 int32_t rank, int64_t step);

  // The frames held of `job` at (`attempt`, `step`), of any rank: where a peer's deduplicated
  // put (data_channel.h) finds the chunks it does not need sent. When there is none yet but a
  // rank other than `for_rank` has a frame of the job at an older step (its frame of this step
  // is likely on its way: data-parallel ranks snapshot the same steps), waits for one until
  // `wait_until`. Not checked against their xxh3 here (the frame assembled from them is).
  std::vector<std::shared_ptr<const checkpoint::SnapshotFrame>> FramesAt(
      const std::string& job, int32_t attempt, int64_t step, int32_t for_rank,
      std::chrono::steady_clock::time_point wait_until) const;

  // A buffer of `n` bytes for a frame's payload that is about to be read in whole (its bytes are
  // unspecified: every one must be written before the frame is checked). It comes from the
  // payloads of frames this store has dropped when one is large enough, so that the next step's
  // frame reuses memory already mapped instead of faulting in and zero-filling fresh pages.
  // Those buffers are bounded (at most kPooledBuffers, a quarter of memory_limit in all; the
  // oldest go first when a newer one is given back). A new buffer is allocated with the room of
  // BufferCapacity(n), so that a frame a few bytes larger than this one still fits it.
  std::string TakeBuffer(uint64_t n);
  static constexpr size_t kPooledBuffers = 16;
  // n rounded up to whole pages with at least a page (n/256 for large n) to spare.
  static uint64_t BufferCapacity(uint64_t n);

  // Every frame held for `job`, by rank then step.
  std::vector<HeldSnapshot> Held(const std::string& job) const;
  // The jobs with anything held or reserved.
  std::vector<std::string> Jobs() const;

  // The coordinator's pins for `job` (see the rules), replacing the previous ones. false (and
  // nothing set) when nothing of the job is held or reserved here.
  bool SetPins(const std::string& job, SnapshotPin kept, SnapshotPin candidate);

  // Frees every frame, reservation and pin of `job`.
  void DropJob(const std::string& job);

  uint64_t used_bytes() const;
  uint64_t reserved_bytes() const;
  // Bytes held beyond the reservations (the window), which a reservation may take back.
  uint64_t extra_bytes() const;
  // The job's complete step here (see the rules), or -1.
  int64_t complete_step(const std::string& job) const;
  uint64_t memory_limit() const { return options_.memory_limit; }

 private:
  struct RankSlot {
    uint64_t reserved = 0;
    uint64_t used = 0;  // payload bytes of `frames`
    // By step; keep_steps entries, up to window_steps while unreserved memory allows.
    std::map<int64_t, std::shared_ptr<const checkpoint::SnapshotFrame>> frames;
  };
  using Pin = SnapshotPin;
  struct JobState {
    int32_t newest_attempt = 0;
    int64_t complete_step = -1;  // never dropped to make room (see the rules)
    Pin kept, candidate;         // SetPins
    std::map<int32_t, RankSlot> ranks;
  };

  // REQUIRES: mu_ held.
  Status ReserveLocked(const std::string& job, JobState& js, int32_t rank, uint64_t per_step);
  Status PutLocked(JobState& js, checkpoint::SnapshotFrame frame,
                   std::shared_ptr<const checkpoint::SnapshotFrame>* held);
  void EraseLocked(RankSlot& slot, int64_t step);
  // Bytes of `slot` beyond its reservation.
  static uint64_t Extra(const RankSlot& slot) {
    return slot.used > slot.reserved ? slot.used - slot.reserved : 0;
  }
  // `f` is covered by one of the job's pins (see the rules).
  bool PinnedLocked(const JobState& js, const checkpoint::SnapshotFrame& f) const;
  // Drops `slot`'s oldest frame that is neither its newest, pinned, nor at the job's complete
  // step while that is protected (see the rules); false when there is none.
  bool DropOldestLocked(const JobState& js, RankSlot& slot);
  // Drops extra frames (oldest first, any job) until reserved_ + extra_ + `room` fits the limit
  // or no extra frame is left.
  void DropExtrasLocked(uint64_t room);
  void UpdateCompleteLocked(JobState& js);

  // Holds mu_ and, when it is released, frees the frames dropped under it (dropped_) after
  // unlocking: freeing a large payload (munmap) takes a while, and a caller at SCHED_IDLE
  // (--snapshot-cpu background) preempted mid-free while holding mu_ would hold up every
  // normal-class caller, the heartbeat's Held() among them.
  class Lock {
   public:
    explicit Lock(SnapshotStore& store) : store_(store), lock_(store.mu_) {}
    // Members are destroyed after this body: freed_ (the dropped frames) once mu_ is released.
    ~Lock() {
      freed_.swap(store_.dropped_);
      lock_.unlock();
    }
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;

   private:
    SnapshotStore& store_;
    std::unique_lock<std::mutex> lock_;
    std::vector<std::shared_ptr<const checkpoint::SnapshotFrame>> freed_;
  };

  const SnapshotStoreOptions options_;
  // Payloads of dropped frames, for TakeBuffer. Shared with the deleter of every frame kept (a
  // frame may outlive the store in a forwarder's queue).
  struct BufferPool {
    std::mutex mu;
    std::vector<std::string> buffers;  // GUARDED_BY(mu)
    uint64_t bytes = 0;                // GUARDED_BY(mu): their capacities
    uint64_t max_bytes = 0;
    void Give(std::string&& b);
  };
  std::shared_ptr<BufferPool> pool_ = std::make_shared<BufferPool>();
  mutable std::mutex mu_;
  mutable std::condition_variable put_;  // notified after each frame kept (FramesAt)
  // Frames dropped under mu_, freed by the Lock that holds it once it is released.
  std::vector<std::shared_ptr<const checkpoint::SnapshotFrame>> dropped_;  // GUARDED_BY(mu_)
  std::map<std::string, JobState> jobs_;                                   // GUARDED_BY(mu_)
  uint64_t used_ = 0;                                                      // GUARDED_BY(mu_)
  uint64_t reserved_ = 0;                                                  // GUARDED_BY(mu_)
  uint64_t extra_ = 0;  // GUARDED_BY(mu_): the sum of every slot's Extra
};

}  // namespace muster::node_agent
