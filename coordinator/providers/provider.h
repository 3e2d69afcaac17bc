#pragma once

// Provider: where on-demand nodes come from (docs/providers.md, "Writing a provider"). The
// coordinator's ProviderManager decides what to ask for (planner.h); a Provider carries it out.
// A request names the node group: how many nodes, the names they must register with, the GPU
// type, the island and the checkpoint volume. The provider starts one `muster agent` per node
// with that name and its template's labels; the nodes count as up when their agents register
// with the coordinator, like any static node. Release gives one idle node back.
//
// Contract:
//  - Request, Cancel and Release return at once: they never wait on a remote controller (a
//    provider that must, runs that on its own thread). An error from Request is a failed try.
//  - Failures found later (the allocation was refused, the agent exited) come out of Poll().
//  - Cancel gives back every node of a request, up or not (a timed-out try).
//  - The destructor gives back everything the provider still holds.
//  - A provider whose nodes can outlive the coordinator (Slurm) records them in a ledger and
//    adopts them after a restart (Adopt).
//
// Thread-safety: used from the coordinator's reactor thread only.

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "coordinator/providers/provider_config.h"
#include "coordinator/providers/provider_ledger.h"

namespace muster::coordinator::providers {

struct NodeGroupRequest {
  uint64_t id = 0;
  std::string job;                 // the gang it is for (logs, Slurm job names)
  std::vector<std::string> names;  // one per node; node i registers as names[i]
  std::string gpu_type;
  int gpus_per_node = 0;
  std::string island;
  std::string volume;  // the checkpoint volume the nodes must mount; empty: none
};

struct RequestFailure {
  uint64_t id = 0;
  std::string message;
};

// How a provider reaches the coordinator: what its agents are started with.
struct AgentLaunch {
  std::string muster_bin;         // the `muster` binary
  std::string coordinator;        // endpoint the agents register with
  std::vector<std::string> args;  // e.g. --insecure, or --keys DIR
};

class Provider {
 public:
  virtual ~Provider() = default;
  virtual const ProviderConfig& config() const = 0;
  virtual Status Request(const NodeGroupRequest& request) = 0;
  virtual void Cancel(uint64_t request_id) = 0;
  virtual void Release(const std::string& node) = 0;
  virtual std::vector<RequestFailure> Poll() = 0;

  // Once, before the first Request, by a coordinator that keeps a ledger (provider_ledger.h,
  // not owned; outlives the provider): what this provider's previous process recorded there is
  // adopted when `keep(request, nodes)` says so (its request is still in flight, or its nodes
  // are nodes the coordinator knows) and given back otherwise; from then on the provider
  // records what it holds in `ledger`. Returns the requests adopted: their nodes may still
  // register, and Cancel and Release act on them as on the provider's own. The default holds
  // nothing beyond its process (the local provider's agents stop with the coordinator), so it
  // adopts nothing.
  using KeepFn = std::function<bool(uint64_t request, const std::vector<std::string>& nodes)>;
  virtual std::set<uint64_t> Adopt(ProviderLedger* ledger, const KeepFn& keep) { return {}; }
};

// The provider for `config.kind` (local or slurm). InvalidArgument for static or unknown kinds.
StatusOr<std::unique_ptr<Provider>> CreateProvider(const ProviderConfig& config,
                                                   const AgentLaunch& launch);

}  // namespace muster::coordinator::providers
