#pragma once

// The local snapshot channel: how a rank hands its in-memory snapshots to its own node's agent,
// and asks for one back to resume from. A Unix stream socket served by the agent
// (node_agent/snapshots/snapshot_server.h) at a path inside a directory only the agent's user
// can enter.
//
// Protocol, one request then one reply at a time on a connection (little-endian):
//   request: op (1 byte: 'P' put, 'G' get) | a SnapshotFrame (checkpoint/snapshot_frame.h);
//            a get's frame names the job, attempt, rank, world size and step, with no payload.
//   reply:   code (1 byte, StatusCode) | u32 message length | message (at most 4096 bytes)
//            | on a get that is OK: u64 frame length | the frame held.
//
// SnapshotClient speaks it (one connection, calls serialized by the caller). SnapshotSender is
// what a training loop uses: Snapshot() copies the state into a payload (the only stall: one
// copy into a buffer reused from snapshot to snapshot) and returns; checksumming and framing
// happen on the sender's thread; a background thread sends it to the agent. Training never waits on
// the agent: when a snapshot is still being sent as the next one is taken, the older unsent one is
// replaced (the newest step matters on recovery, not every step).
//
// Thread-safety: SnapshotClient is not thread-safe. SnapshotSender's methods may be called from
// any thread.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "checkpoint/checkpointer.h"
#include "checkpoint/snapshot_frame.h"
#include "common/status.h"

namespace muster::checkpoint {

inline constexpr size_t kMaxSnapshotReplyMessage = 4096;

// Writes and reads whole buffers on a stream socket (no SIGPIPE). Unavailable when the peer is
// gone or the deadline passes (`deadline` nullopt: no deadline).
Status SendAll(int fd, std::string_view bytes);
Status RecvAll(int fd, char* out, size_t n,
               std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);

class SnapshotClient {
 public:
  // Unavailable when nothing listens at `path`.
  static StatusOr<std::unique_ptr<SnapshotClient>> Connect(const std::string& path);
  ~SnapshotClient();

  // Hands an encoded frame (EncodeSnapshotFrame) to the agent; its answer: OK once it holds
  // the frame, else the agent's refusal (FailedPrecondition when it does not fit, ...).
  Status Put(std::string_view frame);
  // The same for `payload` as `key`'s frame, without copying it into one buffer.
  Status Put(const SnapshotKey& key, std::string_view payload);
  // The frame the agent holds for `key` (its payload checked again here). NotFound when the
  // agent has none.
  StatusOr<SnapshotFrame> Get(const SnapshotKey& key, uint64_t max_payload);

 private:
  explicit SnapshotClient(int fd) : fd_(fd) {}
  Status ReadReply();
  // The agent's reply after a put whose send ended with `sent`.
  Status SentReply(Status sent);
  int fd_;
};

struct SnapshotSenderOptions {
  std::string socket_path;  // the agent's snapshot socket
  SnapshotKey key;          // job, attempt, rank, world size; the step is set per snapshot
};

class SnapshotSender {
 public:
  static std::unique_ptr<SnapshotSender> Create(SnapshotSenderOptions options);
  // Waits for a send in progress; a snapshot queued but not yet sent is dropped (Flush first to
  // hand over the last one before exiting).
  ~SnapshotSender();

  // Copies `state` (EncodeSnapshotState) and queues it for the agent. Returns after the copy;
  // errors in the state itself only. REQUIRES: steps increase from call to call.
  Status Snapshot(int64_t step, const SaveState& state);

  // Waits until nothing is queued or being sent, or `timeout` passes (DeadlineExceeded); then
  // the outcome of the last send (OK, or the agent's refusal or the channel's error).
  Status Flush(std::chrono::milliseconds timeout);

  // Snapshots handed to the agent and kept by it; replaced before they were sent.
  int64_t sent() const;
  int64_t replaced() const;

 private:
  explicit SnapshotSender(SnapshotSenderOptions options);
  void Loop();

  const SnapshotSenderOptions options_;
  std::unique_ptr<SnapshotClient> client_;  // the loop's only
  mutable std::mutex mu_;
  std::condition_variable cv_;
  // GUARDED_BY(mu_): the newest payload not yet sent, and its step.
  std::optional<std::pair<int64_t, std::string>> pending_;
  std::string spare_;     // GUARDED_BY(mu_): a sent payload's buffer, reused by the next copy
  bool sending_ = false;  // GUARDED_BY(mu_)
  bool stop_ = false;     // GUARDED_BY(mu_)
  Status last_;           // GUARDED_BY(mu_)
  int64_t sent_ = 0;      // GUARDED_BY(mu_)
  int64_t replaced_ = 0;  // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace muster::checkpoint
