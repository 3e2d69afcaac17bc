#pragma once

// The copy of in-memory snapshots to a peer agent on another node, and the way back.
//
// SnapshotPeerServer: takes the frames a peer agent forwards, and serves frames back (GET) to an
// agent that resumes a rank from them. Two ports on one address:
//  - an RpcServer with CURVE (ZAP domain "muster-snapshots"): only a client key admitted for a
//    job (Allow: the attempt's rendezvous client key, which every agent of the gang and only they
//    get from the coordinator) may open a data channel session for that job (OPEN_SESSION), or
//    get (GET) or put (PUT, still served) that job's frames; every request is checked against the
//    frame's job. GET, which a resuming agent sends rarely and never per step, stays on CURVE.
//  - the data channel (data_channel.h), plain TCP: the frames forwarded every step, sealed with
//    AES-256-GCM under the session's key (random, returned inside the CURVE reply), a
//    per-session counter as the nonce that must grow (replay), the header as associated data.
//    CURVE does not encrypt them a second time: its crypto_box was nearly all of the agents' CPU
//    per step. A message that is not a live session's next authentic one is refused, counted
//    (data_refused) and its connection closed, before anything of it is kept or much of it
//    read (docs/security.md). A session ends when the CURVE connection that opened it closes or
//    its job is revoked (its data connection is shut down then).
// The server has a ZeroMQ context, reactor and ZAP authenticator of its own, apart from the
// agent's, and its data connections are served on threads of their own (at most
// kMaxSnapshotDataConnections): all can take the background CPU class (snapshot_cpu.h) while
// heartbeats keep the agent's. A frame is opened straight into the buffer the SnapshotStore
// keeps, checked (every field and the xxh3) and kept there; one that does not fit is refused with
// the store's FailedPrecondition, never swapped. When a forwarder's CURVE connection closes (its
// agent stopped or died), the newest step of each rank put in its session is logged ("... last
// put job J rank R step S"): what this agent holds of a lost node's ranks.
//
// SnapshotForwarder: what the agent's local snapshot server (snapshot_server.h) calls for each
// frame a rank hands it. Offer returns at once (the rank's put is answered without waiting on the
// network); a worker thread sends the newest frame per (job, rank) to the job's peer target.
// When frames arrive faster than the network takes them, an older unsent frame of the same rank
// is replaced. Failures (the peer refuses the frame, or is unreachable) are logged as errors with
// the peer's reason and counted.
// One connection per job and target is kept open and reused for every frame: a CURVE handshake
// and a session over it, and the session's data connection, on which each frame is sealed straight
// from the frame held into the chunks sent (one pass, no copy besides). It is opened on the first
// frame, and opened again after a frame fails to reach the peer (unreachable, no reply in time, a
// refused handshake, the peer closed the data connection) or when the job's target changes
// (SetTarget with another attempt, endpoint or key); ClearJob closes it. A frame the peer refuses
// (it does not fit, the key is not admitted) keeps it.
//
// FetchSnapshotFromPeer: one GET, retried until `timeout` while the holder has not admitted the
// key yet (it learns it from its own StartAssignment, which may arrive after ours).
//
// Thread-safety: SnapshotPeerServer is created and destroyed by one thread (any); Allow and
// Revoke are thread-safe. SnapshotForwarder's methods are thread-safe. REQUIRES: the store
// outlives the server.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <zmq.hpp>

#include "checkpoint/snapshot_frame.h"
#include "common/curve.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "common/status.h"
#include "node_agent/snapshots/data_channel.h"
#include "node_agent/snapshots/snapshot_cpu.h"
#include "node_agent/snapshots/snapshot_server.h"
#include "node_agent/snapshots/snapshot_store.h"

namespace muster::node_agent {

inline constexpr char kSnapshotsZapDomain[] = "muster-snapshots";
// Data channel connections open at once, at most (a new one past this closes the oldest that
// has not presented a session yet and has had kSnapshotDataEvictAfter to do so, else it is
// refused).
inline constexpr int kMaxSnapshotDataConnections = 64;
inline constexpr std::chrono::milliseconds kSnapshotDataEvictAfter{1000};
// Data channel sessions open at once, at most (one per CURVE connection; past this a new one is
// refused, Unavailable).
inline constexpr int kMaxSnapshotSessions = 1024;
// A data connection's first message header must be in within this of its accept (bytes that
// arrived in time count when the thread reading them runs late: it then gets another second).
inline constexpr std::chrono::milliseconds kSnapshotDataFirstMessageTimeout{5000};
// How long a peer's offer (a deduplicated put, data_channel.h) waits for a frame of the same
// step to arrive here from another rank of the job, when one is due (SnapshotStore::FramesAt).
inline constexpr std::chrono::milliseconds kDedupSourceWait{25};
// The frames whose chunk digests are kept for offers, at most (the newest).
inline constexpr size_t kDigestedFrames = 64;
// Frames smaller than this are put whole: an offer's round trip would save too little.
inline constexpr uint64_t kMinOfferedPayload = 2 * kDedupChunkBytes;

class SnapshotPeerServer {
 public:
  struct Options {
    std::string endpoint;            // e.g. "tcp://10.0.0.2:*"
    bool insecure = false;           // no CURVE: every client may put and get (tests, benches)
    SnapshotStore* store = nullptr;  // required
    SnapshotCpu cpu = SnapshotCpu::kNormal;  // of its reactor, worker and ZeroMQ threads
  };
  // Starts the server's reactor and worker.
  static StatusOr<std::unique_ptr<SnapshotPeerServer>> Create(const Options& options);
  // Stops the reactor; waits for the frame being stored; its reply is dropped.
  ~SnapshotPeerServer();

  // Lets `client_public_key` put and get `job`'s frames (until Revoke). InvalidArgument for a
  // bad job id or key. Ok and a no-op when insecure.
  Status Allow(const std::string& job, const std::string& client_public_key);
  // Every key of `job` loses access, on open connections too.
  void Revoke(const std::string& job);

  const std::string& endpoint() const;
  const std::string& public_key() const;
  // Frames kept and requests refused, since the start.
  int64_t kept() const;
  int64_t refused() const;
  // Connections from forwarders and fetchers accepted, since the start.
  int64_t connections() const;
  // CURVE handshakes refused (a key not admitted), since the start; 0 when insecure.
  uint64_t refused_handshakes() const;
  // Data channel messages and connections refused (unknown or ended session, replayed counter,
  // a tag that does not authenticate, malformed, over-size, truncated, too slow), since the
  // start; each is also in refused().
  int64_t data_refused() const;
  // Data channel sessions opened over CURVE, since the start.
  int64_t sessions_opened() const;
  // Payload bytes of the frames offered (deduplicated puts, data_channel.h), and of the chunks
  // of them that had to be sent, since the start.
  uint64_t offered_bytes() const;
  uint64_t offered_bytes_received() const;
  // The data channel's TCP port (on the endpoint's host).
  int data_port() const;

 private:
  struct Impl;
  explicit SnapshotPeerServer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// Where a job's frames go.
struct SnapshotPeerTarget {
  int32_t attempt = 0;  // frames of this attempt only
  std::string node;     // for logs
  std::string endpoint;
  std::string server_key;  // z85; unused when insecure
  KeyPair client_key;      // the attempt's rendezvous client key
};

class SnapshotForwarder {
 public:
  struct Options {
    bool insecure = false;
    std::chrono::milliseconds call_timeout{30000};
    SnapshotCpu cpu = SnapshotCpu::kNormal;  // of its loop and its ZeroMQ context's threads
  };
  explicit SnapshotForwarder(Options options);
  ~SnapshotForwarder();  // drops what is not sent yet; waits for the send in progress

  // Frames of `job` at `target.attempt` go to `target` from now on (replaces the job's target).
  void SetTarget(const std::string& job, SnapshotPeerTarget target);
  // Frames of `job` are no longer sent; what waits is dropped.
  void ClearJob(const std::string& job);
  // Queues `frame` for its job's target (dropped when the job has none for its attempt).
  // Returns at once.
  void Offer(std::shared_ptr<const checkpoint::SnapshotFrame> frame);

  // Waits until nothing is queued or being sent, or `timeout` passes (false).
  bool WaitIdle(std::chrono::milliseconds timeout);

  int64_t sent() const;
  int64_t failed() const;
  int64_t replaced() const;
  // Connections to peers opened, since the start.
  int64_t connections() const;
  // Payload bytes of the frames sent as offers (deduplicated puts, data_channel.h), and of the
  // chunks of them the peers asked for, since the start.
  uint64_t offered_bytes() const;
  uint64_t offered_bytes_sent() const;
  // Of those offers, the whole-frame ones (no digests: the peer had held the rank's last frame
  // whole), since the start.
  int64_t whole_offers() const;
  // The last failure's message ("" when none).
  std::string last_error() const;

 private:
  // A socket closed with its owner.
  struct Fd {
    int fd = -1;
    Fd() = default;
    explicit Fd(int f) : fd(f) {}
    Fd(Fd&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
    Fd& operator=(Fd&& o) noexcept;
    ~Fd();
  };
  // The open connection of a job, to the target it was opened for: its CURVE connection, the
  // data channel session opened over it, and the session's data connection.
  struct Connection {
    SnapshotPeerTarget target;
    std::unique_ptr<RpcClient> client;
    DataSessionId session{};
    AeadKey key{};
    uint64_t counter = 0;      // of the last PUT sent
    uint64_t max_payload = 0;  // the peer's, from the session (0: not said, an older peer)
    bool dedup = false;        // the peer takes offers (data_channel.h), with this seed
    uint64_t dedup_seed = 0;
    bool whole_offers = false;  // and whole-frame offers
    // By rank: the peer held the rank's last frame offered whole (it asked for no chunk), so
    // the next is offered whole, without digests.
    std::map<int32_t, bool> held_whole;
    bool warned_resend = false;  // an offer's assembled copy failed and was logged
    Fd data;
    std::string scratch;  // what WriteDataPut seals into
  };

  void Loop();
  // On the loop's thread only: the CURVE connection to `t`, a session for `job` over it, and
  // the session's data connection.
  StatusOr<Connection> Open(const SnapshotPeerTarget& t, const std::string& job);
  // On the loop's thread only: sends `f` over the job's connection, opening it first when
  // there is none for `t`; a failed frame closes it.
  Status Send(const SnapshotPeerTarget& t, const checkpoint::SnapshotFrame& f);

  const Options options_;
  zmq::context_t context_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, SnapshotPeerTarget> targets_;  // GUARDED_BY(mu_)
  // GUARDED_BY(mu_): the newest unsent frame per (job, rank), in arrival order.
  std::deque<std::shared_ptr<const checkpoint::SnapshotFrame>> queue_;
  bool busy_ = false;                             // GUARDED_BY(mu_)
  bool stop_ = false;                             // GUARDED_BY(mu_)
  int64_t sent_ = 0, failed_ = 0, replaced_ = 0;  // GUARDED_BY(mu_)
  std::atomic<int64_t> connections_{0};
  std::atomic<uint64_t> offered_bytes_{0}, offered_sent_bytes_{0};
  std::atomic<int64_t> whole_offers_{0};
  // The loop's thread only (ClearJob and SetTarget wake the loop, which closes a connection
  // whose job or target is gone): the open connection of each job.
  std::map<std::string, Connection> connections_by_job_;
  // The loop's thread only: per job, its offers to its current target (logged when the
  // connection closes).
  struct CopyStats {
    std::string node;  // the peer they went to
    int64_t offers = 0;
    uint64_t offered = 0, sent = 0;
  };
  std::map<std::string, CopyStats> copy_stats_;  // by job
  // Logs and forgets `job`'s CopyStats (its copies to that peer stopped: the target went or
  // changed, or the forwarder stops).
  void ReportCopies(const std::string& job);
  std::string last_error_;                     // GUARDED_BY(mu_)
  std::map<std::string, std::string> logged_;  // GUARDED_BY(mu_): job -> last error logged
  std::thread thread_;
};

// The frame of `key` from the peer at `endpoint`. Retries Unavailable and PermissionDenied
// (the holder may not have admitted `client_key` yet) until `timeout`; NotFound when the peer
// does not hold it; DataLoss when the bytes do not decode or are not the frame asked for;
// Aborted once `*cancel` is set (checked between tries).
StatusOr<checkpoint::SnapshotFrame> FetchSnapshotFromPeer(
    const std::string& endpoint, const std::string& server_key, const KeyPair& client_key,
    bool insecure, const checkpoint::SnapshotKey& key, uint64_t max_payload,
    std::chrono::milliseconds timeout, const std::atomic<bool>* cancel = nullptr);

}  // namespace muster::node_agent
