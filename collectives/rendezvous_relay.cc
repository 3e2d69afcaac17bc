#include "collectives/rendezvous_relay.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <optional>
#include <string_view>

#include "collectives/rendezvous_codec.h"
#include "common/logging.h"
#include "common/wire.h"

namespace muster::collectives {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

namespace {

// Unix socket addresses hold 107 bytes and a NUL.
constexpr size_t kMaxSocketPath = 107;
constexpr milliseconds kMaxTimeout = std::chrono::hours(24);
std::atomic<uint64_t> g_monitor_seq{0};
// Connections the store closes in a row before any handshake completes, before the relay calls
// its key wrong (one may be the store going away mid-handshake).
constexpr int kClosedInHandshake = 3;
// The name of a relay's private directory: this prefix and mkdtemp's six characters.
constexpr std::string_view kDirPrefix = "muster-rdzv-";

milliseconds ClampTimeout(int64_t ms) {
  return std::min(milliseconds(std::max<int64_t>(ms, 0)), kMaxTimeout);
}

// The pid in a local connection's peer address: "unix:uid:gid:pid" (LocalRpcServer, from
// SO_PEERCRED).
std::optional<pid_t> PeerPid(const std::string& address) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 >= address.size()) return std::nullopt;
  pid_t pid = 0;
  const char* b = address.data() + colon + 1;
  const char* e = address.data() + address.size();
  auto [end, ec] = std::from_chars(b, e, pid);
  if (ec != std::errc() || end != e || pid <= 0) return std::nullopt;
  return pid;
}

}  // namespace

RendezvousRelay::RendezvousRelay(Reactor& reactor, Options options)
    : reactor_(reactor), options_(std::move(options)) {}

StatusOr<std::unique_ptr<RendezvousRelay>> RendezvousRelay::Create(Reactor& reactor,
                                                                   Options options) {
  if (options.job.empty()) return InvalidArgumentError("rendezvous relay: no job id");
  if (options.upstream_endpoint.empty()) {
    return InvalidArgumentError("rendezvous relay: no store endpoint");
  }
  if (options.socket_parent.empty()) {
    return InvalidArgumentError("rendezvous relay: no directory for its socket");
  }
  std::unique_ptr<RendezvousRelay> r(new RendezvousRelay(reactor, std::move(options)));
  MUSTER_RETURN_IF_ERROR(r->Start());
  return r;
}

Status RendezvousRelay::Start() {
  std::error_code ec;
  fs::create_directories(options_.socket_parent, ec);
  if (ec) {
    return UnavailableError("rendezvous relay: cannot create " + options_.socket_parent.string() +
                            ": " + ec.message());
  }
  std::string templ = (options_.socket_parent / (std::string(kDirPrefix) + "XXXXXX")).string();
  if (templ.size() + 2 > kMaxSocketPath) {
    return InvalidArgumentError("rendezvous relay: the socket path under " +
                                options_.socket_parent.string() + " would be " +
                                std::to_string(templ.size() + 2) + " bytes; at most " +
                                std::to_string(kMaxSocketPath) + " fit a Unix socket address");
  }
  // mkdtemp makes the directory with mode 0700: only the agent's user can reach the socket.
  if (::mkdtemp(templ.data()) == nullptr) {
    return UnavailableError("rendezvous relay: mkdtemp " + templ + ": " + std::strerror(errno));
  }
  dir_ = templ;
  // Held until the relay closes (the kernel drops it when the process dies): a sweep of stale
  // directories (SweepStaleRelayDirs) leaves this one alone.
  dir_lock_ = ::open(templ.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dir_lock_ < 0 || ::flock(dir_lock_, LOCK_EX | LOCK_NB) != 0) {
    return UnavailableError("rendezvous relay: cannot lock its directory " + templ + ": " +
                            std::strerror(errno));
  }
  LocalRpcServer::Options lo;
  lo.name = "rdzv-relay";
  lo.path = (dir_ / "s").string();
  lo.max_message_bytes = options_.max_message_bytes;
  MUSTER_ASSIGN_OR_RETURN(
      local_, LocalRpcServer::Create(
                  reactor_, lo,
                  [this](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
                    HandleLocal(peer, std::move(req), std::move(reply));
                  }));
  endpoint_ = local_->endpoint();
  auto upstream = OpenSocket(reactor_.context(), zmq::socket_type::dealer);
  if (!upstream.ok()) {
    return UnavailableError("rendezvous relay: no socket for the store at " +
                            options_.upstream_endpoint + ": " + upstream.status().message());
  }
  upstream_ = std::move(*upstream);
  try {
    upstream_.set(zmq::sockopt::linger, 0);
    upstream_.set(zmq::sockopt::maxmsgsize, options_.max_message_bytes);
    const RdzvCredentials& c = options_.credentials;
    if (!c.insecure) {
      if (!IsValidZ85Key(c.server_public_key) || !IsValidZ85Key(c.client_key.secret_key)) {
        return InvalidArgumentError("rendezvous relay: malformed store credentials");
      }
      upstream_.set(zmq::sockopt::curve_serverkey, c.server_public_key);
      upstream_.set(zmq::sockopt::curve_publickey, c.client_key.public_key);
      upstream_.set(zmq::sockopt::curve_secretkey, c.client_key.secret_key);
    }
    // Before the connect, so that no handshake goes unseen.
    std::string mon = "inproc://muster-rdzv-relay-monitor-" + std::to_string(g_monitor_seq++);
    Status watched =
        MonitorSocket(reactor_.context(), upstream_, mon,
                      ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                          ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED);
    if (!watched.ok()) {
      return UnavailableError("rendezvous relay: cannot watch the store's handshakes: " +
                              watched.message());
    }
    auto monitor = OpenSocket(reactor_.context(), zmq::socket_type::pair);
    if (!monitor.ok()) {
      zmq_socket_monitor(upstream_.handle(), nullptr, 0);
      return UnavailableError("rendezvous relay: no socket to watch the store's handshakes: " +
                              monitor.status().message());
    }
    monitor_ = std::move(*monitor);
    monitor_.set(zmq::sockopt::linger, 0);
    monitor_.connect(mon);
    upstream_.connect(options_.upstream_endpoint);
  } catch (const zmq::error_t& e) {
    return UnavailableError("rendezvous relay: cannot connect to the store at " +
                            options_.upstream_endpoint + ": " + e.what());
  }
  reactor_.AddSocket(upstream_, "rdzv-relay.upstream", [this] { OnUpstreamReadable(); });
  upstream_added_ = true;
  // Watched by its ZMQ_FD, as a plain descriptor: the reactor asks every ZeroMQ socket it
  // holds for its events after each pass that ran anything (each time through the socket's
  // command mailbox), and this one has events a handful of times in its life. Its descriptor
  // becomes readable when commands reach the socket, and OnMonitor drains it until EAGAIN, which
  // processes them: no event waits unseen.
  try {
    monitor_fd_ = monitor_.get(zmq::sockopt::fd);
  } catch (const zmq::error_t& e) {
    return UnavailableError(std::string("rendezvous relay: the monitor's descriptor: ") + e.what());
  }
  reactor_.AddFd(monitor_fd_, "rdzv-relay.monitor", [this] { OnMonitor(); });
  monitor_added_ = true;
  // Once on the loop, whatever the descriptor says: drains anything already there, so that
  // from then on the descriptor alone tells when events come.
  std::weak_ptr<int> life = life_;
  reactor_.Post("rdzv-relay.monitor", [this, life] {
    if (life.lock()) OnMonitor();
  });
  log::Get("coll.relay")
      ->debug("rendezvous relay for {}/{} serving {} ({} local ranks), store {}", options_.job,
              options_.attempt, endpoint_, options_.local_ranks.size(), options_.upstream_endpoint);
  return Status::Ok();
}

RendezvousRelay::~RendezvousRelay() {
  Abort("rendezvous relay for " + options_.job + "/" + std::to_string(options_.attempt) +
        " closed (the attempt ended on this node)");
  const bool own = reactor_.InReactorThread() || !reactor_.running();
  if (upstream_added_ && own) reactor_.RemoveSocket(upstream_);
  if (monitor_added_ && own) reactor_.RemoveFd(monitor_fd_);
  if (monitor_) {
    zmq_socket_monitor(upstream_.handle(), nullptr, 0);
    monitor_.close();
  }
  if (upstream_) upstream_.close();
  local_.reset();
  if (!dir_.empty()) {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  if (dir_lock_ >= 0) ::close(dir_lock_);
}

void RendezvousRelay::Abort(const std::string& why) {
  Status aborted = AbortedError(why);
  // Joins first: the callbacks of their requests upstream (failed below) then find none to
  // send again.
  std::map<std::string, Join> joins = std::move(joins_);
  joins_.clear();
  for (auto& [key, j] : joins) {
    if (j.timer != 0) reactor_.CancelTimer(j.timer);
    held_callers_ -= j.next.size();
    for (auto& c : j.next) c.reply(ErrorEnvelope(0, aborted));
  }
  std::map<std::string, Batch> batches = std::move(batches_);
  batches_.clear();
  for (auto& [key, b] : batches) {
    if (b.timer != 0) reactor_.CancelTimer(b.timer);
    held_callers_ -= b.callers.size();
    for (auto& c : b.callers) c.reply(ErrorEnvelope(0, aborted));
  }
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, p] : pending) {
    if (p.timer != 0) reactor_.CancelTimer(p.timer);
    p.done(aborted);
  }
  gather_ranks_.clear();
}

void RendezvousRelay::HandleLocal(const PeerInfo& peer, proto::Envelope&& request,
                                  RpcServer::Reply reply) {
  ++stats_.local_requests;
  auto fail = [&](const Status& s) { reply(ErrorEnvelope(request.request_id(), s)); };
  if (options_.admit) {
    auto pid = PeerPid(peer.address);
    Status ok = pid ? options_.admit(*pid)
                    : FailedPreconditionError("the kernel did not say which process it is");
    if (!ok.ok()) {
      log::Get("coll.relay")
          ->warn("rendezvous relay {}: refused a request from {}: {}", endpoint_, peer.address,
                 ok.message());
      return fail(FailedPreconditionError(
          "rendezvous relay: this socket serves the ranks of " + options_.job + " attempt " +
          std::to_string(options_.attempt) + " only; refused process " +
          (pid ? std::to_string(*pid) : "'" + peer.address + "'") + ": " + ok.message()));
    }
  }
  if (!request.has_store_request()) {
    return fail(InvalidArgumentError("rendezvous relay: expected a StoreRequest"));
  }
  proto::StoreRequest& req = *request.mutable_store_request();
  if (req.scope().job() != options_.job || req.scope().attempt() != options_.attempt) {
    std::string named =
        req.scope().job().substr(0, 128) + "/" + std::to_string(req.scope().attempt());
    return fail(FailedPreconditionError("rendezvous relay: this socket serves scope '" +
                                        options_.job + "/" + std::to_string(options_.attempt) +
                                        "', not '" + named + "'"));
  }
  if (held_callers_ >= options_.max_held_requests) {
    return fail(FailedPreconditionError(
        "rendezvous relay for " + options_.job + "/" + std::to_string(options_.attempt) +
        " holds " + std::to_string(held_callers_) + " requests already; the limit is " +
        std::to_string(options_.max_held_requests)));
  }
  auto through = [this, reply](StatusOr<proto::StoreReply> r) {
    --held_callers_;
    if (!r.ok()) return reply(ErrorEnvelope(0, r.status()));
    proto::Envelope e;
    *e.mutable_store_reply() = std::move(*r);
    reply(std::move(e));
  };
  switch (req.op_case()) {
    case proto::StoreRequest::kSet:
    case proto::StoreRequest::kAdd:
    case proto::StoreRequest::kCompareSet:
      ++held_callers_;
      return Forward(std::move(req), options_.op_timeout, std::move(through));
    case proto::StoreRequest::kGet:
      return AddToJoin(/*get=*/true, req, std::move(reply));
    case proto::StoreRequest::kWait:
      return AddToJoin(/*get=*/false, req, std::move(reply));
    case proto::StoreRequest::kBarrier:
      return AddToBatch(/*gather=*/false, req, std::move(reply));
    case proto::StoreRequest::kGather:
      return AddToBatch(/*gather=*/true, req, std::move(reply));
    case proto::StoreRequest::OP_NOT_SET:
      break;
  }
  fail(InvalidArgumentError("rendezvous relay: request has no operation"));
}

void RendezvousRelay::Forward(proto::StoreRequest request, milliseconds timeout, Upstream done) {
  if (refused_) return done(*refused_);
  uint64_t id = next_id_++;
  proto::Envelope env;
  env.set_request_id(id);
  env.set_deadline_ms(timeout.count());
  *env.mutable_store_request() = std::move(request);
  const size_t size = env.ByteSizeLong();
  if (size > static_cast<size_t>(options_.max_message_bytes)) {
    return done(InvalidArgumentError("rendezvous relay: a request of " + std::to_string(size) +
                                     " bytes exceeds the message limit of " +
                                     std::to_string(options_.max_message_bytes)));
  }
  bool sent = false;
  try {
    // Serialized straight into the message (sizes cached by ByteSizeLong above).
    zmq::message_t msg(size);
    env.SerializeWithCachedSizesToArray(static_cast<uint8_t*>(msg.data()));
    sent = upstream_.send(msg, zmq::send_flags::dontwait).has_value();
  } catch (const zmq::error_t& e) {
    log::Get("coll.relay")->warn("rendezvous relay: send to the store: {}", e.what());
  }
  if (!sent) {
    return done(UnavailableError("rendezvous relay: cannot queue a request to the store at " +
                                 options_.upstream_endpoint));
  }
  ++stats_.upstream_requests;
  Pending& p = pending_[id];
  p.done = std::move(done);
  std::weak_ptr<int> life = life_;
  p.timer = reactor_.PostAfter(timeout, "rdzv-relay.timeout", [this, life, id, timeout] {
    if (!life.lock()) return;
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    Upstream cb = std::move(it->second.done);
    pending_.erase(it);
    cb(DeadlineExceededError("rendezvous relay: the store at " + options_.upstream_endpoint +
                             " did not answer within " + std::to_string(timeout.count()) + " ms"));
  });
}

void RendezvousRelay::OnUpstreamReadable() {
  for (int i = 0; i < 1024; ++i) {
    zmq::message_t msg;
    try {
      if (!upstream_.recv(msg, zmq::recv_flags::dontwait)) return;
    } catch (const zmq::error_t& e) {
      log::Get("coll.relay")->error("rendezvous relay: recv from the store: {}", e.what());
      return;
    }
    auto env = ParseEnvelope(msg.data(), msg.size());
    if (!env.ok()) {
      log::Get("coll.relay")->warn("rendezvous relay: the store sent {}", env.status().message());
      continue;
    }
    auto it = pending_.find(env->request_id());
    if (it == pending_.end()) continue;  // answered already (timed out here)
    Pending p = std::move(it->second);
    pending_.erase(it);
    if (p.timer != 0) reactor_.CancelTimer(p.timer);
    if (env->has_error()) {
      p.done(ErrorToStatus(env->error()));
    } else if (env->has_store_reply()) {
      p.done(std::move(*env->mutable_store_reply()));
    } else {
      p.done(InternalError("rendezvous relay: the store at " + options_.upstream_endpoint +
                           " answered with something other than a StoreReply"));
    }
  }
}

void RendezvousRelay::OnMonitor() {
  for (;;) {
    zmq::message_t event, addr;
    try {
      if (!monitor_.recv(event, zmq::recv_flags::dontwait)) return;
      if (event.more()) (void)monitor_.recv(addr, zmq::recv_flags::dontwait);
    } catch (const zmq::error_t& e) {
      log::Get("coll.relay")->error("rendezvous relay: monitor: {}", e.what());
      return;
    }
    if (event.size() < 6) continue;
    uint16_t id;
    uint32_t value;
    std::memcpy(&id, event.data(), sizeof(id));
    std::memcpy(&value, static_cast<const char*>(event.data()) + 2, sizeof(value));
    const std::string scope = options_.job + "/" + std::to_string(options_.attempt);
    if (id == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
      if (refused_) {
        log::Get("coll.relay")
            ->info("rendezvous relay {}: the store at {} accepted its key now", scope,
                   options_.upstream_endpoint);
      }
      refused_.reset();
      handshake_ok_ = true;
      closed_in_handshake_ = 0;
      ++stats_.upstream_handshakes;
      if (options_.on_upstream_ready) options_.on_upstream_ready();
      continue;
    }
    if (id == ZMQ_EVENT_DISCONNECTED) {
      // A CURVE server that cannot open the client's HELLO (it was sealed for another server
      // key) just closes the connection: the client gets no handshake event, only this.
      if (handshake_ok_) {
        handshake_ok_ = false;
        continue;
      }
      if (options_.credentials.insecure || ++closed_in_handshake_ < kClosedInHandshake) continue;
      refused_ = UnavailableError(
          "rendezvous relay for " + scope + ": the store at " + options_.upstream_endpoint +
          " closed the connection " + std::to_string(closed_in_handshake_) +
          " times in a row during the CURVE handshake: the attempt's credentials most likely "
          "carry a wrong store public key");
    } else if (id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
      refused_ = UnavailableError(
          "rendezvous relay for " + scope + ": the store at " + options_.upstream_endpoint +
          " refused this node's key (ZAP status " + std::to_string(value) +
          "): it is not the attempt's store key there, or the attempt is over on the store");
    } else if (id == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
      refused_ =
          UnavailableError("rendezvous relay for " + scope +
                           ": the CURVE handshake with the store at " + options_.upstream_endpoint +
                           " failed: a wrong store public key in the attempt's "
                           "credentials, or the store does not speak CURVE");
    } else {
      continue;
    }
    log::Get("coll.relay")->error("{}", refused_->message());
    // What waits upstream would only time out: fail it now, with the cause.
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& [rid, p] : pending) {
      if (p.timer != 0) reactor_.CancelTimer(p.timer);
      p.done(*refused_);
    }
  }
}

void RendezvousRelay::AddToJoin(bool get, proto::StoreRequest& req, RpcServer::Reply reply) {
  auto& keys = get ? *req.mutable_get()->mutable_keys() : *req.mutable_wait()->mutable_keys();
  const int64_t timeout_ms = get ? req.get().timeout_ms() : req.wait().timeout_ms();
  // The keys, each with its length: no two different lists share a name.
  std::string key = get ? "g" : "w";
  for (const auto& k : keys) key += std::to_string(k.size()) + ":" + k;
  auto [it, inserted] = joins_.try_emplace(key);
  Join& j = it->second;
  if (inserted) {
    j.get = get;
    j.keys.assign(std::make_move_iterator(keys.begin()), std::make_move_iterator(keys.end()));
  }
  const milliseconds timeout = ClampTimeout(timeout_ms);
  j.next.push_back({std::move(reply), Clock::now() + timeout, timeout.count()});
  ++held_callers_;
  if (j.in_flight == 0) return SendJoin(key);
  // One is upstream: this caller goes with the next, when that one returns, or at the
  // earliest deadline among those waiting, whichever is first (the timer holds the earliest
  // of those before this one).
  const Clock::time_point first = j.next.back().deadline;
  if (j.timer != 0 && j.timer_at <= first) return;
  if (j.timer != 0) reactor_.CancelTimer(j.timer);
  j.timer_at = first;
  std::weak_ptr<int> life = life_;
  j.timer = reactor_.PostAt(first, "rdzv-relay.join", [this, life, key] {
    if (!life.lock()) return;
    auto found = joins_.find(key);
    if (found == joins_.end()) return;
    found->second.timer = 0;
    SendJoin(key);
  });
}

RendezvousRelay::Joined RendezvousRelay::joined() const {
  Joined out;
  for (const auto& [key, j] : joins_) {
    out.callers += j.next.size() + j.upstream_callers;
    out.requests += static_cast<size_t>(j.in_flight);
  }
  return out;
}

void RendezvousRelay::SendJoin(const std::string& key) {
  auto it = joins_.find(key);
  if (it == joins_.end()) return;
  Join& j = it->second;
  if (j.timer != 0) reactor_.CancelTimer(j.timer);
  j.timer = 0;
  if (j.next.empty()) {
    if (j.in_flight == 0) joins_.erase(it);
    return;
  }
  auto callers = std::make_shared<std::vector<JoinCaller>>(std::move(j.next));
  j.next.clear();
  auto now = Clock::now();
  Clock::time_point first = callers->front().deadline;
  for (const auto& c : *callers) first = std::min(first, c.deadline);
  // As a batch's: the earliest caller's timeout, rounded up (the store never answers anyone
  // DeadlineExceeded before their own deadline); those with time left when it does go again.
  auto timeout = std::max(milliseconds(0), std::chrono::ceil<milliseconds>(first - now));
  proto::StoreRequest req;
  req.mutable_scope()->set_job(options_.job);
  req.mutable_scope()->set_attempt(options_.attempt);
  auto* keys = j.get ? req.mutable_get()->mutable_keys() : req.mutable_wait()->mutable_keys();
  for (const auto& k : j.keys) *keys->Add() = k;
  if (j.get) {
    req.mutable_get()->set_timeout_ms(timeout.count());
  } else {
    req.mutable_wait()->set_timeout_ms(timeout.count());
  }
  ++j.in_flight;
  j.upstream_callers += callers->size();
  // `j` may be gone once Forward returns (it can answer at once).
  Forward(std::move(req), timeout + options_.rpc_slack,
          [this, key, callers](StatusOr<proto::StoreReply> r) {
            auto found = joins_.find(key);
            if (found != joins_.end()) {
              --found->second.in_flight;
              found->second.upstream_callers -= callers->size();
            }
            if (r.ok()) {
              proto::Envelope e;
              *e.mutable_store_reply() = std::move(*r);
              auto bytes = std::make_shared<const SerializedReply>(e);
              held_callers_ -= callers->size();
              for (auto& c : *callers) RpcServer::ReplyWith(c.reply, bytes);
            } else {
              auto now = Clock::now();
              for (auto& c : *callers) {
                if (found != joins_.end() && r.status().code() == StatusCode::kDeadlineExceeded &&
                    c.deadline > now + milliseconds(1)) {
                  found->second.next.push_back(std::move(c));
                  continue;
                }
                Status s = r.status();
                // The store's words name the request's timeout, which for a caller that went
                // up at its deadline behind another is what it had left: name its own.
                constexpr std::string_view kWithin = " not set within ";
                if (s.code() == StatusCode::kDeadlineExceeded) {
                  if (size_t at = s.message().find(kWithin); at != std::string::npos) {
                    s = DeadlineExceededError(s.message().substr(0, at + kWithin.size()) +
                                              std::to_string(c.timeout_ms) + " ms");
                  }
                }
                --held_callers_;
                c.reply(ErrorEnvelope(0, s));
              }
            }
            if (found != joins_.end()) SendJoin(key);
          });
}

void RendezvousRelay::AddToBatch(bool gather, proto::StoreRequest& req, RpcServer::Reply reply) {
  auto fail = [&](const Status& s) { reply(ErrorEnvelope(0, s)); };
  Caller caller;
  std::string name;
  int n = 0;
  int64_t timeout_ms = 0;
  if (gather) {
    auto& g = *req.mutable_gather();
    name = g.name();
    n = g.n();
    timeout_ms = g.timeout_ms();
    // Checked here, with the store's words: a batch fails as a whole upstream, and one rank's
    // bad call must not fail its neighbours'.
    if (g.batch_size() > 0) {
      return fail(InvalidArgumentError("rendezvous relay: gather '" + name +
                                       "': a batch of entries comes from relays, not ranks"));
    }
    if (n <= 0 || n > kMaxGatherRanks) {
      return fail(InvalidArgumentError("rendezvous gather '" + name + "': n=" + std::to_string(n) +
                                       " is not in 1.." + std::to_string(kMaxGatherRanks)));
    }
    if (g.rank() < 0 || g.rank() >= n) {
      return fail(InvalidArgumentError("rendezvous gather '" + name + "': rank " +
                                       std::to_string(g.rank()) + " is not in 0.." +
                                       std::to_string(n - 1)));
    }
    auto& seen = gather_ranks_[name];
    if (seen.count(g.rank())) {
      return fail(InvalidArgumentError("rendezvous gather '" + name + "': rank " +
                                       std::to_string(g.rank()) + " has already contributed"));
    }
    seen[g.rank()] = n;
    caller.rank = g.rank();
    caller.value = std::move(*g.mutable_value());
  } else {
    const auto& b = req.barrier();
    name = b.name();
    n = b.n();
    timeout_ms = b.timeout_ms();
    if (b.arrivals() != 0) {
      return fail(InvalidArgumentError("rendezvous relay: barrier '" + name +
                                       "': arrivals for several callers come from relays, "
                                       "not ranks"));
    }
    if (n <= 0) {
      return fail(InvalidArgumentError("rendezvous barrier '" + name + "': n must be positive"));
    }
  }
  caller.reply = std::move(reply);
  caller.deadline = Clock::now() + ClampTimeout(timeout_ms);
  std::string key = std::string(gather ? "g" : "b") + std::to_string(n) + "|" + name;
  auto [it, inserted] = batches_.try_emplace(key);
  Batch& batch = it->second;
  if (inserted) {
    batch.gather = gather;
    batch.name = name;
    batch.n = n;
    batch.flush_at = Clock::now() + options_.batch_window;
  }
  // The batch leaves when complete, after the window, or at its earliest caller's deadline,
  // whichever is first: a caller never waits here past its own timeout.
  Clock::time_point flush_at = std::min(batch.flush_at, caller.deadline);
  batch.callers.push_back(std::move(caller));
  ++held_callers_;
  size_t expected = Expected(batch);
  if (expected > 0 && batch.callers.size() >= expected) return Flush(key);
  if (batch.timer == 0 || flush_at < batch.flush_at) {
    if (batch.timer != 0) reactor_.CancelTimer(batch.timer);
    batch.flush_at = flush_at;
    std::weak_ptr<int> life = life_;
    batch.timer = reactor_.PostAt(flush_at, "rdzv-relay.batch", [this, life, key] {
      if (!life.lock()) return;
      auto b = batches_.find(key);
      if (b == batches_.end()) return;
      b->second.timer = 0;
      Flush(key);
    });
  }
}

size_t RendezvousRelay::Expected(const Batch& b) const {
  if (options_.local_ranks.empty()) return 0;
  if (!b.gather) return std::min(options_.local_ranks.size(), static_cast<size_t>(b.n));
  return static_cast<size_t>(std::count_if(options_.local_ranks.begin(), options_.local_ranks.end(),
                                           [&](int r) { return r >= 0 && r < b.n; }));
}

void RendezvousRelay::Flush(const std::string& key) {
  auto it = batches_.find(key);
  if (it == batches_.end()) return;
  Batch batch = std::move(it->second);
  batches_.erase(it);
  if (batch.timer != 0) reactor_.CancelTimer(batch.timer);
  batch.timer = 0;
  SendBatch(std::move(batch));
}

void RendezvousRelay::SendBatch(Batch batch) {
  if (batch.callers.empty()) return;
  auto now = Clock::now();
  Clock::time_point first = batch.callers.front().deadline;
  for (const auto& c : batch.callers) first = std::min(first, c.deadline);
  // Rounded up, so the store never times the batch out before its earliest caller's deadline.
  auto timeout = std::max(milliseconds(0), std::chrono::ceil<milliseconds>(first - now));
  proto::StoreRequest req;
  req.mutable_scope()->set_job(options_.job);
  req.mutable_scope()->set_attempt(options_.attempt);
  if (batch.gather) {
    auto& g = *req.mutable_gather();
    g.set_name(batch.name);
    g.set_n(batch.n);
    g.set_timeout_ms(timeout.count());
    g.set_accept_zstd(options_.accept_zstd);
    for (const auto& c : batch.callers) {
      auto* e = g.add_batch();
      e->set_rank(c.rank);
      e->set_value(c.value);  // kept: a caller with time left may go upstream again
    }
  } else {
    auto& b = *req.mutable_barrier();
    b.set_name(batch.name);
    b.set_n(batch.n);
    b.set_timeout_ms(timeout.count());
    b.set_arrivals(static_cast<int32_t>(batch.callers.size()));
  }
  auto shared = std::make_shared<Batch>(std::move(batch));
  Forward(std::move(req), timeout + options_.rpc_slack,
          [this, shared](StatusOr<proto::StoreReply> r) {
            Batch& b = *shared;
            auto forget = [&](const Caller& c) {
              if (!b.gather) return;
              auto g = gather_ranks_.find(b.name);
              if (g == gather_ranks_.end()) return;
              g->second.erase(c.rank);
              if (g->second.empty()) gather_ranks_.erase(g);
            };
            if (r.ok() && r->gathered_zstd()) {
              if (Status plain = Inflate(b.gather, *r); !plain.ok()) r = plain;
            }
            if (r.ok()) {
              std::shared_ptr<const ScopedFd> file;
              if (b.gather && b.callers.size() >= 2) file = ShareGather(*r);
              auto e = std::make_shared<proto::Envelope>();
              *e->mutable_store_reply() = std::move(*r);
              // Serialized once for the batch; each caller's reply copies the bytes once.
              std::shared_ptr<const SerializedReply> bytes, plain;
              if (file) {
                // The result in the sealed file that goes with each reply. A caller whose reply
                // cannot carry a descriptor (not over the local socket), or for which the kernel
                // refuses to pass it, gets the plain bytes (`e`, serialized only then).
                proto::Envelope named;
                named.mutable_store_reply()->set_gathered_fd(true);
                named.mutable_store_reply()->set_gathered_size(e->store_reply().gathered().size());
                bytes = std::make_shared<const SerializedReply>(named);
              }
              held_callers_ -= b.callers.size();
              for (auto& c : b.callers) {
                forget(c);
                if (file && ReplyWithDescriptor(c.reply, bytes, file, e)) continue;
                if (!plain) plain = std::make_shared<const SerializedReply>(*e);
                RpcServer::ReplyWith(c.reply, plain);
              }
              return;
            }
            // The store timed the batch out at its earliest caller's deadline (or never
            // answered): callers with time left go upstream again.
            Batch again;
            again.gather = b.gather;
            again.name = b.name;
            again.n = b.n;
            auto now = Clock::now();
            for (auto& c : b.callers) {
              if (r.status().code() == StatusCode::kDeadlineExceeded &&
                  c.deadline > now + milliseconds(1)) {
                again.callers.push_back(std::move(c));
                continue;
              }
              forget(c);
              --held_callers_;
              c.reply(ErrorEnvelope(0, r.status()));
            }
            SendBatch(std::move(again));
          });
}

Status RendezvousRelay::Inflate(bool gather, proto::StoreReply& reply) {
  // Only a gather's reply may come compressed, and only when asked for.
  if (!gather || !options_.accept_zstd) {
    return DataLossError("rendezvous relay: the store at " + options_.upstream_endpoint +
                         " sent a compressed result the relay did not ask for");
  }
  auto plain = InflateGathered(reply.gathered(), options_.max_message_bytes);
  if (!plain.ok()) {
    log::Get("coll.relay")
        ->error("rendezvous relay for {}/{}: {}", options_.job, options_.attempt,
                plain.status().message());
    return plain.status();
  }
  ++stats_.compressed_gathers;
  reply.set_gathered(std::move(*plain));
  reply.clear_gathered_zstd();
  return Status::Ok();
}

std::shared_ptr<const ScopedFd> RendezvousRelay::ShareGather(const proto::StoreReply& reply) {
  const std::string& bytes = reply.gathered();
  const int64_t size = static_cast<int64_t>(bytes.size());
  if (options_.shared_gather_min_bytes <= 0 || size < options_.shared_gather_min_bytes) {
    return nullptr;
  }
  auto fail = [&](const char* step) -> std::shared_ptr<const ScopedFd> {
    log::Get("coll.relay")
        ->warn(
            "rendezvous relay: {} of a gather result's memory file: {}; the result goes down "
            "each rank's socket",
            step, std::strerror(errno));
    return nullptr;
  };
  ScopedFd fd(::memfd_create("muster-gather", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd.get() < 0) return fail("memfd_create");
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    ssize_t n = ::write(fd.get(), p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail("write");
    p += n;
    left -= static_cast<size_t>(n);
  }
  // Sealed before any rank sees it: from here on its bytes are fixed, for the relay too.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) !=
      0) {
    return fail("sealing");
  }
  ++stats_.shared_gathers;
  return std::make_shared<const ScopedFd>(std::move(fd));
}

fs::path PickRelaySocketParent(const std::vector<fs::path>& candidates, const fs::path& fallback) {
  for (const fs::path& c : candidates) {
    if (c.empty() || !c.is_absolute()) continue;
    struct stat st {};
    struct statfs sf {};
    if (::lstat(c.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    if (::statfs(c.c_str(), &sf) != 0 || sf.f_type != TMPFS_MAGIC) continue;
    const bool own_private = st.st_uid == ::geteuid() && (st.st_mode & (S_IWGRP | S_IWOTH)) == 0;
    const bool sticky = (st.st_mode & S_ISVTX) != 0;
    if (!own_private && !sticky) continue;
    if (::access(c.c_str(), W_OK | X_OK) != 0) continue;
    return c;
  }
  return fallback;
}

std::vector<fs::path> RelaySocketParentCandidates() {
  std::vector<fs::path> out;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0') {
    out.emplace_back(xdg);
  }
  out.emplace_back("/dev/shm");
  return out;
}

int SweepStaleRelayDirs(const fs::path& parent, std::chrono::seconds min_age) {
  std::error_code ec;
  fs::directory_iterator it(parent, ec);
  if (ec) return 0;
  const time_t now = ::time(nullptr);
  int removed = 0;
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) break;
    const std::string name = it->path().filename().string();
    if (name.size() != kDirPrefix.size() + 6 || name.rfind(kDirPrefix, 0) != 0) continue;
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() ||
        now - st.st_mtime < min_age.count()) {
      continue;
    }
    int fd = ::open(it->path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      std::error_code rm;
      fs::remove_all(it->path(), rm);
      if (!rm) {
        ++removed;
        log::Get("coll.relay")
            ->info("removed {}, left by a rendezvous relay whose process died",
                   it->path().string());
      }
    }
    ::close(fd);
  }
  return removed;
}

}  // namespace muster::collectives
