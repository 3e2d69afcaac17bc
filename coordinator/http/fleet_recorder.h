#pragma once

// FleetRecorder: builds FleetSnapshots (fleet_snapshot.h) from a Coordinator, on its reactor.
//
// It is the Coordinator's observer (progress reports become per-attempt progress histories;
// scheduler passes feed a histogram) and, at most once per `min_interval_ms`, reads the rest:
// jobs and nodes through the Coordinator's own request handler (a status and a nodes request,
// as `muster status` and `muster nodes` see them), new events from the database past a
// cursor, and, only for jobs that changed (a new event or a new attempt), their attempts and
// checkpoint catalog and counters. The result is published to a SnapshotHub. The reactor's cost is
// bounded by the publication rate and by what changed, not by how often pages are fetched.
//
// Progress histories live in memory: a restarted coordinator starts them anew (the attempts,
// events, catalog and checkpoint counters come back from the database, so /metrics' counters
// never go back).
//
// Thread-safety: reactor-only (the Coordinator's thread), no locks; the hub is thread-safe.

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>

#include "coordinator/coordinator.h"
#include "coordinator/http/fleet_snapshot.h"

namespace muster::coordinator::http {

class FleetRecorder : public CoordinatorObserver {
 public:
  // Registers itself as `coord`'s observer until destroyed. Neither is owned; both must outlive
  // the recorder.
  FleetRecorder(Coordinator& coord, SnapshotHub& hub, int64_t min_interval_ms);
  ~FleetRecorder() override;
  FleetRecorder(const FleetRecorder&) = delete;
  FleetRecorder& operator=(const FleetRecorder&) = delete;

  void OnSchedulerPass(std::chrono::nanoseconds took) override;
  void OnProgress(const std::string& job_id, int attempt, const proto::Progress& p) override;
  void OnCheckpoint(const proto::AgentReport& report, const std::string& provider) override;

  // Publishes a new snapshot taken at `now_ms` (unix ms) if `min_interval_ms` has passed since
  // the last one and something changed (a new event or progress report) or 2 s have passed
  // (heartbeat ages, pass times), or if `force`. Returns whether it published.
  bool MaybePublish(int64_t now_ms, bool force = false);

 private:
  struct AttemptCache {
    int64_t resume_step = -1;
    std::string provider;
    std::vector<ProgressPoint> points;
  };
  struct JobCache {
    int32_t attempt_seen = -1;  // the status's attempt when attempts were last loaded
    bool dirty = true;          // reload attempts and catalog at the next publication
    std::vector<AttemptRecord> attempts;
    std::vector<CheckpointRecord> catalog;
    std::map<std::string, CheckpointStats> counters;  // by provider, as the database has them
    std::map<int32_t, AttemptCache> by_attempt;
  };
  // Reads new events into the ring; returns how many.
  size_t ReadEvents();
  JobView BuildJob(const proto::JobStatus& status, JobCache& cache,
                   const std::map<std::string, std::string>& node_provider, int64_t now_ms);

  Coordinator& coord_;
  SnapshotHub& hub_;
  int64_t min_interval_ms_;
  int64_t last_publish_ms_ = 0;
  bool changed_ = false;  // progress since the last publication
  uint64_t version_ = 0;
  int64_t event_cursor_ = 0;
  std::deque<proto::Event> events_;  // at most FleetSnapshot::kMaxEvents
  std::map<std::string, JobCache> jobs_;
  PassHistogram passes_;
};

}  // namespace muster::coordinator::http
