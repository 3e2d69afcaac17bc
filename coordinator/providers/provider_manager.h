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
// State across restarts: SaveState() is everything above as one document (JSON); the
// coordinator stores it after each Tick that changed it (StateToSave, StateSaved) and, through
// the persist hook (SetPersist), before each new request is handed to its provider, so a
// request's id, names and try count are durable before anything can exist because of it. It
// hands the document to RestoreState when it starts again. Restored, a request whose try was in
// flight and that its provider does not adopt (Adopt, below) counts that try as failed (a
// provider's new process gives back what its old one held: the local provider's agents stop with
// the coordinator, the Slurm provider scancels its ledger), so it is retried after the backoff, or
// given up after max_tries, counting the tries made before the restart; a provider given up for a
// gang stays given up for its retry_backoff_max_s; idle clocks keep running; names already handed
// out are never handed out again.
//
// Thread-safety: none; the coordinator's reactor thread only.

#include <functional>
#include <map>
#include <memory>
#include <optional>
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

  // See "State across restarts" above. RestoreState: call before the first Tick; DataLoss for a
  // document that does not parse (nothing restored then); the events say what it dropped.
  std::string SaveState() const;
  StatusOr<std::vector<Event>> RestoreState(const std::string& state);
  // The document if it changed since it was last restored or saved (StateSaved).
  std::optional<std::string> StateToSave() const;
  void StateSaved(std::string state) { saved_ = std::move(state); }
  // After RestoreState (or with no state to restore), before the first Tick: each provider
  // adopts what its previous process recorded in `ledger` (provider.h, Provider::Adopt) that is
  // still wanted: the allocation of a request whose try was in flight (the try is in flight
  // again, not failed: a node that registers for it now is its node, and request_timeout, counted
  // from the try's start, still cancels it), or one holding nodes in `known` (the nodes the
  // coordinator has). The rest goes back. Returns the events saying what was adopted.
  std::vector<Event> Adopt(std::unique_ptr<ProviderLedger> ledger,
                           const std::set<std::string>& known);
  // Called with SaveState() (the new request included) before each Provider::Request; false:
  // the request is not made, nor any other this Tick. Unset: requests are made unrecorded.
  void SetPersist(std::function<bool(const std::string& state)> persist) {
    persist_ = std::move(persist);
  }

 private:
  std::string NextName(const std::string& provider, const std::set<std::string>& known);

  ProvidersConfig config_;
  std::unique_ptr<ProviderLedger> ledger_;  // outlives the providers (declared before them)
  std::map<std::string, std::unique_ptr<Provider>> providers_;
  std::map<uint64_t, OutstandingRequest> requests_;
  std::map<std::string, TimePoint> idle_since_;
  std::map<std::string, std::map<std::string, GivenUp>> given_up_;  // job -> provider
  std::map<std::string, std::string> reasons_;
  std::map<std::string, int> next_index_;
  std::set<std::string> released_;
  std::set<std::string> announced_;  // nodes of requests whose "up" event was written
  uint64_t next_request_ = 1;
  std::string saved_;  // the state as last saved or restored
  std::function<bool(const std::string&)> persist_;
  std::set<uint64_t> restart_failed_;  // tries RestoreState found in flight (Adopt may resume)
};

}  // namespace muster::coordinator::providers
