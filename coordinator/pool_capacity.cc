#include "coordinator/pool_capacity.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <string>
#include <utility>

namespace muster::coordinator {
namespace {

bool Fits(const JobRequest& j, const NodeSpec& n) {
  if (!j.providers.empty() &&
      std::find(j.providers.begin(), j.providers.end(), n.provider) == j.providers.end())
    return false;
  if (!j.gpu_type.empty() && j.gpu_type != n.gpu_type) return false;
  if (n.gpus < j.gpus_per_node || n.slots < j.ranks_per_node) return false;
  if (!j.checkpoint_volume.empty() &&
      std::find(n.volumes.begin(), n.volumes.end(), j.checkpoint_volume) == n.volumes.end())
    return false;
  return true;
}

NodeSpec FromTemplate(const providers::ProviderConfig& p) {
  NodeSpec s;
  s.provider = p.name;
  s.region = p.node.region;
  s.island = p.node.island;
  s.gpu_type = p.node.gpu_type;
  s.gpus = p.node.gpus;
  s.slots = p.node.slots;
  for (const auto& [name, path] : p.node.volumes) s.volumes.push_back(name);
  return s;
}

struct Pool {
  int can_hold = 0;
  std::string why;  // "3 registered nodes fit" or "max_nodes 2"
};

}  // namespace

Status PoolCanEverHold(const JobRequest& job, const std::vector<NodeView>& nodes,
                       const providers::ProvidersConfig& config) {
  const bool one_island = job.island == IslandPolicy::kRequired;
  // (provider, island or "") -> pool.
  std::map<std::pair<std::string, std::string>, Pool> pools;
  std::map<std::pair<std::string, std::string>, int> up_fitting;  // on-demand, template unfit
  for (const auto& n : nodes) {
    if (n.spec.provider.empty() || !Fits(job, n.spec)) continue;  // labels not known yet
    std::pair<std::string, std::string> key{n.spec.provider, one_island ? n.spec.island : ""};
    const providers::ProviderConfig* p = config.Find(n.spec.provider);
    if (p != nullptr && p->OnDemand()) {
      if (n.state != NodeState::kDown) up_fitting[key]++;
      continue;
    }
    pools[key].can_hold++;
  }
  for (auto& [key, pool] : pools) {
    pool.why = fmt::format("{} registered node{} fit{}", pool.can_hold,
                           pool.can_hold == 1 ? "" : "s", pool.can_hold == 1 ? "s" : "");
  }
  for (const auto& p : config.providers) {
    if (!p.OnDemand()) continue;
    NodeSpec t = FromTemplate(p);
    if (Fits(job, t)) {
      pools[{p.name, one_island ? t.island : ""}] = {p.max_nodes,
                                                     fmt::format("max_nodes {}", p.max_nodes)};
      continue;
    }
    for (const auto& [key, count] : up_fitting) {
      if (key.first != p.name) continue;
      int n = std::min(count, p.max_nodes);
      pools[key] = {n, fmt::format("its template does not fit; {} registered node{} fit{}", n,
                                   n == 1 ? "" : "s", n == 1 ? "s" : "")};
    }
  }
  std::vector<std::pair<std::pair<std::string, std::string>, Pool>> sorted(pools.begin(),
                                                                           pools.end());
  std::stable_sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
    return a.second.can_hold > b.second.can_hold;
  });
  const int need = Need(job);
  if (!sorted.empty() && sorted.front().second.can_hold >= need) return Status::Ok();

  std::string needs = fmt::format("{} node{}", job.nodes, job.nodes == 1 ? "" : "s");
  if (job.spares > 0) {
    needs = fmt::format("{} ({} for the gang + {} spare{})", need, job.nodes, job.spares,
                        job.spares == 1 ? "" : "s");
  }
  std::vector<std::string> what;
  if (!job.gpu_type.empty()) what.push_back("gpu_type " + job.gpu_type);
  if (job.gpus_per_node > 0) what.push_back(fmt::format(">= {} GPUs", job.gpus_per_node));
  if (job.ranks_per_node > 1) what.push_back(fmt::format(">= {} slots", job.ranks_per_node));
  if (!job.checkpoint_volume.empty()) what.push_back("volume " + job.checkpoint_volume);
  if (!job.providers.empty())
    what.push_back(fmt::format("provider {}", fmt::join(job.providers, "|")));
  std::string with = what.empty() ? "" : fmt::format(" with {}", fmt::join(what, ", "));
  std::string where;
  if (sorted.empty() || sorted.front().second.can_hold == 0) {
    where = "no registered node and no on-demand provider's node template fits";
  } else {
    std::vector<std::string> named;
    constexpr size_t kNamed = 4;
    for (size_t i = 0; i < sorted.size() && i < kNamed && sorted[i].second.can_hold > 0; ++i) {
      const auto& [key, pool] = sorted[i];
      named.push_back(fmt::format("provider {}{}: {} ({})", key.first,
                                  one_island ? ", island " + key.second : "", pool.can_hold,
                                  pool.why));
    }
    if (sorted.size() > kNamed) named.push_back(fmt::format("{} more", sorted.size() - kNamed));
    where = fmt::format("the most that can ever exist on one {} is {}: {}",
                        one_island ? "island" : "provider", sorted.front().second.can_hold,
                        fmt::join(named, "; "));
  }
  return FailedPreconditionError(
      fmt::format("no node pool can ever hold this job: it needs {} on one {}{}; {}", needs,
                  one_island ? "island" : "provider", with, where));
}

}  // namespace muster::coordinator
