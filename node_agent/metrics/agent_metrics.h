#pragma once

// What the agent's /metrics shows (`muster agent --http ADDR:PORT`), copied out of the agent at
// one instant, and its rendering in the Prometheus text format.
//
// The agent's reactor builds an AgentMetricsSnapshot every publication interval (the ranks
// from its AssignmentRunner, the copies in flight from its ReplicationWorker, the notices and
// the snapshot store's memory) and swaps it into an AgentMetricsHub; HTTP threads render the
// current one without touching the agent. A snapshot is immutable once published.
//
// The series (every name prefixed muster_agent_; docs/dashboard.md lists them):
//   rank_info{job_id,attempt,rank,pid,state} 1, ranks{state},
//   rank_last_output_age_seconds{job_id,attempt,rank},
//   rank_last_progress_age_seconds{job_id,attempt,rank},
//   replication_copies_in_flight, replication_copy_bytes{job_id,volume,step,source_node},
//   replication_copy_rate_bytes_per_second{...}, notices_total{source},
//   snapshot_memory_used_bytes, snapshot_memory_reserved_bytes, snapshot_memory_limit_bytes,
//   snapshot_peer_offered_bytes_total, snapshot_peer_offered_sent_bytes_total,
//   snapshot_timestamp_seconds; each labelled node too.
//
// Thread-safety: the structs are plain values; RenderAgentMetrics is pure; the hub is
// thread-safe.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace muster::node_agent {

// One rank process of an attempt running here.
struct RankMetrics {
  std::string job_id;
  int32_t attempt = 0;
  int32_t rank = 0;  // global rank
  int64_t pid = 0;
  // "running"; "stopping" (a stop or a notice reached it, it has not exited yet); "exited"
  // (reaped; listed until its output is drained and the attempt forgotten).
  std::string state;
  int64_t started_ms = 0;        // unix ms, when it was spawned
  int64_t last_output_ms = 0;    // its newest line of output; 0: none yet
  int64_t last_progress_ms = 0;  // its newest MUSTER_PROGRESS line; 0: none yet
};

// One checkpoint copy this node is running (ReplicationWorker).
struct CopyMetrics {
  std::string job_id;
  std::string volume;
  std::string source_node;
  int64_t step = 0;
  uint64_t bytes = 0;  // written into the local volume so far
  double seconds = 0;  // since the copy started
};

struct AgentMetricsSnapshot {
  int64_t time_ms = 0;  // unix ms
  uint64_t version = 0;
  std::string node;
  std::string provider;
  std::vector<RankMetrics> ranks;
  std::vector<CopyMetrics> copies;
  std::map<std::string, uint64_t> notices;  // by source ("file", "aws", "sigterm", ...)
  bool snapshots = false;                   // in-memory snapshots enabled (--snapshot-memory-mb)
  uint64_t snapshot_used = 0;
  uint64_t snapshot_reserved = 0;
  uint64_t snapshot_limit = 0;
  // Payload bytes of the frames the forwarder offered to peers (deduplicated puts), and of the
  // chunks of them the peers asked for (node_agent/snapshots/data_channel.h).
  uint64_t snapshot_offered = 0;
  uint64_t snapshot_offered_sent = 0;
};

// Prometheus text format 0.0.4.
std::string RenderAgentMetrics(const AgentMetricsSnapshot& s);

// The current snapshot. Publish from the agent's reactor, Get from anywhere.
class AgentMetricsHub {
 public:
  AgentMetricsHub() : current_(std::make_shared<const AgentMetricsSnapshot>()) {}
  void Publish(std::shared_ptr<const AgentMetricsSnapshot> s) {
    std::lock_guard<std::mutex> l(mu_);
    current_ = std::move(s);
  }
  std::shared_ptr<const AgentMetricsSnapshot> Get() const {
    std::lock_guard<std::mutex> l(mu_);
    return current_;
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const AgentMetricsSnapshot> current_;  // GUARDED_BY(mu_); never null
};

// Notices received, by source. Thread-safe (notices arrive on the watcher's thread and from
// the signal handling thread).
class NoticeCounter {
 public:
  void Count(const std::string& source) {
    std::lock_guard<std::mutex> l(mu_);
    counts_[source.empty() ? "unknown" : source]++;
  }
  std::map<std::string, uint64_t> Get() const {
    std::lock_guard<std::mutex> l(mu_);
    return counts_;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> counts_;  // GUARDED_BY(mu_)
};

}  // namespace muster::node_agent
