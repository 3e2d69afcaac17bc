#pragma once

// CoordinatorDb: the coordinator's durable state, one SQLite database (WAL) at
// <data-dir>/coordinator.db. Tables: nodes, jobs, attempts, events, checkpoints (the catalog:
// which steps of which job are committed on which volume), node_keys (node name -> agent key),
// job_exclusions (nodes kept off a job: a failed launch preflight), state (named blobs of
// components that keep their own state: the provider manager's requests and clocks),
// checkpoint_counters (checkpoint_stats.h: what /metrics counts of commits and replicas),
// job_spares (the hot spares held for running jobs), job_snapshot_fallbacks (jobs whose next
// attempt must not resume from in-memory snapshots: the last snapshot resume failed).
// Tables added later are created when an older database is opened (CREATE TABLE IF NOT EXISTS),
// so a database moves forward without losing anything.
// Every write is its own transaction, in the log when the call returns: a coordinator killed
// with SIGKILL right after answering a submit still has the job when it starts again. Against
// the host's power loss a write is durable within the flush interval (Open's flush_interval,
// wal_flusher.h): a thread of its own syncs the log, so the caller's thread (the coordinator's
// reactor, which answers heartbeats) does not wait on the disk, except for Sync() and, once
// every 1000 pages of log (about 4 MiB of changes), the sync of the log's header when a commit
// starts it over. Interval 0 (or a database that is not in WAL mode, or a SQLite built without
// threads): each write is synced before it returns (synchronous=FULL), on the caller's thread.
// Writes that an action outside the process follows (provider requests, the providers' ledgers)
// call Sync() first; node-key bindings and the rest do not: after a power loss a restarted
// coordinator may lack the last interval's changes, as it would lack any made after the loss.
//
// Thread-safety: none. The coordinator uses it from its reactor thread.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/proto/coordinator.pb.h"
#include "common/status.h"
#include "coordinator/checkpoint_stats.h"
#include "coordinator/wal_flusher.h"

struct sqlite3;

namespace muster::coordinator {

struct NodeRecord {
  proto::NodeLabels labels;
  proto::NodeStatusState state = proto::NODE_UP;  // the admin state: up, draining or down
  int64_t last_heartbeat_ms = 0;
  int32_t quarantines = 0;
  int64_t quarantined_until_ms = 0;
};

struct JobRecord {
  std::string id;
  uint64_t seq = 0;  // submission order, assigned by InsertJob
  proto::JobSpec spec;
  proto::JobState state = proto::JOB_PENDING;
  int32_t attempt = 0;
  int32_t restarts = 0;
  int32_t preemptions = 0;
  std::vector<std::string> nodes;  // the current attempt's, node-rank order
  std::string detail;
  int64_t resume_step = -1;
  int64_t submitted_ms = 0;
  int64_t updated_ms = 0;
  int64_t not_before_ms = 0;  // restart backoff: not scheduled before this
  // The z85 key that submitted the job (set by InsertJob, never updated); "" for jobs
  // submitted before jobs recorded it, or on an insecure coordinator.
  std::string submitter;
};

struct AttemptRecord {
  std::string job_id;
  int32_t attempt = 0;
  std::vector<std::string> nodes;
  int64_t started_ms = 0;
  int64_t ended_ms = 0;  // 0 while running
  std::string outcome;   // "", "succeeded", "failed", "preempted", "node_lost", "cancelled"
  std::string detail;
};

struct CheckpointRecord {
  std::string job_id;
  int64_t step = 0;
  std::string volume;
  bool committed = false;
  int64_t time_ms = 0;
};

// The coordinator's database: the seam between the coordinator and its durable state. The
// real one is SQLite (Open, below); tests put a FaultInjectionCoordinatorDb
// (fault_injection_coordinator_db.h) around it to fail chosen writes.
//
// Writes (PutNode, DeleteNode, BindNodeKey, InsertJob, UpdateJob, PutAttempt, AppendEvent,
// RecordCheckpoint, ExcludeNode, PutState, PutSpares, PutSnapshotFallback) are each atomic and
// durable when they return Ok (as above: at once against a crash of the coordinator, within the
// flush interval against power loss); a write that returns an error changed nothing. The
// coordinator treats a failed write as fatal for changes: it stops accepting any (coordinator.h,
// "Durable writes").
class CoordinatorDb {
 public:
  // The SQLite store: creates `data_dir` if needed and opens (or creates) coordinator.db in it.
  // Only one coordinator may use a data dir: Open takes an exclusive lock file and fails with
  // FailedPrecondition if another process holds it. `flush_interval`: see above; once a flush
  // fails, every later write fails with that error (the database may have lost what it could
  // not write) and changes nothing.
  static constexpr std::chrono::milliseconds kDefaultFlushInterval{100};
  static StatusOr<std::unique_ptr<CoordinatorDb>> Open(
      const std::filesystem::path& data_dir,
      std::chrono::milliseconds flush_interval = kDefaultFlushInterval);
  virtual ~CoordinatorDb() = default;

  // Where the state lives (logs, errors).
  virtual const std::filesystem::path& path() const = 0;

  // Returns once every write made so far is durable against power loss too (it waits for, or
  // does, a flush), or the flush's error. For a write that an action outside the process must
  // not outrun: a provider asked for nodes, an sbatch. Blocks on the disk: not for every write.
  virtual Status Sync() { return Status::Ok(); }
  // Ok, or the error of a flush that failed (every later write fails with it): for the owner to
  // see it without waiting for its next write.
  virtual Status FlushError() const { return Status::Ok(); }
  // How far durability trails the commits, for /metrics. A store that syncs every commit (no
  // flusher) reports flusher false and zeros.
  struct Durability {
    bool flusher = false;
    uint64_t commits = 0;            // committed since the store was opened
    uint64_t durable = 0;            // of those, known durable against power loss
    int log_pages = 0;               // the log's size (WAL pages) at the last commit
    bool failed = false;             // a flush failed: every later write is refused
    uint64_t checkpoint_errors = 0;  // checkpoints of the log that failed (retried; not fatal)
    double last_flush_seconds = 0;   // how long the last flush took
    double max_flush_seconds = 0;    // the longest flush since the store was opened
  };
  virtual Durability GetDurability() const { return {}; }

  // Nodes (keyed by labels.name).
  virtual Status PutNode(const NodeRecord& node) = 0;
  virtual Status DeleteNode(const std::string& name) = 0;
  virtual StatusOr<std::vector<NodeRecord>> LoadNodes() = 0;
  // A node name is bound to the key that first registered it (docs/security.md); binding it
  // again replaces the key (the coordinator does so only when the old key lost its agent role).
  virtual Status BindNodeKey(const std::string& name, const std::string& public_key,
                             int64_t time_ms) = 0;
  // name -> z85 public key.
  virtual StatusOr<std::map<std::string, std::string>> LoadNodeKeys() = 0;

  // Jobs. InsertJob assigns `seq` (and the id, `<spec.name>-<seq>`, when `job->id` is empty).
  virtual Status InsertJob(JobRecord* job) = 0;
  // NotFound if the job does not exist.
  virtual Status UpdateJob(const JobRecord& job) = 0;
  virtual StatusOr<JobRecord> GetJob(const std::string& id) = 0;
  // Every job, by seq.
  virtual StatusOr<std::vector<JobRecord>> LoadJobs() = 0;

  virtual Status PutAttempt(const AttemptRecord& attempt) = 0;
  virtual StatusOr<std::vector<AttemptRecord>> LoadAttempts(const std::string& job_id) = 0;

  // Appends and returns the event's id (increasing).
  virtual StatusOr<int64_t> AppendEvent(const proto::Event& event) = 0;
  // Events with id > after_id, oldest first; `job_id` empty: all jobs.
  virtual StatusOr<std::vector<proto::Event>> Events(const std::string& job_id, int64_t after_id,
                                                     int limit) = 0;

  // The checkpoint catalog.
  virtual Status RecordCheckpoint(const CheckpointRecord& ckpt) = 0;
  virtual StatusOr<std::vector<CheckpointRecord>> Checkpoints(const std::string& job_id) = 0;
  // The newest committed step of `job_id` on `volume` (any volume if empty); nullopt if none.
  virtual StatusOr<std::optional<int64_t>> LatestCommittedStep(const std::string& job_id,
                                                               const std::string& volume) = 0;

  // Nodes kept off a job for the rest of it (a failed launch preflight blamed them). Adding one
  // that is there already is Ok and changes nothing.
  virtual Status ExcludeNode(const std::string& job_id, const std::string& node,
                             const std::string& reason, int64_t time_ms) = 0;
  // job id -> its excluded nodes.
  virtual StatusOr<std::map<std::string, std::set<std::string>>> LoadExclusions() = 0;

  // A named blob a component keeps whole (replaced on each put), e.g. "providers".
  virtual Status PutState(const std::string& key, const std::string& value, int64_t time_ms) = 0;
  // nullopt if never put.
  virtual StatusOr<std::optional<std::string>> GetState(const std::string& key) = 0;

  // The checkpoint counters (checkpoint_stats.h), per job and provider. RecordCheckpointCounted
  // is RecordCheckpoint(ckpt) and, in the same transaction, `count` added to the counters of
  // (ckpt.job_id, provider): a report is counted exactly when it is catalogued, and the counters
  // never go back after a restart. A step already committed on that volume is catalogued again
  // but not counted again (a report sent again). Counted as one write.
  virtual Status RecordCheckpointCounted(const CheckpointRecord& ckpt, const std::string& provider,
                                         const CheckpointStats& count) = 0;
  // provider -> the counters of `job_id` (empty: nothing counted).
  virtual StatusOr<std::map<std::string, CheckpointStats>> CheckpointCounters(
      const std::string& job_id) = 0;

  // Hot spares (table job_spares): the nodes held idle for a running job. PutSpares replaces
  // the job's whole set at once (empty: the job holds none). A node is held for one job at most:
  // putting it for another job moves it.
  virtual Status PutSpares(const std::string& job_id, const std::vector<std::string>& nodes,
                           int64_t time_ms) = 0;
  // job id -> its spares, sorted by name.
  virtual StatusOr<std::map<std::string, std::vector<std::string>>> LoadSpares() = 0;

  // In-memory snapshot fallbacks (table job_snapshot_fallbacks): a job's previous snapshot
  // resume failed, so its next attempt resumes from the volume (FailedSnapshotResume,
  // snapshot_plan.h); `reason` says why. An empty reason clears the job's row (the next attempt
  // has been planned, or the job ended).
  virtual Status PutSnapshotFallback(const std::string& job_id, const std::string& reason,
                                     int64_t time_ms) = 0;
  // job id -> the reason, for every job with a fallback pending.
  virtual StatusOr<std::map<std::string, std::string>> LoadSnapshotFallbacks() = 0;

 protected:
  CoordinatorDb() = default;
  CoordinatorDb(const CoordinatorDb&) = delete;
  CoordinatorDb& operator=(const CoordinatorDb&) = delete;
};

// The SQLite store (see the top of this file). Made by CoordinatorDb::Open.
class SqliteCoordinatorDb final : public CoordinatorDb {
 public:
  ~SqliteCoordinatorDb() override;

  const std::filesystem::path& path() const override { return path_; }
  Status Sync() override;
  Status FlushError() const override;
  Durability GetDurability() const override;
  Status PutNode(const NodeRecord& node) override;
  Status DeleteNode(const std::string& name) override;
  StatusOr<std::vector<NodeRecord>> LoadNodes() override;
  Status BindNodeKey(const std::string& name, const std::string& public_key,
                     int64_t time_ms) override;
  StatusOr<std::map<std::string, std::string>> LoadNodeKeys() override;
  Status InsertJob(JobRecord* job) override;
  Status UpdateJob(const JobRecord& job) override;
  StatusOr<JobRecord> GetJob(const std::string& id) override;
  StatusOr<std::vector<JobRecord>> LoadJobs() override;
  Status PutAttempt(const AttemptRecord& attempt) override;
  StatusOr<std::vector<AttemptRecord>> LoadAttempts(const std::string& job_id) override;
  StatusOr<int64_t> AppendEvent(const proto::Event& event) override;
  StatusOr<std::vector<proto::Event>> Events(const std::string& job_id, int64_t after_id,
                                             int limit) override;
  Status RecordCheckpoint(const CheckpointRecord& ckpt) override;
  StatusOr<std::vector<CheckpointRecord>> Checkpoints(const std::string& job_id) override;
  StatusOr<std::optional<int64_t>> LatestCommittedStep(const std::string& job_id,
                                                       const std::string& volume) override;
  Status ExcludeNode(const std::string& job_id, const std::string& node, const std::string& reason,
                     int64_t time_ms) override;
  StatusOr<std::map<std::string, std::set<std::string>>> LoadExclusions() override;
  Status PutState(const std::string& key, const std::string& value, int64_t time_ms) override;
  StatusOr<std::optional<std::string>> GetState(const std::string& key) override;
  Status RecordCheckpointCounted(const CheckpointRecord& ckpt, const std::string& provider,
                                 const CheckpointStats& count) override;
  StatusOr<std::map<std::string, CheckpointStats>> CheckpointCounters(
      const std::string& job_id) override;
  Status PutSpares(const std::string& job_id, const std::vector<std::string>& nodes,
                   int64_t time_ms) override;
  StatusOr<std::map<std::string, std::vector<std::string>>> LoadSpares() override;
  Status PutSnapshotFallback(const std::string& job_id, const std::string& reason,
                             int64_t time_ms) override;
  StatusOr<std::map<std::string, std::string>> LoadSnapshotFallbacks() override;

 private:
  friend class CoordinatorDb;
  SqliteCoordinatorDb(std::filesystem::path path, sqlite3* db, int lock_fd);
  Status Exec(const std::string& sql);
  // Starts the flusher: a second connection of its own syncs the log every `interval` and now
  // and then checkpoints it into the database file.
  Status StartFlusher(std::chrono::milliseconds interval);

  std::filesystem::path path_;
  sqlite3* db_;
  int lock_fd_;
  sqlite3* flush_db_ = nullptr;                 // the flusher's connection
  std::atomic<uint64_t> checkpoint_errors_{0};  // the flusher's failed checkpoints
  std::unique_ptr<WalFlusher> flusher_;         // null: synchronous=FULL
};

}  // namespace muster::coordinator
