#pragma once

// RankTrust: which processes may use the agent's local snapshot socket, and for what. Each rank
// the agent spawns leads its own process group; a connecting process (SO_PEERCRED) is let in
// only when its process group is a live rank's, and only for that rank's own frames of that
// rank's own job. Any other process of the agent's user (which the socket directory's 0700 mode
// lets reach the socket) gets "permission denied". A rank's helper processes that stay in its
// group are the rank; one that moved to a group of its own (setsid) is not.
//
// A rank runs as soon as it is spawned, so it may connect before the runner has recorded it
// (Add): a process that leads its own group and is not known yet is waited for, up to
// `wait_for_add`, before it is refused.
//
// Thread-safety: every method is thread-safe (the runner adds and removes ranks on its reactor;
// the snapshot server's threads check).

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>

#include "checkpoint/snapshot_frame.h"
#include "common/status.h"

namespace muster::node_agent {

class RankTrust {
 public:
  explicit RankTrust(std::chrono::milliseconds wait_for_add = std::chrono::milliseconds(3000))
      : wait_for_add_(wait_for_add) {}

  // `pgid`: the rank's process (it leads its group).
  void Add(pid_t pgid, const std::string& job, int rank);
  void Remove(pid_t pgid);
  // OK when `pid`'s process group is a rank of key.job with rank key.rank; FailedPrecondition
  // ("permission denied: ...") otherwise, naming the process and why. May wait (see above).
  Status Check(pid_t pid, const checkpoint::SnapshotKey& key) const;
  // Checks waiting for their process to be added, now (for tests).
  int waiting() const;

 private:
  const std::chrono::milliseconds wait_for_add_;
  mutable std::mutex mu_;
  mutable std::condition_variable added_;
  mutable int waiting_ = 0;                             // GUARDED_BY(mu_)
  std::map<pid_t, std::pair<std::string, int>> ranks_;  // GUARDED_BY(mu_): pgid -> (job, rank)
};

}  // namespace muster::node_agent
