#pragma once

// AssignmentRunner: carries out, on this node, what the coordinator asks of it (AgentAction)
// and watches what follows. It spawns an attempt's ranks with the env contract
// (docs/env-contract.md), serves the attempt's rendezvous store on node rank 0, stops ranks
// (with a checkpoint first where asked), answers log fetches, grants and revokes volume
// transfers, and turns what ranks print and how they end into reports: starts and start
// errors, exits, checkpoint commits (only once the step is good on the volume), progress (the
// newest per job, taken by the heartbeat). A preemption notice or the lease running out makes
// it stop its ranks by itself. Replications and retention leave through its outputs.
//
// Ownership: owns the Supervisor (so every rank process), the attempts' rendezvous stores and
// the node's VolumeServer. Borrows the reactor and the ZAP authenticator, which must outlive
// it.
//
// Thread-safety: none, by design: every method runs on the reactor thread (REQUIRES), and so
// do the supervisor's callbacks into it, so its state needs no lock. Create() may run before
// the reactor starts; destroy it on the reactor thread (or once the reactor has stopped). The
// outputs are called on the reactor thread and must not block for long.

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "collectives/rendezvous_relay.h"
#include "collectives/rendezvous_server.h"
#include "common/curve.h"
#include "common/logging.h"
#include "common/proto/coordinator.pb.h"
#include "common/proto/envelope.pb.h"
#include "common/reactor.h"
#include "common/status.h"
#include "node_agent/metrics/agent_metrics.h"
#include "node_agent/preemption_notice.h"
#include "node_agent/preflight.h"
#include "node_agent/snapshots/peer_copy.h"
#include "node_agent/snapshots/rank_trust.h"
#include "node_agent/snapshots/snapshot_server.h"
#include "node_agent/snapshots/snapshot_store.h"
#include "node_agent/supervisor.h"
#include "node_agent/volume_transfer.h"

namespace muster::node_agent {

class AssignmentRunner {
 public:
  struct Options {
    std::filesystem::path work_dir;  // logs/, notice/ and ranks.pids; must exist
    bool insecure = false;           // no CURVE for the stores (tests only)
    // Grace between SIGTERM and SIGKILL when the lease runs out.
    std::chrono::milliseconds stop_grace{5000};
    int64_t rank_log_max_bytes = int64_t{64} << 20;  // Supervisor::Options
    int rank_log_keep = 3;
    // The launch preflight of a multi-node attempt (node_agent/preflight.h).
    std::chrono::milliseconds preflight_timeout{15000};
    std::chrono::milliseconds preflight_probe_timeout{2000};
    // Memory for in-memory snapshots of jobs that ask for them (checkpoint.snapshot_every_steps):
    // 0 turns them off here (such jobs run with volume checkpoints only, and a warning). Served
    // on <work_dir>/snapshots/s.sock (node_agent/snapshots/).
    uint64_t snapshot_memory = 0;
    // The CPU class of the snapshot work (node_agent/snapshots/snapshot_cpu.h).
    SnapshotCpu snapshot_cpu = SnapshotCpu::kNormal;
  };
  // Where what the runner produces goes. Each runs on the reactor thread.
  struct Outputs {
    std::function<void(proto::AgentReport)> report;  // to the coordinator (node name unset)
    std::function<void(proto::Envelope)> send;       // a log chunk for the coordinator
    std::function<void(const std::string& job_dir, int keep)> prune;   // checkpoint.keep
    std::function<void(const proto::ReplicateCheckpoint&)> replicate;  // a copy to run
    // A rank's process group to stop when the lease runs out, and its release once reaped.
    std::function<void(pid_t pgid, const std::string& label)> guard;
    std::function<void(pid_t pgid)> unguard;
  };

  // `labels`: the node's (name, provider, gpus, address, volumes). With volumes, serves them to
  // other nodes (VolumeServer on the node's address) and fills in the labels' transfer
  // endpoint and key. `zap`: null when insecure.
  static StatusOr<std::unique_ptr<AssignmentRunner>> Create(Reactor& reactor, ZapAuthenticator* zap,
                                                            proto::NodeLabels labels,
                                                            Options options, Outputs outputs);
  ~AssignmentRunner();  // REQUIRES: on the reactor thread, or the reactor stopped
  AssignmentRunner(const AssignmentRunner&) = delete;
  AssignmentRunner& operator=(const AssignmentRunner&) = delete;

  // The labels as completed by Create; immutable, so readable from any thread.
  const proto::NodeLabels& labels() const { return labels_; }
  // The snapshots this agent holds; null when Options::snapshot_memory is 0. Thread-safe.
  // A job's snapshots are kept across its attempts (a resumed gang restores from them) and
  // dropped once an attempt here ends for good: every rank exited 0, or it was cancelled or
  // ran out of time.
  SnapshotStore* snapshots() const { return snapshots_.get(); }
  // Copies to the peer agent and the peer's end of them; null without snapshot memory.
  SnapshotForwarder* snapshot_forwarder() const { return forwarder_.get(); }
  SnapshotPeerServer* snapshot_peer_server() const { return peer_server_.get(); }
  // Every frame held now, for heartbeats; nullopt without snapshot memory. Thread-safe.
  std::optional<std::vector<proto::SnapshotHeld>> SnapshotsHeld() const;

  // ---- REQUIRES: on the reactor thread, for everything below.

  void OnAction(const proto::AgentAction& a);
  // A preemption notice for this node: every running attempt is asked to checkpoint and is
  // stopped at the notice's deadline; later starts are refused. The first notice counts.
  void OnNotice(const PreemptionNotice& n);
  // The lease watchdog found the lease running out and signalled the ranks itself: their
  // exits are the agent's doing, and what is left is stopped.
  void OnLeaseExpired(std::chrono::milliseconds silent);
  // Stops every running rank (SIGTERM, SIGKILL after `grace`): the agent shuts down.
  void StopAll(std::chrono::milliseconds grace);

  // What runs here, for registrations and heartbeats.
  std::vector<proto::RunningAssignment> Running() const;
  // The newest progress per job since the last take; ReturnProgress gives back what a failed
  // heartbeat could not deliver (newer progress taken since wins).
  std::map<std::string, proto::Progress> TakeProgress();
  void ReturnProgress(std::map<std::string, proto::Progress> progress);
  // No rank lives.
  bool Idle() const;
  // Every rank process of the attempts here, for the agent's /metrics.
  std::vector<RankMetrics> RankMetricsNow() const;

 private:
  struct Assignment {
    proto::StartAssignment spec;
    std::string group;
    std::map<ChildId, int> rank_of;   // child -> global rank
    std::map<ChildId, pid_t> pid_of;  // child -> its pid, which leads its process group
    std::set<int> live;               // global ranks not yet reaped
    size_t open = 0;                  // children not yet closed
    std::unique_ptr<collectives::RendezvousServer> store;
    // This node's relay to the store for the attempt's ranks (node_agent/rank_relay.h).
    std::unique_ptr<collectives::RendezvousRelay> relay;
    std::string volume_path;
    std::filesystem::path notice_path;
    bool stopping = false;  // a stop (or a notice) reached it: exits are not failures
    bool checkpoint_asked = false;
    bool all_exited_sent = false;
    bool rank_failed = false;  // a rank exited non-zero without being stopped
    bool job_over = false;     // stopped for good (cancelled, time limit)
    Reactor::TimerId deadline_timer = 0;
    int64_t last_commit = 0;  // the newest step reported as committed
    int64_t started_ms = 0;   // when its ranks were spawned (unix ms)
    // Per global rank: unix ms of its newest line and newest progress line (/metrics).
    std::map<int, std::pair<int64_t, int64_t>> last_line_ms;
  };

  AssignmentRunner(Reactor& reactor, ZapAuthenticator* zap, proto::NodeLabels labels,
                   Options options, Outputs outputs);

  std::filesystem::path LogPath(const std::string& job, int attempt, int rank,
                                proto::LogStream stream = proto::LOG_MERGED) const;
  void StartError(const proto::StartAssignment& s, const std::string& why, bool retryable = false);
  void StartAssignment(const proto::StartAssignment& given);
  // The ranks of an assignment whose checks passed; `ifname`: the preflight's interface.
  void LaunchRanks(Assignment a, const std::string& creds, const std::string& resume_fallback,
                   const std::string& ifname);
  // A multi-node attempt runs the launch preflight off the reactor before LaunchRanks.
  void BeginPreflight(Assignment a, const std::string& creds, const std::string& fallback);
  // A snapshot resume (StartAssignment.snapshot_sources): this node's ranks' frames that its
  // store lacks are fetched from their holders off the reactor first; then Proceed.
  void BeginSnapshotFetch(Assignment a, const std::string& creds, const std::string& fallback);
  void EndSnapshotFetch(const std::string& group, const Status& st);
  // The preflight (several nodes) or the launch.
  void Proceed(Assignment a, const std::string& creds, const std::string& fallback);
  void AddSnapshotsHeld(const std::string& job, proto::AgentReport& r) const;
  // Frees the job's snapshots and reservations here, unless its ranks run (or start) here.
  void DropSnapshots(const std::string& job);
  void EndPreflight(const std::string& group, const PreflightResult& r);
  // A stop for an attempt still in its preflight: over at once. False if none.
  bool StopPreflight(const std::string& group);
  void AskCheckpoint(Assignment& a, int64_t deadline_ms, const std::string& why);
  void SendNoticeSignal(Assignment& a);
  void ArmDeadline(Assignment& a, int64_t deadline_ms, std::chrono::milliseconds grace);
  void StopAssignment(const proto::StopAssignment& s);
  void FetchLog(const proto::FetchLog& f);
  Assignment* AssignmentOf(ChildId id, int* rank);
  void OnLine(ChildId id, std::string_view line);
  void OnCommitLine(Assignment& a, int64_t step, double seconds);
  void OnExit(ChildId id, const ExitInfo& info);
  void OnClosed(ChildId id);
  void SaveRanks();

  Reactor& reactor_;
  ZapAuthenticator* const zap_;
  const Options options_;
  const Outputs out_;
  proto::NodeLabels labels_;
  std::shared_ptr<spdlog::logger> logger_ = log::Get("agent");
  std::unique_ptr<Supervisor> supervisor_;
  std::unique_ptr<VolumeServer> volume_server_;
  // Shared with the snapshot server's threads (thread-safe); the server is destroyed first.
  std::unique_ptr<SnapshotStore> snapshots_;
  std::unique_ptr<SnapshotServer> snapshot_server_;
  std::unique_ptr<SnapshotForwarder> forwarder_;
  std::unique_ptr<SnapshotPeerServer> peer_server_;
  // The ranks that may use the local snapshot socket (shared with its threads).
  std::shared_ptr<RankTrust> rank_trust_ = std::make_shared<RankTrust>();
  // Attempts whose ranks' snapshot frames are being fetched from peers, by group.
  struct Fetching {
    Assignment a;
    std::string creds, resume_fallback;
    std::shared_ptr<std::atomic<bool>> cancel;
    std::thread thread;
  };
  std::map<std::string, Fetching> fetches_;
  std::vector<std::thread> finished_fetches_;      // joined in the destructor
  std::map<std::string, Assignment> assignments_;  // by group
  // Attempts whose launch preflight runs: by group, what LaunchRanks will need.
  struct Pending {
    Assignment a;
    std::string creds, resume_fallback;
    std::unique_ptr<Preflight> run;
  };
  std::map<std::string, Pending> preflights_;
  // Closures posted by preflight threads check it: the runner may be gone when they run.
  std::shared_ptr<int> life_ = std::make_shared<int>(0);
  std::map<ChildId, std::string> group_of_;
  std::map<std::string, proto::Progress> progress_;  // newest per job, not yet taken
  std::optional<PreemptionNotice> notice_;
};

// Stops the ranks a previous incarnation of this agent started (it was killed -9), as recorded
// in `pids_file` (the runner's <work_dir>/ranks.pids), and removes the file.
void KillLeftoverRanks(const std::filesystem::path& pids_file,
                       const std::shared_ptr<spdlog::logger>& logger);

}  // namespace muster::node_agent
