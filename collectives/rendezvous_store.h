#pragma once

// RendezvousStore: the key-value store that ranks of one job attempt rendezvous through.
//
// The real one is served over ZeroMQ (by the launcher, or the node-rank-0 agent), with keys
// scoped by job and attempt so a restarted attempt never reads a stale value; the client is
// built from the env contract (MUSTER_RDZV_ENDPOINT, MUSTER_RDZV_KEY). InMemoryRendezvousStore
// serves ranks that run as threads of one process (unit tests).
//
// Waiting operations (Get, Wait, Barrier) park on the server and are woken once; they never
// poll. Every waiting operation takes a timeout and returns DeadlineExceeded when it passes.
//
// Thread-safety: implementations are thread-safe.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::collectives {

class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;

  // Sets `key` to `value`, waking its waiters.
  virtual Status Set(const std::string& key, const std::string& value) = 0;

  // Returns the value of `key`, waiting up to `timeout` for it to be set.
  virtual StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) = 0;

  // Adds `delta` to the integer counter `key` (absent counts as 0) and returns the new value.
  virtual StatusOr<int64_t> Add(const std::string& key, int64_t delta) = 0;

  // If the current value of `key` equals `expected` (an absent key matches an empty
  // `expected`), sets it to `desired`. Returns the value after the operation either way.
  virtual StatusOr<std::string> CompareSet(const std::string& key, const std::string& expected,
                                           const std::string& desired) = 0;

  // Waits up to `timeout` until every key in `keys` is set.
  virtual Status Wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;

  // Returns once `n` callers have entered the barrier `name`, or DeadlineExceeded after
  // `timeout`. Each barrier name is used once per attempt.
  virtual Status Barrier(const std::string& name, int n, std::chrono::milliseconds timeout) = 0;

  // Contributes `value` as entry `rank` of the gather `name` of `n` ranks and returns all n
  // entries in rank order once every rank has contributed (an allgather, e.g. of addresses).
  // On the ZeroMQ store this is one request and one reply per rank, the reply assembled once
  // for all ranks; a Set by each rank and a Get of the N keys by every rank would cost the
  // server N^2 requests. Each gather name is used once per attempt.
  // Errors: InvalidArgument for n outside 1..kMaxGatherRanks, rank outside 0..n-1, an n that
  // differs from the other callers', a rank that already contributed, or a completed name;
  // DeadlineExceeded after `timeout` (the message names missing ranks; this rank's entry is
  // withdrawn, so it may call again, and a gather every caller has left is forgotten);
  // FailedPrecondition when the assembled entries exceed the store's message size limit.
  // REQUIRES: each rank calls once per name with its own `rank`.
  virtual StatusOr<std::vector<std::string>> AllGather(const std::string& name, int rank, int n,
                                                       const std::string& value,
                                                       std::chrono::milliseconds timeout) = 0;
};

// The largest n of RendezvousStore::AllGather.
inline constexpr int kMaxGatherRanks = 1 << 17;

// A store in this process's memory, for ranks run as threads.
std::unique_ptr<RendezvousStore> NewInMemoryRendezvousStore();

}  // namespace muster::collectives
