#pragma once

// FleetSnapshot: everything the coordinator's HTTP side shows (/metrics, the JSON API, the
// page), copied out of the coordinator at one instant. A snapshot is immutable once published:
// the recorder (fleet_recorder.h) builds a new one on the coordinator's reactor and swaps it
// into a SnapshotHub; HTTP threads take a shared_ptr to the current one and read it without
// any lock held and without touching the coordinator. That is how serving never blocks (or is
// blocked by) the reactor.
//
// Thread-safety: a FleetSnapshot is read-only after publication (safe from any thread);
// SnapshotHub is thread-safe.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/bucket_histogram.h"
#include "common/proto/coordinator.pb.h"
#include "coordinator/checkpoint_stats.h"
#include "coordinator/coordinator_db.h"

namespace muster::coordinator::http {

// One accepted progress report.
struct ProgressPoint {
  int64_t step = 0;
  double loss = 0;
  double throughput = 0;
  int64_t time_ms = 0;  // when the rank printed it (unix ms)
};

// One attempt of a job, with the progress it made (oldest first, at most kMaxPoints; older
// points are thinned, never the newest).
struct AttemptView {
  AttemptRecord record;
  std::string provider;      // of its first node ("" if the node is unknown)
  int64_t resume_step = -1;  // the step it started from (-1: fresh)
  int64_t end_step = -1;     // its last reported step (-1: none)
  std::vector<ProgressPoint> points;
  static constexpr size_t kMaxPoints = 2000;
};

// One step of a job's catalog on one provider's volume.
struct CatalogEntry {
  std::string volume;    // the volume's name in the job spec ("ckpt")
  std::string provider;  // "" for a volume key without provider
  int64_t step = 0;
  int64_t time_ms = 0;  // recorded in the catalog
};

// How far a provider's copy of a job's checkpoints trails the newest committed step anywhere.
struct ReplicationLag {
  std::string provider;
  int64_t newest_step = 0;  // newest step on this provider (0: none)
  int64_t lag_steps = 0;    // newest anywhere - newest here
  double lag_seconds = 0;   // since the newest step anywhere was recorded, if not here yet
};

struct JobView {
  proto::JobStatus status;
  std::vector<AttemptView> attempts;  // by attempt number
  std::vector<CatalogEntry> catalog;  // by provider, then step
  std::vector<ReplicationLag> lag;    // one per provider holding any step of the job
  // Ended attempts by cause: "preemption", "node_lost", "failure" (application), "cancelled".
  std::map<std::string, int> ended_by_cause;
  double eta_seconds = -1;  // from the current attempt's rate; -1: unknown
};

// Pass times of the scheduler as a Prometheus histogram (seconds).
inline constexpr double kPassSecondsBounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                0.01,   0.025,   0.05,   0.1,   0.25,   1.0};
using PassHistogram = BucketHistogram<kPassSecondsBounds>;

// CommitHistogram and CheckpointStats: coordinator/checkpoint_stats.h.

struct FleetSnapshot {
  int64_t time_ms = 0;        // when it was taken (the coordinator's clock, unix ms)
  uint64_t version = 0;       // increases with every publication
  std::vector<JobView> jobs;  // by submission time
  std::vector<proto::NodeStatus> nodes;
  std::vector<proto::Event> events;  // the newest (at most kMaxEvents), oldest first
  static constexpr size_t kMaxEvents = 4096;
  PassHistogram passes;
  // By (job id, provider).
  std::map<std::pair<std::string, std::string>, CheckpointStats> checkpoints;
  // How far the state database's durability trails its commits.
  CoordinatorDb::Durability durability;

  const JobView* FindJob(const std::string& id) const {
    for (const auto& j : jobs) {
      if (j.status.job_id() == id) return &j;
    }
    return nullptr;
  }
};

// The current snapshot. Publish from the reactor, Get from anywhere.
class SnapshotHub {
 public:
  SnapshotHub() : current_(std::make_shared<const FleetSnapshot>()) {}
  void Publish(std::shared_ptr<const FleetSnapshot> s) {
    std::lock_guard<std::mutex> l(mu_);
    current_ = std::move(s);
  }
  std::shared_ptr<const FleetSnapshot> Get() const {
    std::lock_guard<std::mutex> l(mu_);
    return current_;
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const FleetSnapshot> current_;  // GUARDED_BY(mu_); never null
};

}  // namespace muster::coordinator::http
