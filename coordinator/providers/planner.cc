#include "coordinator/providers/planner.h"

#include <fmt/format.h>

#include <algorithm>

namespace muster::coordinator::providers {
namespace {

int64_t SecondsUp(Millis d) { return (d.count() + 999) / 1000; }

bool TemplateFits(const ProviderConfig& p, const JobRequest& job) {
  const NodeTemplate& t = p.node;
  if (!job.gpu_type.empty() && job.gpu_type != t.gpu_type) return false;
  if (t.gpus < job.gpus_per_node || t.slots < job.ranks_per_node) return false;
  if (!job.checkpoint_volume.empty() && !t.volumes.count(job.checkpoint_volume)) return false;
  if (!job.providers.empty() &&
      std::find(job.providers.begin(), job.providers.end(), p.name) == job.providers.end())
    return false;
  return job.hosts.empty();  // a gang pinned to named hosts waits for those hosts
}

Millis Backoff(const ProviderConfig& p, int tries) {
  Millis b = p.retry_backoff;
  for (int i = 1; i < tries && b < p.retry_backoff_max; ++i) b *= 2;
  return std::min(b, p.retry_backoff_max);
}

}  // namespace

bool ProviderCouldHold(const ProviderConfig& p, const JobRequest& job) {
  return p.OnDemand() && TemplateFits(p, job) && Need(job) <= p.max_nodes;
}

PlannerDecisions PlanProviders(const PlannerInput& in) {
  PlannerDecisions d;
  std::map<std::string, const ProviderConfig*> config;
  for (const auto& p : in.providers) config[p.name] = &p;
  std::map<std::string, const NodeView*> nodes;
  for (const auto& n : in.nodes) nodes[n.spec.name] = &n;
  std::set<std::string> pending_jobs;
  for (const auto& j : in.pending) pending_jobs.insert(j.id);

  auto registered = [&](const std::string& name) {
    auto it = nodes.find(name);
    return it != nodes.end() && it->second->state != NodeState::kDown;
  };

  // Per provider: nodes held (registered, or promised and not registered yet) and tries in
  // flight.
  std::map<std::string, int> held, in_flight;
  for (const auto& n : in.nodes) {
    if (n.state != NodeState::kDown) held[n.spec.provider]++;
  }
  std::set<std::string> requested_nodes;        // nodes of requests outstanding
  std::map<std::string, std::string> job_wait;  // job -> reason, from its outstanding request

  // 1. The requests outstanding: done, failed or late (retry or give up), due for a retry.
  for (const auto& r : in.requests) {
    auto pc = config.find(r.provider);
    if (pc == config.end()) {  // the provider left the config: nothing more to wait for
      d.done.push_back(r.id);
      continue;
    }
    const ProviderConfig& p = *pc->second;
    int up = 0;
    for (const auto& n : r.nodes) {
      if (registered(n)) ++up;
    }
    int missing = static_cast<int>(r.nodes.size()) - up;
    if (r.waiting_retry) {
      if (!pending_jobs.count(r.job)) {
        d.done.push_back(r.id);
        continue;
      }
      held[r.provider] += static_cast<int>(r.nodes.size());
      if (in.now >= r.retry_at && in_flight[r.provider] < p.max_pending_requests) {
        in_flight[r.provider]++;
        d.requests.push_back(
            {r.provider, r.job, static_cast<int>(r.nodes.size()), r.tries + 1, r.id, r.last_error});
        job_wait[r.job] = fmt::format("waiting for {} nodes from provider {} (try {} of {})",
                                      r.nodes.size(), r.provider, r.tries + 1, p.max_tries);
      } else {
        auto left = std::chrono::duration_cast<Millis>(r.retry_at - in.now);
        job_wait[r.job] = fmt::format(
            "waiting for {} nodes from provider {}: try {} of {} failed ({}); retrying in {} s",
            r.nodes.size(), r.provider, r.tries, p.max_tries, r.last_error,
            SecondsUp(std::max(left, Millis(0))));
      }
      continue;
    }
    if (missing == 0) {
      d.done.push_back(r.id);
      continue;
    }
    held[r.provider] += missing;
    for (const auto& n : r.nodes) requested_nodes.insert(n);
    std::optional<std::string> why = r.failed;
    if (!why && in.now - r.issued >= p.request_timeout) {
      why = fmt::format("{} of {} nodes not up after {} s", missing, r.nodes.size(),
                        SecondsUp(p.request_timeout));
    }
    if (!why) {
      in_flight[r.provider]++;
      job_wait[r.job] = fmt::format("waiting for {} nodes from provider {}", missing, r.provider);
      continue;
    }
    if (r.tries < p.max_tries && pending_jobs.count(r.job)) {
      Millis b = Backoff(p, r.tries);
      d.retries.push_back({r.id, in.now + b, *why});
      job_wait[r.job] = fmt::format(
          "waiting for {} nodes from provider {}: try {} of {} failed ({}); retrying in {} s",
          r.nodes.size(), r.provider, r.tries, p.max_tries, *why, SecondsUp(b));
    } else {
      std::string reason = fmt::format("provider {} could not supply {} nodes after {} tries: {}",
                                       r.provider, r.nodes.size(), r.tries, *why);
      d.give_ups.push_back({r.id, r.job, r.provider, reason});
      job_wait[r.job] = reason;
    }
  }

  // 2. Pending gangs: wait for their request, or make one.
  std::set<std::string> claimed;  // idle nodes a pending gang of this pass counts on
  for (const auto& job : in.pending) {
    if (auto w = job_wait.find(job.id); w != job_wait.end()) {
      d.pending_reasons[job.id] = w->second;
      continue;
    }
    const std::map<std::string, GivenUp>* gave_up = nullptr;
    if (auto g = in.given_up.find(job.id); g != in.given_up.end()) gave_up = &g->second;
    std::string limit, given_up_reason;
    bool requested = false;
    for (const auto& p : in.providers) {
      if (!p.OnDemand() || !TemplateFits(p, job)) continue;
      if (gave_up) {
        auto g = gave_up->find(p.name);
        if (g != gave_up->end() && in.now < g->second.at + p.retry_backoff_max) {
          if (given_up_reason.empty()) given_up_reason = g->second.reason;
          continue;
        }
      }
      std::vector<std::string> idle;
      for (const auto& n : in.nodes) {
        if (n.spec.provider == p.name && n.state == NodeState::kUp && n.job.empty() &&
            !claimed.count(n.spec.name) && !requested_nodes.count(n.spec.name))
          idle.push_back(n.spec.name);
      }
      int take = std::min<int>(static_cast<int>(idle.size()), Need(job));
      int need = Need(job) - take;
      if (need == 0) {  // enough idle nodes: the scheduler has its reasons (reservations)
        for (int i = 0; i < take; ++i) claimed.insert(idle[i]);
        limit.clear();
        break;
      }
      if (held[p.name] + need > p.max_nodes) {
        if (limit.empty())
          limit = fmt::format("waiting: provider {} is at its limit of {} nodes ({} held)", p.name,
                              p.max_nodes, held[p.name]);
        continue;
      }
      if (in_flight[p.name] >= p.max_pending_requests) {
        if (limit.empty())
          limit = fmt::format("waiting: provider {} already has {} requests pending", p.name,
                              in_flight[p.name]);
        continue;
      }
      for (int i = 0; i < take; ++i) claimed.insert(idle[i]);
      held[p.name] += need;
      in_flight[p.name]++;
      d.requests.push_back({p.name, job.id, need, 1, 0, ""});
      d.pending_reasons[job.id] =
          fmt::format("waiting for {} nodes from provider {}", need, p.name);
      requested = true;
      break;
    }
    if (requested) continue;
    if (!limit.empty()) {
      d.pending_reasons[job.id] = limit;
    } else if (!given_up_reason.empty()) {
      d.pending_reasons[job.id] = given_up_reason;
    }
  }

  // 3. Idle nodes past their provider's timeout go back; a node with a job never does.
  for (const auto& n : in.nodes) {
    auto pc = config.find(n.spec.provider);
    if (pc == config.end() || !pc->second->OnDemand()) continue;
    if (!n.job.empty()) continue;
    if (claimed.count(n.spec.name) || requested_nodes.count(n.spec.name)) continue;
    auto since = in.idle_since.find(n.spec.name);
    if (since == in.idle_since.end()) continue;
    Millis idle = std::chrono::duration_cast<Millis>(in.now - since->second);
    if (idle < pc->second->idle_timeout) continue;
    d.releases.push_back({n.spec.name, n.spec.provider,
                          fmt::format("{} for {} s (idle_timeout {} s)",
                                      n.state == NodeState::kDown ? "down (lost)" : "idle",
                                      SecondsUp(idle), SecondsUp(pc->second->idle_timeout))});
  }
  return d;
}

}  // namespace muster::coordinator::providers
