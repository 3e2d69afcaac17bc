#pragma once

// Rendering a FleetSnapshot: the Prometheus text format (/metrics) and the JSON API's bodies.
// Pure functions of the snapshot (and the query), so they are unit-tested without sockets.
//
// The metrics (every name prefixed muster_; docs/dashboard.md lists them with their labels):
//   jobs{state}, queue_depth, jobs_pending{reason}, job_attempts{job_id}, restarts_total{cause},
//   job_restarts_total{job_id,cause}, nodes{provider,island,state},
//   node_heartbeat_age_seconds{node,provider}, scheduler_pass_seconds (histogram),
//   checkpoint_commits_total{job_id,provider}, checkpoint_newest_step{job_id,provider},
//   checkpoint_bytes_total{job_id,provider,kind}, checkpoint_reports_total{job_id,provider,kind},
//   checkpoint_commit_seconds{job_id,provider} (histogram),
//   replication_lag_steps{job_id,provider}, replication_lag_seconds{job_id,provider},
//   job_step{job_id}, job_total_steps{job_id}, job_loss{job_id}, job_throughput{job_id,unit},
//   job_last_progress_timestamp_seconds{job_id}, and the state database's durability:
//   state_db_commits_not_durable, state_db_commits_total, state_db_flush_failed,
//   state_db_checkpoint_errors_total, state_db_log_pages, state_db_flush_seconds{which}.
// A job is `job_id`, never `job`: Prometheus owns `job` (the scrape job's name).
//
// Thread-safety: thread-safe (no state).

#include <cstdint>
#include <string>

#include "common/status.h"
#include "coordinator/http/fleet_snapshot.h"

namespace muster::coordinator::http {

std::string RenderMetrics(const FleetSnapshot& s);

// "waiting: 2 of 4 nodes free on provider aws" -> "waiting"; the label jobs_pending carries
// (bounded: the text before the first ':' or '(' , at most 40 characters).
std::string PendingReasonClass(const std::string& reason);

// GET /api/jobs
std::string RenderJobsJson(const FleetSnapshot& s);
// GET /api/jobs/{id}: the job, its attempts with their progress, its events, its catalog and
// replication lag. NotFound for a job the snapshot does not hold.
StatusOr<std::string> RenderJobJson(const FleetSnapshot& s, const std::string& job_id);
// GET /api/nodes
std::string RenderNodesJson(const FleetSnapshot& s);
// GET /api/events?after=ID&job=JOB&limit=N: events with id > after (oldest first, at most
// `limit`), and `next` to pass as `after` to follow; `truncated` when events after `after` have
// already left the snapshot's window.
std::string RenderEventsJson(const FleetSnapshot& s, int64_t after, const std::string& job_id,
                             int limit);
// GET /api/checkpoints?job=JOB (every job when empty). NotFound for an unknown job.
StatusOr<std::string> RenderCheckpointsJson(const FleetSnapshot& s, const std::string& job_id);

// {"error": message, "code": "NOT_FOUND"}
std::string ErrorJson(const Status& status);

}  // namespace muster::coordinator::http
