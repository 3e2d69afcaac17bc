#include "examples/finetune/gradient_sync.h"

#include <string>

namespace muster::finetune {

Status LocalGradientSync::AllreduceSum(torch::Tensor& flat) {
  if (!flat.is_contiguous() || flat.scalar_type() != torch::kFloat32) {
    return InvalidArgumentError("AllreduceSum needs a contiguous float32 tensor");
  }
  return Status::Ok();
}

namespace {

Status ReduceBucket(GradientSync& sync, const std::vector<torch::Tensor>& bucket) {
  std::vector<torch::Tensor> flats;
  flats.reserve(bucket.size());
  for (const auto& p : bucket) {
    if (p.grad().defined()) {
      flats.push_back(p.grad().reshape({-1}).to(torch::kFloat32));
    } else {
      flats.push_back(torch::zeros({p.numel()}, p.options().dtype(torch::kFloat32)));
    }
  }
  torch::Tensor flat = torch::cat(flats).contiguous();
  MUSTER_RETURN_IF_ERROR(sync.AllreduceSum(flat));
  if (sync.world_size() > 1) flat.div_(static_cast<double>(sync.world_size()));
  int64_t offset = 0;
  for (const auto& p : bucket) {
    torch::Tensor slice = flat.narrow(0, offset, p.numel()).view(p.sizes());
    offset += p.numel();
    if (p.grad().defined()) {
      p.mutable_grad().copy_(slice);
    } else {
      p.mutable_grad() = slice.to(p.scalar_type()).clone();
    }
  }
  return Status::Ok();
}

}  // namespace

Status AllreduceGradients(GradientSync& sync, const std::vector<torch::Tensor>& params,
                          size_t bucket_bytes) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> bucket;
  size_t bytes = 0;
  for (const auto& p : params) {
    bucket.push_back(p);
    bytes += static_cast<size_t>(p.numel()) * sizeof(float);
    if (bytes >= bucket_bytes) {
      MUSTER_RETURN_IF_ERROR(ReduceBucket(sync, bucket));
      bucket.clear();
      bytes = 0;
    }
  }
  if (!bucket.empty()) MUSTER_RETURN_IF_ERROR(ReduceBucket(sync, bucket));
  return Status::Ok();
}

StatusOr<std::unique_ptr<GradientSync>> CreateGradientSync(int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return InvalidArgumentError("bad RANK/WORLD_SIZE: rank " + std::to_string(rank) +
                                " of world size " + std::to_string(world_size));
  }
  if (world_size == 1) return std::unique_ptr<GradientSync>(new LocalGradientSync());
  return FailedPreconditionError(
      "WORLD_SIZE=" + std::to_string(world_size) +
      " needs a collectives backend, and this build has only the single-rank GradientSync");
}

}  // namespace muster::finetune
