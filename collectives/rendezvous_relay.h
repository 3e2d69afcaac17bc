#pragma once

// RendezvousRelay: a node agent's stand-in for the attempt's rendezvous store
// (collectives/rendezvous_server.h), so that the store's connections, CURVE handshakes and
// allgather replies scale with nodes, not ranks.
//
// The ranks of this node reach the relay over a local Unix stream socket (their
// MUSTER_RDZV_ENDPOINT, "unix://<path>"; common/local_rpc.h: length-prefixed Envelopes, no
// ZeroMQ, so that a rank's connection costs one connect and one accept); the relay reaches
// the store with one CURVE connection made with the attempt's key. It forwards set, get, add,
// compare_set and wait request by request, and aggregates what every rank sends:
//   - a gather (RendezvousStore::AllGather): the node's entries go upstream in one request
//     (StoreGather.batch); the one reply is fanned out to each local caller;
//   - a barrier: the node's arrivals go upstream in one request (StoreBarrier.arrivals);
//   - a get or a wait: callers of the same keys join. While one request for them is upstream,
//     later callers wait here and go up together as the next one, when it returns or at their
//     earliest deadline, whichever is first. Every caller's answer comes from a request sent
//     after it asked (no value older than its call), and its timeout is kept as a batch's is
//     (below). A broadcast (every rank waits on a key that one rank sets, as a NCCL unique id
//     goes round) then costs the store two requests per node instead of one per rank.
// A batch (by name and n) goes upstream as soon as it holds all of `local_ranks` (a gather:
// those below n; a barrier: min(local ranks, n)), `batch_window` after its first caller, or at
// its earliest caller's deadline, whichever is first: a gather or barrier that only some local
// ranks join (a subgroup) still completes, one window later, and no caller waits here past its
// own timeout. Where every local rank joins (the usual case) the window costs nothing: the
// batch leaves with the last of them. A caller that comes after its batch left forms the next.
// Semantics are the store's: a batch's timeout is its callers' earliest; when the store times
// it out, the callers whose own timeout has passed get the store's DeadlineExceeded and the
// others go upstream again with what they have left (a withdrawn gather entry may be
// re-contributed, as on the store). A rank contributing twice to one gather is refused here,
// with the store's message, so one rank's mistake never fails its node's batch.
//
// A gather result comes from the store compressed where that is smaller (Options::accept_zstd:
// the store compresses it once, the relay inflates it once); a frame that does not inflate, or
// would inflate past the message limit, fails the batch's callers with DataLoss.
//
// A large gather reply (Options::shared_gather_min_bytes) is handed to the local callers as one
// sealed memory file (memfd, written once, then sealed against writes, shrinking and growing),
// its descriptor passed with each caller's reply over the local socket and mapped read-only by
// each rank (MappedGather), instead of one copy per rank down the socket. The kernel frees it
// when the last rank unmaps it; the relay keeps no copy.
//
// Trust boundary of the local socket: (1) it lives in a directory the relay creates with mode
// 0700 (mkdtemp) and removes, so only processes of the agent's user (and root) can connect to
// it; (2) every request is checked with `admit` against the peer's pid, which the kernel
// reports for the connection (SO_PEERCRED, in the peer address "unix:uid:gid:pid"): the
// agent admits only processes in the process group of one of this attempt's ranks; (3) the
// relay serves exactly one scope (job, attempt): a request naming another is refused, and its
// upstream key cannot reach another scope on the store either. The local socket carries no
// CURVE (it never leaves the host); everything between hosts does.
//
// A store that refuses the relay's key (its ZAP handler: not the attempt's key, or the attempt
// is gone), or that closes three connections in a row before their CURVE handshake completes
// (what a wrong store public key looks like from the client), is seen on the upstream socket's
// monitor: what waits upstream, and what comes while the refusal holds, fails at once with
// Unavailable naming the cause, instead of timing out. A later successful handshake clears it.
//
// Bad input on the local socket (not an Envelope, not a StoreRequest, no operation, a rank or
// n out of range, another scope, a peer not admitted) gets an error reply naming what is wrong,
// and the relay keeps serving.
//
// Thread-safety: none; everything runs on the reactor thread (REQUIRES), Create included (or
// before the reactor starts). Destroy on the reactor thread or after it stopped: callers still
// waiting get Aborted.

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "collectives/rendezvous_client.h"
#include "common/local_rpc.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "common/status.h"

namespace muster::collectives {

class RendezvousRelay {
 public:
  struct Options {
    // A directory the relay's private socket directory is made in (mkdtemp
    // "muster-rdzv-XXXXXX", mode 0700); the socket is <that>/s. The path must fit a Unix socket
    // address (107 bytes). The relay holds an flock on its directory while it lives, so that
    // SweepStaleRelayDirs can tell the directories of relays that died (kill -9) from live ones.
    // PickRelaySocketParent chooses one for an agent.
    std::filesystem::path socket_parent;
    // The store, and the attempt's credentials for it (MUSTER_RDZV_KEY's format).
    std::string upstream_endpoint;
    RdzvCredentials credentials;
    std::string job;
    uint64_t attempt = 0;
    // The global ranks served by this relay (its node's); used to send a batch as soon as it
    // is complete. Empty: every batch waits for `batch_window`.
    std::vector<int> local_ranks;
    std::chrono::milliseconds batch_window{200};
    // Decides whether the process `pid` (kernel-reported for the connection) may use the
    // socket; null admits every process that can open it. The agent checks that the pid is
    // in the process group of one of the attempt's ranks.
    std::function<Status(pid_t pid)> admit;
    // How long past a request's own timeout the relay waits for the store's answer (and the
    // timeout of requests that do not wait: set, add, compare_set).
    std::chrono::milliseconds rpc_slack{2000};
    std::chrono::milliseconds op_timeout{30000};
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
    // Requests the relay holds at once, each caller's once: waiting in a batch or a join, or
    // upstream (alone or in a batch's or join's request). Past it a request is refused
    // (FailedPrecondition, naming the limit) before anything is kept for it, so a local process
    // that sends waits without end cannot grow the agent's memory. The store's own bound on a
    // scope's parked requests.
    size_t max_held_requests = size_t{1} << 18;
    // A gather reply of at least this many bytes, for two or more local callers, is written
    // once to a sealed memory file whose descriptor goes with each caller's reply
    // (StoreReply.gathered_fd; MappedGather maps it) instead of its own copy down the socket.
    // 0 turns this off. A file that cannot be made (no memory, no descriptors) sends the
    // replies down the socket.
    int64_t shared_gather_min_bytes = 64 << 10;
    // Called on the reactor thread each time the upstream connection completes its handshake
    // with the store (ZeroMQ's HANDSHAKE_SUCCEEDED; the CURVE handshake, or the plain one when
    // insecure). Create starts that connection at once, without waiting for a request, so an
    // agent that creates the relay before it spawns the ranks has it made while they start.
    std::function<void()> on_upstream_ready;
    // Ask the store for large gather results compressed (StoreGather.accept_zstd;
    // collectives/rendezvous_codec.h): the relay inflates each once, bounded by
    // max_message_bytes, and its ranks get the plain bytes. false: the store's plain bytes.
    bool accept_zstd = true;
  };

  struct Stats {
    uint64_t local_requests = 0;       // requests from local callers
    uint64_t upstream_requests = 0;    // requests sent to the store
    uint64_t shared_gathers = 0;       // gather results handed over in a sealed memory file
    uint64_t upstream_handshakes = 0;  // handshakes completed with the store
    uint64_t compressed_gathers = 0;   // gather results the store sent compressed
  };

  // REQUIRES: on the reactor thread or before reactor.Start().
  static StatusOr<std::unique_ptr<RendezvousRelay>> Create(Reactor& reactor, Options options);
  ~RendezvousRelay();
  RendezvousRelay(const RendezvousRelay&) = delete;
  RendezvousRelay& operator=(const RendezvousRelay&) = delete;

  // "unix:///.../muster-rdzv-XXXXXX/s": the ranks' MUSTER_RDZV_ENDPOINT.
  const std::string& endpoint() const { return endpoint_; }
  const Stats& stats() const { return stats_; }
  // Callers of gets and waits held by this relay now (AddToJoin: waiting for the next request,
  // or answered by a request upstream), and how many requests upstream stand for them.
  struct Joined {
    size_t callers = 0;
    size_t requests = 0;
  };
  Joined joined() const;
  // Requests held now (Options::max_held_requests). Reactor thread only.
  size_t held() const { return held_callers_; }
  // True while the upstream connection has completed its handshake with the store.
  bool upstream_ready() const { return handshake_ok_; }

  // Handles one request as if it came from `peer` over the local socket (the socket calls
  // this; tests and the fuzzer call it directly). REQUIRES: on the reactor thread, or the
  // reactor not running.
  void HandleLocal(const PeerInfo& peer, proto::Envelope&& request, RpcServer::Reply reply);

 private:
  using Clock = std::chrono::steady_clock;
  using Upstream = std::function<void(StatusOr<proto::StoreReply>)>;
  struct Caller {
    RpcServer::Reply reply;
    Clock::time_point deadline;
    int rank = -1;      // gather: the rank; barrier: unused
    std::string value;  // gather: the entry
  };
  // Callers of one gather or barrier (by kind, name and n) that have not gone upstream yet.
  struct Batch {
    bool gather = false;
    std::string name;
    int n = 0;
    std::vector<Caller> callers;
    Clock::time_point flush_at;  // window end, or the earliest caller's deadline if sooner
    Reactor::TimerId timer = 0;
  };
  struct Pending {
    Upstream done;
    Reactor::TimerId timer = 0;
  };
  // Callers of a get or a wait for the same keys (AddToJoin).
  struct JoinCaller {
    RpcServer::Reply reply;
    Clock::time_point deadline;
    int64_t timeout_ms = 0;  // as the caller asked (for its DeadlineExceeded's words)
  };
  struct Join {
    bool get = false;
    std::vector<std::string> keys;
    int in_flight = 0;             // requests for them upstream now
    size_t upstream_callers = 0;   // the callers of those requests
    std::vector<JoinCaller> next;  // arrived since: the next request
    Reactor::TimerId timer = 0;    // at the earliest deadline in `next`, while one is upstream
    Clock::time_point timer_at;
  };

  RendezvousRelay(Reactor& reactor, Options options);
  Status Start();
  void Forward(proto::StoreRequest request, std::chrono::milliseconds timeout, Upstream done);
  void OnUpstreamReadable();
  void OnMonitor();
  void AddToBatch(bool gather, proto::StoreRequest& req, RpcServer::Reply reply);
  void AddToJoin(bool get, proto::StoreRequest& req, RpcServer::Reply reply);
  // Sends the callers waiting in joins_[key] upstream as one request, if any.
  void SendJoin(const std::string& key);
  size_t Expected(const Batch& b) const;
  void Flush(const std::string& key);
  void SendBatch(Batch batch);
  // A large gather reply's result in a sealed memory file (Options::shared_gather_min_bytes);
  // null when it is small or the file cannot be made.
  std::shared_ptr<const ScopedFd> ShareGather(const proto::StoreReply& reply);
  // Inflates a compressed gather result in place (StoreReply.gathered_zstd); DataLoss when it
  // was not asked for (`gather` false, or Options::accept_zstd off) or does not inflate.
  Status Inflate(bool gather, proto::StoreReply& reply);
  void Abort(const std::string& why);

  Reactor& reactor_;
  Options options_;
  std::filesystem::path dir_;
  int dir_lock_ = -1;  // an open descriptor of dir_, flock'ed while the relay lives
  std::string endpoint_;
  std::unique_ptr<LocalRpcServer> local_;
  zmq::socket_t upstream_;
  bool upstream_added_ = false;
  zmq::socket_t monitor_;  // the upstream socket's handshake events
  int monitor_fd_ = -1;    // monitor_'s ZMQ_FD, which the reactor watches
  bool monitor_added_ = false;
  std::optional<Status> refused_;  // the store refused the last handshake
  bool handshake_ok_ = false;      // the current connection completed its handshake
  int closed_in_handshake_ = 0;    // connections closed in a row before their handshake
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, Pending> pending_;  // upstream requests by request id
  std::map<std::string, Batch> batches_;           // by "g|b" + n + name
  std::map<std::string, Join> joins_;              // by "g|w" + the keys
  size_t held_callers_ = 0;                        // callers held (Options::max_held_requests)
  // Gather ranks waiting here or upstream, by gather name: a second contribution is refused.
  std::map<std::string, std::unordered_map<int, int>> gather_ranks_;
  Stats stats_;
  std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

// Where relays' private socket directories go on this host: the first of `candidates` that is
// a directory (not a symlink) on a memory file system (tmpfs) that this user may create entries
// in, and that other users cannot tamper with (this user's own directory writable by nobody
// else, or a sticky one such as /dev/shm, where mkdtemp's 0700 directory is as private as in
// the temp directory); `fallback` when none is. On a memory file system a relay's directory
// and socket cost no disk inodes and are never written back to a disk (ext4 spent 1-2 ms per
// inode on this build machine's churned /tmp).
std::filesystem::path PickRelaySocketParent(const std::vector<std::filesystem::path>& candidates,
                                            const std::filesystem::path& fallback);
// $XDG_RUNTIME_DIR (when set: the user's own tmpfs), then /dev/shm.
std::vector<std::filesystem::path> RelaySocketParentCandidates();

// Removes the directories ("muster-rdzv-XXXXXX", this user's) that relays left directly under
// `parent` when their process died without closing them (kill -9): those older than `min_age`
// whose flock nobody holds. A live relay holds its lock; `min_age` covers the moment between a
// relay's mkdtemp and its flock. Returns how many it removed. Thread-safe.
int SweepStaleRelayDirs(const std::filesystem::path& parent,
                        std::chrono::seconds min_age = std::chrono::seconds(60));

}  // namespace muster::collectives
