#include "common/rpc.h"

#include <dirent.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "common/local_rpc.h"
#include "common/logging.h"
#include "common/wire.h"

namespace muster {

namespace {
std::atomic<uint64_t> g_monitor_seq{0};

// Descriptors open in this process, or -1 when /proc says nothing.
int OpenFdCount() {
  DIR* d = opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  int n = 0;
  while (readdir(d) != nullptr) ++n;
  closedir(d);
  return n - 3;  // ".", ".." and the directory's own descriptor
}
}  // namespace

namespace {

// The error once `context` has had no room for a socket for `wait`.
Status NoRoomError(zmq::context_t& context, const std::string& what,
                   std::chrono::milliseconds wait) {
  struct rlimit rl {};
  getrlimit(RLIMIT_NOFILE, &rl);
  return UnavailableError(
      what + ": " + zmq_strerror(EMFILE) + " (this context holds at most " +
      std::to_string(context.get(zmq::ctxopt::max_sockets)) + " sockets, and " +
      std::to_string(OpenFdCount()) + " of this process's " + std::to_string(rl.rlim_cur) +
      " file descriptors are open; sockets closed earlier were not released within " +
      std::to_string(wait.count()) + " ms)");
}

// Calls `attempt` (which returns an errno: 0 on success) until it succeeds, fails with
// something other than EMFILE, or `wait` has passed.
template <typename F>
int RetryWhileFull(std::chrono::milliseconds wait, F attempt) {
  auto deadline = std::chrono::steady_clock::now() + wait;
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    int err = attempt();
    if (err != EMFILE || std::chrono::steady_clock::now() >= deadline) return err;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

}  // namespace

StatusOr<zmq::socket_t> OpenSocket(zmq::context_t& context, zmq::socket_type type,
                                   std::chrono::milliseconds wait) {
  zmq::socket_t socket;
  int err = RetryWhileFull(wait, [&] {
    try {
      socket = zmq::socket_t(context, type);
      return 0;
    } catch (const zmq::error_t& e) {
      return e.num();
    }
  });
  if (err == EMFILE) return NoRoomError(context, "cannot open a ZeroMQ socket", wait);
  if (err != 0) {
    return UnavailableError(std::string("cannot open a ZeroMQ socket: ") + zmq_strerror(err));
  }
  return socket;
}

Status MonitorSocket(zmq::context_t& context, zmq::socket_t& socket, const std::string& endpoint,
                     int events, std::chrono::milliseconds wait) {
  int err = RetryWhileFull(wait, [&] {
    return zmq_socket_monitor(socket.handle(), endpoint.c_str(), events) == 0 ? 0 : zmq_errno();
  });
  if (err == EMFILE) return NoRoomError(context, "cannot watch a ZeroMQ socket", wait);
  if (err != 0) return InternalError(std::string("zmq_socket_monitor: ") + zmq_strerror(err));
  return Status::Ok();
}

namespace {

// Field 1 (request_id) of an Envelope as a varint, the way protobuf writes it: the tag, then
// the value 7 bits a byte. 0 is not written (proto3's default).
size_t WriteRequestId(uint64_t id, uint8_t* out) {
  if (id == 0) return 0;
  size_t n = 0;
  out[n++] = 0x08;  // field 1, wire type 0 (varint)
  while (id >= 0x80) {
    out[n++] = static_cast<uint8_t>(id | 0x80);
    id >>= 7;
  }
  out[n++] = static_cast<uint8_t>(id);
  return n;
}

// `env` serialized straight into a message: no intermediate string.
zmq::message_t SerializeToMessage(const proto::Envelope& env) {
  zmq::message_t msg(env.ByteSizeLong());
  env.SerializeWithCachedSizesToArray(static_cast<uint8_t*>(msg.data()));
  return msg;
}

}  // namespace

SerializedReply::SerializedReply(const proto::Envelope& envelope) {
  if (envelope.request_id() == 0) {
    bytes_ = SerializeEnvelope(envelope);
  } else {
    proto::Envelope copy = envelope;
    copy.clear_request_id();
    bytes_ = SerializeEnvelope(copy);
  }
}

size_t SerializedReply::size(uint64_t id) const {
  uint8_t tail[11];
  return bytes_.size() + WriteRequestId(id, tail);
}

void SerializedReply::WriteTo(uint64_t id, char* out) const {
  std::memcpy(out, bytes_.data(), bytes_.size());
  WriteRequestId(id, reinterpret_cast<uint8_t*>(out) + bytes_.size());
}

// The server's socket, shared with Reply closures so a late reply after the server is gone is
// dropped instead of touching a closed socket. Reactor thread only.
struct RpcServer::Core {
  explicit Core(zmq::socket_t s) : socket(std::move(s)) {}
  zmq::socket_t socket;
  bool open = true;
  std::string name;

  void Send(const std::string& routing_id, const proto::Envelope& env) {
    if (!open) return;
    SendMessage(routing_id, SerializeToMessage(env), env.request_id());
  }
  void Send(const std::string& routing_id, const SerializedReply& reply, uint64_t id) {
    if (!open) return;
    zmq::message_t msg(reply.size(id));
    reply.WriteTo(id, static_cast<char*>(msg.data()));
    SendMessage(routing_id, std::move(msg), id);
  }
  void SendMessage(const std::string& routing_id, zmq::message_t body, uint64_t id) {
    try {
      // ROUTER_MANDATORY is off: a reply to a peer that has gone is silently dropped.
      socket.send(zmq::buffer(routing_id), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      socket.send(body, zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      log::Get("rpc")->warn("{}: reply {} dropped: {}", name, id, e.what());
    }
  }
};

// The Reply the server hands its handler: answers one request over the connection it came on,
// once (a second answer is a caller bug and is dropped), from any thread.
struct RpcServer::ServerReply {
  std::weak_ptr<Core> weak;
  Reactor* reactor = nullptr;
  std::string routing_id;
  uint64_t id = 0;
  std::shared_ptr<std::atomic<bool>> replied;

  void operator()(proto::Envelope out) const {
    if (replied->exchange(true)) return;
    out.set_request_id(id);
    if (reactor->InReactorThread()) {
      if (auto core = weak.lock()) core->Send(routing_id, out);
      return;
    }
    reactor->Post("rpc.reply", [weak = weak, routing_id = routing_id, out = std::move(out)] {
      if (auto core = weak.lock()) core->Send(routing_id, out);
    });
  }
  void Send(std::shared_ptr<const SerializedReply> serialized) const {
    if (replied->exchange(true)) return;
    if (reactor->InReactorThread()) {
      if (auto core = weak.lock()) core->Send(routing_id, *serialized, id);
      return;
    }
    reactor->Post("rpc.reply", [weak = weak, routing_id = routing_id, id = id,
                                serialized = std::move(serialized)] {
      if (auto core = weak.lock()) core->Send(routing_id, *serialized, id);
    });
  }
};

void RpcServer::ReplyWith(const Reply& reply, std::shared_ptr<const SerializedReply> serialized) {
  if (const ServerReply* own = reply.target<ServerReply>(); own != nullptr) {
    own->Send(std::move(serialized));
    return;
  }
  if (const LocalServerReply* local = reply.target<LocalServerReply>(); local != nullptr) {
    local->Send(std::move(serialized));
    return;
  }
  // Not one of ours: hand it the envelope, as if it had been called with it.
  auto env = ParseEnvelope(serialized->bytes().data(), serialized->bytes().size());
  if (env.ok()) {
    reply(std::move(*env));
  } else {
    reply(ErrorEnvelope(
        0, InternalError("rpc: a serialized reply does not parse: " + env.status().message())));
  }
}

RpcServer::RpcServer(Reactor& reactor, Options options, Handler handler)
    : reactor_(reactor), options_(std::move(options)), handler_(std::move(handler)) {}

StatusOr<std::unique_ptr<RpcServer>> RpcServer::Create(Reactor& reactor, Options options,
                                                       Handler handler) {
  std::unique_ptr<RpcServer> server(new RpcServer(reactor, std::move(options), std::move(handler)));
  const Options& o = server->options_;
  auto socket = OpenSocket(reactor.context(), zmq::socket_type::router);
  if (!socket.ok()) {
    return UnavailableError(o.name + ": cannot serve " + o.endpoint + ": " +
                            socket.status().message());
  }
  auto core = std::make_shared<Core>(std::move(*socket));
  core->name = o.name;
  try {
    zmq::socket_t& s = core->socket;
    s.set(zmq::sockopt::linger, 0);
    s.set(zmq::sockopt::maxmsgsize, o.max_message_bytes);
    s.set(zmq::sockopt::router_handover, 1);
    // Thousands of ranks connect at once at a rendezvous; with the default backlog (100) the
    // kernel drops their SYNs and each retries after a second.
    s.set(zmq::sockopt::backlog, 4096);
    if (o.insecure && o.endpoint.rfind("ipc://", 0) == 0) {
      // A Unix socket: who may open it is up to its directory's permissions.
      log::Get("rpc")->debug("{}: serving local socket {} without CURVE", o.name, o.endpoint);
    } else if (o.insecure) {
      log::Get("rpc")->warn(
          "{}: INSECURE: serving {} without CURVE; anyone who can reach it is trusted", o.name,
          o.endpoint);
    } else {
      if (!IsValidZ85Key(o.server_key.secret_key)) {
        return InvalidArgumentError(o.name + ": a CURVE server needs its secret key");
      }
      s.set(zmq::sockopt::curve_server, 1);
      s.set(zmq::sockopt::curve_secretkey, o.server_key.secret_key);
      // Without a ZAP handler libzmq would accept every client key: insist on ours.
      if (o.authenticator == nullptr) {
        return InvalidArgumentError(o.name + ": a CURVE server needs a ZapAuthenticator");
      }
      s.set(zmq::sockopt::zap_domain, o.zap_domain);
    }
    if (o.on_connection) {
      // Before the bind, so that no connection is accepted unseen.
      std::string mon = "inproc://muster-rpc-server-monitor-" + std::to_string(g_monitor_seq++);
      if (zmq_socket_monitor(s.handle(), mon.c_str(),
                             ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) != 0) {
        return InternalError(std::string("zmq_socket_monitor: ") + zmq_strerror(zmq_errno()));
      }
      server->monitor_ = std::make_unique<zmq::socket_t>(reactor.context(), zmq::socket_type::pair);
      server->monitor_->set(zmq::sockopt::linger, 0);
      server->monitor_->connect(mon);
    }
    s.bind(o.endpoint);
    server->endpoint_ = s.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return UnavailableError(o.name + ": cannot serve " + o.endpoint + ": " + e.what());
  }
  if (!o.insecure && server->options_.server_key.public_key.empty()) {
    MUSTER_ASSIGN_OR_RETURN(server->options_.server_key.public_key,
                            PublicKeyFromSecret(o.server_key.secret_key));
  }
  server->core_ = std::move(core);
  RpcServer* raw = server.get();
  reactor.AddSocket(server->core_->socket, o.name + ".recv", [raw] { raw->OnReadable(); });
  if (server->monitor_) {
    reactor.AddSocket(*server->monitor_, o.name + ".monitor", [raw] { raw->DrainMonitor(); });
  }
  return server;
}

RpcServer::~RpcServer() {
  if (!core_) return;
  core_->open = false;
  // Before the reactor runs (or once it stopped) no loop holds the sockets: unregister them
  // too, or the reactor keeps a pointer to a closed socket.
  const bool own = reactor_.InReactorThread() || !reactor_.running();
  if (monitor_) {
    if (own) reactor_.RemoveSocket(*monitor_);
    zmq_socket_monitor(core_->socket.handle(), nullptr, 0);
    monitor_->close();
  }
  if (own) reactor_.RemoveSocket(core_->socket);
  core_->socket.close();
}

void RpcServer::DrainMonitor() {
  if (!monitor_) return;
  for (;;) {
    zmq::message_t event, addr;
    try {
      if (!monitor_->recv(event, zmq::recv_flags::dontwait)) return;
      if (event.more()) (void)monitor_->recv(addr, zmq::recv_flags::dontwait);
    } catch (const zmq::error_t& e) {
      log::Get("rpc")->error("{}: monitor: {}", options_.name, e.what());
      return;
    }
    if (event.size() < 6) continue;
    uint16_t id;
    uint32_t value;
    std::memcpy(&id, event.data(), sizeof(id));
    std::memcpy(&value, static_cast<const char*>(event.data()) + 2, sizeof(value));
    ConnectionEvent e;
    e.fd = static_cast<int>(value);
    if (id == ZMQ_EVENT_ACCEPTED) {
      e.kind = ConnectionEvent::Kind::kAccepted;
    } else if (id == ZMQ_EVENT_DISCONNECTED) {
      e.kind = ConnectionEvent::Kind::kClosed;
    } else {
      continue;
    }
    options_.on_connection(e);
  }
}

void RpcServer::OnReadable() {
  auto logger = log::Get("rpc");
  // Drain what is there, bounded so that one busy socket cannot starve the rest of the loop.
  for (int i = 0; i < 1024; ++i) {
    std::vector<zmq::message_t> frames;
    std::optional<size_t> got;
    try {
      got =
          zmq::recv_multipart(core_->socket, std::back_inserter(frames), zmq::recv_flags::dontwait);
    } catch (const zmq::error_t& e) {
      logger->error("{}: recv: {}", options_.name, e.what());
      return;
    }
    if (!got) return;
    std::string routing_id(frames[0].to_string_view());
    if (frames.size() != 2) {
      logger->warn("{}: dropped a request of {} frames (want 1)", options_.name, frames.size() - 1);
      core_->Send(
          routing_id,
          ErrorEnvelope(0, InvalidArgumentError("malformed request: expected one frame, got " +
                                                std::to_string(frames.size() - 1))));
      continue;
    }
    // Connection events first (see Options::on_connection): the monitor emits a connection's
    // kAccepted before its requests can be queued, and an fd's kClosed before the fd is reused.
    DrainMonitor();
    PeerInfo peer;
    peer.routing_id = routing_id;
    peer.fd = zmq_msg_get(frames[1].handle(), ZMQ_SRCFD);
    // gets() throws EINVAL for a property the connection lacks (no ZAP ran: insecure).
    auto property = [&](const char* name) -> std::string {
      const char* v = zmq_msg_gets(frames[1].handle(), name);
      return v ? v : "";
    };
    peer.user_id = property("User-Id");
    if (peer.user_id.empty()) peer.user_id = "anonymous";
    peer.address = property("Peer-Address");
    if (options_.insecure) {
      peer.role = KeyRole::kLegacy;
    } else {
      // Checked per message, not only at the handshake: a key revoked since the connection
      // was opened is refused here.
      peer.public_key = property(kPublicKeyProperty);
      auto key = peer.public_key.empty()
                     ? std::nullopt
                     : options_.authenticator->Lookup(options_.zap_domain, peer.public_key);
      if (!key) {
        logger->warn("{}: refused a message from {} ({}, key {}): key no longer authorized",
                     options_.name, peer.address, peer.user_id, peer.public_key);
        core_->Send(routing_id,
                    ErrorEnvelope(
                        0, FailedPreconditionError(
                               "permission denied: key '" + peer.user_id + "' (" + peer.public_key +
                               ") is no longer authorized by " + options_.name)));
        continue;
      }
      peer.user_id = key->name;
      peer.role = key->role;
    }
    auto env = ParseEnvelope(frames[1].data(), frames[1].size());
    if (!env.ok()) {
      logger->warn("{}: from {} ({}): {}", options_.name, peer.address, peer.user_id,
                   env.status().message());
      core_->Send(routing_id, ErrorEnvelope(0, env.status()));
      continue;
    }
    Reply reply = ServerReply{core_, &reactor_, routing_id, env->request_id(),
                              std::make_shared<std::atomic<bool>>(false)};
    // A slow request is named: the reactor's own warning names only this whole drain.
    const auto* field = proto::Envelope::descriptor()->FindFieldByNumber(env->payload_case());
    std::string kind = field ? field->name() : "empty";
    auto start = std::chrono::steady_clock::now();
    handler_(peer, std::move(*env), std::move(reply));
    auto took = std::chrono::steady_clock::now() - start;
    if (took > std::chrono::milliseconds(100)) {
      logger->warn("{}: request {} from {} ({}) took {} ms", options_.name, kind, peer.address,
                   peer.user_id,
                   std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
    }
  }
}

// --- RpcClient -------------------------------------------------------------------------------

RpcClient::RpcClient(zmq::context_t& context, Options options)
    : options_(std::move(options)),
      socket_(context, zmq::socket_type::dealer),
      monitor_(context, zmq::socket_type::pair) {}

StatusOr<std::unique_ptr<RpcClient>> RpcClient::Connect(zmq::context_t& context, Options options) {
  std::unique_ptr<RpcClient> c(new RpcClient(context, std::move(options)));
  const Options& o = c->options_;
  try {
    c->socket_.set(zmq::sockopt::linger, 0);
    c->socket_.set(zmq::sockopt::maxmsgsize, o.max_message_bytes);
    if (!o.insecure) {
      if (!IsValidZ85Key(o.server_public_key)) {
        return InvalidArgumentError("client for " + o.endpoint +
                                    ": the server's public key is missing or malformed");
      }
      if (!IsValidZ85Key(o.client_key.secret_key) || !IsValidZ85Key(o.client_key.public_key)) {
        return InvalidArgumentError("client for " + o.endpoint +
                                    ": a CURVE client needs its own key pair");
      }
      c->socket_.set(zmq::sockopt::curve_serverkey, o.server_public_key);
      c->socket_.set(zmq::sockopt::curve_publickey, o.client_key.public_key);
      c->socket_.set(zmq::sockopt::curve_secretkey, o.client_key.secret_key);
    }
    std::string mon = "inproc://muster-rpc-monitor-" + std::to_string(g_monitor_seq++);
    if (zmq_socket_monitor(c->socket_.handle(), mon.c_str(),
                           ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) !=
        0) {
      return InternalError(std::string("zmq_socket_monitor: ") + zmq_strerror(zmq_errno()));
    }
    c->monitor_.set(zmq::sockopt::linger, 0);
    c->monitor_.connect(mon);
    c->socket_.connect(o.endpoint);
  } catch (const zmq::error_t& e) {
    return InvalidArgumentError("cannot connect to " + o.endpoint + ": " + e.what());
  }
  return c;
}

RpcClient::~RpcClient() { zmq_socket_monitor(socket_.handle(), nullptr, 0); }

Status RpcClient::CheckMonitor() {
  for (;;) {
    zmq::message_t event, addr;
    if (!monitor_.recv(event, zmq::recv_flags::dontwait)) return Status::Ok();
    if (event.more()) (void)monitor_.recv(addr, zmq::recv_flags::dontwait);
    if (event.size() < 6) continue;
    uint16_t id;
    std::memcpy(&id, event.data(), sizeof(id));
    if (id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
      refused_ = true;
      return UnavailableError("server " + options_.endpoint +
                              " refused this client's key (not in its authorized list)");
    }
    if (id == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
      return UnavailableError("handshake with " + options_.endpoint +
                              " failed: wrong server key, or the server is not CURVE");
    }
  }
}

StatusOr<size_t> StampRequest(proto::Envelope& request, uint64_t id,
                              std::chrono::milliseconds timeout, int64_t max_message_bytes) {
  request.set_request_id(id);
  if (request.deadline_ms() == 0) request.set_deadline_ms(timeout.count());
  const size_t size = request.ByteSizeLong();
  if (size > static_cast<size_t>(max_message_bytes)) {
    return InvalidArgumentError("request of " + std::to_string(size) +
                                " bytes exceeds the message limit of " +
                                std::to_string(max_message_bytes));
  }
  return size;
}

StatusOr<proto::Envelope> RpcClient::Call(proto::Envelope request,
                                          std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  uint64_t id = next_id_++;
  MUSTER_ASSIGN_OR_RETURN(const size_t size,
                          StampRequest(request, id, timeout, options_.max_message_bytes));
  try {
    MUSTER_RETURN_IF_ERROR(CheckMonitor());
    // Serialized straight into the message (sizes cached by ByteSizeLong above).
    zmq::message_t msg(size);
    request.SerializeWithCachedSizesToArray(static_cast<uint8_t*>(msg.data()));
    if (!socket_.send(msg, zmq::send_flags::dontwait)) {
      return UnavailableError("cannot queue a request to " + options_.endpoint);
    }
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() < 0) left = std::chrono::milliseconds(0);
      zmq::pollitem_t items[] = {{socket_.handle(), 0, ZMQ_POLLIN, 0},
                                 {monitor_.handle(), 0, ZMQ_POLLIN, 0}};
      zmq::poll(items, 2, left);
      if (items[1].revents & ZMQ_POLLIN) MUSTER_RETURN_IF_ERROR(CheckMonitor());
      if (items[0].revents & ZMQ_POLLIN) {
        zmq::message_t msg;
        if (!socket_.recv(msg, zmq::recv_flags::dontwait)) continue;
        while (msg.more()) {  // a well-behaved server sends one frame; skip any extra
          zmq::message_t extra;
          (void)socket_.recv(extra, zmq::recv_flags::dontwait);
          msg.rebuild(0);
          if (!extra.more()) break;
        }
        auto reply = ParseEnvelope(msg.data(), msg.size());
        if (!reply.ok()) {
          return InternalError("unreadable reply from " + options_.endpoint + ": " +
                               reply.status().message());
        }
        // request_id 0: the server could not read our request at all.
        if (reply->request_id() != id && reply->request_id() != 0) continue;  // stale
        if (reply->has_error()) return ErrorToStatus(reply->error());
        return std::move(reply).value();
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return DeadlineExceededError("no reply from " + options_.endpoint + " within " +
                                     std::to_string(timeout.count()) + " ms");
      }
    }
  } catch (const zmq::error_t& e) {
    return UnavailableError("call to " + options_.endpoint + ": " + e.what());
  }
}

}  // namespace muster
