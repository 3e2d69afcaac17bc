#include "coordinator/job_lifecycle.h"

#include <fmt/format.h>

namespace muster::coordinator {

std::string_view AttemptCauseName(AttemptCause cause) {
  switch (cause) {
    case AttemptCause::kNone:
      return "none";
    case AttemptCause::kRankFailed:
      return "rank_failed";
    case AttemptCause::kStartFailed:
      return "start_failed";
    case AttemptCause::kStartRetryable:
      return "start_retryable";
    case AttemptCause::kNodeLost:
      return "node_lost";
  }
  return "?";
}

std::string_view AttemptEndKindName(AttemptEndDecision::Kind kind) {
  using K = AttemptEndDecision::Kind;
  switch (kind) {
    case K::kCancelled:
      return "cancelled";
    case K::kTimeLimit:
      return "time_limit";
    case K::kPreempted:
      return "preempted";
    case K::kNodeLost:
      return "node_lost";
    case K::kStartRetry:
      return "start_retry";
    case K::kRestart:
      return "restart";
    case K::kFailed:
      return "failed";
    case K::kSucceeded:
      return "succeeded";
  }
  return "?";
}

bool AttemptState::RecordStop(proto::StopReason reason, int64_t deadline_ms, bool has_volume) {
  if (stop == proto::STOP_REASON_UNSPECIFIED || reason == proto::STOP_CANCELLED) stop = reason;
  if (deadline_ms > 0 && reason != proto::STOP_CANCELLED && has_volume &&
      (checkpoint_deadline_ms == 0 || deadline_ms < checkpoint_deadline_ms)) {
    checkpoint_deadline_ms = deadline_ms;
  }
  if (reason == proto::STOP_CANCELLED) checkpoint_deadline_ms = 0;
  return reason != proto::STOP_CANCELLED && reason != proto::STOP_TIME_LIMIT;
}

ExitVerdict AttemptState::RecordExit(const std::string& node, const proto::RankExit& x) {
  ExitVerdict v;
  if (x.exit_code() == 0 && x.signal() == 0) {
    clean_exits.insert({node, x.rank()});
  } else {
    unclean_exit = true;
  }
  bool bad = (x.exit_code() != 0 || x.signal() != 0) && !x.stopped_by_agent();
  bool open = stop == proto::STOP_REASON_UNSPECIFIED || stopped_for_peer_exit;
  if (!bad || !failure.empty() || !open) return v;
  if (x.signal() == 0 && x.exit_code() == kPeerFailureExitCode) {
    // A consequence, not a cause: stop the gang, wait for the cause (another rank's exit, a
    // lost node) to be reported.
    v.kind = ExitVerdict::Kind::kPeerFailure;
    if (peer_failure.empty()) {
      peer_failure =
          fmt::format("rank {} on {} exited {} (a peer failed)", x.rank(), node, x.exit_code());
      v.first_peer_failure = true;
    }
    if (stop == proto::STOP_REASON_UNSPECIFIED) {
      stopped_for_peer_exit = true;
      v.stop_gang = true;
    }
    return v;
  }
  v.kind = ExitVerdict::Kind::kRankFailed;
  cause = AttemptCause::kRankFailed;
  failure = x.signal()
                ? fmt::format("rank {} on {} killed by signal {}", x.rank(), node, x.signal())
                : fmt::format("rank {} on {} exited {}", x.rank(), node, x.exit_code());
  failure_node = node;
  // This node's other ranks are stopped too (unless it reports them all gone already).
  v.stop_gang = stop == proto::STOP_REASON_UNSPECIFIED;
  return v;
}

bool AttemptState::RecordStartError(const std::string& node, const std::string& error,
                                    bool retryable, int start_retries) {
  if (!failure.empty()) return false;
  failure = fmt::format("node {} could not start: {}", node, error);
  failure_node = node;
  cause = retryable && start_retries < kMaxStartRetries ? AttemptCause::kStartRetryable
                                                        : AttemptCause::kStartFailed;
  return true;
}

bool AttemptState::RecordNodeLost(const std::string& why, bool override_cause, bool agent_gone) {
  if (!agent_gone) lost_node_may_run = true;
  if (!failure.empty() && !override_cause) return false;
  cause = AttemptCause::kNodeLost;
  failure = why;
  return true;
}

bool AttemptState::EveryRankExitedZero(int ranks) const {
  return cause == AttemptCause::kNone && peer_failure.empty() && !unclean_exit && ranks > 0 &&
         static_cast<int>(clean_exits.size()) == ranks;
}

AttemptEndDecision DecideAttemptEnd(const AttemptState& a, const JobRecord& r, int start_retries,
                                    bool replicating, int64_t now, const LifecycleTiming& timing,
                                    int lease_requeues) {
  using K = AttemptEndDecision::Kind;
  using Q = AttemptEndDecision::Queue;
  AttemptEndDecision d;
  d.restarts = r.restarts;
  d.preemptions = r.preemptions;
  d.start_retries = start_retries;
  d.not_before_ms = r.not_before_ms;
  d.state = r.state;
  bool lost = a.cause == AttemptCause::kNodeLost;
  std::string failure = a.failure;
  if (failure.empty() && !lost && !a.peer_failure.empty()) {
    failure = a.peer_failure;  // no cause showed up: the peer failure is all we know
  }
  d.attempt_detail = failure;
  auto event = [&](std::string kind, std::string message) {
    d.events.push_back({std::move(kind), std::move(message)});
  };
  bool preempted = a.stop == proto::STOP_PREEMPTED || a.stop == proto::STOP_NODE_PREEMPTED;
  // Ranks that all exit 0 after a notice have finished the job (exit 0 is success); a rank that
  // stopped for the notice exits otherwise (the examples exit 3) or is killed by the agent.
  int ranks = static_cast<int>(r.nodes.size()) * std::max(1, r.spec.ranks_per_node());
  if (preempted && a.EveryRankExitedZero(ranks)) preempted = false;
  // Ranks their agents stopped unasked (a lease that ran out, or an agent shut down), with no
  // other cause: requeued freely kLeaseRequeues times in a row; after that it is a failure like
  // any other, so a cluster whose leases keep running out restarts the job with backoff and
  // gives up at max_restarts instead of requeueing it for ever.
  bool stopped_by_agents = r.state != proto::JOB_CANCELLED && a.stop != proto::STOP_TIME_LIMIT &&
                           !preempted && !lost && a.cause != AttemptCause::kStartRetryable &&
                           failure.empty() && a.unclean_exit;
  if (stopped_by_agents && lease_requeues >= kLeaseRequeues) {
    failure = fmt::format(
        "its ranks were stopped by their agents, unasked, {} times in a row without progress "
        "(leases that ran out: is the coordinator overloaded or --lease-ms too short? or agents "
        "that were shut down)",
        lease_requeues + 1);
    d.attempt_detail = failure;
    d.stopped_by_agents = true;
  }

  if (r.state == proto::JOB_CANCELLED) {
    d.kind = K::kCancelled;
    d.outcome = "cancelled";
    d.queue = Q::kRelease;
  } else if (a.stop == proto::STOP_TIME_LIMIT) {
    d.kind = K::kTimeLimit;
    d.outcome = "failed";
    d.state = proto::JOB_FAILED;
    d.detail = "time limit";
    d.set_detail = true;
    event("failed", "time limit reached");
    d.queue = Q::kRelease;
  } else if (preempted || lost) {
    d.lease_requeues = lease_requeues;  // not a run's end: the count goes on
    d.kind = lost ? K::kNodeLost : K::kPreempted;
    d.outcome = lost ? "node_lost" : "preempted";
    d.preemptions++;
    d.state = proto::JOB_PENDING;
    if (lost && a.lost_node_may_run && timing.lease_ms > timing.heartbeat_timeout_ms) {
      // No split brain: a lost node's agent may still be running its ranks until its lease
      // runs out (it counts from its last reply, at most heartbeat_timeout before now).
      d.not_before_ms = now + (timing.lease_ms - timing.heartbeat_timeout_ms) + 500;
      d.queue = Q::kRelease;
    } else if (replicating) {
      // Submitted again once the copies to other providers are in (or given up on).
      d.queue = Q::kRelease;
    } else {
      d.queue = Q::kRequeue;
    }
    event("requeued", fmt::format("after attempt {} ({}); not counted against max_restarts",
                                  r.attempt, lost ? failure : "preempted"));
  } else if (a.cause == AttemptCause::kStartRetryable) {
    // A port of this attempt was taken on its master node: the next attempt gets other ports.
    d.lease_requeues = lease_requeues;
    d.kind = K::kStartRetry;
    d.outcome = "start_retry";
    d.start_retries++;
    d.state = proto::JOB_PENDING;
    d.queue = Q::kRequeue;
    event("requeued",
          fmt::format(
              "after attempt {} ({}); {}, not counted against max_restarts", r.attempt, failure,
              a.preflight ? "placed again at once without that node" : "retried on other ports"));
  } else if (!failure.empty()) {
    d.outcome = "failed";
    d.start_retries = 0;
    d.restarts++;
    d.blame_node = a.failure_node;
    d.detail = failure;
    d.set_detail = true;
    d.queue = Q::kRelease;
    if (d.restarts > r.spec.max_restarts()) {
      d.kind = K::kFailed;
      d.state = proto::JOB_FAILED;
      event("failed", fmt::format("{}; {} restart(s) used of {}", failure, d.restarts - 1,
                                  r.spec.max_restarts()));
    } else {
      d.kind = K::kRestart;
      int64_t backoff = r.spec.restart_backoff_s() * 1000;
      for (int i = 1; i < d.restarts && backoff < 3600 * 1000; ++i) backoff *= 2;
      d.not_before_ms = now + backoff;
      d.state = proto::JOB_PENDING;
      event("requeued",
            fmt::format("restart {} of {} in {} ms", d.restarts, r.spec.max_restarts(), backoff));
    }
  } else if (stopped_by_agents) {
    // Nothing failed, was lost or was stopped for a notice, a preemption or a limit, yet a rank
    // did not exit 0 and was not blamed: its agent stopped it unasked (an agent whose heartbeats
    // go unanswered until its lease runs out stops its ranks, so that no other attempt can ever
    // run beside them). Neither the job's success nor its failure: placed again at once (the
    // ranks are gone), from its newest checkpoint or snapshots, not counted against
    // max_restarts.
    d.kind = K::kPreempted;
    d.outcome = "preempted";
    d.preemptions++;
    d.state = proto::JOB_PENDING;
    // As for a preemption: submitted again once copies to other providers are in.
    d.queue = replicating ? Q::kRelease : Q::kRequeue;
    d.detail = "its ranks were stopped by their agents, unasked (a lease ran out?)";
    d.set_detail = true;
    d.lease_requeues = lease_requeues + 1;
    d.stopped_by_agents = true;
    event("requeued", fmt::format("after attempt {} (its ranks were stopped by their agents, not "
                                  "by the coordinator: a lease that ran out, or an agent shut "
                                  "down); not counted against max_restarts",
                                  r.attempt));
  } else {
    d.kind = K::kSucceeded;
    d.outcome = "succeeded";
    d.state = proto::JOB_SUCCEEDED;
    d.detail = "every rank exited 0";
    d.set_detail = true;
    d.credit_nodes = true;
    d.queue = Q::kRelease;
    event("succeeded", fmt::format("attempt {}: every rank exited 0", r.attempt));
  }
  return d;
}

}  // namespace muster::coordinator
