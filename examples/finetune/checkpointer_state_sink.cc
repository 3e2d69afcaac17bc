#include "examples/finetune/checkpointer_state_sink.h"

namespace muster::finetune {

StatusOr<checkpoint::DType> ToCheckpointDType(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return checkpoint::DType::kF32;
    case torch::kFloat64:
      return checkpoint::DType::kF64;
    case torch::kFloat16:
      return checkpoint::DType::kF16;
    case torch::kBFloat16:
      return checkpoint::DType::kBF16;
    case torch::kInt32:
      return checkpoint::DType::kI32;
    case torch::kInt64:
      return checkpoint::DType::kI64;
    case torch::kUInt8:
      return checkpoint::DType::kU8;
    default:
      return InvalidArgumentError("no checkpoint dtype for this tensor's dtype");
  }
}

namespace {

StatusOr<torch::ScalarType> FromDType(checkpoint::DType d) {
  switch (d) {
    case checkpoint::DType::kF32:
      return torch::kFloat32;
    case checkpoint::DType::kF64:
      return torch::kFloat64;
    case checkpoint::DType::kF16:
      return torch::kFloat16;
    case checkpoint::DType::kBF16:
      return torch::kBFloat16;
    case checkpoint::DType::kI32:
      return torch::kInt32;
    case checkpoint::DType::kI64:
      return torch::kInt64;
    case checkpoint::DType::kU8:
      return torch::kUInt8;
    default:
      return DataLossError("checkpoint holds a dtype the trainer does not use");
  }
}

}  // namespace

StatusOr<std::unique_ptr<CheckpointerStateSink>> CheckpointerStateSink::Open(
    const std::string& dir, int rank, int world_size, collectives::RendezvousStore* store) {
  checkpoint::CheckpointerOptions o;
  o.dir = dir;
  o.rank = rank;
  o.world_size = world_size;
  o.store = store;
  o.io_threads = 1;  // the example's checkpoints are a few MB
  MUSTER_ASSIGN_OR_RETURN(auto ck, checkpoint::Checkpointer::Create(std::move(o)));
  return std::make_unique<CheckpointerStateSink>(std::move(ck));
}

Status CheckpointerStateSink::Save(int64_t step, const NamedTensors& tensors,
                                   const std::string& metadata) {
  checkpoint::SaveState state;
  state.metadata = metadata;
  std::vector<torch::Tensor> keep;  // the host copies must live until Save has snapshotted them
  for (const auto& [name, t] : tensors) {
    torch::Tensor c = t.detach().contiguous();
    const bool cuda = c.is_cuda();
    MUSTER_ASSIGN_OR_RETURN(checkpoint::DType dtype, ToCheckpointDType(c.scalar_type()));
    std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end());
    state.tensors.push_back(checkpoint::TensorRef::Replicated(
        name, dtype, shape, c.data_ptr(),
        cuda ? checkpoint::MemoryKind::kCuda : checkpoint::MemoryKind::kHost));
    keep.push_back(std::move(c));
  }
  return ck_->Save(step, state);
}

StatusOr<std::optional<int64_t>> CheckpointerStateSink::LatestStep() {
  auto latest = ck_->LatestStep();
  if (!latest.ok()) {
    if (latest.status().code() == StatusCode::kNotFound) return std::optional<int64_t>();
    return latest.status();
  }
  return std::optional<int64_t>(*latest);
}

StatusOr<SavedState> CheckpointerStateSink::Restore(int64_t step) {
  MUSTER_ASSIGN_OR_RETURN(checkpoint::Manifest m, ck_->ReadManifest(step));
  SavedState out;
  out.step = step;
  out.metadata = m.UserMetadata();
  std::vector<checkpoint::RestoreRequest> requests;
  for (const auto& entry : m.tensors) {
    MUSTER_ASSIGN_OR_RETURN(torch::ScalarType type, FromDType(entry.dtype));
    torch::Tensor t = torch::empty(entry.shape, torch::TensorOptions().dtype(type));
    requests.push_back(checkpoint::RestoreRequest::Whole(entry.name, entry.dtype, t.data_ptr()));
    out.tensors.emplace_back(entry.name, std::move(t));
  }
  MUSTER_RETURN_IF_ERROR(ck_->Restore(step, requests));
  return out;
}

}  // namespace muster::finetune
