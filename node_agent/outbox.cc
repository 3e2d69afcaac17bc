#include "node_agent/outbox.h"

#include <google/protobuf/util/message_differencer.h>

#include <iterator>

namespace muster::node_agent {

namespace {

size_t LogBytes(const proto::Envelope& e) {
  return e.has_agent_log_chunk() ? e.agent_log_chunk().data().size() + 64 : 0;
}

}  // namespace

bool Outbox::Push(proto::Envelope e) {
  if (e.has_agent_report()) {
    for (const auto& q : queue_) {
      if (q.has_agent_report() &&
          google::protobuf::util::MessageDifferencer::Equals(q.agent_report(), e.agent_report())) {
        ++coalesced_;
        return false;
      }
    }
  }
  size_t bytes = LogBytes(e);
  if (bytes > 0) {
    // Oldest log chunks first, until the new one fits (it goes in even alone over the bound).
    // Never the front: it may be on its way (the agent pops it once the coordinator took it).
    for (auto it = queue_.empty() ? queue_.end() : std::next(queue_.begin());
         it != queue_.end() && log_bytes_ + bytes > max_log_bytes_;) {
      if (!it->has_agent_log_chunk()) {
        ++it;
        continue;
      }
      log_bytes_ -= LogBytes(*it);
      ++dropped_logs_;
      it = queue_.erase(it);
    }
  }
  log_bytes_ += bytes;
  queue_.push_back(std::move(e));
  return true;
}

void Outbox::pop_front() {
  log_bytes_ -= LogBytes(queue_.front());
  queue_.pop_front();
}

}  // namespace muster::node_agent
