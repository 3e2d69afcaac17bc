#pragma once

// Coordinator: the job lifecycle, node registry and agent protocol of `muster coordinator`,
// independent of sockets. It turns request envelopes (client and agent payloads of
// common/proto/coordinator.proto) into replies, state-store writes, scheduler passes and actions
// for agents. CoordinatorServer (server.h) puts it behind an RpcServer; the fuzz target feeds it
// bytes directly.
//
// Job lifecycle: pending -> scheduled (assignments sent) -> running (every node started) ->
// succeeded | failed | cancelled, or requeued (preempted, node lost, or failed with restarts
// left) -> pending again once every node's ranks have stopped.
//
// Time comes from the injected clock; Tick() (the server calls it every 100 ms) detects
// heartbeat timeouts, enforces time limits, ends restart backoffs, expires parked polls and runs
// a scheduling pass.
//
// Durable writes: every change goes to the database before anything acts on it. The first
// write that fails latches the coordinator (LevelDB's background error): it is logged
// (critical), kept (write_error()), shown by the status request (StatusReply.write_error, and so
// `muster status`), and every later change is refused with Unavailable naming it: submit,
// cancel, drain, node preempt, agent register and agent report requests, and Tick's own
// changes (lost nodes, time limits, starts, copies). Reads keep working, and so do heartbeats
// and polls, so agents keep their leases and running ranks go on until the coordinator is
// restarted on a working store. In memory nothing claims what the store does not have: a job
// record whose write failed goes back to the stored one, and nothing is sent for it.
//
// Thread-safety: none; used from one thread (the server's reactor).

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>

#include "common/curve.h"
#include "common/log_throttle.h"
#include "common/proto/envelope.pb.h"
#include "common/status.h"
#include "coordinator/coordinator_db.h"
#include "coordinator/job_spec.h"
#include "coordinator/log_keeper.h"
#include "coordinator/node_registry.h"
#include "coordinator/scheduler.h"
#include "coordinator/snapshot_plan.h"

namespace muster::coordinator {

namespace providers {
class ProviderManager;
}

struct CoordinatorOptions {
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds heartbeat_timeout{5000};
  std::chrono::milliseconds lease{8000};  // handed to agents; must exceed heartbeat_timeout
  std::chrono::milliseconds stop_grace{10000};
  // Grace when a gang is stopped because one of its nodes or ranks failed: nothing collective
  // can succeed any more, so the survivors get SIGKILL sooner.
  std::chrono::milliseconds peer_failed_grace{2000};
  // MASTER_PORT = base + (seq * 7 + attempt) % 500 (a retry gets another port); the attempt's
  // rendezvous store listens on MASTER_PORT + 500.
  int rendezvous_port_base = 29500;
  QuarantinePolicy quarantine;
  // The role a key has now (kNone: not authorized any more); the server asks its ZAP handler.
  // A node name bound to a key that is no longer an agent key may be taken by another agent
  // key (key rotation, `muster keys migrate`). Unset: a binding never moves.
  std::function<KeyRole(const std::string& public_key)> current_role;
  // The scope a key has now (common/key_scope.h): a registration outside it is refused. The
  // server asks its ZAP handler. Unset: every key is unscoped.
  std::function<KeyScope(const std::string& public_key)> current_scope;
  std::function<TimePoint()> clock = [] { return SchedClock::now(); };
  // Finished attempts' rank logs kept by the coordinator (log_keeper.h, log_collect.cc): the
  // directory ("": none kept), its caps, and how long collecting one node's logs may take (an
  // idle on-demand node is not released before that, unless its logs are in).
  std::filesystem::path log_keep_dir;
  LogKeepLimits log_keep;
  std::chrono::milliseconds log_keep_wait{30000};
};

// Who sent a request: the CURVE key of its connection, as authorized when the request arrived.
// Roles decide what a request may do (docs/security.md): clients act on the jobs they submitted,
// admins on every job and node, agents only as the nodes bound to their key.
struct Caller {
  std::string name;        // the key's name (logs, refusals)
  std::string public_key;  // z85; "" on an insecure coordinator
  KeyRole role = KeyRole::kLegacy;
  std::string address;  // for logs
  std::string ToString() const;
};

// Told what the coordinator does, on its reactor thread, as it happens (coordinator/http's
// recorder keeps progress histories and the scheduler's pass times from these). REQUIRES: the
// methods return quickly and never call back into the Coordinator.
class CoordinatorObserver {
 public:
  virtual ~CoordinatorObserver() = default;
  // One scheduling pass took `took` (wall time of Scheduler::Schedule).
  virtual void OnSchedulerPass(std::chrono::nanoseconds took) = 0;
  // A progress report of `attempt` of `job_id` was accepted.
  virtual void OnProgress(const std::string& job_id, int attempt, const proto::Progress& p) = 0;
  // A step was catalogued on `provider`'s volume: a commit or a verified replica
  // (`report.checkpoint_replica()`), with its size and, for a commit, its latency when given.
  virtual void OnCheckpoint(const proto::AgentReport& report, const std::string& provider) {}
};

class Coordinator {
 public:
  using Reply = std::function<void(proto::Envelope)>;

  // Takes `store`, loads its state and restores the scheduler: pending jobs queue again, running
  // jobs keep their nodes until their agents re-register or time out.
  static StatusOr<std::unique_ptr<Coordinator>> Create(std::unique_ptr<CoordinatorDb> store,
                                                       CoordinatorOptions options);
  ~Coordinator();

  // Handles one request. `reply` is called exactly once, now or later (parked polls and log
  // fetches reply from a later Handle or Tick). A request the caller's role or key may not make
  // gets FailedPrecondition "permission denied: ..." naming key, role and request, and a log line.
  void Handle(const Caller& caller, proto::Envelope&& request, Reply reply);
  // The same for a caller with every right and no key (an insecure coordinator; tests, fuzzing).
  void Handle(const std::string& peer, proto::Envelope&& request, Reply reply);

  // Periodic work; see above.
  void Tick();

  // Dead or silent (docs/protocol.md; coordinator/agent_connections.h). Whether `caller` speaks
  // for `node` and `session` is its current session.
  bool IsAgentSession(const Caller& caller, const std::string& node, const std::string& session);
  // The agent of `node` (session `session`) is gone: every connection it had closed and it said
  // nothing since. Declares the node lost now, with no lease fence: its ranks died with it. A
  // session that is no longer the node's current one is ignored.
  void AgentGone(const std::string& node, const std::string& session, const std::string& why);

  const Scheduler& scheduler() const { return *sched_; }
  // Read-only use on the reactor thread (the HTTP side's snapshots: attempts, catalog, events).
  CoordinatorDb& store() { return *store_; }
  // Not owned; null: none. REQUIRES: outlives the Coordinator or is reset to null first.
  void set_observer(CoordinatorObserver* observer) { observer_ = observer; }

  // On-demand nodes (coordinator/providers/): after each pass the manager may request node
  // groups for the gangs left pending and release idle nodes. Call before the first Tick: it
  // restores the manager's state that the store kept (provider_manager.h).
  void SetProviders(std::unique_ptr<providers::ProviderManager> providers);

  // Ok, or the first durable write that failed; every change has been refused since.
  const Status& write_error() const { return write_error_; }

 private:
  using NodeRt = NodeRegistry::Node;
  struct JobRt;
  Coordinator(std::unique_ptr<CoordinatorDb> store, CoordinatorOptions options);
  Status Restore();

  int64_t NowMs() const;
  void Event(const std::string& job, const std::string& node, const std::string& kind,
             const std::string& message);
  // Writes job.rec (UpdateJob); on failure job.rec goes back to what the store has.
  Status Persist(JobRt& job);
  // Sets (or, with "", clears) why the job's next attempt must not resume from snapshots, in
  // memory and in the database (PutSnapshotFallback), so a restart keeps it.
  void SaveSnapshotFallback(JobRt& job, const std::string& why);
  // Runs a durable write named `what` (for the error): refused once latched; a failure latches.
  Status Write(const std::string& what, const std::function<Status()>& write);
  // The error every change gets once latched: Unavailable, naming the original failure.
  Status Refusal() const;
  void ExpireFetches(int64_t now);
  void Pass();
  // The provider hooks (provider_hooks.cc).
  class DbProviderLedger;
  void ProvidersPass();
  // The scheduler's nodes as the providers see them: one serving a copy in flight is busy.
  std::vector<NodeView> NodesForProviders(TimePoint now) const;
  std::string ProviderReason(const std::string& job) const;
  // Hot spares (spares.cc): events for the spares a pass held; a lost gang node replaced by a
  // spare (false: none held); a lost spare dropped from its job.
  void SpareEvents(const Decisions& d);
  bool ReplaceWithSpare(const std::string& job, const std::string& lost);
  void DropLostSpare(const std::string& node);
  // The spares as the database keeps them (job_spares): SaveSpares writes each job's set that
  // changed since it was last saved; RestoreSpares gives the restored running jobs theirs back
  // (REQUIRES: jobs restored).
  void SaveSpares();
  void RestoreSpares();
  // Drops a node's record (database, scheduler, registry; its key binding stays). Its log
  // copies in flight end with "node NAME <why> before all of it was kept". No-op for an
  // unknown node.
  Status ForgetNode(const std::string& name, const std::string& why);
  // Why jobs that have not ended still need `node`: "it is in attempt A of job J" (not done
  // there yet), "it holds in-memory snapshots of job J" (coordinator.cc: JobRt is private to it).
  std::vector<std::string> JobsNeedingNode(const std::string& node) const;
  std::vector<JobRequest> PendingRequests() const;
  // False if the store did not take the attempt (nothing was sent).
  bool Start(JobRt& job, const std::vector<std::string>& nodes);
  // `checkpoint_deadline_ms` (unix ms) > 0: the agents ask the ranks to checkpoint a common
  // step before it, then stop them (preemption).
  void StopGang(JobRt& job, proto::StopReason reason, const std::string& except_node,
                int64_t checkpoint_deadline_ms = 0);
  std::string VolumeKey(const std::string& volume, const std::string& provider) const;
  // After a commit on `source`'s provider: copy the step to every other provider that has a
  // connected node mounting the volume (AllowTransfer to the source, ReplicateCheckpoint to the
  // target).
  void Replicate(JobRt* job, const std::string& job_id, int64_t step, const std::string& volume,
                 const NodeRt& source);
  void Replicated(JobRt& job, const std::string& provider, int64_t step);
  // A checkpoint copy to another provider's volume: one per job and target provider, the
  // newest step asked for. A copy that fails, or whose target agent restarts or is lost, is
  // retried with backoff (from the source's current endpoint, to a connected node of that
  // provider mounting the volume) until it is done, superseded by a newer step, or has failed
  // kMaxCopyTries times or waited kCopySourceWaitMs for its source, or the job ended (its transfer
  // keys are revoked then): every outcome is an event.
  // Saved in the database when one starts and at each tick that changed them (not the
  // grants, sessions or backoff clocks): after a restart a copy not done is asked again.
  struct CopyRt {
    std::string job_id, provider, volume;
    int64_t step = 0;
    std::string source;                  // the node that committed the step
    std::string target, target_session;  // where the current try runs
    int tries = 0;                       // tries that failed
    int64_t retry_at_ms = 0;             // > 0: waiting to retry then; 0: a try runs
    int64_t waiting_since_ms = 0;        // > 0: when it started waiting for its source
    bool done = false;                   // copied, failed for good, or superseded
  };
  // Starts a try of `c` now; false when no source or target is connected (retried later).
  bool IssueCopy(CopyRt& c, int keep);
  // The copies as the database keeps them (durable_hooks.cc): SaveCopies writes them when
  // they changed since the last save; RestoreCopies reads them (REQUIRES: jobs restored).
  std::string CopiesState() const;
  void SaveCopies();
  void RestoreCopies();
  void RetryCopy(CopyRt& c, const std::string& why);
  void TickCopies(int64_t now);
  // A report about a copy from its target: done, failed (retried) or superseded there.
  void OnCopyReport(const NodeRt& target, const proto::AgentReport& req);
  // A transfer key handed to a replication's source (AllowTransfer). It is revoked there
  // (RevokeTransfer) when the copy it was made for ends (the target reports the outcome with
  // the key) or when the job ends; the source drops it by itself at its expiry.
  struct TransferGrant {
    std::string job_id, source, target, public_key;
    int64_t expires_ms = 0;
  };
  void RevokeTransfer(const TransferGrant& grant, const std::string& why);
  void NodeDone(JobRt& job, const std::string& node);
  // Kept logs (log_collect.cc): when `node` is done with the current attempt of `job`, its
  // ranks' logs are copied into log_keeper_ (FetchLog/AgentLogChunk, one chunk in flight per
  // rank) until complete or log_keep_wait has passed; meanwhile the node is not idle.
  struct LogCopy {
    uint64_t serial = 0;  // which fetch replies belong to this copy
    std::string job, node;
    int attempt = 0, rank = 0, ranks = 0;
    int node_first = 0, node_ranks = 0;  // the node's ranks of the attempt
    uint64_t generation = 0;             // the agent's cursor (node_agent/log_reader.h)
    int64_t offset = 0;
    int64_t deadline_ms = 0;
    int64_t next_fetch_ms = 0;  // > 0: ask again then (the node had nothing new yet)
    bool in_flight = false;
    // > 0: a copy asked again after a coordinator restart, waiting until then for its node's
    // agent to register again (every restored node is disconnected at first).
    int64_t reconnect_until_ms = 0;
  };
  using LogCopyKey = std::tuple<std::string, int, int>;  // job, attempt, rank
  void KeepLogs(const JobRecord& rec, const std::string& node);
  void FetchKeptLog(LogCopy& c);
  void OnKeptLogChunk(const LogCopyKey& key, uint64_t serial, const proto::Envelope& e);
  // Ends a copy: commits what it has, with `note` saying what is missing ("" : complete);
  // `keep` false: drops it (the node had no log of the rank).
  void EndLogCopy(const LogCopyKey& key, const std::string& note, bool keep = true);
  void TickLogCopies(int64_t now);
  // At start: the copies the previous coordinator was writing when it stopped are asked again
  // of their nodes (or given up with a logs_lost event when the node is gone).
  void RestoreLogCopies(int64_t now);
  // Answers `req` from the kept copy when there is one to answer from; false: ask the node.
  bool ServeKeptLog(const proto::LogsRequest& req, const JobRecord& rec, int attempt,
                    const std::string& node, Reply& reply);
  void Finish(JobRt& job);
  void PreflightFailed(JobRt& job, const std::string& node, const proto::AgentReport& req);
  // Durable facts beyond jobs and nodes (durable_hooks.cc), stored before memory follows:
  // a preemption notice drains its node until an admin undrains it; a node blamed by a launch
  // preflight is kept off that job for the rest of it.
  Status DrainOnNotice(const std::string& node);
  Status ExcludeFromJob(JobRequest& job, const std::string& node, const std::string& why);
  // The lease agents hold: the one handed out, but at least two heartbeat intervals (as the
  // agent takes it, node_agent/coordinator_session.cc). Assumes the same flags across a restart.
  int64_t AgentLeaseMs() const {
    return std::max<int64_t>(options_.lease.count(), 2 * options_.heartbeat_interval.count());
  }
  // `agent_gone`: the agent process is known to have ended (AgentGone), or its lease has run
  // out with no reply from this coordinator (a restored node that never came back): no lease
  // fence.
  void LoseNode(NodeRt& node, const std::string& why, bool agent_gone = false);
  void Enqueue(const std::string& node, proto::AgentAction action);
  // The node's session, if `caller` holds the key the node is bound to.
  StatusOr<NodeRt*> Session(const Caller& caller, const std::string& node,
                            const std::string& session);
  // May `caller` see and act on `job`? Admins: every job; clients: the jobs they submitted.
  bool Owns(const Caller& caller, const JobRecord& job) const;
  Status Deny(const Caller& caller, const std::string& request, const std::string& why);
  // A replica outcome (copied, failed, superseded) for `step` of `job_id` on `volume` is
  // accepted from `node` only if it mounts the volume and the step is committed on another
  // provider's volume (where the copy came from).
  bool ReplicaReportAllowed(const NodeRt& node, const std::string& job_id, int64_t step,
                            const std::string& volume);
  proto::JobStatus StatusOf(const JobRt& job);
  proto::NodeStatus NodeStatusOf(const NodeRt& node);

  StatusOr<proto::Envelope> OnSubmit(const Caller& caller, const proto::SubmitRequest& req);
  StatusOr<proto::Envelope> OnStatus(const Caller& caller, const proto::StatusRequest& req);
  StatusOr<proto::Envelope> OnCancel(const Caller& caller, const proto::CancelRequest& req);
  StatusOr<proto::Envelope> OnNodes(const Caller& caller);
  StatusOr<proto::Envelope> OnEvents(const Caller& caller, const proto::EventsRequest& req);
  StatusOr<proto::Envelope> OnDrain(const proto::DrainRequest& req);
  StatusOr<proto::Envelope> OnPreemptNode(const proto::PreemptNodeRequest& req);
  // `muster node forget` (node_forget.cc).
  StatusOr<proto::Envelope> OnForgetNode(const Caller& caller, const proto::ForgetNodeRequest& req);
  void OnLogs(const Caller& caller, const proto::LogsRequest& req, Reply reply);
  StatusOr<proto::Envelope> OnRegister(const Caller& caller, const proto::AgentRegister& req);
  StatusOr<proto::Envelope> OnHeartbeat(const Caller& caller, const proto::AgentHeartbeat& req);
  void OnPoll(const Caller& caller, const proto::AgentPoll& req, Reply reply);
  StatusOr<proto::Envelope> OnReport(const Caller& caller, const proto::AgentReport& req);
  StatusOr<proto::Envelope> OnLogChunk(const Caller& caller, const proto::AgentLogChunk& req);

  std::unique_ptr<CoordinatorDb> store_;
  CoordinatorOptions options_;
  // A refused key may retry at will: its warnings are throttled per key and request.
  LogThrottle deny_log_{std::chrono::seconds(10)};
  std::unique_ptr<Scheduler> sched_;
  NodeRegistry nodes_;              // and the node keys (persisted: CoordinatorDb::BindNodeKey)
  SnapshotBook snapshot_book_;      // the in-memory snapshots each agent holds (snapshot_plan.h)
  SnapshotPinner snapshot_pinner_;  // the snapshot steps the agents keep (snapshot_pin.h)
  std::map<std::string, std::unique_ptr<JobRt>> jobs_;  // every job not terminal, plus recent
  struct Fetch {
    Reply reply;
    int64_t deadline_ms;
    std::string node;
  };
  std::map<uint64_t, Fetch> fetches_;
  std::map<std::pair<std::string, std::string>, CopyRt> copies_;  // by (job, target provider)
  std::vector<TransferGrant> grants_;
  std::string saved_copies_;  // CopiesState() as last saved or restored
  std::map<std::string, std::vector<std::string>> saved_spares_;  // job -> spares, as saved
  uint64_t next_fetch_ = 1;
  bool pass_needed_ = true;
  std::unique_ptr<providers::ProviderManager> providers_;  // null: static nodes only
  Status write_error_;  // the latch: the first durable write that failed
  CoordinatorObserver* observer_ = nullptr;
  std::unique_ptr<LogKeeper> log_keeper_;  // null: no logs kept
  std::map<LogCopyKey, LogCopy> log_copies_;
  uint64_t next_log_copy_ = 1;
  bool stopping_ = false;  // in the destructor: fetch replies change nothing
};

}  // namespace muster::coordinator
