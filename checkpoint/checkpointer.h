#pragma once

// Checkpointer: sharded, asynchronous, crash-consistent checkpoints of named tensors.
//
// Every rank of a job makes one Checkpointer over the job's checkpoint directory and calls
// Save(step, state) with the same step and the same set of tensors (each rank passing its own
// slice of sharded tensors). Save snapshots the state into reused host staging memory (pinned,
// device-to-host, for CUDA tensors) and returns; a background thread writes this rank's shard,
// fsyncs it, and reports its checksums through the rendezvous RendezvousStore; rank 0 then writes
// the MANIFEST, renames step-N.tmp to step-N, fsyncs the parent and updates LATEST (the format and
// the commit protocol: docs/checkpoint-format.md). One save is in flight at a time: a second
// Save first waits for the previous one.
//
// A training loop:
//
//   auto ck = *Checkpointer::FromEnv(store);              // MUSTER_CHECKPOINT_DIR, RANK, ...
//   if (auto step = ck->ResumeStep(); step.ok()) {         // MUSTER_RESUME_STEP or LATEST
//     MUSTER_RETURN_IF_ERROR(ck->Restore(*step, {RestoreRequest::RowShard("w", DType::kF32,
//         {rows, cols}, my_row0, my_rows, w_ptr)}));
//     auto m = ck->ReadManifest(*step);  // m->UserMetadata(): data position, RNG state
//   }
//   for (...) {
//     train();
//     if (step % 100 == 0) {
//       SaveState s;
//       s.tensors.push_back(TensorRef::RowShard("w", DType::kF32, {rows, cols}, my_row0,
//                                               my_rows, w_ptr, MemoryKind::kCuda));
//       s.metadata = SerializeDataPosition();
//       MUSTER_RETURN_IF_ERROR(ck->Save(step, s));   // returns after the snapshot
//     }
//   }
//   MUSTER_RETURN_IF_ERROR(ck->Wait());              // the last save is committed
//
// Thread-safety: Save, Wait, Restore and the read accessors may be called from any thread;
// Save calls are serialized with each other internally, and so are Restore calls. The tensors
// passed to Save must not change until Save returns (not until the commit: that is what staging is
// for).

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/device_copier.h"
#include "checkpoint/manifest.h"
#include "checkpoint/staging.h"
#include "checkpoint/volume.h"
#include "collectives/rendezvous_store.h"
#include "common/rank_env.h"

namespace muster::checkpoint {

// One tensor (or this rank's slice of it) to save.
struct TensorRef {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;    // the global shape
  std::vector<int64_t> offsets;  // this rank's slice: empty means the whole tensor
  std::vector<int64_t> lengths;
  // Every rank holds the same whole tensor; it is stored once (by one rank).
  bool replicated = false;
  const void* data = nullptr;  // row-major, contiguous, `lengths` (or `shape`) elements
  MemoryKind memory = MemoryKind::kHost;

  static TensorRef Replicated(std::string name, DType dtype, std::vector<int64_t> shape,
                              const void* data, MemoryKind memory = MemoryKind::kHost);
  // Rows [row_offset, row_offset + rows) of dimension 0, all of the other dimensions.
  static TensorRef RowShard(std::string name, DType dtype, std::vector<int64_t> shape,
                            int64_t row_offset, int64_t rows, const void* data,
                            MemoryKind memory = MemoryKind::kHost);
};

struct SaveState {
  std::vector<TensorRef> tensors;
  std::string metadata;  // opaque: data position, RNG state; stored per rank in the manifest
};

// A slice of a saved tensor that this rank wants, written row-major into `data`. The slice may
// cut the stored shards any way; only the byte ranges that overlap it are read.
struct RestoreRequest {
  std::string name;
  DType dtype = DType::kF32;     // must match the stored dtype
  std::vector<int64_t> offsets;  // empty: the whole tensor
  std::vector<int64_t> lengths;
  void* data = nullptr;
  MemoryKind memory = MemoryKind::kHost;
  // The bytes `data` holds. A whole-tensor request takes its size from the stored tensor, which
  // comes from a volume or a peer (untrusted): with a capacity, a stored tensor of any other
  // size is refused (InvalidArgument naming both sizes) before a byte is written; a box request
  // must fit in it. 0: unchecked (the caller sized `data` from the same MANIFEST or index).
  uint64_t capacity = 0;

  // Prefer the overload with `capacity` whenever the caller knows its buffer's size.
  static RestoreRequest Whole(std::string name, DType dtype, void* data,
                              MemoryKind memory = MemoryKind::kHost);
  static RestoreRequest Whole(std::string name, DType dtype, void* data, uint64_t capacity,
                              MemoryKind memory = MemoryKind::kHost);
  // `shape` is the global shape (rows [row_offset, row_offset + rows) of dimension 0).
  static RestoreRequest RowShard(std::string name, DType dtype, std::vector<int64_t> shape,
                                 int64_t row_offset, int64_t rows, void* data,
                                 MemoryKind memory = MemoryKind::kHost);
};

// InvalidArgument (naming `what`) when `req` has a capacity that `bytes`, the size of the
// stored data it asks for, does not fit: for a whole-tensor request (`whole`) any other size,
// for a box a larger one. Shared by the volume and the snapshot restores.
Status CheckRestoreCapacity(const RestoreRequest& req, bool whole, uint64_t bytes,
                            const std::string& what);

struct CheckpointerOptions {
  std::string dir;           // the job's checkpoint directory (holds LATEST)
  Volume* volume = nullptr;  // default: LocalVolume(); must outlive the Checkpointer
  int rank = 0;
  int world_size = 1;
  // The rendezvous store the ranks commit through; required when world_size > 1; must outlive
  // the Checkpointer. Keys are "<store_prefix>/<n>/..." for the n-th save of this attempt.
  collectives::RendezvousStore* store = nullptr;
  std::string store_prefix = "ckpt";
  std::chrono::milliseconds commit_timeout{std::chrono::minutes(10)};
  // After each commit, rank 0 applies this (keep_last <= 0: keep everything).
  RetentionPolicy retention{.keep_last = 0, .keep_every = 0};
  int io_threads = 4;  // parallel writers / readers per rank
  // Threads that copy host tensors into staging (1: a plain memcpy; ranks of one node already
  // copy in parallel with each other).
  int snapshot_threads = 1;
  uint64_t block_size = 1 << 20;    // checksum granularity
  uint64_t write_chunk = 32 << 20;  // bytes per write call
  bool direct_io = true;  // O_DIRECT for shard writes and restore reads where the FS allows
  // Start writing each chunk as soon as the snapshot has copied it, so the save overlaps the
  // stall. Off by default: on the 2-core build machine the writers' hashing competed with the
  // copy (stall 4.9x a memcpy with it, 1.04x without; docs/benchmarks.md). Worth turning on
  // where cores are plentiful or tensors are on the GPU (the copy is DMA).
  bool overlap_snapshot = false;
  // Restore reads into a ring of this many staging slots of write_chunk bytes each (pinned
  // when CUDA tensors are restored), so reads overlap the copies out of earlier slots; 0 means
  // io_threads, plus 2 when CUDA tensors are restored. The ring is kept across restores.
  int restore_slots = 0;
  // Moves restored bytes from the ring into MemoryKind::kCuda destinations. Null: the CUDA
  // runtime (cudaMemcpyAsync on a stream of the device current on the Restore caller's
  // thread). Tests pass a fake device; it must outlive the Checkpointer.
  DeviceCopier* device_copier = nullptr;
  // The step ResumeStep() answers with; nullopt: the newest committed one (FromEnv sets it
  // from MUSTER_RESUME_STEP).
  std::optional<int64_t> resume_step = std::nullopt;
  // Called on rank 0's writer thread once each step is committed (durable, LATEST updated),
  // before the other ranks' Wait() returns. FromEnv, when the rank has a control channel
  // (MUSTER_CONTROL_FD), sets it to announce the commit to the agent (common/control_channel.h),
  // so a program that never prints `MUSTER_CHECKPOINT step=N` is still catalogued. `seconds`:
  // from the Save call (once the previous save was done) to the commit, the commit latency the
  // announcement carries (`seconds=S`).
  std::function<void(int64_t step, double seconds)> on_commit = nullptr;
};

class Checkpointer {
 public:
  // InvalidArgument for a bad rank/world size or empty dir; FailedPrecondition when
  // world_size > 1 and no store is given.
  static StatusOr<std::unique_ptr<Checkpointer>> Create(CheckpointerOptions options);

  // From the env contract (common/rank_env.h): MUSTER_CHECKPOINT_DIR (required; else
  // FailedPrecondition), RANK and WORLD_SIZE (or OMPI_COMM_WORLD_RANK/SIZE; default 0 and 1),
  // MUSTER_RESUME_STEP, and MUSTER_CONTROL_FD (commits are announced there: on_commit). `store` is
  // the job attempt's rendezvous store (may be null at world size 1). `base` supplies the other
  // options. A malformed variable is InvalidArgument.
  static StatusOr<std::unique_ptr<Checkpointer>> FromEnv(collectives::RendezvousStore* store,
                                                         CheckpointerOptions base = {});
  // The same from an already parsed env (runtime::JobContext passes its own).
  static StatusOr<std::unique_ptr<Checkpointer>> FromEnv(const RankEnv& env,
                                                         collectives::RendezvousStore* store,
                                                         CheckpointerOptions base = {});

  // Waits for the in-flight save, then stops the background thread.
  ~Checkpointer();

  // Snapshots `state` and starts saving it as `step` in the background. Returns once the
  // snapshot is taken: errors in the state itself (InvalidArgument) or in copying it. Errors of
  // writing and committing are reported by Wait() (and logged).
  // REQUIRES: every rank calls Save with the same step and the same tensor names, shapes and
  // replicated flags, in the same order of calls.
  Status Save(int64_t step, const SaveState& state);

  // Waits for the in-flight save; returns its outcome (OK once the step is committed and
  // visible to LatestStep on every rank). OK when nothing was saved.
  Status Wait();

  // True while a save is in flight (Wait() would block); never blocks. Lets a training loop
  // announce a commit as soon as it lands instead of at its next Save.
  bool Saving();

  // The newest committed step in the directory; NotFound if none.
  StatusOr<int64_t> LatestStep();
  // options().resume_step (MUSTER_RESUME_STEP under FromEnv) when set, else LatestStep().
  StatusOr<int64_t> ResumeStep();

  StatusOr<Manifest> ReadManifest(int64_t step);

  // Reads the requested slices of `step` (checkpoint/restore_pipeline.h: large aligned reads
  // into the staging ring, checked there, then copied out; device copies overlap the next
  // reads). Every block read is checked before its bytes reach a CUDA destination: DataLoss
  // names the tensor and step. The destinations hold the bytes when Restore returns OK. NotFound
  // for a missing step or tensor; InvalidArgument for a slice outside the tensor or a dtype
  // mismatch.
  Status Restore(int64_t step, const std::vector<RestoreRequest>& requests);

  const CheckpointerOptions& options() const { return options_; }
  // Bytes this rank wrote in its last completed save.
  uint64_t last_shard_bytes() const { return last_shard_bytes_; }

 private:
  struct Piece;
  struct Job;
  explicit Checkpointer(CheckpointerOptions options);
  void WorkerLoop();
  Status RunJob(Job& job);
  Status WriteShard(Job& job, ShardEntry* shard);
  Status Commit(Job& job, const std::vector<std::string>& parts);

  CheckpointerOptions options_;
  Volume* volume_;
  StagingBuffer staging_;
  int64_t save_seq_ = 0;
  uint64_t last_shard_bytes_ = 0;

  std::mutex save_mu_;  // serializes Save callers

  std::mutex restore_mu_;       // serializes Restore callers over the ring and the copier
  StagingBuffer restore_ring_;  // GUARDED_BY(restore_mu_)
  std::unique_ptr<DeviceCopier> cuda_copier_;  // GUARDED_BY(restore_mu_)

  std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<Job> job_;  // GUARDED_BY(mu_): the pending or running job
  bool busy_ = false;         // GUARDED_BY(mu_)
  bool stop_ = false;         // GUARDED_BY(mu_)
  Status last_status_;        // GUARDED_BY(mu_)
  std::thread worker_;
};

}  // namespace muster::checkpoint
