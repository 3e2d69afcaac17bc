#include "node_agent/replication_queue.h"

namespace muster::node_agent {

ReplicationQueue::Offered ReplicationQueue::Offer(const proto::ReplicateCheckpoint& r) {
  Offered out;
  auto it = slots_.find(Key(r));
  if (it == slots_.end()) {
    slots_[Key(r)].running_step = r.step();
    out.start = r;
    return out;
  }
  Slot& s = it->second;
  int64_t newest = s.waiting ? s.waiting->step() : s.running_step;
  if (r.step() == newest || r.step() == s.running_step) {
    // Asked again (the coordinator retries a copy it thought lost): the one there reports. A
    // waiting one takes the newer request's source and key (the source may have restarted).
    if (s.waiting && s.waiting->step() == r.step()) s.waiting = r;
    out.duplicate = true;
    return out;
  }
  if (r.step() < newest) {
    out.superseded.emplace_back(r, newest);
    return out;
  }
  if (s.waiting) out.superseded.emplace_back(*s.waiting, r.step());
  s.waiting = r;
  return out;
}

std::optional<proto::ReplicateCheckpoint> ReplicationQueue::Finished(
    const proto::ReplicateCheckpoint& r) {
  auto it = slots_.find(Key(r));
  if (it == slots_.end()) return std::nullopt;
  if (!it->second.waiting) {
    slots_.erase(it);
    return std::nullopt;
  }
  proto::ReplicateCheckpoint next = std::move(*it->second.waiting);
  it->second.waiting.reset();
  it->second.running_step = next.step();
  return next;
}

}  // namespace muster::node_agent
