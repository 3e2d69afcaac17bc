#pragma once

// StateStore: the seam between the fine-tune trainer and checkpoint storage. A checkpoint is a
// set of named tensors plus opaque metadata (the trainer's JSON), committed atomically under a
// step number. FileStateStore is a single-writer local implementation; the sharded
// muster::checkpoint::Checkpointer plugs in behind the same interface.
//
// On-disk layout of FileStateStore (mirrors docs/architecture.md's checkpoint layout):
//
//   <dir>/step-000000100/tensors.bin   named tensors, then an xxh3-64 of every preceding byte
//   <dir>/step-000000100/METADATA      the caller's metadata, verbatim
//   <dir>/LATEST                       "100\n": the newest committed step
//
// A step directory is written as step-N.tmp, fsynced, renamed and its parent fsynced; LATEST is
// replaced by temp + fsync + rename. A directory without the rename never counts.
//
// Thread-safety: one instance per process, used by one thread.

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace muster::finetune {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct SavedState {
  int64_t step = 0;
  NamedTensors tensors;  // on the CPU, in the order they were saved
  std::string metadata;
};

class StateStore {
 public:
  virtual ~StateStore() = default;
  // Starts committing `tensors` and `metadata` as checkpoint `step`. Every rank calls it;
  // tensors are replicated across data-parallel ranks, so an implementation may store them
  // once. May return as soon as the tensors are copied (an asynchronous save): the caller may
  // then change them. The commit's outcome is reported by this call or by the next Wait().
  virtual Status Save(int64_t step, const NamedTensors& tensors, const std::string& metadata) = 0;
  // Returns once the last Save is committed (durable, visible to LatestStep()), or its error.
  virtual Status Wait() = 0;
  // True while the last Save is still being committed (Wait() would block); never blocks.
  virtual bool Saving() { return false; }
  // The newest committed step, or nullopt when there is none.
  virtual StatusOr<std::optional<int64_t>> LatestStep() = 0;
  // Reads checkpoint `step`; NotFound when it was never committed, DataLoss when it is corrupt.
  virtual StatusOr<SavedState> Restore(int64_t step) = 0;
};

class FileStateStore final : public StateStore {
 public:
  // Rank `rank` of the job; only rank 0 writes.
  FileStateStore(std::filesystem::path dir, int rank) : dir_(std::move(dir)), rank_(rank) {}

  Status Save(int64_t step, const NamedTensors& tensors, const std::string& metadata) override;
  Status Wait() override { return Status::Ok(); }  // Save is synchronous
  StatusOr<std::optional<int64_t>> LatestStep() override;
  StatusOr<SavedState> Restore(int64_t step) override;

  std::filesystem::path StepDir(int64_t step) const;

 private:
  std::filesystem::path dir_;
  int rank_;
};

// Serialises named tensors (float32/float64/int64/uint8/bfloat16/float16, any shape) with a
// trailing checksum, and parses them back. Exposed for tests and tools.
std::string EncodeTensors(const NamedTensors& tensors);
StatusOr<NamedTensors> DecodeTensors(const std::string& bytes);

// xxh3-64 of every tensor's name, dtype, shape and bytes, in order, as 16 hex digits. Two
// models have the same digest exactly when their parameters are bit-identical.
std::string DigestTensors(const NamedTensors& tensors);

}  // namespace muster::finetune
