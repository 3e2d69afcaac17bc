#pragma once

// CheckpointerStateSink: the TrainStateSink seam over muster::checkpoint::Checkpointer, the
// project's sharded asynchronous checkpoints (format: docs/checkpoint-format.md). Every tensor
// is saved as replicated (data-parallel ranks hold identical copies; the Checkpointer stores it
// once); the trainer's metadata rides in the manifest. Save returns after the snapshot into
// staging memory, so the training stall is the copy alone; Wait() returns after the commit.
//
// Thread-safety: as Checkpointer (one training thread calls it).

#include <memory>

#include "checkpoint/checkpointer.h"
#include "examples/finetune/train_state_sink.h"

namespace muster::finetune {

// The checkpoint dtype of a torch dtype; InvalidArgument for one checkpoints cannot hold.
StatusOr<checkpoint::DType> ToCheckpointDType(torch::ScalarType t);

class CheckpointerStateSink final : public TrainStateSink {
 public:
  explicit CheckpointerStateSink(std::unique_ptr<checkpoint::Checkpointer> ck)
      : ck_(std::move(ck)) {}

  // Opens `dir` for rank `rank` of `world_size`. `store` (the job attempt's rendezvous store)
  // is required when world_size > 1 and must outlive the result.
  static StatusOr<std::unique_ptr<CheckpointerStateSink>> Open(const std::string& dir, int rank,
                                                               int world_size,
                                                               collectives::RendezvousStore* store);

  Status Save(int64_t step, const NamedTensors& tensors, const std::string& metadata) override;
  Status Wait() override { return ck_->Wait(); }
  bool Saving() override { return ck_->Saving(); }
  StatusOr<std::optional<int64_t>> LatestStep() override;
  StatusOr<SavedState> Restore(int64_t step) override;

 private:
  std::unique_ptr<checkpoint::Checkpointer> ck_;
};

}  // namespace muster::finetune
