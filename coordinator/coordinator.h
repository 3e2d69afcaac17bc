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
// Thread-safety: none; used from one thread (the server's reactor).

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "common/proto/envelope.pb.h"
#include "common/status.h"
#include "coordinator/job_spec.h"
#include "coordinator/scheduler.h"
#include "coordinator/state_store.h"

namespace muster::coordinator {

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
  std::function<TimePoint()> clock = [] { return SchedClock::now(); };
};

class Coordinator {
 public:
  using Reply = std::function<void(proto::Envelope)>;

  // Takes `store`, loads its state and restores the scheduler: pending jobs queue again, running
  // jobs keep their nodes until their agents re-register or time out.
  static StatusOr<std::unique_ptr<Coordinator>> Create(std::unique_ptr<StateStore> store,
                                                       CoordinatorOptions options);
  ~Coordinator();

  // Handles one request. `reply` is called exactly once, now or later (parked polls and log
  // fetches reply from a later Handle or Tick). `peer` names the caller for logs.
  void Handle(const std::string& peer, proto::Envelope&& request, Reply reply);

  // Periodic work; see above.
  void Tick();

  const Scheduler& scheduler() const { return *sched_; }

 private:
  struct NodeRt;
  struct JobRt;
  Coordinator(std::unique_ptr<StateStore> store, CoordinatorOptions options);
  Status Restore();

  int64_t NowMs() const;
  void Event(const std::string& job, const std::string& node, const std::string& kind,
             const std::string& message);
  void Persist(JobRt& job);
  void Pass();
  void Start(JobRt& job, const std::vector<std::string>& nodes);
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
  // A transfer key handed to a replication's source (AllowTransfer). It is revoked there
  // (RevokeTransfer) when the copy it was made for ends (the target reports the outcome with
  // the key) or when the job ends; the source drops it by itself at its expiry.
  struct TransferGrant {
    std::string job_id, source, target, public_key;
    int64_t expires_ms = 0;
  };
  void RevokeTransfer(const TransferGrant& grant, const std::string& why);
  void NodeDone(JobRt& job, const std::string& node);
  void Finish(JobRt& job);
  void LoseNode(NodeRt& node, const std::string& why);
  void Enqueue(const std::string& node, proto::AgentAction action);
  void FlushPoll(NodeRt& node);
  StatusOr<NodeRt*> Session(const std::string& node, const std::string& session);
  proto::JobStatus StatusOf(const JobRt& job);
  proto::NodeStatus NodeStatusOf(const NodeRt& node);

  StatusOr<proto::Envelope> OnSubmit(const proto::SubmitRequest& req);
  StatusOr<proto::Envelope> OnStatus(const proto::StatusRequest& req);
  StatusOr<proto::Envelope> OnCancel(const proto::CancelRequest& req);
  StatusOr<proto::Envelope> OnNodes();
  StatusOr<proto::Envelope> OnEvents(const proto::EventsRequest& req);
  StatusOr<proto::Envelope> OnDrain(const proto::DrainRequest& req);
  StatusOr<proto::Envelope> OnPreemptNode(const proto::PreemptNodeRequest& req);
  void OnLogs(const proto::LogsRequest& req, Reply reply);
  StatusOr<proto::Envelope> OnRegister(const proto::AgentRegister& req);
  StatusOr<proto::Envelope> OnHeartbeat(const proto::AgentHeartbeat& req);
  void OnPoll(const proto::AgentPoll& req, Reply reply);
  StatusOr<proto::Envelope> OnReport(const proto::AgentReport& req);
  StatusOr<proto::Envelope> OnLogChunk(const proto::AgentLogChunk& req);

  std::unique_ptr<StateStore> store_;
  CoordinatorOptions options_;
  std::unique_ptr<Scheduler> sched_;
  std::map<std::string, std::unique_ptr<NodeRt>> nodes_;
  std::map<std::string, std::unique_ptr<JobRt>> jobs_;  // every job not terminal, plus recent
  struct Fetch {
    Reply reply;
    int64_t deadline_ms;
    std::string node;
  };
  std::map<uint64_t, Fetch> fetches_;
  std::vector<TransferGrant> grants_;
  uint64_t next_fetch_ = 1;
  uint64_t next_session_ = 1;
  bool pass_needed_ = true;
};

// Conversions between the YAML job spec and the wire.
proto::JobSpec JobSpecToProto(const JobSpec& spec);
StatusOr<JobSpec> JobSpecFromProto(const proto::JobSpec& spec);

}  // namespace muster::coordinator
