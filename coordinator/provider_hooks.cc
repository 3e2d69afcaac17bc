// The coordinator's side of on-demand nodes: the hooks that feed the ProviderManager from the
// scheduler's model after each pass and apply what it decided (events, released nodes).

#include <algorithm>

#include "common/logging.h"
#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {

// The database key of the ProviderManager's state (provider_manager.h).
constexpr const char* kProviderStateKey = "providers";

// The providers' ledgers (provider_ledger.h) as database state "provider_ledger/<provider>",
// written through the coordinator's durable-write latch.
class Coordinator::DbProviderLedger : public providers::ProviderLedger {
 public:
  explicit DbProviderLedger(Coordinator& c) : c_(c) {}
  Status Save(const std::string& provider,
              const std::vector<providers::LedgerEntry>& entries) override {
    // Durable before what it records is done (an sbatch): Sync.
    return c_.Write("provider ledger of " + provider, [&] {
      MUSTER_RETURN_IF_ERROR(
          c_.store_->PutState(Key(provider), providers::EncodeLedger(entries), c_.NowMs()));
      return c_.store_->Sync();
    });
  }
  StatusOr<std::vector<providers::LedgerEntry>> Load(const std::string& provider) override {
    MUSTER_ASSIGN_OR_RETURN(auto saved, c_.store_->GetState(Key(provider)));
    if (!saved) return std::vector<providers::LedgerEntry>{};
    return providers::DecodeLedger(*saved);
  }

 private:
  static std::string Key(const std::string& provider) { return "provider_ledger/" + provider; }
  Coordinator& c_;
};

void Coordinator::SetProviders(std::unique_ptr<providers::ProviderManager> providers) {
  providers_ = std::move(providers);
  pass_needed_ = true;
  if (!providers_) return;
  // Before a request is handed to its provider: durable against power loss too (Sync), so a
  // restarted coordinator knows every node it may have asked for.
  providers_->SetPersist([this](const std::string& state) {
    bool ok = Write("provider state", [&] {
                MUSTER_RETURN_IF_ERROR(store_->PutState(kProviderStateKey, state, NowMs()));
                return store_->Sync();
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
  // What the providers hold outside this process (Slurm jobs): adopted when still wanted.
  std::set<std::string> known;
  for (const auto& [name, n] : nodes_) known.insert(name);
  for (const auto& e : providers_->Adopt(std::make_unique<DbProviderLedger>(*this), known)) {
    Event(e.job, e.node, e.kind, e.message);
  }
}

void Coordinator::ProvidersPass() {
  if (!providers_) return;
  TimePoint now = options_.clock();
  std::vector<JobRequest> pending = PendingRequests();
  std::sort(pending.begin(), pending.end(), [](const JobRequest& a, const JobRequest& b) {
    return a.priority != b.priority ? a.priority > b.priority : a.seq < b.seq;
  });
  // Running jobs short of hot spares ask for them after every pending gang.
  for (auto& r : sched_->SpareRequests()) pending.push_back(std::move(r));
  auto out = providers_->Tick(pending, NodesForProviders(now), now);
  for (const auto& e : out.events) Event(e.job, e.node, e.kind, e.message);
  for (const auto& name : out.released) ForgetNode(name, "was released").IgnoreError();
  if (auto state = providers_->StateToSave()) {
    if (Write("provider state", [&] {
          return store_->PutState(kProviderStateKey, *state, NowMs());
        }).ok()) {
      providers_->StateSaved(std::move(*state));
    }
  }
}

std::vector<NodeView> Coordinator::NodesForProviders(TimePoint now) const {
  // A node serving a checkpoint copy not done yet (its source, or the target of its current
  // try) is not idle: released, it would take the copy with it. It counts as busy with the
  // copy's job until the copy is done (copied, failed for good, superseded, or its job ended),
  // and its idle clock starts then.
  std::map<std::string, std::string> copying;
  for (const auto& [key, c] : copies_) {
    if (c.done) continue;
    copying.emplace(c.source, c.job_id);
    if (!c.target.empty()) copying.emplace(c.target, c.job_id);
  }
  // So is a node whose rank logs of an attempt that ended are being kept (log_collect.cc):
  // bounded by log_keep_wait.
  for (const auto& [key, c] : log_copies_) copying.emplace(c.node, c.job);
  std::vector<NodeView> nodes = sched_->Nodes(now);
  for (auto& n : nodes) {
    auto it = copying.find(n.spec.name);
    // A lost node took its part of the copy with it already (the copy is retried elsewhere).
    if (n.job.empty() && it != copying.end() && n.state != NodeState::kDown) n.job = it->second;
  }
  return nodes;
}

std::string Coordinator::ProviderReason(const std::string& job) const {
  return providers_ ? providers_->PendingReason(job) : "";
}

// A released node (its agent is being stopped by its provider; it runs no job), or one an
// admin forgot (node_forget.cc).
Status Coordinator::ForgetNode(const std::string& name, const std::string& why) {
  if (!nodes_.Find(name)) return Status::Ok();
  // Durable first (the latch refuses it once a write has failed), then memory follows: a
  // refused delete leaves the node, and its log copies, as they were.
  Status st = Write("delete node " + name, [&] { return store_->DeleteNode(name); });
  if (!st.ok()) {
    log::Get("coord")->error("node {} ({}) not deleted: {}", name, why, st.ToString());
    return st;
  }
  std::vector<LogCopyKey> cut;
  for (const auto& [key, c] : log_copies_)
    if (c.node == name) cut.push_back(key);
  for (const auto& key : cut)
    EndLogCopy(key, "node " + name + " " + why + " before all of it was kept");
  st = sched_->RemoveNode(name);
  if (!st.ok()) log::Get("coord")->error("node {} ({}): {}", name, why, st.ToString());
  nodes_.Remove(name);
  return Status::Ok();
}

}  // namespace muster::coordinator
