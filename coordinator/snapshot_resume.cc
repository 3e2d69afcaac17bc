#include "coordinator/snapshot_resume.h"

#include <tuple>

namespace muster::coordinator {

ResumeChoice ChooseResume(int32_t world_size, const std::vector<SnapshotHolding>& held,
                          const std::set<std::string>& lost, std::optional<int64_t> volume_step) {
  // (step, attempt) -> rank -> holders, over surviving nodes and this world size only.
  std::map<std::pair<int64_t, int32_t>, std::map<int32_t, std::vector<std::string>>> sets;
  for (const SnapshotHolding& h : held) {
    if (lost.count(h.node) || h.world_size != world_size || h.rank < 0 || h.rank >= world_size ||
        h.step < 0) {
      continue;
    }
    auto& nodes = sets[{h.step, h.attempt}][h.rank];
    bool dup = false;
    for (const auto& n : nodes) dup = dup || n == h.node;
    if (!dup) nodes.push_back(h.node);
  }
  ResumeChoice c;
  for (auto it = sets.rbegin(); it != sets.rend(); ++it) {
    if (static_cast<int32_t>(it->second.size()) != world_size) continue;
    auto [step, attempt] = it->first;
    if (volume_step && *volume_step > step) break;
    c.source = ResumeChoice::Source::kSnapshot;
    c.step = step;
    c.attempt = attempt;
    c.holders = it->second;
    c.reason = "in-memory snapshots of step " + std::to_string(step) + " (attempt " +
               std::to_string(attempt) + ") survive for all " + std::to_string(world_size) +
               " ranks";
    return c;
  }
  if (volume_step) {
    c.source = ResumeChoice::Source::kVolume;
    c.step = *volume_step;
    c.reason = sets.empty() ? "no in-memory snapshots survive; step " +
                                  std::to_string(*volume_step) + " from the volume"
                            : "no complete set of surviving in-memory snapshots is newer than "
                              "step " +
                                  std::to_string(*volume_step) + " on the volume";
    return c;
  }
  c.reason = "no complete set of surviving snapshots and no checkpoint on the volume";
  return c;
}

}  // namespace muster::coordinator
