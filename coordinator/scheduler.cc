#include "coordinator/scheduler.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <deque>
#include <limits>

#include "common/logging.h"

namespace muster::coordinator {

std::string_view NodeStateName(NodeState state) {
  switch (state) {
    case NodeState::kUp:
      return "up";
    case NodeState::kDraining:
      return "draining";
    case NodeState::kQuarantined:
      return "quarantined";
    case NodeState::kDown:
      return "down";
  }
  return "?";
}

StatusOr<NodeState> ParseNodeState(std::string_view name) {
  for (NodeState s :
       {NodeState::kUp, NodeState::kDraining, NodeState::kQuarantined, NodeState::kDown}) {
    if (NodeStateName(s) == name) return s;
  }
  return InvalidArgumentError(fmt::format("unknown node state '{}'", name));
}

std::string_view IslandPolicyName(IslandPolicy policy) {
  switch (policy) {
    case IslandPolicy::kAny:
      return "any";
    case IslandPolicy::kPreferred:
      return "preferred";
    case IslandPolicy::kRequired:
      return "required";
  }
  return "?";
}

StatusOr<IslandPolicy> ParseIslandPolicy(std::string_view name) {
  for (IslandPolicy p : {IslandPolicy::kAny, IslandPolicy::kPreferred, IslandPolicy::kRequired}) {
    if (IslandPolicyName(p) == name) return p;
  }
  // `name` may come off the wire: show a bounded prefix.
  return InvalidArgumentError(
      fmt::format("island must be required, preferred or any, not '{}'{}", name.substr(0, 48),
                  name.size() > 48 ? fmt::format("... ({} bytes)", name.size()) : ""));
}

namespace {

constexpr TimePoint kNever = TimePoint::max();

struct Job;

struct Node {
  NodeSpec spec;
  NodeState base = NodeState::kUp;  // kUp, kDraining or kDown
  bool quarantined = false;
  TimePoint q_until{};
  int quarantines = 0;
  std::deque<TimePoint> failures;
  int cls = -1;
  int free_pos = -1;  // index in its class's free list, -1 when not free
  Job* job = nullptr;
  bool spare = false;  // held idle as a spare of `job`
  bool removed = false;
};

struct Class {
  int provider = -1;      // index into providers
  int island_group = -1;  // index into island groups
  std::string gpu_type;
  int gpus = 0;
  int slots = 0;
  std::vector<std::string> volumes;  // sorted
  std::string island;
  int total = 0;          // registered members
  std::vector<int> free;  // node indices
  std::vector<int> members;
};

enum class WaitKind { kNone, kNotEnough, kHeld, kPreempting, kPinned, kNoNodes };

struct Job {
  JobRequest req;
  bool running = false;
  std::vector<int> nodes;
  std::vector<int> spares;  // held for it, idle (JobRequest::spares)
  TimePoint start{};
  std::vector<int> elig;  // eligible classes
  uint64_t elig_gen = std::numeric_limits<uint64_t>::max();
  // Preemption bookkeeping.
  Job* preempted_for = nullptr;  // on a victim
  int victims = 0;               // on a preemptor: victims still running
  int preempt_provider = -1, preempt_island = -1;
  // Why it waits.
  WaitKind wait = WaitKind::kNone;
  int wait_free = 0, wait_provider = -1, wait_island = -1;
  std::string wait_other;
};

struct QueueOrder {
  bool operator()(const Job* a, const Job* b) const {
    if (a->req.priority != b->req.priority) return a->req.priority > b->req.priority;
    return a->req.seq < b->req.seq;
  }
};

// The nodes held for the head job, which later jobs may use only within `extra` unless they end
// before `shadow`.
struct Reservation {
  Job* head = nullptr;
  std::vector<char> in_e;  // per class
  TimePoint shadow = kNever;
  int extra = 0;
};

}  // namespace

struct Scheduler::Impl {
  QuarantinePolicy policy;
  std::vector<Node> nodes;
  std::unordered_map<std::string, int> node_index;
  std::vector<Class> classes;
  std::unordered_map<std::string, int> class_index;
  uint64_t classes_gen = 0;
  std::vector<std::string> providers;
  std::unordered_map<std::string, int> provider_index;
  std::vector<std::pair<int, std::string>> islands;  // (provider, island)
  std::map<std::pair<int, std::string>, int> island_index;
  std::unordered_map<std::string, std::unique_ptr<Job>> jobs;
  std::set<Job*, QueueOrder> queue;
  std::set<int> quarantined_nodes;
  // Running jobs holding fewer spares than they ask for (refilled after the queue in a pass).
  std::set<Job*, QueueOrder> short_of_spares;
  // Scratch arrays for a pass.
  std::vector<int> s_prov_non, s_prov_e, s_isl_non, s_isl_e, s_prov_tot, s_isl_tot;

  int ProviderIdx(const std::string& p) {
    auto [it, added] = provider_index.emplace(p, static_cast<int>(providers.size()));
    if (added) providers.push_back(p);
    return it->second;
  }
  int IslandIdx(int provider, const std::string& island) {
    auto [it, added] =
        island_index.emplace(std::make_pair(provider, island), static_cast<int>(islands.size()));
    if (added) islands.emplace_back(provider, island);
    return it->second;
  }

  int ClassFor(const NodeSpec& s) {
    std::vector<std::string> vols = s.volumes;
    std::sort(vols.begin(), vols.end());
    vols.erase(std::unique(vols.begin(), vols.end()), vols.end());
    std::string key = fmt::format("{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}", s.provider, s.region,
                                  s.island, s.gpu_type, s.gpus, s.slots);
    for (const auto& v : vols) key += "\x1f" + v;
    auto it = class_index.find(key);
    if (it != class_index.end()) return it->second;
    Class c;
    c.provider = ProviderIdx(s.provider);
    c.island_group = IslandIdx(c.provider, s.island);
    c.gpu_type = s.gpu_type;
    c.gpus = s.gpus;
    c.slots = s.slots;
    c.volumes = std::move(vols);
    c.island = s.island;
    classes.push_back(std::move(c));
    ++classes_gen;
    int idx = static_cast<int>(classes.size()) - 1;
    class_index.emplace(std::move(key), idx);
    return idx;
  }

  bool ShouldBeFree(const Node& n) const {
    return !n.removed && n.base == NodeState::kUp && !n.quarantined && n.job == nullptr;
  }

  void SetFree(int idx, bool free) {
    Node& n = nodes[idx];
    auto& list = classes[n.cls].free;
    if (free && n.free_pos < 0) {
      n.free_pos = static_cast<int>(list.size());
      list.push_back(idx);
    } else if (!free && n.free_pos >= 0) {
      int last = list.back();
      list[n.free_pos] = last;
      nodes[last].free_pos = n.free_pos;
      list.pop_back();
      n.free_pos = -1;
    }
  }
  void Refresh(int idx) { SetFree(idx, ShouldBeFree(nodes[idx])); }

  void AttachToClass(int idx) {
    Node& n = nodes[idx];
    n.cls = ClassFor(n.spec);
    classes[n.cls].total++;
    classes[n.cls].members.push_back(idx);
  }
  void DetachFromClass(int idx) {
    Node& n = nodes[idx];
    SetFree(idx, false);
    Class& c = classes[n.cls];
    c.total--;
    c.members.erase(std::find(c.members.begin(), c.members.end(), idx));
    n.cls = -1;
  }

  static bool Eligible(const JobRequest& j, const Class& c, const std::string& provider) {
    if (!j.providers.empty() &&
        std::find(j.providers.begin(), j.providers.end(), provider) == j.providers.end())
      return false;
    if (!j.gpu_type.empty() && j.gpu_type != c.gpu_type) return false;
    if (c.gpus < j.gpus_per_node || c.slots < j.ranks_per_node) return false;
    if (!j.checkpoint_volume.empty() &&
        !std::binary_search(c.volumes.begin(), c.volumes.end(), j.checkpoint_volume))
      return false;
    return true;
  }

  const std::vector<int>& EligibleClasses(Job& j) {
    if (j.elig_gen != classes_gen) {
      j.elig.clear();
      for (int c = 0; c < static_cast<int>(classes.size()); ++c) {
        if (Eligible(j.req, classes[c], providers[classes[c].provider])) j.elig.push_back(c);
      }
      j.elig_gen = classes_gen;
    }
    return j.elig;
  }

  void Allocate(Job& j, std::vector<int> picked, TimePoint now) {
    std::sort(picked.begin(), picked.end(), [&](int a, int b) {
      const Class& ca = classes[nodes[a].cls];
      const Class& cb = classes[nodes[b].cls];
      if (ca.island != cb.island) return ca.island < cb.island;
      return nodes[a].spec.name < nodes[b].spec.name;
    });
    if (!j.req.hosts.empty()) {  // pinned: the order the user gave is the node-rank order
      picked.clear();
      for (const auto& h : j.req.hosts) picked.push_back(node_index.at(h));
    }
    for (int idx : picked) {
      nodes[idx].job = &j;
      SetFree(idx, false);
    }
    // The gang first (node-rank order), then its spares.
    if (static_cast<int>(picked.size()) > j.req.nodes) {
      j.spares.assign(picked.begin() + j.req.nodes, picked.end());
      picked.resize(j.req.nodes);
      for (int idx : j.spares) nodes[idx].spare = true;
    }
    j.nodes = std::move(picked);
    if (static_cast<int>(j.spares.size()) < j.req.spares) short_of_spares.insert(&j);
    j.running = true;
    j.start = now;
    j.wait = WaitKind::kNone;
  }

  void FreeNodes(Job& j) {
    for (int idx : j.spares) nodes[idx].spare = false;
    j.nodes.insert(j.nodes.end(), j.spares.begin(), j.spares.end());
    for (int idx : j.nodes) {
      nodes[idx].job = nullptr;
      Refresh(idx);
    }
    j.nodes.clear();
    j.spares.clear();
    short_of_spares.erase(&j);
    j.running = false;
    if (j.preempted_for != nullptr) {
      j.preempted_for->victims--;
      j.preempted_for = nullptr;
    }
  }

  TimePoint EndOf(const Job& j) const {
    if (j.req.time_limit.count() <= 0) return kNever;
    return j.start + j.req.time_limit;
  }

  bool TryPinned(Job& j, const Reservation& res, bool fits_before_shadow, TimePoint now,
                 std::vector<int>* picked) {
    int e_used = 0;
    std::string provider;
    for (const auto& h : j.req.hosts) {
      auto it = node_index.find(h);
      if (it == node_index.end()) {
        j.wait = WaitKind::kPinned;
        j.wait_other = fmt::format("node {} is not registered", h);
        return false;
      }
      const Node& n = nodes[it->second];
      if (n.free_pos < 0) {
        j.wait = WaitKind::kPinned;
        j.wait_other = n.job ? fmt::format("node {} runs job {}", h, n.job->req.id)
                             : fmt::format("node {} is {}", h,
                                           n.quarantined ? "quarantined" : NodeStateName(n.base));
        return false;
      }
      if (res.head && res.in_e[n.cls]) ++e_used;
      picked->push_back(it->second);
    }
    if (res.head && !fits_before_shadow && e_used > res.extra) {
      j.wait = WaitKind::kHeld;
      j.wait_other = res.head->req.id;
      return false;
    }
    return true;
  }

  // Tries to place `j` with its spares, else its gang alone (the spares follow as nodes free up):
  // a gang never waits for its spares, so a job that lost its spare to a replacement is never
  // stuck waiting for one.
  bool TryPlace(Job& j, const Reservation& res, TimePoint now, std::vector<int>* picked,
                int* e_used) {
    if (j.req.spares > 0 && TryPlaceN(j, res, now, picked, e_used, Need(j.req))) return true;
    return TryPlaceN(j, res, now, picked, e_used, j.req.nodes);
  }

  // Tries to place `need` nodes for `j` from free nodes, honouring the head's reservation. On
  // success fills `picked` and `e_used`; otherwise sets j's wait info.
  bool TryPlaceN(Job& j, const Reservation& res, TimePoint now, std::vector<int>* picked,
                 int* e_used, const int need) {
    picked->clear();
    *e_used = 0;
    // The job's excluded nodes are not free for it: hidden from the free lists for this try.
    std::vector<int> hidden;
    for (const auto& name : j.req.hosts.empty() ? j.req.excluded_nodes : std::set<std::string>{}) {
      auto it = node_index.find(name);
      if (it == node_index.end() || nodes[it->second].free_pos < 0) continue;
      SetFree(it->second, false);
      hidden.push_back(it->second);
    }
    struct Unhide {
      Impl* m;
      std::vector<int>* idx;
      ~Unhide() {
        for (int i : *idx) m->Refresh(i);
      }
    } unhide{this, &hidden};
    bool fits_before_shadow =
        res.head == nullptr || (j.req.time_limit.count() > 0 && res.shadow != kNever &&
                                now + j.req.time_limit <= res.shadow);
    int budget = fits_before_shadow ? std::numeric_limits<int>::max() / 2 : res.extra;
    if (!j.req.hosts.empty()) {
      if (!TryPinned(j, res, fits_before_shadow, now, picked)) return false;
      if (res.head && !fits_before_shadow) {
        for (int idx : *picked) *e_used += res.in_e[nodes[idx].cls] ? 1 : 0;
      }
      return true;
    }
    const auto& elig = EligibleClasses(j);
    s_prov_non.assign(providers.size(), 0);
    s_prov_e.assign(providers.size(), 0);
    s_isl_non.assign(islands.size(), 0);
    s_isl_e.assign(islands.size(), 0);
    bool any_e = false;
    s_prov_tot.assign(providers.size(), 0);
    s_isl_tot.assign(islands.size(), 0);
    for (int c : elig) {
      const Class& cl = classes[c];
      s_prov_tot[cl.provider] += cl.total;
      s_isl_tot[cl.island_group] += cl.total;
      int f = static_cast<int>(cl.free.size());
      if (f == 0) continue;
      if (res.head && res.in_e[c]) {
        s_prov_e[cl.provider] += f;
        s_isl_e[cl.island_group] += f;
        any_e = true;
      } else {
        s_prov_non[cl.provider] += f;
        s_isl_non[cl.island_group] += f;
      }
    }
    auto avail = [&](int non, int e) { return non + std::min(e, budget); };
    // Best fit: the smallest group that holds the gang.
    int best_p = -1, best_i = -1, best_avail = std::numeric_limits<int>::max();
    auto consider_islands = [&] {
      for (size_t i = 0; i < islands.size(); ++i) {
        int a = avail(s_isl_non[i], s_isl_e[i]);
        if (a >= need && a < best_avail) {
          best_avail = a;
          best_i = static_cast<int>(i);
          best_p = islands[i].first;
        }
      }
    };
    auto consider_providers = [&] {
      for (size_t p = 0; p < providers.size(); ++p) {
        int a = avail(s_prov_non[p], s_prov_e[p]);
        if (a >= need && a < best_avail) {
          best_avail = a;
          best_p = static_cast<int>(p);
          best_i = -1;
        }
      }
    };
    if (j.req.island != IslandPolicy::kAny) consider_islands();
    if (best_p < 0 && j.req.island != IslandPolicy::kRequired) consider_providers();
    if (best_p < 0) {
      // Wait info: the group with the most usable nodes, and whether the head's hold is why.
      // Only groups that could ever hold the gang are named (a reason that points at a
      // provider too small to help would mislead).
      const auto& prov_tot = s_prov_tot;
      const auto& isl_tot = s_isl_tot;
      int most = -1, most_p = -1, most_i = -1, most_raw = 0;
      bool islands_only = j.req.island == IslandPolicy::kRequired;
      if (islands_only) {
        for (size_t i = 0; i < islands.size(); ++i) {
          if (isl_tot[i] < need) continue;
          int a = avail(s_isl_non[i], s_isl_e[i]);
          if (a > most) most = a, most_p = islands[i].first, most_i = static_cast<int>(i);
          most_raw = std::max(most_raw, s_isl_non[i] + s_isl_e[i]);
        }
      } else {
        for (size_t p = 0; p < providers.size(); ++p) {
          if (prov_tot[p] < need) continue;
          int a = avail(s_prov_non[p], s_prov_e[p]);
          if (a > most) most = a, most_p = static_cast<int>(p), most_i = -1;
          most_raw = std::max(most_raw, s_prov_non[p] + s_prov_e[p]);
        }
      }
      if (any_e && most_raw >= need) {
        j.wait = WaitKind::kHeld;
        j.wait_other = res.head->req.id;
      } else if (elig.empty() || most_p < 0) {
        j.wait = WaitKind::kNoNodes;
      } else {
        j.wait = WaitKind::kNotEnough;
        j.wait_free = std::max(most, 0);
        j.wait_provider = most_p;
        j.wait_island = most_i;
      }
      return false;
    }
    // Pick: classes of the chosen group, by island, non-held nodes first.
    std::vector<int> cls;
    for (int c : elig) {
      const Class& cl = classes[c];
      if (cl.provider != best_p || cl.free.empty()) continue;
      if (best_i >= 0 && cl.island_group != best_i) continue;
      cls.push_back(c);
    }
    std::sort(cls.begin(), cls.end(), [&](int a, int b) {
      bool ea = res.head && res.in_e[a], eb = res.head && res.in_e[b];
      if (ea != eb) return !ea;
      return classes[a].island < classes[b].island;
    });
    int left = need;
    int e_left = budget;
    for (int c : cls) {
      bool e = res.head && res.in_e[c];
      const auto& free = classes[c].free;
      for (size_t k = 0; k < free.size() && left > 0; ++k) {
        if (e && e_left <= 0) break;
        picked->push_back(free[k]);
        --left;
        if (e) {
          --e_left;
          ++*e_used;
        }
      }
      if (left == 0) break;
    }
    MUSTER_CHECK(left == 0) << "scheduler: counted " << best_avail << " nodes but picked "
                            << need - left;
    return true;
  }

  // Groups a job could use under its island policy: (provider, island group or -1).
  std::vector<std::pair<int, int>> CandidateGroups(const Job& j) {
    std::vector<std::pair<int, int>> g;
    std::vector<char> seen_p(providers.size(), 0), seen_i(islands.size(), 0);
    for (int c : j.elig) {
      const Class& cl = classes[c];
      if (j.req.island == IslandPolicy::kRequired) {
        if (!seen_i[cl.island_group]) g.emplace_back(cl.provider, cl.island_group);
        seen_i[cl.island_group] = 1;
      } else {
        if (!seen_p[cl.provider]) g.emplace_back(cl.provider, -1);
        seen_p[cl.provider] = 1;
      }
    }
    return g;
  }

  bool InGroup(const Class& c, std::pair<int, int> g) const {
    return c.provider == g.first && (g.second < 0 || c.island_group == g.second);
  }

  Reservation HoldFor(Job& head, std::pair<int, int> g, TimePoint shadow, int extra) {
    Reservation r;
    r.head = &head;
    r.in_e.assign(classes.size(), 0);
    for (int c : head.elig) {
      if (InGroup(classes[c], g)) r.in_e[c] = 1;
    }
    r.shadow = shadow;
    r.extra = extra;
    return r;
  }

  // EASY backfill: the group where the head starts soonest, by the time limits of the jobs on
  // its nodes. No reservation if no group has enough usable nodes.
  Reservation EasyReservation(Job& head, TimePoint now) {
    Reservation best;
    TimePoint best_shadow = kNever;
    int best_extra = -1;
    std::pair<int, int> best_g{-1, -1};
    for (auto g : CandidateGroups(head)) {
      int free = 0;
      std::map<Job*, int> busy;
      int usable = 0;
      for (int c : head.elig) {
        const Class& cl = classes[c];
        if (!InGroup(cl, g)) continue;
        free += static_cast<int>(cl.free.size());
        for (int idx : cl.members) {
          const Node& n = nodes[idx];
          if (n.removed || n.base != NodeState::kUp || n.quarantined) continue;
          ++usable;
          if (n.job) busy[n.job]++;
        }
      }
      if (usable < head.req.nodes) continue;
      std::vector<std::pair<TimePoint, int>> ends;
      for (auto& [job, count] : busy) ends.emplace_back(EndOf(*job), count);
      std::sort(ends.begin(), ends.end());
      TimePoint shadow = kNever;
      int have = free, extra = 0;
      for (auto& [end, count] : ends) {
        if (end == kNever) break;
        have += count;
        if (have >= head.req.nodes) {
          shadow = end;
          extra = have - head.req.nodes;
          break;
        }
      }
      if (best_g.first < 0 || shadow < best_shadow ||
          (shadow == best_shadow && extra > best_extra)) {
        best_g = g;
        best_shadow = shadow;
        best_extra = extra;
      }
    }
    if (best_g.first < 0) return best;
    return HoldFor(head, best_g, best_shadow, best_shadow == kNever ? 0 : best_extra);
  }

  // Preempts lower-priority jobs for `head` if that gives it a gang. Returns true if it did.
  bool PlanPreemption(Job& head, TimePoint now, Decisions* out, Reservation* res) {
    struct Plan {
      std::pair<int, int> g;
      std::vector<Job*> victims;
      int max_prio = 0;
    };
    std::optional<Plan> best;
    for (auto g : CandidateGroups(head)) {
      int free = 0;
      std::map<Job*, int> cand;
      for (int c : head.elig) {
        const Class& cl = classes[c];
        if (!InGroup(cl, g)) continue;
        free += static_cast<int>(cl.free.size());
        for (int idx : cl.members) {
          const Node& n = nodes[idx];
          if (n.removed || n.base != NodeState::kUp || n.quarantined || !n.job) continue;
          if (n.job->req.priority < head.req.priority && n.job->preempted_for == nullptr) {
            cand[n.job]++;
          }
        }
      }
      std::vector<std::pair<Job*, int>> v(cand.begin(), cand.end());
      std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) {
        if (a.first->req.priority != b.first->req.priority)
          return a.first->req.priority < b.first->req.priority;
        if (a.first->start != b.first->start) return a.first->start > b.first->start;
        return a.first->req.seq > b.first->req.seq;
      });
      Plan p{g, {}, std::numeric_limits<int>::min()};
      int have = free;
      for (auto& [job, count] : v) {
        if (have >= head.req.nodes) break;
        p.victims.push_back(job);
        p.max_prio = std::max(p.max_prio, job->req.priority);
        have += count;
      }
      if (have < head.req.nodes || p.victims.empty()) continue;
      if (!best || p.victims.size() < best->victims.size() ||
          (p.victims.size() == best->victims.size() && p.max_prio < best->max_prio)) {
        best = std::move(p);
      }
    }
    if (!best) return false;
    for (Job* v : best->victims) {
      v->preempted_for = &head;
      head.victims++;
      out->preemptions.push_back({v->req.id, head.req.id});
    }
    head.preempt_provider = best->g.first;
    head.preempt_island = best->g.second;
    head.wait = WaitKind::kPreempting;
    head.wait_other.clear();
    for (Job* v : best->victims) {
      head.wait_other += (head.wait_other.empty() ? "" : ", ") + v->req.id;
    }
    *res = HoldFor(head, best->g, kNever, 0);
    return true;
  }

  // Gives running jobs short of spares new ones from free nodes of their gang's provider (the
  // gang's islands first; only those when the island is required), never from nodes held for
  // the head job `res`.
  void RefillSpares(const Reservation& res, Decisions* out) {
    for (auto it = short_of_spares.begin(); it != short_of_spares.end();) {
      Job& j = **it;
      if (!j.running || j.nodes.empty() || static_cast<int>(j.spares.size()) >= j.req.spares) {
        it = short_of_spares.erase(it);
        continue;
      }
      int provider = classes[nodes[j.nodes[0]].cls].provider;
      std::set<int> gang_islands;
      for (int idx : j.nodes) gang_islands.insert(classes[nodes[idx].cls].island_group);
      std::vector<int> cand;  // free nodes that may become its spares
      for (int c : EligibleClasses(j)) {
        const Class& cl = classes[c];
        if (cl.provider != provider || cl.free.empty() || (res.head && res.in_e[c])) continue;
        if (j.req.island == IslandPolicy::kRequired && !gang_islands.count(cl.island_group))
          continue;
        for (int idx : cl.free) {
          if (!j.req.excluded_nodes.count(nodes[idx].spec.name)) cand.push_back(idx);
        }
      }
      std::sort(cand.begin(), cand.end(), [&](int a, int b) {
        bool sa = gang_islands.count(classes[nodes[a].cls].island_group) > 0;
        bool sb = gang_islands.count(classes[nodes[b].cls].island_group) > 0;
        if (sa != sb) return sa;
        return nodes[a].spec.name < nodes[b].spec.name;
      });
      for (int idx : cand) {
        if (static_cast<int>(j.spares.size()) >= j.req.spares) break;
        nodes[idx].job = &j;
        nodes[idx].spare = true;
        SetFree(idx, false);
        j.spares.push_back(idx);
        out->spares_held.push_back({j.req.id, nodes[idx].spec.name});
      }
      if (static_cast<int>(j.spares.size()) >= j.req.spares) {
        it = short_of_spares.erase(it);
      } else {
        ++it;
      }
    }
  }

  void ExpireQuarantines(TimePoint now) {
    for (auto it = quarantined_nodes.begin(); it != quarantined_nodes.end();) {
      Node& n = nodes[*it];
      if (n.q_until <= now) {
        n.quarantined = false;
        Refresh(*it);
        it = quarantined_nodes.erase(it);
      } else {
        ++it;
      }
    }
  }

  NodeView View(const Node& n, TimePoint now) const {
    NodeView v;
    v.spec = n.spec;
    v.state = n.quarantined && n.q_until > now ? NodeState::kQuarantined : n.base;
    if (n.job) v.job = n.job->req.id;
    v.spare = n.spare;
    v.quarantines = n.quarantines;
    v.quarantined_until = n.q_until;
    return v;
  }

  Status Validate(const JobRequest& j) const {
    if (j.id.empty()) return InvalidArgumentError("job id is empty");
    if (j.nodes < 1) return InvalidArgumentError(fmt::format("job {}: nodes must be >= 1", j.id));
    if (j.ranks_per_node < 1)
      return InvalidArgumentError(fmt::format("job {}: ranks_per_node must be >= 1", j.id));
    if (j.gpus_per_node < 0)
      return InvalidArgumentError(fmt::format("job {}: gpus_per_node must be >= 0", j.id));
    if (!j.hosts.empty() && static_cast<int>(j.hosts.size()) != j.nodes)
      return InvalidArgumentError(
          fmt::format("job {}: {} hosts named for {} nodes", j.id, j.hosts.size(), j.nodes));
    if (j.spares < 0) return InvalidArgumentError(fmt::format("job {}: spares must be >= 0", j.id));
    if (j.spares > 0 && !j.hosts.empty())
      return InvalidArgumentError(
          fmt::format("job {}: spares cannot be held for a gang pinned to named hosts", j.id));
    return Status::Ok();
  }
};

Scheduler::Scheduler(QuarantinePolicy policy) : impl_(std::make_unique<Impl>()) {
  impl_->policy = policy;
}
Scheduler::~Scheduler() = default;

void Scheduler::UpsertNode(const NodeSpec& spec) {
  auto& m = *impl_;
  auto it = m.node_index.find(spec.name);
  int idx;
  if (it == m.node_index.end()) {
    idx = static_cast<int>(m.nodes.size());
    m.nodes.emplace_back();
    m.node_index.emplace(spec.name, idx);
    m.nodes[idx].spec = spec;
    m.AttachToClass(idx);
  } else {
    idx = it->second;
    m.DetachFromClass(idx);
    m.nodes[idx].spec = spec;
    m.AttachToClass(idx);
    if (m.nodes[idx].base == NodeState::kDown) m.nodes[idx].base = NodeState::kUp;
  }
  m.Refresh(idx);
}

Status Scheduler::RemoveNode(const std::string& name) {
  auto& m = *impl_;
  auto it = m.node_index.find(name);
  if (it == m.node_index.end()) return NotFoundError("unknown node " + name);
  Node& n = m.nodes[it->second];
  if (n.job) {
    return FailedPreconditionError(
        fmt::format("node {} runs job {}; release it first", name, n.job->req.id));
  }
  m.DetachFromClass(it->second);
  m.quarantined_nodes.erase(it->second);
  n.removed = true;
  m.node_index.erase(it);
  return Status::Ok();
}

Status Scheduler::SetNodeState(const std::string& name, NodeState state) {
  auto& m = *impl_;
  auto it = m.node_index.find(name);
  if (it == m.node_index.end()) return NotFoundError("unknown node " + name);
  if (state == NodeState::kQuarantined) {
    return InvalidArgumentError("quarantine comes from RecordNodeFailure, not SetNodeState");
  }
  m.nodes[it->second].base = state;
  m.Refresh(it->second);
  return Status::Ok();
}

std::optional<TimePoint> Scheduler::RecordNodeFailure(const std::string& name, TimePoint now) {
  auto& m = *impl_;
  auto it = m.node_index.find(name);
  if (it == m.node_index.end()) return std::nullopt;
  Node& n = m.nodes[it->second];
  n.failures.push_back(now);
  while (!n.failures.empty() && n.failures.front() + m.policy.failure_window < now) {
    n.failures.pop_front();
  }
  if (static_cast<int>(n.failures.size()) < m.policy.failures_to_quarantine) return std::nullopt;
  n.failures.clear();
  auto d = m.policy.quarantine_base;
  for (int i = 0; i < n.quarantines && d < m.policy.quarantine_max; ++i) d *= 2;
  d = std::min(d, m.policy.quarantine_max);
  n.quarantines++;
  n.quarantined = true;
  n.q_until = now + d;
  m.quarantined_nodes.insert(it->second);
  m.Refresh(it->second);
  return n.q_until;
}

void Scheduler::RecordNodeSuccess(const std::string& name) {
  auto it = impl_->node_index.find(name);
  if (it != impl_->node_index.end()) impl_->nodes[it->second].failures.clear();
}

void Scheduler::RestoreQuarantine(const std::string& name, int quarantines, TimePoint until) {
  auto& m = *impl_;
  auto it = m.node_index.find(name);
  if (it == m.node_index.end()) return;
  Node& n = m.nodes[it->second];
  n.quarantines = quarantines;
  n.q_until = until;
  n.quarantined = until > TimePoint{};
  if (n.quarantined) m.quarantined_nodes.insert(it->second);
  m.Refresh(it->second);
}

StatusOr<NodeView> Scheduler::GetNode(const std::string& name, TimePoint now) const {
  auto it = impl_->node_index.find(name);
  if (it == impl_->node_index.end()) return NotFoundError("unknown node " + name);
  return impl_->View(impl_->nodes[it->second], now);
}

std::vector<NodeView> Scheduler::Nodes(TimePoint now) const {
  std::vector<NodeView> out;
  for (const auto& n : impl_->nodes) {
    if (!n.removed) out.push_back(impl_->View(n, now));
  }
  std::sort(out.begin(), out.end(),
            [](const NodeView& a, const NodeView& b) { return a.spec.name < b.spec.name; });
  return out;
}

Status Scheduler::Feasible(const JobRequest& job) const {
  auto& m = *impl_;
  MUSTER_RETURN_IF_ERROR(m.Validate(job));
  std::string needs = fmt::format("{} node{}", job.nodes, job.nodes == 1 ? "" : "s");
  if (job.spares > 0) {
    needs = fmt::format("{} ({} for the gang + {} spare{})", Need(job), job.nodes, job.spares,
                        job.spares == 1 ? "" : "s");
  }
  std::vector<std::string> what;
  if (!job.gpu_type.empty()) what.push_back("gpu_type " + job.gpu_type);
  if (job.gpus_per_node > 0) what.push_back(fmt::format(">= {} GPUs", job.gpus_per_node));
  if (job.ranks_per_node > 1) what.push_back(fmt::format(">= {} slots", job.ranks_per_node));
  if (!job.checkpoint_volume.empty()) what.push_back("volume " + job.checkpoint_volume);
  if (!job.providers.empty())
    what.push_back(fmt::format("provider {}", fmt::join(job.providers, "|")));
  std::string with = what.empty() ? "" : " with " + fmt::format("{}", fmt::join(what, ", "));
  if (!job.hosts.empty()) {
    std::string provider;
    for (const auto& h : job.hosts) {
      auto it = m.node_index.find(h);
      if (it == m.node_index.end())
        return FailedPreconditionError(fmt::format("node {} is not registered", h));
      const Node& n = m.nodes[it->second];
      const Class& c = m.classes[n.cls];
      if (!Impl::Eligible(job, c, m.providers[c.provider]))
        return FailedPreconditionError(fmt::format("node {} does not fit a rank set{}", h, with));
      if (!provider.empty() && provider != n.spec.provider)
        return FailedPreconditionError(
            fmt::format("nodes {} span providers {} and {}; a gang needs one provider",
                        fmt::join(job.hosts, ","), provider, n.spec.provider));
      provider = n.spec.provider;
    }
    return Status::Ok();
  }
  std::vector<int> prov(m.providers.size(), 0), isl(m.islands.size(), 0);
  for (size_t c = 0; c < m.classes.size(); ++c) {
    const Class& cl = m.classes[c];
    if (cl.total == 0 || !Impl::Eligible(job, cl, m.providers[cl.provider])) continue;
    prov[cl.provider] += cl.total;
    isl[cl.island_group] += cl.total;
  }
  bool one_island = job.island == IslandPolicy::kRequired;
  const auto& counts = one_island ? isl : prov;
  int best = 0, best_idx = -1;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] > best) best = counts[i], best_idx = static_cast<int>(i);
  }
  if (best >= Need(job)) return Status::Ok();
  std::string where;
  if (best_idx < 0) {
    where = "no registered node fits";
  } else if (one_island) {
    where = fmt::format("the most on one island is {} (provider {}, island {})", best,
                        m.providers[m.islands[best_idx].first], m.islands[best_idx].second);
  } else {
    where = fmt::format("the most on one provider is {} ({})", best, m.providers[best_idx]);
  }
  return FailedPreconditionError(
      fmt::format("no registered node set can ever hold this job: it needs {} on one {}{}; {}",
                  needs, one_island ? "island" : "provider", with, where));
}

Status Scheduler::Submit(const JobRequest& job) {
  auto& m = *impl_;
  MUSTER_RETURN_IF_ERROR(m.Validate(job));
  if (m.jobs.count(job.id)) return InvalidArgumentError("job " + job.id + " already exists");
  auto j = std::make_unique<Job>();
  j->req = job;
  j->wait = WaitKind::kNotEnough;
  j->wait_provider = -1;
  m.queue.insert(j.get());
  m.jobs.emplace(job.id, std::move(j));
  return Status::Ok();
}

Status Scheduler::RestoreRunning(const JobRequest& job, const std::vector<std::string>& nodes) {
  auto& m = *impl_;
  MUSTER_RETURN_IF_ERROR(m.Validate(job));
  if (m.jobs.count(job.id)) return InvalidArgumentError("job " + job.id + " already exists");
  auto j = std::make_unique<Job>();
  j->req = job;
  std::vector<int> idxs;
  for (const auto& name : nodes) {
    if (!m.node_index.count(name)) {
      // A node of a running job that has not re-registered yet (coordinator restart): known by
      // name only, and down until its agent registers with its labels.
      NodeSpec unregistered;
      unregistered.name = name;
      UpsertNode(unregistered);
      m.nodes[m.node_index[name]].base = NodeState::kDown;
      m.Refresh(m.node_index[name]);
    }
    int idx = m.node_index[name];
    if (m.nodes[idx].job) {
      return FailedPreconditionError(
          fmt::format("node {} already runs job {}", name, m.nodes[idx].job->req.id));
    }
    idxs.push_back(idx);
  }
  for (int idx : idxs) {
    m.nodes[idx].job = j.get();
    m.SetFree(idx, false);
  }
  j->nodes = std::move(idxs);
  j->running = true;
  // Short of spares until RestoreSpare gives them back; one not restored is found in a pass.
  if (j->req.spares > 0) m.short_of_spares.insert(j.get());
  m.jobs.emplace(job.id, std::move(j));
  return Status::Ok();
}

Status Scheduler::RestoreSpare(const std::string& job, const std::string& node) {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  if (it == m.jobs.end() || !it->second->running)
    return NotFoundError("job " + job + " is not running");
  Job& j = *it->second;
  if (static_cast<int>(j.spares.size()) >= j.req.spares) {
    return FailedPreconditionError(
        fmt::format("job {} holds the {} spare(s) it asks for already", job, j.req.spares));
  }
  if (!m.node_index.count(node)) {
    NodeSpec unregistered;  // as in RestoreRunning
    unregistered.name = node;
    UpsertNode(unregistered);
    m.nodes[m.node_index[node]].base = NodeState::kDown;
    m.Refresh(m.node_index[node]);
  }
  int idx = m.node_index[node];
  if (m.nodes[idx].job) {
    return FailedPreconditionError(
        fmt::format("node {} is held by job {} already", node, m.nodes[idx].job->req.id));
  }
  m.nodes[idx].job = &j;
  m.nodes[idx].spare = true;
  m.SetFree(idx, false);
  j.spares.push_back(idx);
  if (static_cast<int>(j.spares.size()) >= j.req.spares) m.short_of_spares.erase(&j);
  return Status::Ok();
}

Status Scheduler::Release(const std::string& job) {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  if (it == m.jobs.end() || !it->second->running)
    return NotFoundError("job " + job + " is not running");
  m.FreeNodes(*it->second);
  m.jobs.erase(it);
  return Status::Ok();
}

Status Scheduler::Requeue(const std::string& job) {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  if (it == m.jobs.end() || !it->second->running)
    return NotFoundError("job " + job + " is not running");
  m.FreeNodes(*it->second);
  it->second->wait = WaitKind::kNotEnough;
  it->second->wait_provider = -1;
  m.queue.insert(it->second.get());
  return Status::Ok();
}

Status Scheduler::Exclude(const std::string& job, const std::string& node) {
  auto it = impl_->jobs.find(job);
  if (it == impl_->jobs.end()) return NotFoundError("no job " + job);
  it->second->req.excluded_nodes.insert(node);
  return Status::Ok();
}

Status Scheduler::CancelPending(const std::string& job) {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  if (it == m.jobs.end() || it->second->running)
    return NotFoundError("job " + job + " is not pending");
  m.queue.erase(it->second.get());
  for (auto& n : m.nodes) {  // victims stopping for it stop anyway; forget who asked
    if (n.job && n.job->preempted_for == it->second.get()) n.job->preempted_for = nullptr;
  }
  m.jobs.erase(it);
  return Status::Ok();
}

bool Scheduler::IsPending(const std::string& job) const {
  auto it = impl_->jobs.find(job);
  return it != impl_->jobs.end() && !it->second->running;
}

bool Scheduler::IsRunning(const std::string& job) const {
  auto it = impl_->jobs.find(job);
  return it != impl_->jobs.end() && it->second->running;
}

std::vector<std::string> Scheduler::AllocationOf(const std::string& job) const {
  std::vector<std::string> out;
  auto it = impl_->jobs.find(job);
  if (it == impl_->jobs.end()) return out;
  for (int idx : it->second->nodes) out.push_back(impl_->nodes[idx].spec.name);
  return out;
}

std::vector<std::string> Scheduler::SparesOf(const std::string& job) const {
  std::vector<std::string> out;
  auto it = impl_->jobs.find(job);
  if (it == impl_->jobs.end()) return out;
  for (int idx : it->second->spares) out.push_back(impl_->nodes[idx].spec.name);
  std::sort(out.begin(), out.end());
  return out;
}

StatusOr<std::string> Scheduler::TakeSpare(const std::string& job, const std::string& lost) {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  if (it == m.jobs.end() || !it->second->running)
    return NotFoundError("job " + job + " is not running");
  Job& j = *it->second;
  auto li = m.node_index.find(lost);
  auto pos = li == m.node_index.end() ? j.nodes.end()
                                      : std::find(j.nodes.begin(), j.nodes.end(), li->second);
  if (pos == j.nodes.end())
    return NotFoundError(fmt::format("node {} is not in job {}'s gang", lost, job));
  if (j.spares.empty()) return FailedPreconditionError(fmt::format("job {} holds no spare", job));
  // Only a spare that could start ranks now: up (a restored spare whose agent is not back yet is
  // down), not draining, not quarantined.
  std::vector<int> usable;
  for (int idx : j.spares) {
    if (m.nodes[idx].base == NodeState::kUp && !m.nodes[idx].quarantined) usable.push_back(idx);
  }
  if (usable.empty()) {
    std::vector<std::string> names;
    for (int idx : j.spares) names.push_back(m.nodes[idx].spec.name);
    return FailedPreconditionError(
        fmt::format("job {} holds no spare that is up (held: {})", job, fmt::join(names, ",")));
  }
  int lost_island = m.classes[m.nodes[li->second].cls].island_group;
  auto better = [&](int a, int b) {  // same island as the lost node first, then by name
    bool sa = m.classes[m.nodes[a].cls].island_group == lost_island;
    bool sb = m.classes[m.nodes[b].cls].island_group == lost_island;
    if (sa != sb) return sa;
    return m.nodes[a].spec.name < m.nodes[b].spec.name;
  };
  int spare = *std::min_element(usable.begin(), usable.end(), better);
  j.spares.erase(std::find(j.spares.begin(), j.spares.end(), spare));
  m.nodes[spare].spare = false;
  *pos = spare;
  m.nodes[li->second].job = nullptr;
  m.Refresh(li->second);
  m.short_of_spares.insert(&j);
  return m.nodes[spare].spec.name;
}

Status Scheduler::DropSpare(const std::string& job, const std::string& node) {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  auto ni = m.node_index.find(node);
  if (it == m.jobs.end() || ni == m.node_index.end())
    return NotFoundError(fmt::format("node {} is not a spare of job {}", node, job));
  Job& j = *it->second;
  auto pos = std::find(j.spares.begin(), j.spares.end(), ni->second);
  if (pos == j.spares.end())
    return NotFoundError(fmt::format("node {} is not a spare of job {}", node, job));
  j.spares.erase(pos);
  m.nodes[ni->second].spare = false;
  m.nodes[ni->second].job = nullptr;
  m.Refresh(ni->second);
  m.short_of_spares.insert(&j);
  return Status::Ok();
}

std::vector<JobRequest> Scheduler::SpareRequests() const {
  auto& m = *impl_;
  std::vector<JobRequest> out;
  for (const Job* j : m.short_of_spares) {
    int lacks = j->req.spares - static_cast<int>(j->spares.size());
    if (!j->running || j->nodes.empty() || lacks <= 0) continue;
    JobRequest r = j->req;
    r.nodes = lacks;
    r.spares = 0;
    r.providers = {m.nodes[j->nodes[0]].spec.provider};
    out.push_back(std::move(r));
  }
  return out;
}

std::string Scheduler::PendingReason(const std::string& job) const {
  auto& m = *impl_;
  auto it = m.jobs.find(job);
  if (it == m.jobs.end() || it->second->running) return "";
  const Job& j = *it->second;
  switch (j.wait) {
    case WaitKind::kNone:
      return "waiting: not yet scheduled";
    case WaitKind::kNotEnough:
      if (j.wait_provider < 0) return "waiting: not yet scheduled";
      if (j.wait_island >= 0) {
        return fmt::format("waiting: {} of {} nodes free on provider {}, island {}", j.wait_free,
                           j.req.nodes, m.providers[j.wait_provider],
                           m.islands[j.wait_island].second);
      }
      return fmt::format("waiting: {} of {} nodes free on provider {}", j.wait_free, j.req.nodes,
                         m.providers[j.wait_provider]);
    case WaitKind::kHeld:
      return fmt::format(
          "waiting: the free nodes that fit are held for higher-priority job {} (backfill would "
          "delay it)",
          j.wait_other);
    case WaitKind::kPreempting:
      return fmt::format("waiting: preempting lower-priority job(s) {}", j.wait_other);
    case WaitKind::kPinned:
      return "waiting: " + j.wait_other;
    case WaitKind::kNoNodes:
      return fmt::format("waiting: no {} has {} registered nodes that fit this job",
                         j.req.island == IslandPolicy::kRequired ? "island" : "provider",
                         j.req.nodes);
  }
  return "";
}

Decisions Scheduler::Schedule(TimePoint now) {
  auto& m = *impl_;
  Decisions out;
  m.ExpireQuarantines(now);
  Reservation res;
  std::vector<int> picked;
  std::vector<Job*> placed;
  int e_used = 0;
  for (Job* j : m.queue) {
    if (!m.TryPlace(*j, res, now, &picked, &e_used)) {
      if (res.head != nullptr) continue;
      // `j` is the head: it preempts, or waits for victims it already preempts, or reserves.
      if (j->victims > 0) {
        m.EligibleClasses(*j);
        j->wait = WaitKind::kPreempting;
        res = m.HoldFor(*j, {j->preempt_provider, j->preempt_island}, kNever, 0);
        continue;
      }
      if (j->req.hosts.empty() && m.PlanPreemption(*j, now, &out, &res)) continue;
      if (j->req.hosts.empty()) {
        res = m.EasyReservation(*j, now);
      } else {
        res = Reservation{};  // a pinned job holds nothing: its nodes are named, not counted
      }
      continue;
    }
    if (res.head) res.extra -= std::min(res.extra, e_used);
    m.Allocate(*j, picked, now);
    placed.push_back(j);
    Placement p;
    p.job = j->req.id;
    for (int idx : j->nodes) p.nodes.push_back(m.nodes[idx].spec.name);
    for (int idx : j->spares) p.spares.push_back(m.nodes[idx].spec.name);
    out.placements.push_back(std::move(p));
  }
  for (Job* j : placed) m.queue.erase(j);
  m.RefillSpares(res, &out);
  out.pending = m.queue.size();
  return out;
}

}  // namespace muster::coordinator
