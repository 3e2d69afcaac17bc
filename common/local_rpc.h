#pragma once

// Request/reply between processes of one host over a Unix stream socket: LocalRpcServer (on a
// Reactor) and LocalRpcClient (blocking, owned by the calling thread). The same Envelopes as
// RpcServer/RpcClient (common/rpc.h), without ZeroMQ: each message is a frame of a 4-byte
// little-endian length and that many bytes of Envelope. Used where thousands of short-lived
// local connections meet one server (a node's ranks and their agent's rendezvous relay,
// collectives/rendezvous_relay.h): a connection is one connect(2) and one accept(2), with no
// I/O thread, mailbox or ZMTP handshake on either side.
//
// A reply may carry one file descriptor (SCM_RIGHTS, on its frame's first byte): the relay hands
// a large result to each of its ranks as one sealed memory file (ReplyWithDescriptor), which the
// kernel shares between them instead of a copy per rank down each socket.
//
// The endpoint is "unix://" and the socket's absolute path. There is no CURVE: who may open the
// socket is up to its directory's permissions, and the server learns each connection's peer
// from the kernel (SO_PEERCRED: pid, uid, gid), which a peer cannot forge.
//
// Bad input: a frame longer than the message limit gets an error reply (request_id 0) and its
// connection is closed after it (as libzmq drops a peer past ZMQ_MAXMSGSIZE); bytes that are not
// an Envelope (or one without a payload) get an error reply with request_id 0 and the
// connection keeps serving. A peer that does not read its replies is disconnected once more than
// Options::max_queued_bytes of them wait for it. Connections past Options::max_connections are
// closed as they come.

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/reactor.h"
#include "common/rpc.h"
#include "common/status.h"

namespace muster {

// An owned file descriptor, closed when destroyed. Move-only.
class ScopedFd {
 public:
  ScopedFd() = default;
  explicit ScopedFd(int fd) : fd_(fd) {}
  ScopedFd(ScopedFd&& o) noexcept : fd_(o.release()) {}
  ScopedFd& operator=(ScopedFd&& o) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd();
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

// "unix://<path>" endpoints.
inline constexpr std::string_view kUnixScheme = "unix://";
bool IsUnixEndpoint(std::string_view endpoint);
// The socket's path in a "unix://" endpoint; InvalidArgument when the endpoint is not one, the
// path is not absolute, or it does not fit a Unix socket address (107 bytes).
StatusOr<std::string> UnixEndpointPath(std::string_view endpoint);

// A non-blocking connection to the socket of a "unix://" endpoint. A server not up yet (no
// socket file, nobody listening) or with its backlog full (a non-blocking connect to a Unix
// socket says EAGAIN instead of waiting) is tried again until `deadline`: then
// DeadlineExceeded. Other errors (EACCES...) give Unavailable at once.
StatusOr<ScopedFd> ConnectUnixSocket(const std::string& endpoint,
                                     std::chrono::steady_clock::time_point deadline);

// recvmsg(2) of up to `size` bytes into `data`, appending the descriptors that came with them
// (SCM_RIGHTS, opened close-on-exec, owned from here on) to `fds`. *truncated is set when the
// kernel dropped some (more than kMaxReceivedDescriptors in one read, or this process at its
// open-file limit). Returns what recvmsg returns.
inline constexpr int kMaxReceivedDescriptors = 4;
ssize_t RecvWithDescriptors(int sock, char* data, size_t size, std::vector<ScopedFd>* fds,
                            bool* truncated);

// Frames: a 4-byte little-endian length, then the message. A frame's header and body in one
// string, ready to write.
inline constexpr size_t kLocalFrameHeader = 4;
std::string LocalFrame(std::string_view body);

// Splits a byte stream into frames, bounded by a message limit. Feed it what arrives, in any
// chunks; take the frames out with Next. Pure (no I/O): the server's and the client's reader,
// and what the fuzzer drives.
class LocalFrameReader {
 public:
  explicit LocalFrameReader(int64_t max_message_bytes) : max_(max_message_bytes) {}
  void Append(const char* data, size_t n);
  // Room for `n` more bytes at the end (to recv into); Commit says how many were written there.
  char* Prepare(size_t n);
  void Commit(size_t n);
  enum class Result { kNeedMore, kFrame, kTooLarge };
  // kFrame: *frame is the next message (valid until the next Append or Prepare). kTooLarge: the
  // next frame's header announces more than the limit (*announced says how much); the stream
  // cannot be read past it. kNeedMore: no whole frame yet.
  Result Next(std::string_view* frame, uint64_t* announced = nullptr);
  // Bytes held that are not yet part of a frame taken out.
  size_t buffered() const { return end_ - begin_; }
  // How many more bytes complete the next frame (at least 1 while kNeedMore); 0 when a whole
  // frame is already buffered.
  size_t missing() const;

 private:
  int64_t max_;
  std::unique_ptr<char[]> data_;
  size_t cap_ = 0;
  size_t begin_ = 0;  // the first byte not yet taken out
  size_t end_ = 0;    // past the last byte held
};

class LocalRpcServer {
 public:
  using Handler = RpcServer::Handler;
  using Reply = RpcServer::Reply;

  struct Options {
    std::string name = "local-rpc";  // for logs
    // The socket to bind: an absolute path that fits a Unix socket address, in a directory
    // whose permissions say who may connect. A file already there is not replaced.
    std::string path;
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
    // Connections held at once; more get an error frame and are closed as they are accepted.
    // 0: half of this process's open-file limit (RLIMIT_NOFILE), at least 64, so that the
    // connections never take the descriptors the rest of the process needs.
    int max_connections = 0;
    // Replies waiting for a peer that does not read them, in bytes, before its connection is
    // closed (0: twice max_message_bytes, at least 1 MiB).
    int64_t max_queued_bytes = 0;
  };

  // REQUIRES: on the reactor thread or before reactor.Start().
  static StatusOr<std::unique_ptr<LocalRpcServer>> Create(Reactor& reactor, Options options,
                                                          Handler handler);
  // Closes every connection and removes the socket file. Replies after this are dropped.
  // REQUIRES: on the reactor thread, or after the reactor stopped.
  ~LocalRpcServer();
  LocalRpcServer(const LocalRpcServer&) = delete;
  LocalRpcServer& operator=(const LocalRpcServer&) = delete;

  // "unix://" + the socket's path.
  const std::string& endpoint() const { return endpoint_; }
  // Connections open now. Reactor thread only.
  size_t connections() const;

  struct Core;

 private:
  LocalRpcServer(Reactor& reactor, std::string endpoint, std::shared_ptr<Core> core);

  Reactor& reactor_;
  std::string endpoint_;
  std::shared_ptr<Core> core_;
};

// The Reply a LocalRpcServer hands its handler (RpcServer::ReplyWith recognizes it and writes a
// SerializedReply's bytes without parsing them back): answers one request over the connection
// it came on, once, from any thread; dropped when that connection or the server has gone.
struct LocalServerReply {
  std::weak_ptr<LocalRpcServer::Core> weak;
  Reactor* reactor = nullptr;
  uint64_t connection = 0;
  uint64_t id = 0;
  std::shared_ptr<std::atomic<bool>> replied;

  void operator()(proto::Envelope out) const;
  // With `fd` (may be null) passed along with the reply's first byte. When the kernel refuses
  // to pass it (ETOOMANYREFS: this user has too many descriptors in flight), `fallback` (when
  // given) is serialized then and sent instead, without a descriptor.
  void Send(std::shared_ptr<const SerializedReply> serialized,
            std::shared_ptr<const ScopedFd> fd = nullptr,
            std::shared_ptr<const proto::Envelope> fallback = nullptr) const;
};

// Answers `reply` with `serialized` and the descriptor `fd` passed with it, when `reply` is a
// LocalRpcServer's (then true); false, leaving `reply` unanswered, for any other (an RpcServer's
// cannot carry a descriptor; a test's or a fuzzer's): the caller answers another way.
// `fallback` (may be null) is what goes instead when the kernel refuses to pass `fd`; it is
// serialized only then (a large result is not copied for a case that rarely comes).
bool ReplyWithDescriptor(const RpcServer::Reply& reply,
                         std::shared_ptr<const SerializedReply> serialized,
                         std::shared_ptr<const ScopedFd> fd,
                         std::shared_ptr<const proto::Envelope> fallback = nullptr);

// A blocking client of a LocalRpcServer. Connects lazily: a server not up yet (no socket file,
// or refusing) is retried until a call's timeout. A call that fails for any reason other than
// the server's error reply closes the connection, and the next call opens a new one.
// Thread-safety: calls are serialized by an internal mutex.
class LocalRpcClient final : public RpcCaller {
 public:
  struct Options {
    std::string endpoint;  // "unix://<path>"
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
  };
  // InvalidArgument when the endpoint is not a "unix://" one.
  static StatusOr<std::unique_ptr<LocalRpcClient>> Connect(Options options);
  ~LocalRpcClient() override;

  // As RpcClient::Call: assigns the request_id, waits up to `timeout` for the reply; an error
  // payload is returned as its Status; DeadlineExceeded when no reply came in time; Unavailable
  // when the server cannot be reached or closed the connection.
  StatusOr<proto::Envelope> Call(proto::Envelope request,
                                 std::chrono::milliseconds timeout) override;
  // The same; the descriptors that came with the reply are appended to `received` (null:
  // closed). At most kMaxReceivedDescriptors per read are taken; more are closed by the kernel
  // (MSG_CTRUNC), and the call fails with DataLoss. One request is in flight per connection
  // (the mutex), so every descriptor read before a reply's last byte belongs to that reply; a
  // client that pipelined requests would have to record where in the stream each one came.
  StatusOr<proto::Envelope> Call(proto::Envelope request, std::chrono::milliseconds timeout,
                                 std::vector<ScopedFd>* received) override;
  const std::string& endpoint() const { return options_.endpoint; }

 private:
  explicit LocalRpcClient(Options options);
  Status Open(std::chrono::steady_clock::time_point deadline);
  // Closes the connection (the next call opens another) and forgets what it had buffered.
  void Drop();

  Options options_;
  std::mutex mu_;
  int fd_ = -1;                // GUARDED_BY(mu_)
  LocalFrameReader in_;        // GUARDED_BY(mu_): what fd_ delivered past the last reply
  std::vector<ScopedFd> fds_;  // GUARDED_BY(mu_): descriptors fd_ delivered, not yet handed out
  uint64_t next_id_ = 1;       // GUARDED_BY(mu_)
};

}  // namespace muster
