#pragma once

// CheckpointStats: what agents reported of one job's checkpoints on one provider's volumes:
// commits (by the job's ranks) and verified replicas (copies from another provider), their
// bytes, and the latency of the commits that gave one. /metrics shows them as
// muster_checkpoint_bytes_total, muster_checkpoint_reports_total and the
// muster_checkpoint_commit_seconds histogram (coordinator/http/render.cc).
//
// They are Prometheus counters, so they must never go down while the coordinator lives on: the
// database keeps them (CoordinatorDb::RecordCheckpointCounted adds a report's count in the
// same transaction as its catalog row), and a restarted coordinator serves them from there.
//
// Thread-safety: plain values.

#include <cstdint>

#include "common/bucket_histogram.h"

namespace muster::coordinator {

// Checkpoint commit latencies (Save to commit, as the ranks' checkpointer measured them) as a
// Prometheus histogram (seconds).
inline constexpr double kCommitSecondsBounds[] = {0.1, 0.25, 0.5, 1,   2.5, 5,
                                                  10,  30,   60,  120, 300, 900};
using CommitHistogram = BucketHistogram<kCommitSecondsBounds>;

struct CheckpointStats {
  uint64_t commits = 0;
  uint64_t replicas = 0;
  uint64_t commit_bytes = 0;
  uint64_t replica_bytes = 0;
  CommitHistogram latency;

  // One report: a commit or a verified replica of `bytes`; a commit's latency is observed when
  // given (> 0).
  void AddReport(bool replica, uint64_t bytes, double commit_seconds) {
    if (replica) {
      replicas++;
      replica_bytes += bytes;
    } else {
      commits++;
      commit_bytes += bytes;
      if (commit_seconds > 0) latency.Add(commit_seconds);
    }
  }
  // Adds `other` to these (counts, bytes, buckets).
  void Merge(const CheckpointStats& other) {
    commits += other.commits;
    replicas += other.replicas;
    commit_bytes += other.commit_bytes;
    replica_bytes += other.replica_bytes;
    for (int i = 0; i < CommitHistogram::kBuckets; ++i)
      latency.counts[i] += other.latency.counts[i];
    latency.count += other.latency.count;
    latency.sum += other.latency.sum;
  }
};

}  // namespace muster::coordinator
