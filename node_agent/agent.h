#pragma once

// Agent: `muster agent` as a library. One per node. It registers the node's labels with the
// coordinator, heartbeats, keeps a long poll outstanding for actions, and carries them out:
//
//   - StartAssignment: spawns the node's ranks with the env contract (docs/env-contract.md),
//     each rank's output appended to <work-dir>/logs/<job>/attempt-<a>/rank-<r>.log; on node
//     rank 0 it also serves the attempt's rendezvous store (collectives::RendezvousServer) on the
//     port and with the CURVE keys the coordinator chose.
//   - StopAssignment: SIGTERM to every rank's process group, SIGKILL after the grace. With
//     `checkpoint_first` the ranks are first asked to checkpoint (the key `muster/preempt` in
//     the job's store, and the file named by MUSTER_PREEMPT_FILE, which any program can watch)
//     and given until the deadline to stop by themselves.
//   - FetchLog: reads a rank's log file and answers with AgentLogChunk.
//
// It reports every start, exit, checkpoint commit (the line `MUSTER_CHECKPOINT step=N` printed
// by global rank 0, once step N is a good checkpoint on the volume: checkpoint_steps.h) and
// progress (`MUSTER_PROGRESS step=...`, docs/protocol.md). An attempt whose resume step is not
// good on the volume here starts from the newest good step there (or fresh), and says so. After
// each commit and each replica it applies the job's checkpoint.keep to that volume. Reports
// wait in a bounded Outbox while the coordinator is away (outbox.h). It learns of
// preemption from its notice sources (file, cloud metadata) and from Notice() (SIGTERM), asks
// its own ranks to checkpoint at once and tells the coordinator, which stops the gang.
//
// Lease: when no heartbeat has been answered for the lease the coordinator handed out, the
// agent stops all its ranks by itself (a partitioned node never keeps running an attempt that
// was requeued elsewhere); a watchdog thread of its own does it, so a stalled reactor cannot
// keep ranks alive (lease_watchdog.h). It re-registers, listing what still runs, whenever the
// coordinator forgets its session (a coordinator restart): running ranks are kept.
//
// Threads: a reactor owns the supervisor, the stores and all assignment state (the
// AssignmentRunner, assignment_runner.h); a control thread makes the calls to the coordinator
// (register, heartbeat, reports) and a poll thread keeps the long poll outstanding (the
// CoordinatorSession, coordinator_session.h); the lease watchdog, the replication worker and
// the prune worker have threads of their own (lease_watchdog.h, replication_worker.h,
// prune_worker.h). Agent wires them together. Thread-safety: the public methods are
// thread-safe.

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/net_address.h"
#include "common/proto/envelope.pb.h"
#include "common/status.h"
#include "node_agent/preemption_notice.h"
#include "node_agent/rank_lines.h"  // ParseProgressLine, ParseCheckpointLine
#include "node_agent/snapshots/snapshot_cpu.h"

namespace muster::node_agent {

struct AgentOptions {
  std::string coordinator;  // endpoint; "" : $MUSTER_COORDINATOR
  std::string keys_dir;     // agent.key + coordinator.pub; "" : $MUSTER_KEYS, else ~/.muster
  std::string key_file;     // "" : <keys_dir>/agent.key, or client.key in a pre-roles keys dir
  bool insecure = false;    // no CURVE to the coordinator nor for the stores (tests only)
  // `muster` to run as this agent's rank reaper (node_agent/rank_reaper.h); "": none.
  std::string rank_reaper_bin;
  // name, provider, region, island, gpu_type, gpus, slots, volumes, address. An empty name
  // becomes the hostname; an empty address the local address that routes to the coordinator.
  proto::NodeLabels labels;
  std::filesystem::path work_dir;  // logs and notice files; created
  // Notice sources polled every notice_interval.
  std::string preempt_file;  // a notice once this file exists (see NewNoticeFileSource)
  std::string aws_metadata;  // e.g. http://169.254.169.254; "" : not polled
  std::string gcp_metadata;  // e.g. http://metadata.google.internal; "" : not polled
  std::chrono::milliseconds notice_interval{1000};
  std::chrono::seconds default_notice{30};  // for sources that give no deadline
  // Grace between SIGTERM and SIGKILL when stopping ranks on our own (lease, shutdown).
  std::chrono::milliseconds stop_grace{5000};
  // Per-rank log files are rotated past this size, keeping this many older parts
  // (Supervisor::Options); 0 bytes: never rotated.
  int64_t rank_log_max_bytes = int64_t{64} << 20;
  int rank_log_keep = 3;
  std::chrono::milliseconds call_timeout{3000};
  // The launch preflight of a multi-node attempt (node_agent/preflight.h): the whole of it,
  // and one connect to a peer.
  std::chrono::milliseconds preflight_timeout{15000};
  std::chrono::milliseconds preflight_probe_timeout{2000};
  // Bytes of memory for jobs' in-memory snapshots (node_agent/snapshots/); 0: none.
  uint64_t snapshot_memory = 0;
  // The CPU class of the agent's snapshot work (node_agent/snapshots/snapshot_cpu.h).
  SnapshotCpu snapshot_cpu = SnapshotCpu::kNormal;
  // The agent's own /metrics (node_agent/metrics/metrics_server.h) on HOST:PORT; "": off.
  // Beyond loopback `http_token` is required.
  std::string http;
  std::string http_token;
  // Called (on the session's control thread) when the coordinator refuses this node's
  // registration for good (CoordinatorSession::Delegate::on_fatal): the agent should end with
  // an error. `muster agent` exits 1. Unset: the agent idles, unregistered.
  std::function<void(const Status&)> on_fatal;
};

class Agent {
 public:
  // Starts the threads; registration is retried in the background until it succeeds.
  static StatusOr<std::unique_ptr<Agent>> Start(AgentOptions options);
  ~Agent();  // Shutdown(stop ranks, default grace) if not done

  // A preemption notice for this node (SIGTERM to the agent, tests): like one from a source.
  void Notice(const PreemptionNotice& notice);

  // Stops every rank (SIGTERM, SIGKILL after `grace`), waits for them, sends the last reports
  // (bounded by the call timeout) and stops the threads.
  void Shutdown(std::chrono::milliseconds grace);

  // Blocks until a notice was handled and every rank has exited (what `muster agent` waits for
  // after SIGTERM before it exits), or `timeout` passes. True when idle.
  bool WaitIdle(std::chrono::milliseconds timeout);

  const proto::NodeLabels& labels() const;
  bool registered() const;
  // The /metrics URL when AgentOptions::http is set, else "".
  std::string metrics_url() const;

  // Runs `f` on the agent's reactor thread (tests: a closure that blocks stalls the reactor).
  void RunOnReactorForTesting(std::function<void()> f);

 private:
  struct Impl;
  explicit Agent(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// GPUs on this node for `--gpus auto`: the CUDA runtime's device count where muster was built
// with CUDA (0 when no driver or device answers), else 0.
int CountGpus();

// The local-address and port helpers live in common/net_address.h.
using ::muster::LocalAddressFor;
using ::muster::TcpPortInUse;

}  // namespace muster::node_agent
