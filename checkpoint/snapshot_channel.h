#pragma once

// The local snapshot channel: how a rank hands its in-memory snapshots to its own node's agent,
// and asks for one back to resume from. A Unix stream socket served by the agent
// (node_agent/snapshots/snapshot_server.h) at a path inside a directory only the agent's user
// can enter.
//
// Protocol, one request then one reply at a time on a connection (little-endian):
//   request: op (1 byte: 'P' put, 'G' get) | a SnapshotFrame (checkpoint/snapshot_frame.h);
//            a get's frame names the job, attempt, rank, world size and step, with no payload.
//        or: op 'V' (put in place) | the frame's header (its payload_xxh3 0: the agent computes
//            it) and job id | u32 part count (1..kMaxSnapshotParts) | per part: u8 kind (0:
//            bytes that follow here; 1: bytes in the rank's own memory) | u64 length | kind 0:
//            the bytes; kind 1: u64 address. The parts' lengths sum to the header's payload
//            length. The agent reads the kind-1 parts straight out of the connecting process's
//            memory (process_vm_readv; that process must not change them until the reply), so
//            the payload crosses once, with no copy in the rank and none through the socket.
//   reply:   code (1 byte, StatusCode) | u32 message length | message (at most 4096 bytes)
//            | on a get that is OK: u64 frame length | the frame held. To a 'V' the agent first
//            sends one byte, kSnapshotReadAck, as soon as it has read the rank's memory (the
//            tensors may change from then on), then the reply once the frame is hashed and kept.
//   An agent that cannot read the rank's memory (no ptrace permission over it) answers a 'V'
//   FAILED_PRECONDITION with a message that starts with kSnapshotInPlaceUnavailable; an older
//   agent answers INVALID_ARGUMENT "unknown op". The rank then copies (op 'P').
//
// SnapshotClient speaks it (one connection, calls serialized by the caller). SnapshotSender is
// what a training loop uses, one of two ways:
//  - Snapshot() copies the state into a payload (the only stall: one copy into a buffer reused
//    from snapshot to snapshot) and returns; checksumming and framing happen on the sender's
//    thread, which sends it to the agent. Training never waits on the agent: when a snapshot is
//    still being sent as the next one is taken, the older unsent one is replaced (the newest step
//    matters on recovery, not every step).
//  - SnapshotInPlace() copies nothing: the sender's thread asks the agent to read the tensors
//    where they are ('V') while training goes on, and Release(), which the loop calls before it
//    changes them (its next optimizer step), waits for the agent's answer, which has nearly
//    always come by then. Where the agent cannot read this process, the sender's thread copies
//    the state instead (once Release has let go, the copy has been made) and puts it ('P').
//
// Thread-safety: SnapshotClient is not thread-safe. SnapshotSender's methods may be called from
// any thread.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "checkpoint/snapshot_frame.h"
#include "checkpoint/snapshot_state.h"
#include "common/status.h"

namespace muster::checkpoint {

inline constexpr size_t kMaxSnapshotReplyMessage = 4096;
// The parts of a put in place, at most (a tensor each, and the index and metadata).
inline constexpr uint32_t kMaxSnapshotParts = 1u << 20;
// The byte that tells a rank the agent has read its memory (see the protocol above).
inline constexpr char kSnapshotReadAck = 'R';
// How an agent that cannot read the rank's memory begins its answer to a put in place.
inline constexpr char kSnapshotInPlaceUnavailable[] = "in-place snapshot unavailable: ";

// One part of a put in place: bytes sent along (`here`), or `length` bytes at `address` in the
// sending process.
struct SnapshotPart {
  std::string_view here;
  uint64_t address = 0;
  uint64_t length = 0;
  static SnapshotPart Here(std::string_view b) { return {b, 0, b.size()}; }
  static SnapshotPart InMemory(const void* p, uint64_t n) {
    return {{}, reinterpret_cast<uint64_t>(p), n};
  }
  bool in_memory() const { return here.data() == nullptr; }
};

// A put in place's part list (after the op, the frame's header and its job id), as the rank
// writes it for `parts`.
std::string EncodeSnapshotParts(const std::vector<SnapshotPart>& parts);
// One in-memory part as the agent reads the list: where it goes in the payload, and where it is
// in the rank's memory.
struct InMemoryPart {
  uint64_t at = 0;
  uint64_t address = 0;
  uint64_t length = 0;
};
// Reads a part list with `read` (exactly n bytes, or its error) for a payload of
// payload->size() bytes: the inline parts' bytes are read straight into their place in
// `*payload`, the in-memory ones returned (zero-length ones left out). InvalidArgument for a
// part count outside 1..kMaxSnapshotParts; DataLoss for an unknown kind or parts that do not
// fill the payload exactly (checked before any byte of a part is placed past it).
// `admit`, when given, sees the part count before anything else is read or allocated (the agent
// charges the parts' bookkeeping to its memory budget there); its error is returned.
StatusOr<std::vector<InMemoryPart>> ReadSnapshotParts(
    const std::function<Status(char* out, size_t n)>& read, std::string* payload,
    const std::function<Status(uint64_t count)>& admit = nullptr);

// Writes and reads whole buffers on a stream socket (no SIGPIPE). Unavailable when the peer is
// gone or the deadline passes (`deadline` nullopt: no deadline).
Status SendAll(int fd, std::string_view bytes);
Status RecvAll(int fd, char* out, size_t n,
               std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);

// Reads a stream socket through a buffer, for a server that parses a request in many small
// reads (its header, its job id, a part list of thousands of entries): each refill takes
// whatever has arrived, up to the buffer, in one recv, so a request costs a few system calls
// rather than a poll and a recv per field. A read of half the buffer or more goes straight to
// its destination once the buffered bytes are used (a payload is not copied twice). Errors and
// deadlines as RecvAll.
class BufferedReader {
 public:
  explicit BufferedReader(int fd, size_t capacity = 64 << 10);
  Status Read(char* out, size_t n,
              std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);
  // Bytes received but not yet read: a client that sent more than its request.
  size_t buffered() const { return end_ - begin_; }

 private:
  int fd_;
  std::string buf_;
  size_t begin_ = 0, end_ = 0;
};

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
  // A put in place ('V'): `key`'s frame is the parts, in order; the agent reads the in-memory
  // ones out of this process. `on_read` runs when the agent says it has read them (before its
  // verdict). REQUIRES: they stay unchanged until on_read runs or this returns.
  Status PutInPlace(const SnapshotKey& key, const std::vector<SnapshotPart>& parts,
                    const std::function<void()>& on_read = nullptr);
  // The connection's descriptor (to cut a put in place that takes too long, from another thread).
  int fd() const { return fd_; }
  // The frame the agent holds for `key` (its payload checked again here). NotFound when the
  // agent has none.
  StatusOr<SnapshotFrame> Get(const SnapshotKey& key, uint64_t max_payload);

 private:
  explicit SnapshotClient(int fd) : fd_(fd) {}
  Status ReadReply();
  // The rest of a reply whose code byte was already read.
  Status ReadReplyAfter(char code);
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

  // Queues `state` for the agent to read in place (see the top): copies nothing but its index.
  // Errors in the state itself only. REQUIRES: steps increase from call to call; the previous
  // in-place snapshot was released; none of the tensors' bytes changes until Release returns.
  Status SnapshotInPlace(int64_t step, const SaveState& state);
  // Waits until the in-place snapshot queued last no longer needs its tensors: the agent has
  // read them (or refused), or they were copied here. Ok at once when none is pending. After
  // `timeout`, gives it up: a read by the agent is cut (the connection is shut down, so the agent
  // keeps nothing of it), and DeadlineExceeded is returned once nothing reads the tensors.
  Status Release(std::chrono::milliseconds timeout);
  // Whether the agent reads in place (false once it said it cannot: later in-place snapshots
  // are copied on the sender's thread).
  bool in_place() const;
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
  // An in-place snapshot: its step, its state (the tensors' pointers) and index.
  struct InPlace {
    int64_t step = 0;
    SaveState state;
    std::string head;
    std::vector<SnapshotSpan> spans;
  };
  // Where the in-place snapshot is. kQueued: waiting for the loop (Release may drop it);
  // kReading: the agent is reading it (Release may cut the connection, in_place_fd_);
  // kCopying: the loop copies it (Release waits); kNone: its tensors are free.
  enum class InPlacePhase { kNone, kQueued, kReading, kCopying };
  std::optional<InPlace> in_place_;           // GUARDED_BY(mu_): kQueued's
  InPlacePhase phase_ = InPlacePhase::kNone;  // GUARDED_BY(mu_)
  int in_place_fd_ = -1;                      // GUARDED_BY(mu_): the connection while kReading
  bool in_place_unavailable_ = false;         // GUARDED_BY(mu_): the agent said it cannot
  bool in_place_cut_ = false;                 // GUARDED_BY(mu_): Release shut the connection
  std::string spare_;     // GUARDED_BY(mu_): a sent payload's buffer, reused by the next copy
  // The last index encoded by Snapshot or SnapshotInPlace (the callers' threads), reused while
  // the tensors' layout stays the same.
  std::mutex index_mu_;
  SnapshotIndexCache index_;  // GUARDED_BY(index_mu_)
  bool sending_ = false;  // GUARDED_BY(mu_)
  bool stop_ = false;     // GUARDED_BY(mu_)
  Status last_;           // GUARDED_BY(mu_)
  int64_t sent_ = 0;      // GUARDED_BY(mu_)
  int64_t replaced_ = 0;  // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace muster::checkpoint
