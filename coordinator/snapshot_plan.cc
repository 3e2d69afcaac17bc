#include "coordinator/snapshot_plan.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <set>

namespace muster::coordinator {

namespace {

void ToHoldings(const std::string& node, const SnapshotBook::Held& held,
                const std::string* only_job,
                std::map<std::string, std::vector<SnapshotHolding>>* out) {
  for (const auto& h : held) {
    if (only_job && h.job_id() != *only_job) continue;
    (*out)[h.job_id()].push_back(
        {node, h.rank(), h.world_size(), h.attempt(), h.step(), h.pinned()});
  }
}

}  // namespace

void SnapshotBook::ReplaceNode(const std::string& node, const Held& held) {
  auto& jobs = held_[node];
  jobs.clear();
  ToHoldings(node, held, nullptr, &jobs);
}

void SnapshotBook::ReplaceJob(const std::string& node, const std::string& job, const Held& held) {
  auto& jobs = held_[node];
  jobs.erase(job);
  ToHoldings(node, held, &job, &jobs);
}

void SnapshotBook::ForgetNode(const std::string& node) { held_.erase(node); }

std::vector<SnapshotHolding> SnapshotBook::Of(const std::string& job) const {
  std::vector<SnapshotHolding> out;
  for (const auto& [node, jobs] : held_) {
    auto it = jobs.find(job);
    if (it != jobs.end()) out.insert(out.end(), it->second.begin(), it->second.end());
  }
  return out;
}

std::vector<std::string> SnapshotBook::TakeHoldersExcept(const std::string& job,
                                                         const std::vector<std::string>& keep) {
  std::vector<std::string> out;
  for (auto& [node, jobs] : held_) {
    if (std::find(keep.begin(), keep.end(), node) != keep.end()) continue;
    auto it = jobs.find(job);
    if (it == jobs.end()) continue;
    jobs.erase(it);
    out.push_back(node);
  }
  return out;
}

std::vector<std::string> SnapshotBook::JobsOf(const std::string& node) const {
  std::vector<std::string> out;
  auto it = held_.find(node);
  if (it == held_.end()) return out;
  for (const auto& [job, frames] : it->second) out.push_back(job);
  return out;
}

std::set<std::string> SnapshotBook::Reported() const {
  std::set<std::string> out;
  for (const auto& [node, jobs] : held_) out.insert(node);
  return out;
}

std::optional<proto::AgentAction> SnapshotPinner::Decide(
    const std::string& job, int32_t world_size, const std::vector<SnapshotHolding>& held,
    const std::set<std::string>& reported, const std::vector<std::string>& attempt_nodes) {
  PinDecision d = DecidePins(world_size, held, reported, attempt_nodes, state_[job]);
  state_[job] = d.next;
  if (!d.send) return std::nullopt;
  proto::AgentAction a;
  auto* p = a.mutable_snapshot_pins();
  p->set_job_id(job);
  p->set_kept_attempt(d.kept.attempt);
  p->set_kept_step(d.kept.step);
  p->set_candidate_attempt(d.candidate.attempt);
  p->set_candidate_step(d.candidate.step);
  return a;
}

ResumeChoice PlanSnapshots(const std::vector<SnapshotNode>& nodes, int ranks_per_node,
                           const std::vector<SnapshotHolding>& held,
                           std::optional<int64_t> volume_step,
                           std::vector<proto::AgentAction>& starts,
                           const std::string& no_resume_because) {
  const int nn = static_cast<int>(nodes.size());
  // The ring: node rank i copies to node rank i+1's agent.
  for (int i = 0; i < nn && nn > 1; ++i) {
    const SnapshotNode& peer = nodes[(i + 1) % nn];
    if (peer.endpoint.empty() || nodes[i].endpoint.empty()) continue;
    auto* s = starts[i].mutable_start();
    s->set_snapshot_peer_endpoint(peer.endpoint);
    s->set_snapshot_peer_key(peer.key);
  }
  if (!no_resume_because.empty()) {
    ResumeChoice c = ChooseResume(std::max(1, nn * ranks_per_node), {}, {}, volume_step);
    c.reason = no_resume_because;
    return c;
  }
  // Only frames that this attempt's nodes hold can be fetched by its agents.
  std::map<std::string, const SnapshotNode*> by_name;
  for (const auto& n : nodes) {
    if (!n.endpoint.empty()) by_name[n.name] = &n;
  }
  std::vector<SnapshotHolding> usable;
  for (const auto& h : held) {
    if (by_name.count(h.node)) usable.push_back(h);
  }
  ResumeChoice c = ChooseResume(nn * ranks_per_node, usable, {}, volume_step);
  if (c.source != ResumeChoice::Source::kSnapshot) return c;
  for (int i = 0; i < nn; ++i) {
    auto* s = starts[i].mutable_start();
    s->set_snapshot_resume_step(c.step);
    s->set_snapshot_resume_attempt(c.attempt);
    for (int local = 0; local < ranks_per_node; ++local) {
      const int rank = i * ranks_per_node + local;
      std::vector<std::string> holders = c.holders[rank];
      // Its own node first: no copy over the network when it holds the frame.
      std::stable_partition(holders.begin(), holders.end(),
                            [&](const std::string& n) { return n == nodes[i].name; });
      for (const auto& h : holders) {
        const SnapshotNode* n = by_name.at(h);
        auto* src = s->add_snapshot_sources();
        src->set_rank(rank);
        src->set_node(n->name);
        src->set_endpoint(n->endpoint);
        src->set_key(n->key);
      }
    }
  }
  return c;
}

std::optional<std::string> FailedSnapshotResume(int attempt, const ResumeChoice& resumed,
                                                std::optional<int64_t> progress_step,
                                                const std::string& failure) {
  if (resumed.source != ResumeChoice::Source::kSnapshot) return std::nullopt;
  if (progress_step && *progress_step > resumed.step) return std::nullopt;
  return fmt::format(
      "the snapshot resume of attempt {} (step {}, in-memory snapshots of attempt {}) failed "
      "before the gang passed that step ({}): the next attempt resumes without snapshots",
      attempt, resumed.step, resumed.attempt, failure.empty() ? "no cause reported" : failure);
}

std::string SnapshotResumeEvent(int attempt, const ResumeChoice& c,
                                std::optional<int64_t> volume_step) {
  std::set<std::string> on;
  for (const auto& [rank, nodes] : c.holders) on.insert(nodes.begin(), nodes.end());
  return fmt::format(
      "attempt {} resumes from step {} (in-memory snapshot of attempt {} on nodes {}; {})", attempt,
      c.step, c.attempt, fmt::join(on, ","),
      volume_step ? "the volume has step " + std::to_string(*volume_step)
                  : std::string("nothing on the volume"));
}

}  // namespace muster::coordinator
