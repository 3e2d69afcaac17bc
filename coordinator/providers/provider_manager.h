#pragma once

// ProviderManager: the stateful side of on-demand nodes in the coordinator. It keeps the
// requests outstanding, since when each node has been idle, the names handed out and the gangs
// whose requests were given up; each Tick it calls PlanProviders (planner.h, the pure rules)
// and carries the decisions out through the Providers: Request, Cancel, Release. The
// coordinator turns its events into job/node events and removes the released nodes.
//
// Node names are "<provider>-<n>", n counting up and never reused in this process (a name
// already known to the coordinator is skipped), so a released node that still heartbeats can
// be told apart and refused (Released()).
//
// Thread-safety: none; the coordinator's reactor thread only.

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "coordinator/providers/planner.h"
#include "coordinator/providers/provider.h"

namespace muster::coordinator::providers {

class ProviderManager {
 public:
  struct Event {
    std::string job, node, kind, message;
  };
  struct Output {
    std::vector<Event> events;
    std::vector<std::string> released;  // nodes given back: the coordinator forgets them
  };

  // Creates the providers of `config` (static ones have none).
  static StatusOr<std::unique_ptr<ProviderManager>> Create(const ProvidersConfig& config,
                                                           const AgentLaunch& launch);
  // With given providers (tests: fakes), keyed by provider name.
  ProviderManager(ProvidersConfig config,
                  std::map<std::string, std::unique_ptr<Provider>> providers);
  ~ProviderManager();

  // `pending`: the jobs the last scheduling pass left pending, in queue order; `nodes`: every
  // node the scheduler knows.
  Output Tick(const std::vector<JobRequest>& pending, const std::vector<NodeView>& nodes,
              TimePoint now);

  // The provider side of why `job` waits ("waiting for 2 nodes from provider aws"), or empty.
  std::string PendingReason(const std::string& job) const;
  // Some on-demand provider could hold `job` (a job no registered node fits is accepted then).
  bool CouldHold(const JobRequest& job) const;
  // `node` was released: its agent must not come back under that name.
  bool Released(const std::string& node) const { return released_.count(node) > 0; }
  const ProvidersConfig& config() const { return config_; }

 private:
  std::string NextName(const std::string& provider, const std::set<std::string>& known);

  ProvidersConfig config_;
  std::map<std::string, std::unique_ptr<Provider>> providers_;
  std::map<uint64_t, OutstandingRequest> requests_;
  std::map<std::string, TimePoint> idle_since_;
  std::map<std::string, std::map<std::string, GivenUp>> given_up_;  // job -> provider
  std::map<std::string, std::string> reasons_;
  std::map<std::string, int> next_index_;
  std::set<std::string> released_;
  std::set<std::string> announced_;  // nodes of requests whose "up" event was written
  uint64_t next_request_ = 1;
};

}  // namespace muster::coordinator::providers
