// ProviderManager's durable state (provider_manager.h, "State across restarts"): what it knows
// as one JSON document the coordinator keeps in its database.

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator::providers {
namespace {

using json = nlohmann::json;

int64_t Ms(TimePoint t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}
TimePoint At(int64_t ms) { return TimePoint(std::chrono::milliseconds(ms)); }

}  // namespace

std::string ProviderManager::SaveState() const {
  json j;
  j["version"] = 1;
  j["next_request"] = next_request_;
  j["next_index"] = next_index_;
  j["released"] = released_;
  j["announced"] = announced_;
  json reqs = json::array();
  for (const auto& [id, r] : requests_) {
    json q = {{"id", r.id},
              {"provider", r.provider},
              {"job", r.job},
              {"nodes", r.nodes},
              {"tries", r.tries},
              {"issued_ms", Ms(r.issued)},
              {"waiting_retry", r.waiting_retry},
              {"retry_at_ms", Ms(r.retry_at)},
              {"last_error", r.last_error}};
    if (r.failed) q["failed"] = *r.failed;
    reqs.push_back(std::move(q));
  }
  j["requests"] = std::move(reqs);
  json idle = json::object();
  for (const auto& [node, since] : idle_since_) idle[node] = Ms(since);
  j["idle_since_ms"] = std::move(idle);
  json given = json::object();
  for (const auto& [job, by_provider] : given_up_) {
    for (const auto& [provider, g] : by_provider) {
      given[job][provider] = {{"reason", g.reason}, {"at_ms", Ms(g.at)}};
    }
  }
  j["given_up"] = std::move(given);
  return j.dump();
}

StatusOr<std::vector<ProviderManager::Event>> ProviderManager::RestoreState(
    const std::string& state) {
  std::vector<Event> events;
  // Parsed whole before anything is taken: a document that does not parse changes nothing.
  decltype(requests_) requests;
  decltype(idle_since_) idle_since;
  decltype(given_up_) given_up;
  decltype(next_index_) next_index;
  decltype(released_) released;
  decltype(announced_) announced;
  uint64_t next_request = 1;
  std::set<uint64_t> restart_failed;
  try {
    json j = json::parse(state);
    if (j.value("version", 0) != 1) {
      return DataLossError(
          fmt::format("provider state: version {} is not 1", j.value("version", 0)));
    }
    next_request = j.at("next_request").get<uint64_t>();
    next_index = j.at("next_index").get<std::map<std::string, int>>();
    released = j.at("released").get<std::set<std::string>>();
    announced = j.at("announced").get<std::set<std::string>>();
    for (const auto& q : j.at("requests")) {
      OutstandingRequest r;
      r.id = q.at("id").get<uint64_t>();
      r.provider = q.at("provider").get<std::string>();
      r.job = q.at("job").get<std::string>();
      r.nodes = q.at("nodes").get<std::vector<std::string>>();
      r.tries = q.at("tries").get<int>();
      r.issued = At(q.at("issued_ms").get<int64_t>());
      r.waiting_retry = q.at("waiting_retry").get<bool>();
      r.retry_at = At(q.at("retry_at_ms").get<int64_t>());
      r.last_error = q.at("last_error").get<std::string>();
      if (q.contains("failed")) r.failed = q.at("failed").get<std::string>();
      requests[r.id] = std::move(r);
    }
    for (const auto& [node, ms] : j.at("idle_since_ms").items())
      idle_since[node] = At(ms.get<int64_t>());
    for (const auto& [job, by_provider] : j.at("given_up").items()) {
      for (const auto& [provider, g] : by_provider.items()) {
        given_up[job][provider] =
            GivenUp{g.at("reason").get<std::string>(), At(g.at("at_ms").get<int64_t>())};
      }
    }
  } catch (const json::exception& e) {
    return DataLossError(fmt::format("provider state does not parse: {}", e.what()));
  }
  for (auto it = requests.begin(); it != requests.end();) {
    OutstandingRequest& r = it->second;
    if (!providers_.count(r.provider)) {  // no longer in the providers file
      events.push_back({r.job, "", "provider_retry",
                        fmt::format("request {} to provider {} dropped: the provider is no longer "
                                    "configured",
                                    r.id, r.provider)});
      it = requests.erase(it);
      continue;
    }
    // A try in flight died with the coordinator: the providers give back what their previous
    // process held (local agents stop with it; Slurm allocations are scancelled from the
    // ledger), so the try failed. It counts, and is retried after the backoff as any failed try.
    if (!r.waiting_retry && !r.failed) {
      r.failed = "the coordinator restarted while the request was in flight";
      restart_failed.insert(r.id);
    }
    ++it;
  }
  requests_ = std::move(requests);
  idle_since_ = std::move(idle_since);
  given_up_ = std::move(given_up);
  next_index_ = std::move(next_index);
  released_ = std::move(released);
  announced_ = std::move(announced);
  next_request_ = std::max(next_request_, next_request);
  restart_failed_ = std::move(restart_failed);
  saved_ = state;
  return events;
}

std::vector<ProviderManager::Event> ProviderManager::Adopt(std::unique_ptr<ProviderLedger> ledger,
                                                           const std::set<std::string>& known) {
  std::vector<Event> events;
  ledger_ = std::move(ledger);
  for (auto& [name, p] : providers_) {
    const std::string& provider = name;
    auto keep = [&](uint64_t id, const std::vector<std::string>& nodes) {
      auto it = requests_.find(id);
      if (it != requests_.end() && it->second.provider == provider && restart_failed_.count(id))
        return true;
      for (const auto& n : nodes) {
        if (known.count(n)) return true;
      }
      return false;
    };
    for (uint64_t id : p->Adopt(ledger_.get(), keep)) {
      next_request_ = std::max(next_request_, id + 1);  // never handed out again
      auto it = requests_.find(id);
      if (it == requests_.end() || !restart_failed_.count(id)) continue;
      it->second.failed.reset();
      events.push_back(
          {it->second.job, "", "provider_adopted",
           fmt::format("request {} to provider {} (nodes {}) was in flight when the coordinator "
                       "restarted; adopted: its nodes may still register",
                       id, provider, fmt::join(it->second.nodes, ","))});
    }
  }
  restart_failed_.clear();
  return events;
}

std::optional<std::string> ProviderManager::StateToSave() const {
  std::string s = SaveState();
  if (s == saved_) return std::nullopt;
  return s;
}

}  // namespace muster::coordinator::providers
