#include "examples/finetune/snapshot_sink.h"

#include <algorithm>
#include <vector>

#include "checkpoint/snapshot_state.h"
#include "common/logging.h"
#include "examples/finetune/checkpointer_state_sink.h"

namespace muster::finetune {
namespace {

std::vector<int64_t> Shape(const torch::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

}  // namespace

SnapshotSink::~SnapshotSink() {
  if (!held_.empty()) (void)Release();
}

Status SnapshotSink::Release() {
  if (held_.empty()) return Status::Ok();
  const auto began = std::chrono::steady_clock::now();
  Status s = sender_->Release(kReleaseTimeout);
  held_.clear();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count();
  stats_.stall_ms_sum += ms;
  stats_.release_ms_sum += ms;
  stats_.stall_ms_max = std::max(stats_.stall_ms_max, ms);
  if (!s.ok()) log::Get("examples.finetune")->warn("in-memory snapshot: {}", s.ToString());
  return Status::Ok();
}

Status SnapshotSink::Save(int64_t step, const NamedTensors& tensors, const std::string& metadata,
                          std::chrono::steady_clock::time_point began) {
  MUSTER_RETURN_IF_ERROR(Release());  // the previous one, if the caller has not
  checkpoint::SaveState state;
  state.metadata = metadata;
  std::vector<torch::Tensor>& keep = held_;  // the tensors (and host copies) until Release
  keep.reserve(tensors.size());
  uint64_t bytes = 0;
  for (const auto& [name, t] : tensors) {
    torch::Tensor h = t.detach();
    if (!h.device().is_cpu()) h = h.to(torch::kCPU);
    h = h.contiguous();  // a no-op for the parameters and moments (already contiguous)
    MUSTER_ASSIGN_OR_RETURN(checkpoint::DType dtype, ToCheckpointDType(h.scalar_type()));
    state.tensors.push_back(checkpoint::TensorRef::Replicated(name, dtype, Shape(h), h.data_ptr()));
    bytes += static_cast<uint64_t>(h.numel()) * h.element_size();
    keep.push_back(std::move(h));
  }
  if (Status st = sender_->SnapshotInPlace(step, state); !st.ok()) {
    held_.clear();
    return st;
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count();
  ++stats_.snapshots;
  stats_.stall_ms_sum += ms;
  stats_.stall_ms_max = std::max(stats_.stall_ms_max, ms);
  stats_.bytes = bytes;
  if (const int64_t kept = sender_->sent(); kept > kept_) {
    if (warned_) {
      log::Get("examples.finetune")->info("in-memory snapshots: the agent keeps them again");
    }
    kept_ = kept;
    kept_at_ = stats_.snapshots;
    warned_ = false;
  } else if (!warned_ && stats_.snapshots - kept_at_ >= kStalledAfter) {
    warned_ = true;
    log::Get("examples.finetune")
        ->warn(
            "in-memory snapshots: the agent has kept none of the last {} (up to step {}); a "
            "failure now resumes from an older snapshot or the volume. The agent's log says "
            "why (a snapshot larger than its --snapshot-memory-mb is refused)",
            stats_.snapshots - kept_at_, step);
  }
  return Status::Ok();
}

StatusOr<int64_t> RestoreSnapshotInto(const runtime::JobContext& ctx, const NamedTensors& into,
                                      std::string* metadata) {
  std::vector<checkpoint::RestoreRequest> requests;
  // Host destinations: the tensor itself when it is a contiguous CPU tensor, else a host copy
  // that is written back after the restore.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> staged;  // (destination, host buffer)
  for (const auto& [name, t] : into) {
    torch::Tensor host = t;
    if (!t.device().is_cpu() || !t.is_contiguous()) {
      host = torch::empty(t.sizes(), t.options().device(torch::kCPU));
      staged.emplace_back(t, host);
    }
    MUSTER_ASSIGN_OR_RETURN(checkpoint::DType dtype, ToCheckpointDType(host.scalar_type()));
    auto r = checkpoint::RestoreRequest::Whole(
        name, dtype, host.data_ptr(), static_cast<uint64_t>(host.numel()) * host.element_size());
    // The size alone would let a saved tensor of another shape through: ask for exactly this
    // tensor's extent, which must be the box that was saved.
    r.offsets.assign(host.dim(), 0);
    r.lengths = Shape(host);
    requests.push_back(std::move(r));
  }
  MUSTER_ASSIGN_OR_RETURN(int64_t step, ctx.RestoreSnapshot(requests, metadata));
  torch::NoGradGuard no_grad;
  for (auto& [dst, host] : staged) dst.copy_(host);
  return step;
}

}  // namespace muster::finetune
