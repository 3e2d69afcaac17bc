#pragma once

// ReplicationWorker: runs the checkpoint copies the coordinator asks of this node
// (ReplicateCheckpoint): each copies a committed step from another node's volume
// (RemoteVolume, volume_transfer.h) into the local volume of the same name, verifies it
// (checkpoint::Replicate) and reports a verified replica or the error; a good replica is then
// pruned to the job's checkpoint.keep. Which copies run and which wait is ReplicationQueue's
// decision (replication_queue.h): per job and volume one runs, the newest step asked for
// waits, and superseded requests are reported as such at once.
//
// Ownership: owns one thread per running job and volume (joined as new ones start and in
// Stop()). Reports and prunes leave through the callbacks given, which must be thread-safe and
// must not block for long. Thread-safety: every method is thread-safe.

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/logging.h"
#include "common/proto/coordinator.pb.h"
#include "common/proto/envelope.pb.h"
#include "node_agent/metrics/agent_metrics.h"
#include "node_agent/replication_queue.h"

namespace muster::node_agent {

class ReplicationWorker {
 public:
  struct Outputs {
    std::function<void(proto::AgentReport)> report;                   // to the coordinator
    std::function<void(const std::string& job_dir, int keep)> prune;  // checkpoint.keep
  };

  // `labels`: the node's name and volumes (name -> local root). `insecure`: no CURVE to the
  // source (tests only).
  ReplicationWorker(proto::NodeLabels labels, bool insecure, Outputs outputs);
  ~ReplicationWorker();  // Stop()
  ReplicationWorker(const ReplicationWorker&) = delete;
  ReplicationWorker& operator=(const ReplicationWorker&) = delete;

  // A request from the coordinator: started, queued, or reported superseded. Ignored after
  // Stop().
  void Offer(const proto::ReplicateCheckpoint& r);

  // The copies running now: bytes written into the local volume so far and seconds since each
  // started (the agent's /metrics).
  std::vector<CopyMetrics> CopiesInFlight() const;

  // No copy starts any more (a running one finishes its copy and reports it).
  void RequestStop();
  // RequestStop, and waits for the running copies.
  void Stop();

 private:
  // Copies `r`'s step into our volume; the report for the coordinator.
  proto::AgentReport Copy(const proto::ReplicateCheckpoint& r);

  const proto::NodeLabels labels_;
  const bool insecure_;
  const Outputs out_;
  std::shared_ptr<spdlog::logger> logger_ = log::Get("agent");
  // A running copy as /metrics sees it: the copier thread adds to `bytes`.
  struct InFlight {
    CopyMetrics what;
    std::chrono::steady_clock::time_point started;
    std::atomic<uint64_t> bytes{0};
  };
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<InFlight>> in_flight_;  // GUARDED_BY(mu_)
  bool stop_ = false;                                 // GUARDED_BY(mu_)
  ReplicationQueue queue_;                            // GUARDED_BY(mu_)
  // The running copies' threads, each with its "finished" flag so finished ones are joined as
  // new ones start.
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>>
      copiers_;  // GUARDED_BY(mu_)
};

// The public half of `r`'s transfer key (the coordinator revokes that grant when the copy
// ends); empty if the secret is malformed.
std::string TransferKeyOf(const proto::ReplicateCheckpoint& r);

}  // namespace muster::node_agent
