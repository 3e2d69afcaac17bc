#include "coordinator/agent_connections.h"

#include <algorithm>

namespace muster::coordinator {

void AgentConnections::OnAccepted(int fd) {
  open_.insert(fd);
  owner_.erase(fd);  // a new connection: nobody's until it says who it is
}

void AgentConnections::OnClosed(int fd, int64_t now_ms) {
  open_.erase(fd);
  auto it = owner_.find(fd);
  if (it == owner_.end()) return;
  Agent agent = it->second;
  owner_.erase(it);
  for (const auto& [other_fd, other] : owner_) {
    if (other == agent) return;  // it still has an open connection
  }
  suspects_.emplace(agent, now_ms);  // keeps the first close if already suspect
}

void AgentConnections::OnRequest(int fd, const Agent& agent) {
  suspects_.erase(agent);
  if (fd >= 0 && open_.count(fd)) owner_[fd] = agent;
}

std::vector<AgentConnections::Agent> AgentConnections::Due(int64_t now_ms) {
  std::vector<Agent> due;
  for (auto it = suspects_.begin(); it != suspects_.end();) {
    if (it->second + grace_ms_ <= now_ms) {
      due.push_back(it->first);
      it = suspects_.erase(it);
    } else {
      ++it;
    }
  }
  return due;
}

std::optional<int64_t> AgentConnections::NextDue() const {
  std::optional<int64_t> next;
  for (const auto& [agent, closed] : suspects_) {
    int64_t t = closed + grace_ms_;
    if (!next || t < *next) next = t;
  }
  return next;
}

}  // namespace muster::coordinator
