#pragma once

// ChooseResume: where a gang that lost a node resumes from, given the in-memory snapshots the
// agents report holding (node_agent/snapshots/snapshot_store.h) and the newest step committed
// on the volume.
//
// Rules (pure: no I/O, no clock):
//   - A snapshot set for (step S, attempt A) is complete when every rank 0..world_size-1 has a
//     frame of step S, attempt A and that world size on some node not in `lost`. Frames of
//     different attempts are never mixed in one set: a resumed attempt may have saved a step of
//     the same number from a different state.
//   - The newest complete set wins (the higher attempt on a tie), unless the volume holds a
//     newer step: then the volume. With no complete set, the volume's step; with neither, a
//     fresh start.
//   - For a snapshot resume, each rank's holders are listed (surviving nodes, in the order the
//     reports came), so a rank restores from its own node's copy when it has one, else from a
//     peer's.
//
// Thread-safety: pure function.

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace muster::coordinator {

// One frame an agent reports holding.
struct SnapshotHolding {
  std::string node;
  int32_t rank = 0;
  int32_t world_size = 0;
  int32_t attempt = 0;
  int64_t step = 0;
  // The agent keeps it under a pin (snapshot_pin.h) until the coordinator pins another step.
  bool pinned = false;
};

struct ResumeChoice {
  enum class Source { kFresh, kVolume, kSnapshot };
  Source source = Source::kFresh;
  int64_t step = 0;     // meaningless for kFresh
  int32_t attempt = 0;  // kSnapshot: the attempt whose frames are restored
  // kSnapshot: rank -> the surviving nodes that hold its frame.
  std::map<int32_t, std::vector<std::string>> holders;
  std::string reason;  // for the job's events: why this source and step
};

// REQUIRES: world_size >= 1.
ResumeChoice ChooseResume(int32_t world_size, const std::vector<SnapshotHolding>& held,
                          const std::set<std::string>& lost, std::optional<int64_t> volume_step);

}  // namespace muster::coordinator
