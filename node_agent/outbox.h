#pragma once

// Outbox: the messages an agent has for the coordinator (reports and log chunks), kept in order
// until the coordinator takes them, and bounded while it is away.
//
// What is never dropped: reports of rank exits, starts and start errors, checkpoint commits,
// replication outcomes and notices; losing one would lose a job's state or a committed step.
// They are bounded by their sources: exits by the ranks started, commits by the steps that
// exist (the agent reports a step only once it checked it on the volume), and no rank runs
// longer than the lease without a coordinator.
//
// What is coalesced: a report that repeats one already waiting (the same commit printed twice,
// the same replication outcome) is not queued again. Progress never enters the outbox: the
// newest per job rides on the next heartbeat.
//
// What is dropped: log chunks (answers to `muster logs`, which the coordinator stops waiting
// for after its fetch deadline) beyond `max_log_bytes` waiting, oldest first, never the front
// (it may be on its way: the agent sends front() and pops it once the coordinator took it).
//
// Pure bookkeeping; not thread-safe (the agent holds its own mutex around it).

#include <cstddef>
#include <cstdint>
#include <deque>

#include "common/proto/envelope.pb.h"

namespace muster::node_agent {

class Outbox {
 public:
  explicit Outbox(size_t max_log_bytes = 16 << 20) : max_log_bytes_(max_log_bytes) {}

  // Queues `e` unless it repeats a waiting report; may drop the oldest log chunks. True when
  // queued.
  bool Push(proto::Envelope e);

  bool empty() const { return queue_.empty(); }
  size_t size() const { return queue_.size(); }
  const proto::Envelope& front() const { return queue_.front(); }
  void pop_front();

  size_t log_bytes() const { return log_bytes_; }
  // Log chunks dropped so far, and reports not queued because they repeated a waiting one.
  uint64_t dropped_log_chunks() const { return dropped_logs_; }
  uint64_t coalesced() const { return coalesced_; }

 private:
  const size_t max_log_bytes_;
  std::deque<proto::Envelope> queue_;
  size_t log_bytes_ = 0;
  uint64_t dropped_logs_ = 0;
  uint64_t coalesced_ = 0;
};

}  // namespace muster::node_agent
