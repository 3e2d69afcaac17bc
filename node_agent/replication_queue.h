#pragma once

// ReplicationQueue: which checkpoint copies an agent runs when commits come faster than the
// network carries them. Per job and volume at most one copy runs and at most one waits, the
// newest step asked for: a request for a newer step replaces the waiting one (superseded),
// and a request for a step no newer than one already running or waiting is superseded at
// once. A request for the step that already runs or waits is a duplicate (the coordinator
// retries copies it believes lost) and is dropped. A running copy is never cut short, so
// replication always completes a step, however often the job commits; the backlog is bounded at one
// step per job and volume.
//
// Pure bookkeeping, no I/O and no locks: the agent calls it under its own mutex.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/proto/coordinator.pb.h"

namespace muster::node_agent {

class ReplicationQueue {
 public:
  struct Offered {
    std::optional<proto::ReplicateCheckpoint> start;  // run this now
    // Requests that will not run, each with the step that replaced it.
    std::vector<std::pair<proto::ReplicateCheckpoint, int64_t>> superseded;
    bool duplicate = false;  // the same step already runs or waits: nothing to do
  };

  // A new request from the coordinator.
  Offered Offer(const proto::ReplicateCheckpoint& r);
  // The copy that ran for `r`'s job and volume finished (either way): the waiting request to
  // run next, if any.
  std::optional<proto::ReplicateCheckpoint> Finished(const proto::ReplicateCheckpoint& r);

  size_t running() const { return slots_.size(); }

 private:
  struct Slot {
    int64_t running_step = 0;
    std::optional<proto::ReplicateCheckpoint> waiting;
  };
  static std::string Key(const proto::ReplicateCheckpoint& r) {
    return r.job_id() + "\n" + r.volume();
  }
  std::map<std::string, Slot> slots_;  // present while a copy runs
};

}  // namespace muster::node_agent
