#pragma once

// Request/reply over ZeroMQ: RpcServer (ROUTER, on a Reactor) and RpcClient (DEALER, owned by
// the calling thread). Every TCP socket uses CURVE unless the caller asked for insecure; every
// socket has a message size limit (ZMQ_MAXMSGSIZE), past which libzmq drops the peer's
// connection and the server keeps serving. Bytes that are not an Envelope get an error reply
// with request_id 0 and the server keeps serving.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/curve.h"
#include "common/proto/envelope.pb.h"
#include "common/reactor.h"
#include "common/status.h"

namespace muster {

inline constexpr int64_t kDefaultMaxMessageBytes = 64LL << 20;
inline constexpr char kDefaultZapDomain[] = "muster";

struct PeerInfo {
  std::string routing_id;         // ROUTER identity of the connection
  std::string user_id;            // the authorized key's name ("anonymous" when insecure)
  std::string address;            // the peer's IP address
  std::string public_key;         // the client's z85 CURVE key; empty when insecure
  KeyRole role = KeyRole::kNone;  // as authorized now (kLegacy when insecure)
  int fd = -1;                    // the connection's socket in this process (ZMQ_SRCFD); -1 unknown
};

// Opens a ZeroMQ socket of `type` in `context`. ZeroMQ closes sockets asynchronously: a socket
// closed a moment ago keeps its slot in the context (ZMQ_MAX_SOCKETS, 1023 by default) and its
// descriptors until the context's reaper thread has shut it down, and on a loaded machine that
// thread can fall far behind a loop that opens and closes sockets. So when the context (or the
// process) has no room left (EMFILE), this waits up to `wait` for sockets closed earlier to be
// released, and then fails with Unavailable naming the limits. It blocks the calling thread only
// in that case.
StatusOr<zmq::socket_t> OpenSocket(zmq::context_t& context, zmq::socket_type type,
                                   std::chrono::milliseconds wait = std::chrono::seconds(2));
// zmq_socket_monitor(socket, endpoint, events), which opens a socket of its own: waits for room
// as OpenSocket does.
Status MonitorSocket(zmq::context_t& context, zmq::socket_t& socket, const std::string& endpoint,
                     int events, std::chrono::milliseconds wait = std::chrono::seconds(2));

// A connection of an RpcServer's socket opened or closed, as its socket monitor saw it
// (Options::on_connection). `fd` is the connection's socket in this process, as PeerInfo::fd of
// the requests that came over it. The kernel reuses fds: an fd closed may come back as another
// connection, announced by its own kAccepted.
struct ConnectionEvent {
  enum class Kind { kAccepted, kClosed };
  Kind kind = Kind::kAccepted;
  int fd = -1;
};

// An Envelope serialized once, to answer several requests with the same bytes (a result that
// many parked requests wait for): RpcServer::ReplyWith sends it as each one's reply with only
// that request's id added, where answering with a proto::Envelope copies and serializes it per
// reply. Immutable once made: share it between threads freely.
class SerializedReply {
 public:
  // `envelope`'s request_id is not kept: each reply carries its own request's.
  explicit SerializedReply(const proto::Envelope& envelope);
  // The envelope's bytes, without a request_id.
  const std::string& bytes() const { return bytes_; }
  // bytes() with request_id `id` appended: the envelope as the wire carries it to that request
  // (protobuf merges concatenated messages, so the appended field sets request_id). Writes
  // size(id) bytes at `out`.
  size_t size(uint64_t id) const;
  void WriteTo(uint64_t id, char* out) const;

 private:
  std::string bytes_;
};

class RpcServer {
 public:
  // Sends the reply to the request. Call exactly once, from any thread, while the reactor
  // lives; a reply for a connection that has gone is dropped.
  using Reply = std::function<void(proto::Envelope)>;

  // Answers `reply` with `serialized`, as calling it with the envelope those bytes were made
  // from would, and counts as that call (a Reply is answered once). A Reply made by an
  // RpcServer or a LocalRpcServer (common/local_rpc.h) copies the bytes once, into the outgoing
  // message; any other (a test's, a
  // caller's wrapper) is called with the envelope parsed back from them.
  static void ReplyWith(const Reply& reply, std::shared_ptr<const SerializedReply> serialized);
  // Runs on the reactor. The request's payload is set (malformed requests never reach it).
  using Handler = std::function<void(const PeerInfo&, proto::Envelope&&, Reply)>;

  struct Options {
    std::string name = "rpc";  // for logs
    std::string endpoint;      // e.g. "tcp://127.0.0.1:*" (port chosen) or "ipc:///run/x"
    // Without insecure, `server_key` must hold a secret key and `authenticator` must be the
    // ZapAuthenticator of the reactor's context (not owned; outlives the server): only keys it
    // authorizes for `zap_domain` are served. Every message is checked against the keys
    // authorized at that moment: once a key is revoked (Revoke, SetAuthorized), each further
    // request on a connection it opened gets a FailedPrecondition "permission denied" reply and
    // never reaches the handler.
    bool insecure = false;
    KeyPair server_key;
    ZapAuthenticator* authenticator = nullptr;
    std::string zap_domain = kDefaultZapDomain;
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
    // When set, the server watches its connections (a socket monitor) and calls this on the
    // reactor for each one accepted or closed (the peer's kernel closed it: process exit, kill
    // -9, reset; or libzmq dropped it). Ordering: events are handed out before each request is,
    // so every event the monitor emitted before a request's connection was set up precedes the
    // request: a kClosed(fd) seen after a request from `fd` closes that request's connection
    // or a later one on the same fd.
    std::function<void(const ConnectionEvent&)> on_connection;
  };

  // REQUIRES: on the reactor thread or before reactor.Start().
  static StatusOr<std::unique_ptr<RpcServer>> Create(Reactor& reactor, Options options,
                                                     Handler handler);
  // REQUIRES: on the reactor thread, or after the reactor stopped.
  ~RpcServer();

  // The endpoint bound, with the port resolved ("tcp://127.0.0.1:40123").
  const std::string& endpoint() const { return endpoint_; }
  const std::string& public_key() const { return options_.server_key.public_key; }

 private:
  struct Core;
  struct ServerReply;
  RpcServer(Reactor& reactor, Options options, Handler handler);
  void OnReadable();
  void DrainMonitor();

  Reactor& reactor_;
  Options options_;
  Handler handler_;
  std::shared_ptr<Core> core_;
  std::unique_ptr<zmq::socket_t> monitor_;  // with options_.on_connection
  std::string endpoint_;
};

class ScopedFd;  // common/local_rpc.h

// Readies `request` to go out as call `id` with `timeout`: sets its request_id, and its
// deadline_ms unless the caller set one. Returns its size (ByteSizeLong, now cached), or
// InvalidArgument when that exceeds `max_message_bytes`. RpcClient and LocalRpcClient call it.
StatusOr<size_t> StampRequest(proto::Envelope& request, uint64_t id,
                              std::chrono::milliseconds timeout, int64_t max_message_bytes);

// One request, one reply, blocking the caller: what RpcClient (ZeroMQ) and LocalRpcClient (a
// Unix socket, common/local_rpc.h) have in common.
class RpcCaller {
 public:
  virtual ~RpcCaller() = default;
  // Sends `request` (its request_id is assigned here) and waits up to `timeout` for its reply;
  // an error payload in the reply is returned as its Status.
  virtual StatusOr<proto::Envelope> Call(proto::Envelope request,
                                         std::chrono::milliseconds timeout) = 0;
  // The same, with the file descriptors that came with the reply appended to `received`
  // (ScopedFd: common/local_rpc.h). Only a local socket carries them: the others never add any.
  virtual StatusOr<proto::Envelope> Call(proto::Envelope request, std::chrono::milliseconds timeout,
                                         std::vector<ScopedFd>* received) {
    (void)received;
    return Call(std::move(request), timeout);
  }
};

class RpcClient final : public RpcCaller {
 public:
  struct Options {
    std::string endpoint;
    bool insecure = false;
    std::string server_public_key;  // z85; required unless insecure
    KeyPair client_key;             // required unless insecure
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
  };

  // The client's socket lives in `context` (not owned; must outlive the client). Connecting is
  // asynchronous: a server that is not up yet is retried until a call's timeout.
  static StatusOr<std::unique_ptr<RpcClient>> Connect(zmq::context_t& context, Options options);
  ~RpcClient() override;

  // Sends `request` (its request_id is assigned here) and waits up to `timeout` for its reply.
  // An error payload in the reply is returned as its Status. A server that refuses our key
  // gives Unavailable as soon as the handshake fails; no reply in time gives DeadlineExceeded.
  // Replies to earlier, timed-out calls are discarded.
  // Thread-safety: calls are serialized by an internal mutex.
  StatusOr<proto::Envelope> Call(proto::Envelope request,
                                 std::chrono::milliseconds timeout) override;
  using RpcCaller::Call;

  const std::string& endpoint() const { return options_.endpoint; }

 private:
  RpcClient(zmq::context_t& context, Options options);
  Status CheckMonitor();

  Options options_;
  std::mutex mu_;
  zmq::socket_t socket_;   // GUARDED_BY(mu_)
  zmq::socket_t monitor_;  // GUARDED_BY(mu_)
  uint64_t next_id_ = 1;   // GUARDED_BY(mu_)
  bool refused_ = false;   // GUARDED_BY(mu_)
};

}  // namespace muster
