#include "coordinator/providers/provider_manager.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/logging.h"
#include "coordinator/providers/local_provider.h"
#include "coordinator/providers/slurm_provider.h"

namespace muster::coordinator::providers {

StatusOr<std::unique_ptr<Provider>> CreateProvider(const ProviderConfig& config,
                                                   const AgentLaunch& launch) {
  if (config.kind == "local") return std::unique_ptr<Provider>(new LocalProvider(config, launch));
  if (config.kind == "slurm") return std::unique_ptr<Provider>(new SlurmProvider(config, launch));
  return InvalidArgumentError(
      fmt::format("provider {}: kind {} has no provider to create", config.name, config.kind));
}

StatusOr<std::unique_ptr<ProviderManager>> ProviderManager::Create(const ProvidersConfig& config,
                                                                   const AgentLaunch& launch) {
  std::map<std::string, std::unique_ptr<Provider>> providers;
  for (const auto& p : config.providers) {
    if (!p.OnDemand()) continue;
    MUSTER_ASSIGN_OR_RETURN(providers[p.name], CreateProvider(p, launch));
  }
  return std::make_unique<ProviderManager>(config, std::move(providers));
}

ProviderManager::ProviderManager(ProvidersConfig config,
                                 std::map<std::string, std::unique_ptr<Provider>> providers)
    : config_(std::move(config)), providers_(std::move(providers)) {}

ProviderManager::~ProviderManager() = default;

std::string ProviderManager::NextName(const std::string& provider,
                                      const std::set<std::string>& known) {
  for (;;) {
    std::string name = fmt::format("{}-{}", provider, ++next_index_[provider]);
    if (!known.count(name) && !released_.count(name)) return name;
  }
}

ProviderManager::Output ProviderManager::Tick(const std::vector<JobRequest>& pending,
                                              const std::vector<NodeView>& nodes, TimePoint now) {
  Output out;
  // Failures the providers found since the last tick.
  for (auto& [name, p] : providers_) {
    for (auto& f : p->Poll()) {
      auto it = requests_.find(f.id);
      if (it == requests_.end() || it->second.waiting_retry) continue;
      it->second.failed = f.message;
    }
  }
  std::set<std::string> known;
  for (const auto& n : nodes) {
    known.insert(n.spec.name);
    if (!n.job.empty()) {
      idle_since_.erase(n.spec.name);
    } else if (!idle_since_.count(n.spec.name)) {
      idle_since_[n.spec.name] = now;
    }
  }
  for (auto it = idle_since_.begin(); it != idle_since_.end();) {
    it = known.count(it->first) ? std::next(it) : idle_since_.erase(it);
  }
  std::set<std::string> pending_ids;
  for (const auto& j : pending) pending_ids.insert(j.id);
  for (auto it = given_up_.begin(); it != given_up_.end();) {
    it = pending_ids.count(it->first) ? std::next(it) : given_up_.erase(it);
  }
  // "node P-3 up" once per requested node.
  for (const auto& n : nodes) {
    if (n.state == NodeState::kDown || announced_.count(n.spec.name)) continue;
    for (const auto& [id, r] : requests_) {
      if (std::find(r.nodes.begin(), r.nodes.end(), n.spec.name) == r.nodes.end()) continue;
      announced_.insert(n.spec.name);
      out.events.push_back(
          {r.job, n.spec.name, "node_up",
           fmt::format("node {} up (provider {}, request {})", n.spec.name, r.provider, id)});
    }
  }

  PlannerInput in;
  in.providers = config_.providers;
  in.pending = pending;
  in.nodes = nodes;
  in.idle_since = idle_since_;
  for (const auto& [id, r] : requests_) in.requests.push_back(r);
  in.given_up = given_up_;
  in.now = now;
  PlannerDecisions d = PlanProviders(in);

  for (uint64_t id : d.done) requests_.erase(id);
  for (const auto& r : d.retries) {
    auto it = requests_.find(r.id);
    if (it == requests_.end()) continue;
    if (auto p = providers_.find(it->second.provider); p != providers_.end())
      p->second->Cancel(r.id);
    it->second.waiting_retry = true;
    it->second.retry_at = r.at;
    it->second.last_error = r.why;
    it->second.failed.reset();
    out.events.push_back(
        {it->second.job, "", "provider_retry",
         fmt::format("request {} to provider {} failed (try {} of {}): {}; retrying in {} s", r.id,
                     it->second.provider, it->second.tries,
                     config_.Find(it->second.provider)->max_tries, r.why,
                     std::chrono::duration_cast<std::chrono::seconds>(r.at - now).count())});
  }
  for (const auto& g : d.give_ups) {
    if (auto p = providers_.find(g.provider); p != providers_.end()) p->second->Cancel(g.id);
    requests_.erase(g.id);
    given_up_[g.job][g.provider] = GivenUp{g.reason, now};
    out.events.push_back({g.job, "", "provider_failed", g.reason});
  }
  for (const auto& nr : d.requests) {
    auto p = providers_.find(nr.provider);
    if (p == providers_.end()) continue;
    OutstandingRequest r;
    r.id = next_request_++;
    r.provider = nr.provider;
    r.job = nr.job;
    r.tries = nr.tries;
    r.issued = now;
    r.last_error = nr.last_error;
    std::optional<OutstandingRequest> replaced;
    if (auto it = requests_.find(nr.retry_of); nr.retry_of && it != requests_.end()) {
      replaced = std::move(it->second);
      requests_.erase(it);
    }
    for (int i = 0; i < nr.nodes; ++i) r.nodes.push_back(NextName(nr.provider, known));
    // The intent is durable before the provider is asked (see "State across restarts").
    requests_[r.id] = r;
    if (persist_ && !persist_(SaveState())) {
      requests_.erase(r.id);
      if (replaced) requests_[replaced->id] = std::move(*replaced);
      break;  // the coordinator refuses changes now: nothing more is asked of a provider
    }
    NodeGroupRequest g;
    g.id = r.id;
    g.job = nr.job;
    g.names = r.nodes;
    for (const auto& j : pending) {
      if (j.id != nr.job) continue;
      g.gpu_type = j.gpu_type;
      g.gpus_per_node = j.gpus_per_node;
      g.volume = j.checkpoint_volume;
    }
    g.island = p->second->config().node.island;
    Status st = p->second->Request(g);
    if (!st.ok()) r.failed = st.message();
    out.events.push_back(
        {nr.job, "", "provider_request",
         fmt::format("requested {} node{} from {}{}: {}", nr.nodes, nr.nodes == 1 ? "" : "s",
                     nr.provider, nr.tries > 1 ? fmt::format(" (try {})", nr.tries) : "",
                     fmt::join(r.nodes, ","))});
    requests_[r.id] = std::move(r);
  }
  for (const auto& rel : d.releases) {
    auto p = providers_.find(rel.provider);
    if (p == providers_.end()) continue;
    p->second->Release(rel.node);
    released_.insert(rel.node);
    idle_since_.erase(rel.node);
    out.released.push_back(rel.node);
    out.events.push_back(
        {"", rel.node, "node_released",
         fmt::format("released idle node {} to provider {}: {}", rel.node, rel.provider, rel.why)});
  }
  reasons_ = std::move(d.pending_reasons);
  return out;
}

std::string ProviderManager::PendingReason(const std::string& job) const {
  auto it = reasons_.find(job);
  return it == reasons_.end() ? "" : it->second;
}

bool ProviderManager::CouldHold(const JobRequest& job) const {
  for (const auto& p : config_.providers) {
    if (ProviderCouldHold(p, job)) return true;
  }
  return false;
}

}  // namespace muster::coordinator::providers
