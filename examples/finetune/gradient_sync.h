#pragma once

// GradientSync: the seam between the fine-tune trainer and the collectives layer. The trainer
// only needs "sum this flat buffer across the ranks of the job", plus who it is. Two
// implementations: LocalGradientSync (world size 1, the identity) and, once muster::collectives
// is built, one that forwards to a collectives::Communicator (see CreateGradientSync()).
//
// Thread-safety: an instance is used by one training thread.

#include <torch/torch.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "collectives/communicator.h"
#include "common/status.h"

namespace muster::finetune {

class GradientSync {
 public:
  virtual ~GradientSync() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Sums `flat` across all ranks, in place. REQUIRES: `flat` is contiguous float32, the same
  // number of elements on every rank, and every rank calls in the same order.
  virtual Status AllreduceSum(torch::Tensor& flat) = 0;
};

// The world-size-1 implementation: the sum over one rank is the buffer itself.
class LocalGradientSync final : public GradientSync {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  Status AllreduceSum(torch::Tensor& flat) override;
};

// Averages the gradients of `params` across ranks, packing them into buckets of about
// `bucket_bytes` so each collective moves a reasonable amount of data (as DDP does). Parameters
// without a gradient contribute zeros. Buckets are formed in `params` order, so every rank
// packs identical buckets.
Status AllreduceGradients(GradientSync& sync, const std::vector<torch::Tensor>& params,
                          size_t bucket_bytes);

// Forwards to a muster::collectives::Communicator (Gloo on CPU, NCCL on GPU). Tensors on a CUDA
// device go to NCCL as they are; for a host backend they are staged through host memory.
class CommunicatorGradientSync final : public GradientSync {
 public:
  explicit CommunicatorGradientSync(std::unique_ptr<collectives::Communicator> comm)
      : comm_(std::move(comm)) {}
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->size(); }
  Status AllreduceSum(torch::Tensor& flat) override;

 private:
  std::unique_ptr<collectives::Communicator> comm_;
};

}  // namespace muster::finetune
