// The coordinator's side of on-demand nodes: the hooks that feed the ProviderManager from the
// scheduler's model after each pass and apply what it decided (events, released nodes).

#include <algorithm>

#include "common/logging.h"
#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {

// The database key of the ProviderManager's state (provider_manager.h).
constexpr const char* kProviderStateKey = "providers";

void Coordinator::SetProviders(std::unique_ptr<providers::ProviderManager> providers) {
  providers_ = std::move(providers);
  pass_needed_ = true;
  if (!providers_) return;
  providers_->SetPersist([this](const std::string& state) {
    bool ok = Write("provider state", [&] {
                return store_->PutState(kProviderStateKey, state, NowMs());
              }).ok();
    if (ok) providers_->StateSaved(state);
    return ok;
  });
  // What the previous coordinator on this data dir knew: requests, idle clocks, given-up gangs.
  auto saved = store_->GetState(kProviderStateKey);
  Status st = saved.status();
  if (st.ok() && saved->has_value()) {
    auto restored = providers_->RestoreState(**saved);
    st = restored.status();
    if (st.ok()) {
      for (const auto& e : *restored) Event(e.job, e.node, e.kind, e.message);
    }
  }
  if (!st.ok()) {
    // The providers start from nothing: as before their state was kept (docs/providers.md).
    Event("", "", "provider_state_lost", "starting with no provider state: " + st.ToString());
  }
}

void Coordinator::ProvidersPass() {
  if (!providers_) return;
  TimePoint now = options_.clock();
  std::vector<JobRequest> pending = PendingRequests();
  std::sort(pending.begin(), pending.end(), [](const JobRequest& a, const JobRequest& b) {
    return a.priority != b.priority ? a.priority > b.priority : a.seq < b.seq;
  });
  auto out = providers_->Tick(pending, sched_->Nodes(now), now);
  for (const auto& e : out.events) Event(e.job, e.node, e.kind, e.message);
  for (const auto& name : out.released) ForgetNode(name);
  if (auto state = providers_->StateToSave()) {
    if (Write("provider state", [&] {
          return store_->PutState(kProviderStateKey, *state, NowMs());
        }).ok()) {
      providers_->StateSaved(std::move(*state));
    }
  }
}

std::string Coordinator::ProviderReason(const std::string& job) const {
  return providers_ ? providers_->PendingReason(job) : "";
}

// A released node: its agent is being stopped by its provider; it runs no job.
void Coordinator::ForgetNode(const std::string& name) {
  if (!nodes_.Find(name)) return;
  // Durable first (the latch refuses it once a write has failed), then memory follows.
  Status st = Write("delete released node " + name, [&] { return store_->DeleteNode(name); });
  if (!st.ok()) {
    log::Get("coord")->error("released node {} not deleted: {}", name, st.ToString());
    return;
  }
  st = sched_->RemoveNode(name);
  if (!st.ok()) log::Get("coord")->error("released node {}: {}", name, st.ToString());
  nodes_.Remove(name);
}

}  // namespace muster::coordinator
