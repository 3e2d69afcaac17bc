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

Status CommunicatorGradientSync::AllreduceSum(torch::Tensor& flat) {
  if (!flat.is_contiguous() || flat.scalar_type() != torch::kFloat32) {
    return InvalidArgumentError("AllreduceSum needs a contiguous float32 tensor");
  }
  const bool device_ok = flat.is_cuda() == (comm_->backend() == collectives::Backend::kNccl);
  torch::Tensor buf = device_ok ? flat : flat.to(flat.is_cuda() ? torch::kCPU : torch::kCUDA);
  if (buf.is_cuda()) torch::cuda::synchronize();  // the producer kernels ran on torch's stream
  auto work = comm_->AllReduce(buf.data_ptr(), static_cast<size_t>(buf.numel()), DType::kF32,
                               collectives::ReduceOp::kSum);
  MUSTER_RETURN_IF_ERROR(work->Wait());
  if (!device_ok) flat.copy_(buf);
  return Status::Ok();
}

}  // namespace muster::finetune
