// Kept logs: the coordinator copies each node's rank logs of an attempt when the attempt ends
// there (every rank exited, stopped or cancelled), into its LogKeeper (log_keeper.h), so
// `muster logs` of a finished job still reads them after the node is released or lost.
//
// The copy reuses the fetch protocol: FetchLog to the node that ran the rank, answered with
// AgentLogChunk, which OnLogChunk accepts only from that node. One chunk per rank is in flight;
// the reactor never waits for one. The agent's bytes are a peer's: a chunk larger than asked
// ends the copy, and the rank's file name is built from the job id, attempt and rank that the
// coordinator itself holds (validated: LogKeeper::Validate), never from the chunk.

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "common/logging.h"
#include "common/wire.h"
#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {

namespace {
constexpr int kKeptChunkBytes = 1 << 20;  // asked of the agent per FetchLog
constexpr int64_t kKeptRefetchMs = 200;   // the node had nothing new yet: ask again then
}  // namespace

void Coordinator::KeepLogs(const JobRecord& r, const std::string& node) {
  if (!log_keeper_) return;
  auto pos = std::find(r.nodes.begin(), r.nodes.end(), node);
  if (pos == r.nodes.end()) return;
  int rpn = std::max(1, r.spec.ranks_per_node());
  int ranks = static_cast<int>(r.nodes.size()) * rpn;
  int first = static_cast<int>(pos - r.nodes.begin()) * rpn;
  const NodeRt* n = nodes_.Find(node);
  if (n == nullptr || !n->connected()) {
    Event(r.id, node, "logs_lost",
          fmt::format("attempt {}: the logs of ranks {}-{} were not kept: node {} was lost before "
                      "they could be copied",
                      r.attempt, first, first + rpn - 1, node));
    return;
  }
  int64_t now = NowMs();
  for (int rank = first; rank < first + rpn; ++rank) {
    LogCopyKey key(r.id, r.attempt, rank);
    if (log_copies_.count(key) || log_keeper_->Has(r.id, r.attempt, rank)) continue;
    if (Status st = log_keeper_->Begin(r.id, r.attempt, rank, ranks); !st.ok()) {
      log::Get("coord")->warn("job {} attempt {} rank {}: log not kept: {}", r.id, r.attempt, rank,
                              st.ToString());
      continue;
    }
    LogCopy c;
    c.serial = next_log_copy_++;
    c.job = r.id;
    c.node = node;
    c.attempt = r.attempt;
    c.rank = rank;
    c.ranks = ranks;
    c.node_first = first;
    c.node_ranks = rpn;
    c.deadline_ms = now + options_.log_keep_wait.count();
    auto& stored = log_copies_.emplace(key, std::move(c)).first->second;
    FetchKeptLog(stored);
  }
}

void Coordinator::RestoreLogCopies(int64_t now) {
  if (!log_keeper_) return;
  // By (job, attempt, node): the ranks asked again, for one event each.
  std::map<std::tuple<std::string, int, std::string>, std::vector<int>> asked;
  for (const auto& id : log_keeper_->interrupted()) {
    auto lost = [&](const std::string& node, const std::string& why) {
      log_keeper_->Discard(id);
      Event(id.job, node, "logs_lost",
            fmt::format("attempt {}: the log of rank {} was not kept: the coordinator restarted "
                        "during its copy, and {}",
                        id.attempt, id.rank, why));
    };
    // The attempt's nodes and ranks: from the job's record (running or finished) and its
    // attempt's, both in the database before the attempt started.
    StatusOr<JobRecord> rec = store_->GetJob(id.job);
    auto attempts = rec.ok() ? store_->LoadAttempts(id.job)
                             : StatusOr<std::vector<AttemptRecord>>(rec.status());
    const AttemptRecord* attempt = nullptr;
    if (attempts.ok()) {
      for (const auto& a : *attempts)
        if (a.attempt == id.attempt) attempt = &a;
    }
    if (attempt == nullptr) {
      lost("", fmt::format("the nodes of attempt {} are not known ({})", id.attempt,
                           attempts.ok() ? "no such attempt" : attempts.status().message()));
      continue;
    }
    int rpn = std::max(1, rec->spec.ranks_per_node());
    int index = id.rank / rpn;
    if (index >= static_cast<int>(attempt->nodes.size())) {
      lost("", fmt::format("attempt {} ran {} node(s) of {} rank(s): rank {} is not one of them",
                           id.attempt, attempt->nodes.size(), rpn, id.rank));
      continue;
    }
    const std::string& node = attempt->nodes[index];
    if (nodes_.Find(node) == nullptr) {
      lost(node, fmt::format("node {} is gone", node));
      continue;
    }
    LogCopyKey key(id.job, id.attempt, id.rank);
    int ranks = static_cast<int>(attempt->nodes.size()) * rpn;
    if (Status st = log_keeper_->Begin(id.job, id.attempt, id.rank, ranks); !st.ok()) {
      lost(node, st.message());
      continue;
    }
    LogCopy c;
    c.serial = next_log_copy_++;
    c.job = id.job;
    c.node = node;
    c.attempt = id.attempt;
    c.rank = id.rank;
    c.ranks = ranks;
    c.node_first = index * rpn;
    c.node_ranks = rpn;
    // Its agent gets a heartbeat timeout to register again, as every restored node does; then
    // the copy has its usual time.
    c.reconnect_until_ms = now + options_.heartbeat_timeout.count();
    c.deadline_ms = c.reconnect_until_ms + options_.log_keep_wait.count();
    c.next_fetch_ms = now;  // TickLogCopies asks once the node is connected
    log_copies_.emplace(key, std::move(c));
    asked[{id.job, id.attempt, node}].push_back(id.rank);
  }
  for (const auto& [k, ranks] : asked) {
    const auto& [job, attempt, node] = k;
    Event(job, node, "logs_copy_retry",
          fmt::format("attempt {}: the log of rank(s) {} is copied again from node {}: the "
                      "coordinator restarted during the copy",
                      attempt, fmt::join(ranks, ","), node));
  }
}

void Coordinator::FetchKeptLog(LogCopy& c) {
  LogCopyKey key(c.job, c.attempt, c.rank);
  const NodeRt* n = nodes_.Find(c.node);
  if (n == nullptr || !n->connected()) {
    return EndLogCopy(key, "node " + c.node + " went away before all of it was kept");
  }
  uint64_t fetch = next_fetch_++;
  proto::AgentAction a;
  auto* f = a.mutable_fetch_log();
  f->set_fetch_id(fetch);
  f->set_job_id(c.job);
  f->set_attempt(c.attempt);
  f->set_rank(c.rank);
  f->set_offset(c.offset);
  f->set_generation(c.generation);
  f->set_max_bytes(kKeptChunkBytes);
  f->set_stream(proto::LOG_MERGED);
  c.in_flight = true;
  c.next_fetch_ms = 0;
  c.reconnect_until_ms = 0;  // asked of a connected node: from now on it must stay so
  uint64_t serial = c.serial;
  fetches_.emplace(fetch,
                   Fetch{[this, key, serial](proto::Envelope e) { OnKeptLogChunk(key, serial, e); },
                         NowMs() + 10000, c.node});
  Enqueue(c.node, std::move(a));
}

void Coordinator::OnKeptLogChunk(const LogCopyKey& key, uint64_t serial, const proto::Envelope& e) {
  if (stopping_) return;
  auto it = log_copies_.find(key);
  if (it == log_copies_.end() || it->second.serial != serial) return;  // ended meanwhile
  LogCopy& c = it->second;
  c.in_flight = false;
  if (e.has_error()) {
    const auto& err = e.error();
    if (err.code() == proto::NOT_FOUND && c.offset == 0 && c.generation == 0) {
      // The rank left no log on the node (it never started): there is nothing to keep.
      return EndLogCopy(key, "", /*keep=*/false);
    }
    if (err.code() == proto::DEADLINE_EXCEEDED) {
      c.next_fetch_ms = NowMs();  // asked again at the next tick, until the copy's deadline
      return;
    }
    if (err.code() == proto::UNAVAILABLE) {
      // The node could not read it for now (out of descriptors or memory): asked again soon,
      // until the copy's deadline.
      c.next_fetch_ms = NowMs() + kKeptRefetchMs;
      return;
    }
    // Permission denied, an I/O error, a refused file, or a log gone in the middle: asking
    // again would not help. What came is kept, with the node's reason.
    return EndLogCopy(key, "the rest was not kept: " + err.message());
  }
  if (!e.has_logs_reply()) return EndLogCopy(key, "the rest was not kept: unexpected reply");
  const auto& r = e.logs_reply();
  if (r.data().size() > static_cast<size_t>(kKeptChunkBytes)) {
    return EndLogCopy(key, fmt::format("the rest was not kept: node {} sent a chunk of {} bytes, "
                                       "more than the {} asked for",
                                       c.node, r.data().size(), kKeptChunkBytes));
  }
  Status st = Status::Ok();
  if (r.skipped()) {
    st = log_keeper_->Append(c.job, c.attempt, c.rank,
                             "[muster: output rotated away on the node before it was kept]\n");
  }
  if (st.ok()) st = log_keeper_->Append(c.job, c.attempt, c.rank, r.data());
  if (!st.ok()) return EndLogCopy(key, "the rest was not kept: " + st.message());
  c.generation = r.generation();
  c.offset = r.next_offset();
  if (r.eof()) return EndLogCopy(key, "");
  if (r.data().empty()) {
    c.next_fetch_ms = NowMs() + kKeptRefetchMs;
    return;
  }
  FetchKeptLog(c);
}

void Coordinator::EndLogCopy(const LogCopyKey& key, const std::string& note, bool keep) {
  auto it = log_copies_.find(key);
  if (it == log_copies_.end()) return;
  LogCopy c = std::move(it->second);
  log_copies_.erase(it);
  std::string why = note;
  if (c.reconnect_until_ms > 0) {
    // Asked again after a restart and never fetched since: nothing of it is here to keep.
    keep = false;
    why = "the coordinator restarted during its copy, and " + note;
  }
  Status st = Status::Ok();
  if (keep) {
    st = log_keeper_->Commit(c.job, c.attempt, c.rank, note);
  } else {
    log_keeper_->Abandon(c.job, c.attempt, c.rank);
  }
  if (!st.ok()) {
    log::Get("coord")->warn("job {} attempt {} rank {}: kept log not written: {}", c.job, c.attempt,
                            c.rank, st.ToString());
  }
  if (!keep && !note.empty()) {
    Event(c.job, c.node, "logs_lost",
          fmt::format("attempt {}: the log of rank {} was not kept: {}", c.attempt, c.rank, why));
  } else if (!note.empty() || !st.ok()) {
    Event(c.job, c.node, "logs_lost",
          fmt::format("attempt {}: the log of rank {} is kept only in part: {}", c.attempt, c.rank,
                      st.ok() ? note : st.message()));
  }
  // The node's last rank copied: say so once.
  for (const auto& [k, other] : log_copies_) {
    if (other.job == c.job && other.attempt == c.attempt && other.node == c.node) return;
  }
  int kept = 0;
  for (int r = c.node_first; r < c.node_first + c.node_ranks; ++r)
    kept += log_keeper_->Has(c.job, c.attempt, r) ? 1 : 0;
  if (kept == 0) return;  // the node had no log of any of them
  Event(c.job, c.node, "logs_kept",
        fmt::format("attempt {}: the logs of {} rank(s) from node {} are kept by the coordinator",
                    c.attempt, kept, c.node));
}

void Coordinator::TickLogCopies(int64_t now) {
  std::vector<LogCopyKey> late, again;
  for (auto& [key, c] : log_copies_) {
    const NodeRt* n = nodes_.Find(c.node);
    bool waiting = c.reconnect_until_ms > now && n != nullptr && !n->connected();
    if (c.deadline_ms <= now) {
      late.push_back(key);
    } else if (waiting) {
      continue;  // asked again after a restart: its node's agent has not registered yet
    } else if (n == nullptr || !n->connected()) {
      late.push_back(key);
    } else if (!c.in_flight && c.next_fetch_ms > 0 && c.next_fetch_ms <= now) {
      again.push_back(key);
    }
  }
  for (const auto& key : late) {
    const LogCopy& c = log_copies_.at(key);
    const NodeRt* n = nodes_.Find(c.node);
    if (c.reconnect_until_ms > 0) {
      // Asked again after a restart, and never fetched since (EndLogCopy says so).
      EndLogCopy(key, n == nullptr ? "node " + c.node + " is gone"
                                   : fmt::format("node {} did not register again within {} ms",
                                                 c.node, options_.heartbeat_timeout.count()));
      continue;
    }
    EndLogCopy(key, n == nullptr || !n->connected()
                        ? "node " + c.node + " went away before all of it was kept"
                        : fmt::format("not all of it was copied from node {} within {} ms", c.node,
                                      options_.log_keep_wait.count()));
  }
  for (const auto& key : again) FetchKeptLog(log_copies_.at(key));
}

bool Coordinator::ServeKeptLog(const proto::LogsRequest& req, const JobRecord& rec, int attempt,
                               const std::string& node, Reply& reply) {
  if (!log_keeper_ || req.stream() != proto::LOG_MERGED) return false;
  const NodeRt* n = nodes_.Find(node);
  bool node_there = n != nullptr && n->connected();
  if (!req.kept()) {
    // An agent's cursor (generation != 0) counts in the node's files, not in the copy: it goes
    // on reading from the node while the node is there; so does every reader while the copy
    // is not complete (the node may have what the copy lacks).
    if (!log_keeper_->Has(rec.id, attempt, req.rank())) return false;
    if (node_there &&
        (req.generation() != 0 || !log_keeper_->Complete(rec.id, attempt, req.rank())))
      return false;
    if (!node_there && req.generation() != 0) return false;  // the node's error says what to do
  }
  auto chunk =
      log_keeper_->Read(rec.id, attempt, req.rank(), req.offset(),
                        std::clamp(req.max_bytes() > 0 ? req.max_bytes() : 65536, 1, 1 << 20));
  if (!chunk.ok()) {
    reply(ErrorEnvelope(0, chunk.status()));
    return true;
  }
  proto::Envelope e;
  auto* out = e.mutable_logs_reply();
  out->set_data(std::move(chunk->data));
  out->set_next_offset(chunk->next_offset);
  out->set_eof(chunk->eof);
  out->set_kept(true);
  // Said once, when the node the log came from is not there to ask (with the node there the
  // copy holds the same bytes, and nothing is said).
  if (!req.kept() && !node_there) {
    std::string why = providers_ && providers_->Released(node) ? "was released"
                      : n == nullptr                           ? "is gone"
                                                               : "is not connected";
    out->set_kept_note(
        fmt::format("logs of attempt {} kept by the coordinator; node {} {}", attempt, node, why));
  }
  reply(std::move(e));
  return true;
}

}  // namespace muster::coordinator
