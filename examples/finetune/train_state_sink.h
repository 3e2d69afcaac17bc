#pragma once

// TrainStateSink: the seam between the fine-tune trainer and checkpoint storage. A checkpoint is a
// set of named tensors plus opaque metadata (the trainer's JSON), committed atomically under a
// step number. The sharded muster::checkpoint::Checkpointer plugs in behind it
// (checkpointer_state_sink.h).
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

class TrainStateSink {
 public:
  virtual ~TrainStateSink() = default;
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

// xxh3-64 of every tensor's name, dtype, shape and bytes, in order, as 16 hex digits. Two
// models have the same digest exactly when their parameters are bit-identical.
std::string DigestTensors(const NamedTensors& tensors);

}  // namespace muster::finetune
