#include "node_agent/snapshots/rank_trust.h"

#include <unistd.h>

namespace muster::node_agent {

void RankTrust::Add(pid_t pgid, const std::string& job, int rank) {
  std::lock_guard<std::mutex> l(mu_);
  ranks_[pgid] = {job, rank};
  added_.notify_all();
}

void RankTrust::Remove(pid_t pgid) {
  std::lock_guard<std::mutex> l(mu_);
  ranks_.erase(pgid);
}

Status RankTrust::Check(pid_t pid, const checkpoint::SnapshotKey& key) const {
  const pid_t pgid = ::getpgid(pid);
  std::unique_lock<std::mutex> l(mu_);
  if (pgid > 0 && pgid == pid && !ranks_.count(pgid)) {
    // Perhaps a rank just spawned, before the runner recorded it.
    ++waiting_;
    added_.wait_for(l, wait_for_add_, [&] { return ranks_.count(pgid) > 0; });
    --waiting_;
  }
  auto it = pgid > 0 ? ranks_.find(pgid) : ranks_.end();
  if (it == ranks_.end()) {
    return FailedPreconditionError("permission denied: process " + std::to_string(pid) +
                                   " is not a rank this agent started");
  }
  const auto& [job, rank] = it->second;
  if (job != key.job || rank != key.rank) {
    return FailedPreconditionError("permission denied: process " + std::to_string(pid) +
                                   " is rank " + std::to_string(rank) + " of job " + job +
                                   ", not rank " + std::to_string(key.rank) + " of job " + key.job);
  }
  return Status::Ok();
}

int RankTrust::waiting() const {
  std::lock_guard<std::mutex> l(mu_);
  return waiting_;
}

}  // namespace muster::node_agent
