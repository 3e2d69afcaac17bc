#pragma once

// SnapshotServer: the agent's end of the local snapshot channel (checkpoint/snapshot_channel.h).
// It listens on a Unix socket at `socket_path`, whose directory it creates with mode 0700 (only
// the agent's user, which its ranks run as, can connect), reads each request's frame (the header
// first, so a frame larger than the store's whole memory limit is refused before its bytes are
// read, and so is one that would take the bytes being read at once past that limit), keeps puts in
// the SnapshotStore and answers gets from it.
//
// Frames are read and checked on the server's own threads (one per connection, at most
// kMaxSnapshotConnections), never on the agent's reactor: a rank handing over gigabytes cannot
// stall heartbeats or the lease. A malformed request gets an error reply and its connection is
// closed (the stream cannot be resynchronised).
//
// `on_put`, when set, is called on the connection's thread after each frame is kept (the peer
// forwarder hooks in here). `cpu`: the class of the accept and connection threads
// (snapshot_cpu.h).
//
// Thread-safety: constructed and destroyed by one thread; the store is shared (thread-safe).
// REQUIRES: `store` outlives the server.

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/snapshot_channel.h"
#include "checkpoint/snapshot_frame.h"
#include "common/status.h"
#include "node_agent/snapshots/snapshot_cpu.h"
#include "node_agent/snapshots/snapshot_store.h"

namespace muster::node_agent {

inline constexpr int kMaxSnapshotConnections = 256;
// Once a request's first byte has arrived, the rest of its frame must arrive within this, plus
// one second per kSnapshotFrameBytesPerSecond of payload announced: a rank that stalls
// mid-frame (stopped, hung) loses its connection, and the bytes it had reserved against the
// limit are free again.
inline constexpr std::chrono::milliseconds kSnapshotFrameTimeout{10000};
inline constexpr uint64_t kSnapshotFrameBytesPerSecond = uint64_t{256} << 20;

// Reads the regions `remote` into `local` (pairwise, of equal lengths) with `read` (one
// process_vm_readv call: up to n regions, returns the bytes read or -1 with errno), calling it
// again past a short count (a call reads at most about 2 GiB, and stops before a region it cannot
// read) until every byte is read. Returns the bytes read, or -errno of the call that failed
// (-EFAULT when one read nothing more).
using RegionReader = std::function<ssize_t(const iovec* local, size_t n, const iovec* remote)>;
int64_t ReadRegions(const RegionReader& read, std::vector<iovec> local, std::vector<iovec> remote);

// What a put in place's part list costs the agent per part (its entry and two iovecs), charged
// against the same budget as the payloads being read.
inline constexpr uint64_t kSnapshotPartCost = 64;

class SnapshotServer {
 public:
  using OnPut = std::function<void(std::shared_ptr<const checkpoint::SnapshotFrame>)>;
  // Whether the process `pid` (the connecting process, from SO_PEERCRED) may put or get the
  // frame of `key`; an error is the reply. Called on the connection's thread for every request.
  using PeerCheck = std::function<Status(pid_t pid, const checkpoint::SnapshotKey& key)>;

  // Unavailable/Internal naming the path when the socket cannot be made.
  // `frame_timeout`: kSnapshotFrameTimeout (shorter in tests).
  // `peer_check`: null lets every process of the agent's user in (the directory's mode is then
  // the only fence).
  static StatusOr<std::unique_ptr<SnapshotServer>> Start(
      std::string socket_path, SnapshotStore* store, OnPut on_put = nullptr,
      std::chrono::milliseconds frame_timeout = kSnapshotFrameTimeout,
      PeerCheck peer_check = nullptr, SnapshotCpu cpu = SnapshotCpu::kNormal);
  // Closes the socket and every connection, joins the threads, removes the socket file.
  ~SnapshotServer();

  // From now on every put in place ('V') is answered kSnapshotInPlaceUnavailable: the ranks copy
  // their snapshots instead (tests of that fallback; a host that must not have its agent read the
  // ranks' memory).
  void DisableInPlace() { in_place_ = false; }

  const std::string& socket_path() const { return path_; }

 private:
  SnapshotServer(std::string path, SnapshotStore* store, OnPut on_put,
                 std::chrono::milliseconds frame_timeout, PeerCheck peer_check, SnapshotCpu cpu);
  void AcceptLoop();

  const std::string path_;
  SnapshotStore* store_;
  OnPut on_put_;
  const std::chrono::milliseconds frame_timeout_;
  std::atomic<bool> in_place_{true};
  PeerCheck peer_check_;
  const SnapshotCpu cpu_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};  // closing wake_[1] wakes every poll
  std::thread accept_thread_;
  struct Conn {
    int fd = -1;
    pid_t pid = -1;     // the connecting process (SO_PEERCRED); -1: unknown
    int pidfd = -1;     // that process (pidfd_open): whether it is still the one read in place
    bool done = false;  // GUARDED_BY(mu_): Serve returned; the thread may be joined
    std::thread thread;
  };
  // Whether the connecting process may put or get `key`'s frame (peer_check_; a refusal is
  // logged). Ok when there is no check.
  Status CheckRank(const Conn& conn, const checkpoint::SnapshotKey& key) const;
  // The rest of a put in place ('V', checkpoint/snapshot_channel.h) after its header `h`: the
  // parts, the connecting process's memory read (process_vm_readv), the frame kept. Its reply
  // sent; false when the connection must close. `in` reads the connection's bytes.
  bool ServeInPlace(Conn* conn, checkpoint::BufferedReader* in, const checkpoint::SnapshotHeader& h,
                    std::chrono::steady_clock::time_point deadline);
  std::mutex mu_;
  std::vector<std::unique_ptr<Conn>> conns_;  // GUARDED_BY(mu_)
  bool stopping_ = false;                     // GUARDED_BY(mu_)
  // Bytes of frames being read, across connections: bounded by the store's limit, so many
  // ranks sending at once cannot make the agent hold more than twice its limit.
  uint64_t inflight_ = 0;  // GUARDED_BY(mu_)

  void Serve(Conn* conn);
};

}  // namespace muster::node_agent
