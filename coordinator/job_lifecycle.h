#pragma once

// The job lifecycle of the coordinator as pure rules: what one attempt has seen (AttemptState,
// filled in as the agents report), and what becomes of the job when every node of the attempt
// has stopped (DecideAttemptEnd). Like Scheduler::Schedule it does no I/O and reads no clock:
// the coordinator passes `now` in, applies the decision (database, scheduler, events, agent
// actions) and owns everything else.
//
// Rules (docs/protocol.md, "Reports", points users here):
//  - The first cause reported is the attempt's: a rank that exits non-zero or by a signal without
//    `stopped_by_agent`, a node lost, or a start error. Later ones are consequences.
//  - Exit 75 (kPeerFailureExitCode) is a consequence: it stops the gang but waits for a cause;
//    if none shows up by the end it is the failure, blaming no node.
//  - A rank's exit after the gang was stopped (for any reason but its own exit 75) is not a cause.
//  - The end, in this order:
//      cancelled                     -> cancelled;
//      stopped for the time limit    -> failed ("time limit");
//      preempted (scheduler or notice) and not every rank exited 0, or a node lost
//                                    -> pending again, counted as a preemption, not against
//                                       max_restarts; after a lost node not before its agent's
//                                       lease has surely run out (no split brain), unless every
//                                       lost node's agent is known to be gone (then at once);
//      ranks their agents stopped unasked (a lease ran out, or an agent shut down; no other
//      cause), fewer than kLeaseRequeues times in a row without progress
//                                    -> pending at once, counted as a preemption, not against
//                                       max_restarts (from then on: a failure, below);
//      a retryable start error (a port in use on the master node, or a launch preflight that
//      blamed a node), fewer than kMaxStartRetries in a row
//                                    -> pending at once on other ports (without that node),
//                                       not counted;
//      a failure                     -> restart after restart_backoff * 2^(restarts-1) (capped
//                                       at an hour), blaming the failing node (quarantine), or
//                                       failed once max_restarts is used up;
//      otherwise (including every rank exiting 0 after a preemption notice: exit 0 is success,
//      docs/env-contract.md)         -> succeeded, crediting every node.
//
// Thread-safety: values and free functions; no shared state.

#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/exit_codes.h"  // kPeerFailureExitCode
#include "common/proto/coordinator.pb.h"
#include "coordinator/coordinator_db.h"

namespace muster::coordinator {

// Retryable start errors in a row before one counts as a failure.
inline constexpr int kMaxStartRetries = 8;
// Attempts in a row without progress whose ranks their agents stopped unasked (their leases
// ran out) that are requeued without counting; the next one is a failure.
inline constexpr int kLeaseRequeues = 3;

// What caused the attempt to end, as far as the coordinator knows (the first cause wins).
enum class AttemptCause {
  kNone,            // nothing went wrong (yet)
  kRankFailed,      // a rank exited non-zero or by a signal on its own
  kStartFailed,     // a node could not start its ranks
  kStartRetryable,  // ... because of a port in use: retried at once on other ports
  kNodeLost,        // a node was lost (heartbeat timeout, agent restarted): not the job's fault
};
std::string_view AttemptCauseName(AttemptCause cause);

// What a rank's exit means for the attempt (AttemptState::RecordExit).
struct ExitVerdict {
  enum class Kind {
    kNone,         // success, the agent's own stop, or after the cause is known: nothing to do
    kPeerFailure,  // exit 75: a consequence, wait for the cause
    kRankFailed,   // the attempt's cause: the coordinator emits rank_failed
  };
  Kind kind = Kind::kNone;
  bool first_peer_failure = false;  // kPeerFailure: the first one (emit rank_peer_failed)
  bool stop_gang = false;           // stop the rest of the gang now (reason STOP_PEER_FAILED)
};

// What the current attempt has seen. A new attempt starts from a fresh one.
struct AttemptState {
  int64_t started_ms = 0;
  std::set<std::string> started;  // nodes that started their ranks
  std::set<std::string> done;     // nodes whose ranks have all exited (or are given up on)
  // Why the coordinator stopped the gang (the first reason, or a cancel): what the agents get.
  proto::StopReason stop = proto::STOP_REASON_UNSPECIFIED;
  int64_t checkpoint_deadline_ms = 0;  // > 0: the stop asks for a checkpoint first
  AttemptCause cause = AttemptCause::kNone;
  std::string failure;       // the cause, in words (events, the job's detail)
  std::string failure_node;  // the node to blame (quarantine); "" for none
  // The first exit 75, in words; the failure only if no cause shows up.
  std::string peer_failure;
  bool stopped_for_peer_exit = false;  // the gang was stopped because of an exit 75
  // The start error was a failed launch preflight (node_agent/preflight.h): the retry goes
  // without the blamed node (failure_node), which the coordinator keeps off the job.
  bool preflight = false;
  // A node was lost that may still be running its ranks (silent: no heartbeat): the next attempt
  // waits for its lease to run out. False when every lost node's agent is known to be gone
  // (its connection closed: docs/protocol.md, "Dead or silent").
  bool lost_node_may_run = false;
  // Ranks (node, rank) that exited 0 with no signal, and whether any exited otherwise.
  std::set<std::pair<std::string, int>> clean_exits;
  bool unclean_exit = false;

  // The coordinator stops the gang for `reason`; `checkpoint_deadline_ms` > 0 asks for a
  // checkpoint first (kept only when the job has a volume; the earliest deadline wins; a cancel
  // drops it). Returns whether a scheduled or running job becomes requeued by it (every reason
  // but a cancel or the time limit).
  bool RecordStop(proto::StopReason reason, int64_t checkpoint_deadline_ms, bool has_volume);
  // A rank of `node` exited.
  ExitVerdict RecordExit(const std::string& node, const proto::RankExit& exit);
  // `node` could not start its ranks. Returns true when this is the attempt's cause (emit
  // start_failed, stop the gang). `start_retries`: retryable errors in a row before this one.
  bool RecordStartError(const std::string& node, const std::string& error, bool retryable,
                        int start_retries);
  // A node of the attempt was lost; `why` names it. Becomes the cause unless one is known, or
  // always with `override_cause` (a node that re-registered before starting: the attempt must
  // start again wherever its cause came from). `agent_gone`: the node's agent process is known
  // to have ended (its connection closed), so its ranks ended with it and no lease fence is
  // needed for it. Returns whether it became the cause.
  bool RecordNodeLost(const std::string& why, bool override_cause = false, bool agent_gone = false);

  // Every one of `ranks` ranks exited 0, none otherwise, and no cause is known.
  bool EveryRankExitedZero(int ranks) const;
};

// The timing that keeps a lost node's ranks from overlapping the next attempt.
struct LifecycleTiming {
  int64_t lease_ms = 8000;
  int64_t heartbeat_timeout_ms = 5000;
};

// What the coordinator does with a job whose attempt has ended.
struct AttemptEndDecision {
  enum class Kind {
    kCancelled,
    kTimeLimit,   // failed: time limit
    kPreempted,   // requeued, a preemption
    kNodeLost,    // requeued, a preemption (a node lost)
    kStartRetry,  // requeued at once on other ports
    kRestart,     // requeued after the restart backoff
    kFailed,      // max_restarts used up
    kSucceeded,
  };
  // What the scheduler does with the job: forget it (finished, or it waits off the queue for a
  // backoff, a lease or its checkpoint copies; the coordinator submits it again then) or put it
  // back in the queue at its place.
  enum class Queue { kRelease, kRequeue };
  struct Event {
    std::string kind, message;
    bool operator==(const Event&) const = default;
  };

  Kind kind = Kind::kSucceeded;
  proto::JobState state = proto::JOB_SUCCEEDED;
  std::string detail;  // the job's new detail (unchanged for kCancelled and kPreempted/kNodeLost)
  bool set_detail = false;
  int32_t restarts = 0;  // the job's counters after this attempt
  int32_t preemptions = 0;
  int start_retries = 0;  // retryable start errors in a row
  // Attempts in a row stopped by their agents unasked: carried through preemptions, lost nodes
  // and start retries, 0 after any other end. The coordinator keeps it in memory (a restarted
  // coordinator starts from 0, as with start_retries) and passes 0 once an attempt made
  // progress.
  int lease_requeues = 0;
  // This end was the agents' doing (requeued, or the failure that ends a run of them): not a
  // failed resume from snapshots.
  bool stopped_by_agents = false;
  int64_t not_before_ms = 0;  // the job's not_before after this attempt
  Queue queue = Queue::kRelease;
  std::string blame_node;      // count a failure against this node (quarantine); "" for none
  bool credit_nodes = false;   // a clean finish on every node of the attempt
  std::vector<Event> events;   // the job's events, in order, after any quarantine event
  std::string outcome;         // the attempt record's: "succeeded", "failed", "preempted", ...
  std::string attempt_detail;  // the attempt record's detail: its failure
};
std::string_view AttemptEndKindName(AttemptEndDecision::Kind kind);

// Decides what becomes of `job` now that every node of its current attempt has stopped.
// `start_retries`: retryable start errors in a row before this attempt; `replicating`: copies of
// its checkpoints to other providers are in flight (a requeued job waits for them);
// `lease_requeues`: attempts in a row before this one whose ranks their agents stopped unasked
// (0 when this attempt made progress).
// REQUIRES: every node of job.nodes is in attempt.done.
AttemptEndDecision DecideAttemptEnd(const AttemptState& attempt, const JobRecord& job,
                                    int start_retries, bool replicating, int64_t now_ms,
                                    const LifecycleTiming& timing, int lease_requeues = 0);

}  // namespace muster::coordinator
