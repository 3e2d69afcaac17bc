#pragma once

// FaultInjectionCoordinatorDb: a CoordinatorDb for tests that forwards to another (the real SQLite
// store) and fails the writes a test picks, as LevelDB's FaultInjectionTestEnv does for files.
// A failed write does not reach the store underneath (a failed SQLite transaction changes
// nothing) and returns Internal "injected fault: write N (<op> <key>) failed". Reads always
// forward, so a test can compare what the coordinator claims with what is durable.
//
// Writes are numbered from 1 in the order they are attempted: PutNode, DeleteNode, BindNodeKey,
// InsertJob, UpdateJob, PutAttempt, AppendEvent, RecordCheckpoint, ExcludeNode, PutState,
// RecordCheckpointCounted (logged as "RecordCheckpoint": it is the same write, counted),
// PutSpares, PutSnapshotFallback.
//
// Thread-safety: none (the coordinator's reactor thread, or a test's).

#include <memory>
#include <string>
#include <vector>

#include "coordinator/coordinator_db.h"

namespace muster::coordinator {

class FaultInjectionCoordinatorDb final : public CoordinatorDb {
 public:
  explicit FaultInjectionCoordinatorDb(std::unique_ptr<CoordinatorDb> base);

  // Fails write number `n` (counted from the first write of this store; 0: none) and, with
  // `sticky`, every write after it too (a disk that stays broken).
  void FailWrite(int n, bool sticky = false);
  // Writes attempted so far (failed ones included), and a line for each: "<op> <key>".
  int writes() const { return static_cast<int>(log_.size()); }
  const std::vector<std::string>& write_log() const { return log_; }

  const std::filesystem::path& path() const override { return base_->path(); }
  Status Sync() override { return base_->Sync(); }
  Status FlushError() const override { return base_->FlushError(); }
  Durability GetDurability() const override { return base_->GetDurability(); }
  Status PutNode(const NodeRecord& node) override;
  Status DeleteNode(const std::string& name) override;
  StatusOr<std::vector<NodeRecord>> LoadNodes() override { return base_->LoadNodes(); }
  Status BindNodeKey(const std::string& name, const std::string& public_key,
                     int64_t time_ms) override;
  StatusOr<std::map<std::string, std::string>> LoadNodeKeys() override {
    return base_->LoadNodeKeys();
  }
  Status InsertJob(JobRecord* job) override;
  Status UpdateJob(const JobRecord& job) override;
  StatusOr<JobRecord> GetJob(const std::string& id) override { return base_->GetJob(id); }
  StatusOr<std::vector<JobRecord>> LoadJobs() override { return base_->LoadJobs(); }
  Status PutAttempt(const AttemptRecord& attempt) override;
  StatusOr<std::vector<AttemptRecord>> LoadAttempts(const std::string& job_id) override {
    return base_->LoadAttempts(job_id);
  }
  StatusOr<int64_t> AppendEvent(const proto::Event& event) override;
  StatusOr<std::vector<proto::Event>> Events(const std::string& job_id, int64_t after_id,
                                             int limit) override {
    return base_->Events(job_id, after_id, limit);
  }
  Status RecordCheckpoint(const CheckpointRecord& ckpt) override;
  StatusOr<std::vector<CheckpointRecord>> Checkpoints(const std::string& job_id) override {
    return base_->Checkpoints(job_id);
  }
  StatusOr<std::optional<int64_t>> LatestCommittedStep(const std::string& job_id,
                                                       const std::string& volume) override {
    return base_->LatestCommittedStep(job_id, volume);
  }
  Status ExcludeNode(const std::string& job_id, const std::string& node, const std::string& reason,
                     int64_t time_ms) override;
  StatusOr<std::map<std::string, std::set<std::string>>> LoadExclusions() override {
    return base_->LoadExclusions();
  }
  Status PutState(const std::string& key, const std::string& value, int64_t time_ms) override;
  StatusOr<std::optional<std::string>> GetState(const std::string& key) override {
    return base_->GetState(key);
  }
  Status RecordCheckpointCounted(const CheckpointRecord& ckpt, const std::string& provider,
                                 const CheckpointStats& count) override;
  StatusOr<std::map<std::string, CheckpointStats>> CheckpointCounters(
      const std::string& job_id) override {
    return base_->CheckpointCounters(job_id);
  }
  Status PutSpares(const std::string& job_id, const std::vector<std::string>& nodes,
                   int64_t time_ms) override;
  StatusOr<std::map<std::string, std::vector<std::string>>> LoadSpares() override {
    return base_->LoadSpares();
  }
  Status PutSnapshotFallback(const std::string& job_id, const std::string& reason,
                             int64_t time_ms) override;
  StatusOr<std::map<std::string, std::string>> LoadSnapshotFallbacks() override {
    return base_->LoadSnapshotFallbacks();
  }

 private:
  // Counts a write; its injected error if it is to fail.
  Status Attempt(const std::string& what);

  std::unique_ptr<CoordinatorDb> base_;
  int fail_at_ = 0;
  bool sticky_ = false;
  std::vector<std::string> log_;
};

}  // namespace muster::coordinator
