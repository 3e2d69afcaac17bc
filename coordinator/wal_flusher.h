#pragma once

// WalFlusher: makes the coordinator's committed changes durable against power loss on its own
// thread, every `interval`, instead of at each commit on the serving thread.
//
// Why: the coordinator's reactor answers heartbeats. An fsync at each commit (SQLite's
// synchronous=FULL) put the disk's latency on that thread; on a loaded host an fsync waits for
// every other process's dirty data in the same journal commit (ext4 data=ordered) and took up
// to 1.35 s, so agents' leases ran out while the coordinator was only waiting on its disk.
// With the flusher, a commit writes its log to the page cache (SQLite WAL, synchronous=NORMAL):
// a coordinator killed with SIGKILL loses nothing, and a host that loses power loses at most
// the changes of the last `interval` plus one flush (PostgreSQL's synchronous_commit=off makes
// the same trade, bounded by its WAL writer's delay). Where an action outside the process must
// not happen before its record is durable (a provider asked for nodes), the owner syncs on its
// own thread (CoordinatorDb::Sync).
//
// `flush` does the durable work (for SQLite: an fdatasync of the log, and now and then a
// checkpoint into the database file). It is given the log's size as last noted, in pages. When
// it returns Ok, everything noted before it began is durable. An error is latched: no flush is
// tried again, error() returns it, and the owner refuses later changes (a failed fsync may have
// dropped the pages it could not write; retrying would claim them). So `flush` returns an error
// only for what cannot be retried: a checkpoint that failed (the log keeps every change, and the
// next checkpoint copies the same pages again) is the owner's to count and log, not an error
// here.
//
// Thread-safety: all methods from any thread; `flush` runs on the flusher's thread.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "common/status.h"

namespace muster::coordinator {

class WalFlusher {
 public:
  using Flush = std::function<Status(int log_pages)>;
  WalFlusher(std::chrono::milliseconds interval, Flush flush);
  ~WalFlusher();  // stops the thread after one last flush of what was noted
  WalFlusher(const WalFlusher&) = delete;
  WalFlusher& operator=(const WalFlusher&) = delete;

  // A change was committed (its log written; the log now holds `log_pages` pages): the next
  // flush makes it durable.
  void NoteCommit(int log_pages);
  // Ok, or the flush error that was latched.
  Status error() const;
  // Commits noted, and how many of them are known durable.
  uint64_t committed() const;
  uint64_t durable() const;
  struct Stats {
    uint64_t committed = 0;
    uint64_t durable = 0;
    int log_pages = 0;
    bool failed = false;
    double last_flush_seconds = 0;
    double max_flush_seconds = 0;
  };
  Stats stats() const;

 private:
  void Run();
  // One flush of what was noted; under mu_ on entry and on return.
  void FlushLocked(std::unique_lock<std::mutex>& lock);

  const std::chrono::milliseconds interval_;
  Flush flush_;
  mutable std::mutex mu_;
  std::condition_variable cv_;  // stop_, for the thread
  bool stop_ = false;
  uint64_t committed_ = 0;
  uint64_t durable_ = 0;
  int log_pages_ = 0;
  double last_flush_seconds_ = 0;
  double max_flush_seconds_ = 0;
  Status error_;
  std::thread thread_;
};

}  // namespace muster::coordinator
