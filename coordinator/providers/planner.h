#pragma once

// PlanProviders: the provider decisions of the coordinator, as a pure function, computed the
// way Scheduler::Schedule is: state in (pending gangs, nodes, the requests outstanding, the
// providers' configs, now), decisions out (requests to make, tries to retry or give up, idle
// nodes to release, pending reasons). It does no I/O and reads no clock, so every rule below
// is tested without processes (tests/unit/provider_planner_test.cc).
//
// Rules:
//  - A pending gang that the last scheduling pass could not place, and that has no request
//    outstanding, gets one request for the nodes it lacks, from the first on-demand provider
//    (config order) that it allows and whose node template fits it (gpu_type, gpus, slots,
//    checkpoint volume). The nodes it lacks: its node count and spares (JobRequest::spares)
//    less the provider's idle nodes no earlier gang of this pass has claimed. A running job
//    short of spares comes here as a pending request for the spares it lacks, limited to its
//    gang's provider (the coordinator's ProvidersPass). Its pending reason then says "waiting for N
//    nodes from provider P".
//  - Limits: a provider never holds more than max_nodes nodes (registered, plus promised by
//    requests outstanding) and never more than max_pending_requests requests in flight. A gang
//    that every fitting provider refuses for a limit waits with that limit as its reason.
//  - A try that the provider reported failed, or whose nodes are not all up within
//    request_timeout, is cancelled and retried after retry_backoff * 2^(tries-1) (capped at
//    retry_backoff_max), up to max_tries tries; then it is given up: an event, and the gang
//    asks the next fitting provider; with none left its pending reason names the provider and
//    the last error. A provider given up for a gang is asked again after retry_backoff_max.
//  - A node of an on-demand provider that runs no job and has been idle for idle_timeout is
//    released, unless a pending gang of this pass claimed it or a request outstanding still
//    waits for its group. A node that runs a job (ranks) is never released. A lost (down)
//    node of an on-demand provider is released the same way: its provider took it back.
//  - A request whose nodes are all up is done (forgotten); so is one waiting to retry whose
//    gang is no longer pending.
//
// Thread-safety: pure function; inputs are read only.

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "coordinator/providers/provider_config.h"
#include "coordinator/scheduler.h"

namespace muster::coordinator::providers {

// A node group asked of a provider whose nodes are not all up yet, or a failed try waiting to
// be retried.
struct OutstandingRequest {
  uint64_t id = 0;
  std::string provider;
  std::string job;                    // the gang it was made for
  std::vector<std::string> nodes;     // the names its nodes register with
  int tries = 1;                      // tries made, the current one included
  TimePoint issued{};                 // when the current try was made
  std::optional<std::string> failed;  // the provider said the current try failed (why)
  bool waiting_retry = false;         // no try in flight: the next one is due at retry_at
  TimePoint retry_at{};
  std::string last_error;  // of the previous try, for the pending reason
};

struct GivenUp {
  std::string reason;
  TimePoint at{};
};

struct PlannerInput {
  std::vector<ProviderConfig> providers;
  std::vector<JobRequest> pending;              // jobs the last pass left pending, in queue order
  std::vector<NodeView> nodes;                  // every node the scheduler knows
  std::map<std::string, TimePoint> idle_since;  // per node that runs no job: since when
  std::vector<OutstandingRequest> requests;
  // Requests given up: job -> provider -> why and when. The job asks other providers, and
  // this one again once retry_backoff_max has passed.
  std::map<std::string, std::map<std::string, GivenUp>> given_up;
  TimePoint now{};
};

// Ask `provider` for `nodes` nodes for `job`.
struct NewRequest {
  std::string provider;
  std::string job;
  int nodes = 0;
  int tries = 1;           // > 1: a retry of `retry_of`
  uint64_t retry_of = 0;   // the request it replaces (0: a new one)
  std::string last_error;  // of the try it retries
};

// Cancel the current try of request `id` (its nodes go back) and retry it at `at`.
struct Retry {
  uint64_t id = 0;
  TimePoint at{};
  std::string why;
};

// Cancel request `id` for good; `reason` is the gang's pending reason from now on.
struct GiveUp {
  uint64_t id = 0;
  std::string job, provider, reason;
};

struct Release {
  std::string node, provider, why;
};

struct PlannerDecisions {
  std::vector<NewRequest> requests;
  std::vector<Retry> retries;
  std::vector<GiveUp> give_ups;
  std::vector<Release> releases;
  std::vector<uint64_t> done;                          // requests to forget
  std::map<std::string, std::string> pending_reasons;  // job -> reason
};

// REQUIRES: provider names are unique; request ids are unique.
PlannerDecisions PlanProviders(const PlannerInput& in);

// Whether `p`'s nodes could ever hold `job` (its template fits and max_nodes is enough).
bool ProviderCouldHold(const ProviderConfig& p, const JobRequest& job);

}  // namespace muster::coordinator::providers
