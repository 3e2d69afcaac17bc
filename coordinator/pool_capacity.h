#pragma once

// PoolCanEverHold: whether the node pool could ever hold a job's gang and its hot spares at once
// (what `muster submit` refuses when it could not), once on-demand providers are configured.
// Scheduler::Feasible answers the same for registered nodes only; this one counts what each
// provider can ever have at once:
//  - a static provider (kind `static`, or a provider the providers file does not name): its
//    registered nodes that fit the job, in any state (a down node may come back);
//  - an on-demand provider (local, slurm): max_nodes when its node template fits the job, however
//    many of its nodes are registered now (a lost node waiting for its release and its
//    replacement are both registered, but never both held: the planner caps the nodes it holds
//    at max_nodes); when the template does not fit, its registered nodes that fit and are not
//    down, at most max_nodes.
// Each provider is one pool; with island policy `required`, each (provider, island) is (an
// on-demand provider's nodes are on its template's island).
//
// Pure; thread-safe.

#include <vector>

#include "common/status.h"
#include "coordinator/providers/provider_config.h"
#include "coordinator/scheduler.h"

namespace muster::coordinator {

// Ok, or FailedPrecondition naming what the job needs (nodes + spares, on one provider or
// island, with which labels) and what the largest pools can ever hold, each named with its
// provider (and island) and why (registered nodes that fit, or max_nodes).
// REQUIRES: job.hosts empty (a pinned gang is Scheduler::Feasible's business); `nodes` are
// Scheduler::Nodes().
Status PoolCanEverHold(const JobRequest& job, const std::vector<NodeView>& nodes,
                       const providers::ProvidersConfig& config);

}  // namespace muster::coordinator
