#include "coordinator/snapshot_pin.h"

#include <map>

namespace muster::coordinator {
namespace {

// Per rank, the nodes holding its frame of one (step, attempt), and those that pin it.
struct RankHolders {
  std::set<std::string> all, pinned;
};
using Sets = std::map<SnapshotRef, std::map<int32_t, RankHolders>>;

// Every rank of the world has at least `n` holders (pinned ones when `pinned_only`).
bool Covered(int32_t world_size, const std::map<int32_t, RankHolders>& ranks, size_t n,
             bool pinned_only) {
  if (static_cast<int32_t>(ranks.size()) != world_size) return false;
  for (const auto& [rank, h] : ranks) {
    if ((pinned_only ? h.pinned.size() : h.all.size()) < n) return false;
  }
  return true;
}

}  // namespace

PinDecision DecidePins(int32_t world_size, const std::vector<SnapshotHolding>& held,
                       const std::set<std::string>& reported,
                       const std::vector<std::string>& attempt_nodes, const PinState& previous) {
  PinDecision d;
  d.next = previous;
  for (const auto& n : attempt_nodes) {
    if (!reported.count(n)) return d;  // not every agent heard from yet: change nothing
  }
  Sets sets;
  for (const SnapshotHolding& h : held) {
    if (h.world_size != world_size || h.rank < 0 || h.rank >= world_size || h.step < 0) continue;
    RankHolders& r = sets[{h.attempt, h.step}][h.rank];
    r.all.insert(h.node);
    if (h.pinned) r.pinned.insert(h.node);
  }
  d.send = true;
  auto covered = [&](const SnapshotRef& r, size_t n) {
    auto it = sets.find(r);
    return it != sets.end() && Covered(world_size, it->second, n, true);
  };
  if (previous.kept.valid() && covered(previous.kept, 1)) {
    // Moves only to the candidate, once its pins hold it on two nodes for every rank.
    d.kept = previous.kept;
    if (previous.candidate.valid() && previous.kept < previous.candidate &&
        covered(previous.candidate, 2)) {
      d.kept = previous.candidate;
    }
  } else {
    // Learned from the reports (a restarted coordinator, or the kept set is gone): the newest
    // pinned set that survives the loss of any one node; else a complete pinned set still held.
    for (auto it = sets.rbegin(); it != sets.rend() && !d.kept.valid(); ++it) {
      if (Covered(world_size, it->second, 2, true)) d.kept = it->first;
    }
    for (auto it = sets.rbegin(); it != sets.rend() && !d.kept.valid(); ++it) {
      // A candidate that some pins hold already is not kept yet: it waits for all of them.
      if (it->first == previous.candidate) continue;
      if (Covered(world_size, it->second, 1, true)) d.kept = it->first;
    }
  }
  d.next.kept = d.kept;
  // The previous candidate: still waiting for its pins, or resolved (kept above, or given up).
  SnapshotRef given_up;
  if (previous.candidate.valid() && d.kept < previous.candidate) {
    bool waiting = false;
    if (auto it = sets.find(previous.candidate); it != sets.end()) {
      for (const auto& [rank, h] : it->second) waiting = waiting || h.pinned.size() < h.all.size();
    }
    if (waiting && previous.pending < kMaxPendingDecisions) {
      d.candidate = previous.candidate;
      d.next.candidate = previous.candidate;
      d.next.pending = previous.pending + 1;
      return d;
    }
    given_up = previous.candidate;
  }
  d.next.candidate = {};
  d.next.pending = 0;
  for (auto it = sets.rbegin(); it != sets.rend() && d.kept < it->first; ++it) {
    if (it->first == given_up) continue;
    if (Covered(world_size, it->second, 2, false)) {
      d.candidate = it->first;
      d.next.candidate = it->first;
      break;
    }
  }
  return d;
}

}  // namespace muster::coordinator
