#include "coordinator/fault_injection_coordinator_db.h"

#include <fmt/format.h>

namespace muster::coordinator {

FaultInjectionCoordinatorDb::FaultInjectionCoordinatorDb(std::unique_ptr<CoordinatorDb> base)
    : base_(std::move(base)) {}

void FaultInjectionCoordinatorDb::FailWrite(int n, bool sticky) {
  fail_at_ = n;
  sticky_ = sticky;
}

Status FaultInjectionCoordinatorDb::Attempt(const std::string& what) {
  log_.push_back(what);
  int n = writes();
  if (fail_at_ > 0 && (n == fail_at_ || (sticky_ && n > fail_at_))) {
    return InternalError(fmt::format("injected fault: write {} ({}) failed", n, what));
  }
  return Status::Ok();
}

Status FaultInjectionCoordinatorDb::PutNode(const NodeRecord& node) {
  MUSTER_RETURN_IF_ERROR(Attempt("PutNode " + node.labels.name()));
  return base_->PutNode(node);
}

Status FaultInjectionCoordinatorDb::DeleteNode(const std::string& name) {
  MUSTER_RETURN_IF_ERROR(Attempt("DeleteNode " + name));
  return base_->DeleteNode(name);
}

Status FaultInjectionCoordinatorDb::BindNodeKey(const std::string& name,
                                                const std::string& public_key, int64_t time_ms) {
  MUSTER_RETURN_IF_ERROR(Attempt("BindNodeKey " + name));
  return base_->BindNodeKey(name, public_key, time_ms);
}

Status FaultInjectionCoordinatorDb::InsertJob(JobRecord* job) {
  MUSTER_RETURN_IF_ERROR(Attempt("InsertJob " + job->spec.name()));
  return base_->InsertJob(job);
}

Status FaultInjectionCoordinatorDb::UpdateJob(const JobRecord& job) {
  MUSTER_RETURN_IF_ERROR(Attempt("UpdateJob " + job.id));
  return base_->UpdateJob(job);
}

Status FaultInjectionCoordinatorDb::PutAttempt(const AttemptRecord& attempt) {
  MUSTER_RETURN_IF_ERROR(
      Attempt(fmt::format("PutAttempt {} attempt {}", attempt.job_id, attempt.attempt)));
  return base_->PutAttempt(attempt);
}

StatusOr<int64_t> FaultInjectionCoordinatorDb::AppendEvent(const proto::Event& event) {
  MUSTER_RETURN_IF_ERROR(Attempt("AppendEvent " + event.kind()));
  return base_->AppendEvent(event);
}

Status FaultInjectionCoordinatorDb::RecordCheckpoint(const CheckpointRecord& ckpt) {
  MUSTER_RETURN_IF_ERROR(
      Attempt(fmt::format("RecordCheckpoint {} step {}", ckpt.job_id, ckpt.step)));
  return base_->RecordCheckpoint(ckpt);
}

Status FaultInjectionCoordinatorDb::RecordCheckpointCounted(const CheckpointRecord& ckpt,
                                                            const std::string& provider,
                                                            const CheckpointStats& count) {
  MUSTER_RETURN_IF_ERROR(
      Attempt(fmt::format("RecordCheckpoint {} step {}", ckpt.job_id, ckpt.step)));
  return base_->RecordCheckpointCounted(ckpt, provider, count);
}

Status FaultInjectionCoordinatorDb::ExcludeNode(const std::string& job_id, const std::string& node,
                                                const std::string& reason, int64_t time_ms) {
  MUSTER_RETURN_IF_ERROR(Attempt(fmt::format("ExcludeNode {} {}", job_id, node)));
  return base_->ExcludeNode(job_id, node, reason, time_ms);
}

Status FaultInjectionCoordinatorDb::PutState(const std::string& key, const std::string& value,
                                             int64_t time_ms) {
  MUSTER_RETURN_IF_ERROR(Attempt("PutState " + key));
  return base_->PutState(key, value, time_ms);
}

Status FaultInjectionCoordinatorDb::PutSpares(const std::string& job_id,
                                              const std::vector<std::string>& nodes,
                                              int64_t time_ms) {
  MUSTER_RETURN_IF_ERROR(Attempt("PutSpares " + job_id));
  return base_->PutSpares(job_id, nodes, time_ms);
}

Status FaultInjectionCoordinatorDb::PutSnapshotFallback(const std::string& job_id,
                                                        const std::string& reason,
                                                        int64_t time_ms) {
  MUSTER_RETURN_IF_ERROR(Attempt("PutSnapshotFallback " + job_id));
  return base_->PutSnapshotFallback(job_id, reason, time_ms);
}

}  // namespace muster::coordinator
