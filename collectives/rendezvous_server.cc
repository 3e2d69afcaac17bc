#include "collectives/rendezvous_server.h"

#include <algorithm>
#include <cctype>
#include <optional>

#include "collectives/rendezvous_codec.h"
#include "common/logging.h"
#include "common/strings.h"
#include "common/wire.h"

namespace muster::collectives {

namespace {

std::string ScopeName(const std::string& job, uint64_t attempt) {
  return job + "/" + std::to_string(attempt);
}

Status ValidateJob(const std::string& job) {
  if (job.empty() || job.size() > 128) {
    return InvalidArgumentError("rendezvous scope: job id must be 1..128 bytes, got " +
                                std::to_string(job.size()));
  }
  for (unsigned char c : job) {
    if (c == '/' || c == ',' || std::isspace(c) || !std::isprint(c)) {
      return InvalidArgumentError("rendezvous scope: job id '" + job +
                                  "' may not hold '/', ',', whitespace or control bytes");
    }
  }
  return Status::Ok();
}

// `s` for a log line or error: a bounded prefix.
std::string Clip(const std::string& s) {
  constexpr size_t kShown = 64;
  if (s.size() <= kShown) return s;
  return s.substr(0, kShown) + "... (" + std::to_string(s.size()) + " bytes)";
}

// Memory a gather of n ranks holds besides its name and entries.
int64_t GatherOverhead(int n) {
  return static_cast<int64_t>(n) * static_cast<int64_t>(sizeof(std::string) + sizeof(uint64_t));
}

proto::Envelope ReplyEnvelope(proto::StoreReply r) {
  proto::Envelope env;
  *env.mutable_store_reply() = std::move(r);
  return env;
}

}  // namespace

// A parked get, wait or barrier. Reactor thread only.
struct RendezvousServer::Waiter {
  std::string scope;
  std::vector<std::string> keys;  // get/wait: the keys asked for, in order
  size_t missing = 0;             // get/wait: how many of `keys` are still unset
  bool with_values = false;
  std::string barrier;            // barrier: its name
  int arrivals = 1;               // barrier: the callers it stands for (a relay's batch)
  std::string gather;             // gather: its name
  std::vector<int> gather_ranks;  // gather: the ranks it contributed (several: a relay's batch)
  bool accept_zstd = false;       // gather: takes the result compressed
  RpcServer::Reply reply;
  Reactor::TimerId timer = 0;
};

RendezvousServer::RendezvousServer(Reactor& reactor, ZapAuthenticator* authenticator,
                                   Options options)
    : reactor_(reactor), authenticator_(authenticator), options_(std::move(options)) {}

StatusOr<std::unique_ptr<RendezvousServer>> RendezvousServer::Create(
    Reactor& reactor, ZapAuthenticator* authenticator, Options options) {
  if (!options.insecure) {
    if (authenticator == nullptr) {
      return InvalidArgumentError("rendezvous store: a CURVE store needs a ZapAuthenticator");
    }
    if (options.server_key.secret_key.empty()) {
      MUSTER_ASSIGN_OR_RETURN(options.server_key, GenerateKeyPair());
    }
  }
  std::unique_ptr<RendezvousServer> s(
      new RendezvousServer(reactor, authenticator, std::move(options)));
  RpcServer::Options ro;
  ro.name = "rdzv";
  ro.endpoint = s->options_.endpoint;
  ro.insecure = s->options_.insecure;
  ro.server_key = s->options_.server_key;
  ro.authenticator = authenticator;
  ro.zap_domain = s->options_.zap_domain;
  ro.max_message_bytes = s->options_.max_message_bytes;
  RendezvousServer* raw = s.get();
  MUSTER_ASSIGN_OR_RETURN(
      s->rpc_,
      RpcServer::Create(reactor, ro,
                        [raw](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
                          raw->HandleRequest(peer, std::move(req), std::move(reply));
                        }));
  s->endpoint_ = s->rpc_->endpoint();
  if (!s->options_.insecure) s->options_.server_key.public_key = s->rpc_->public_key();
  log::Get("coll.store")
      ->info("rendezvous store serving {}{}", s->endpoint_,
             s->options_.insecure ? " (INSECURE)" : "");
  return s;
}

RendezvousServer::~RendezvousServer() {
  std::vector<uint64_t> ids;
  for (auto& [id, w] : waiters_) ids.push_back(id);
  for (uint64_t id : ids) Finish(id, AbortedError("rendezvous store shut down"));
  if (authenticator_ != nullptr) {
    for (auto& [name, scope] : scopes_) {
      authenticator_->Revoke(options_.zap_domain, scope.client_key.public_key);
    }
  }
  rpc_.reset();
}

template <typename F>
auto RendezvousServer::OnReactor(const char* name, F fn) -> decltype(fn()) {
  if (reactor_.InReactorThread() || !reactor_.running()) return fn();
  return reactor_.Call(name, std::move(fn));
}

StatusOr<std::string> RendezvousServer::AddScope(const std::string& job, uint64_t attempt,
                                                 const KeyPair* client_key) {
  MUSTER_RETURN_IF_ERROR(ValidateJob(job));
  std::string name = ScopeName(job, attempt);
  // Key generation needs no reactor; registering does.
  KeyPair key;
  if (!options_.insecure) {
    if (client_key != nullptr) {
      if (!IsValidZ85Key(client_key->public_key) || !IsValidZ85Key(client_key->secret_key)) {
        return InvalidArgumentError("rendezvous scope " + name + ": malformed client key");
      }
      key = *client_key;
    } else {
      MUSTER_ASSIGN_OR_RETURN(key, GenerateKeyPair());
    }
  }
  return OnReactor("rdzv.add_scope", [&]() -> StatusOr<std::string> {
    auto [it, inserted] = scopes_.try_emplace(name);
    Scope& scope = it->second;
    if (inserted) {
      scope.name = name;
      scope.client_key = key;
      if (!options_.insecure) {
        authenticator_->Authorize(options_.zap_domain, {key.public_key, name});
      }
      log::Get("coll.store")->info("rendezvous scope {} open", name);
    }
    if (options_.insecure) return std::string("insecure");
    return "v1," + options_.server_key.public_key + "," + scope.client_key.public_key + "," +
           scope.client_key.secret_key;
  });
}

Status RendezvousServer::Set(const std::string& job, uint64_t attempt, const std::string& key,
                             const std::string& value) {
  std::string name = ScopeName(job, attempt);
  return OnReactor("rdzv.host_set", [&]() -> Status {
    auto it = scopes_.find(name);
    if (it == scopes_.end()) return NotFoundError("rendezvous scope " + name + " is not open");
    SetKey(it->second, key, value);  // the host's own keys are not held to the limits
    return Status::Ok();
  });
}

void RendezvousServer::RemoveScope(const std::string& job, uint64_t attempt) {
  std::string name = ScopeName(job, attempt);
  OnReactor("rdzv.remove_scope", [&] {
    auto it = scopes_.find(name);
    if (it == scopes_.end()) return;
    if (authenticator_ != nullptr && !options_.insecure) {
      authenticator_->Revoke(options_.zap_domain, it->second.client_key.public_key);
    }
    std::vector<uint64_t> ids;
    for (auto& [id, w] : waiters_)
      if (w->scope == name) ids.push_back(id);
    for (uint64_t id : ids) Finish(id, AbortedError("rendezvous scope " + name + " was closed"));
    scopes_.erase(it);
    log::Get("coll.store")->info("rendezvous scope {} closed", name);
  });
}

std::chrono::milliseconds RendezvousServer::ClampTimeout(int64_t timeout_ms) const {
  return std::min(std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0)),
                  options_.max_timeout);
}

int64_t RendezvousServer::scope_bytes(const std::string& job, uint64_t attempt) const {
  auto it = scopes_.find(ScopeName(job, attempt));
  return it == scopes_.end() ? -1 : it->second.bytes;
}

Status RendezvousServer::CheckKey(const char* op, const std::string& key) const {
  if (key.empty() || key.size() > options_.max_key_bytes) {
    return InvalidArgumentError("rendezvous " + std::string(op) + ": a key or name must be 1.." +
                                std::to_string(options_.max_key_bytes) + " bytes, not " +
                                std::to_string(key.size()));
  }
  return Status::Ok();
}

Status RendezvousServer::CheckRoom(const Scope& scope, int64_t more_bytes,
                                   size_t more_entries) const {
  if (scope.bytes + more_bytes > options_.max_scope_bytes) {
    return FailedPreconditionError("rendezvous scope " + scope.name + " is full: it holds " +
                                   std::to_string(scope.bytes) + " bytes, and this request needs " +
                                   std::to_string(more_bytes) + " more; the limit is " +
                                   std::to_string(options_.max_scope_bytes));
  }
  size_t entries = scope.kv.size() + scope.barriers.size() + scope.gathers.size();
  if (more_entries > 0 && entries + more_entries > options_.max_scope_entries) {
    return FailedPreconditionError(
        "rendezvous scope " + scope.name + " is full: it holds " + std::to_string(entries) +
        " keys, barriers and gathers; the limit is " + std::to_string(options_.max_scope_entries));
  }
  return Status::Ok();
}

Status RendezvousServer::CheckSet(const Scope& scope, const std::string& key,
                                  size_t value_bytes) const {
  auto it = scope.kv.find(key);
  int64_t now = it == scope.kv.end() ? 0 : static_cast<int64_t>(key.size() + it->second.size());
  int64_t after = static_cast<int64_t>(key.size() + value_bytes);
  return CheckRoom(scope, after - now, it == scope.kv.end() ? 1 : 0);
}

Status RendezvousServer::CheckPark(const Scope& scope) const {
  if (scope.parked >= options_.max_parked_per_scope) {
    return FailedPreconditionError(
        "rendezvous scope " + scope.name + " has " + std::to_string(scope.parked) +
        " requests waiting already; the limit is " + std::to_string(options_.max_parked_per_scope));
  }
  return Status::Ok();
}

void RendezvousServer::HandleRequest(const PeerInfo& peer, proto::Envelope&& request,
                                     RpcServer::Reply reply) {
  auto fail = [&](const Status& s) { reply(ErrorEnvelope(request.request_id(), s)); };
  if (!request.has_store_request()) {
    return fail(InvalidArgumentError("rendezvous store: expected a StoreRequest"));
  }
  proto::StoreRequest& req = *request.mutable_store_request();
  std::string name = ScopeName(req.scope().job(), req.scope().attempt());
  // Under CURVE the connection's key names its scope; a request may not reach past it.
  if (!options_.insecure && peer.user_id != name) {
    log::Get("coll.store")
        ->warn("rendezvous: refused a request for scope {} from {} (key of scope {})", Clip(name),
               peer.address, peer.user_id);
    return fail(FailedPreconditionError("rendezvous store: this client's key belongs to scope '" +
                                        peer.user_id + "', not '" + Clip(name) + "'"));
  }
  auto it = scopes_.find(name);
  if (it == scopes_.end()) {
    return fail(FailedPreconditionError("rendezvous store: scope '" + Clip(name) +
                                        "' is not open (attempt ended or never started)"));
  }
  Status st = Dispatch(it->second, req, reply);
  if (!st.ok()) fail(st);
}

Status RendezvousServer::Dispatch(Scope& scope, proto::StoreRequest& req, RpcServer::Reply& reply) {
  auto CheckKeys = [&](const char* op, const auto& keys) -> Status {
    if (static_cast<size_t>(keys.size()) > options_.max_keys_per_request) {
      return InvalidArgumentError("rendezvous " + std::string(op) + ": " +
                                  std::to_string(keys.size()) + " keys; at most " +
                                  std::to_string(options_.max_keys_per_request));
    }
    for (const auto& k : keys) MUSTER_RETURN_IF_ERROR(CheckKey(op, k));
    return Status::Ok();
  };
  switch (req.op_case()) {
    case proto::StoreRequest::kSet: {
      MUSTER_RETURN_IF_ERROR(CheckKey("set", req.set().key()));
      MUSTER_RETURN_IF_ERROR(CheckSet(scope, req.set().key(), req.set().value().size()));
      SetKey(scope, req.set().key(), std::move(*req.mutable_set()->mutable_value()));
      reply(ReplyEnvelope({}));
      return Status::Ok();
    }
    case proto::StoreRequest::kGet: {
      auto& g = *req.mutable_get();
      if (g.keys().empty()) return InvalidArgumentError("rendezvous get: no keys");
      MUSTER_RETURN_IF_ERROR(CheckKeys("get", g.keys()));
      MUSTER_RETURN_IF_ERROR(CheckPark(scope));
      std::vector<std::string> keys(std::make_move_iterator(g.mutable_keys()->begin()),
                                    std::make_move_iterator(g.mutable_keys()->end()));
      Park(scope, std::move(keys), /*with_values=*/true, g.timeout_ms(), std::move(reply));
      return Status::Ok();
    }
    case proto::StoreRequest::kWait: {
      auto& w = *req.mutable_wait();
      MUSTER_RETURN_IF_ERROR(CheckKeys("wait", w.keys()));
      MUSTER_RETURN_IF_ERROR(CheckPark(scope));
      std::vector<std::string> keys(std::make_move_iterator(w.mutable_keys()->begin()),
                                    std::make_move_iterator(w.mutable_keys()->end()));
      Park(scope, std::move(keys), /*with_values=*/false, w.timeout_ms(), std::move(reply));
      return Status::Ok();
    }
    case proto::StoreRequest::kAdd: {
      const std::string& key = req.add().key();
      MUSTER_RETURN_IF_ERROR(CheckKey("add", key));
      int64_t v = 0;
      if (auto it = scope.kv.find(key); it != scope.kv.end()) {
        std::optional<int64_t> held = ParseInt64(it->second);
        if (!held) {
          return InvalidArgumentError("rendezvous add: key '" + key +
                                      "' does not hold a 64-bit integer");
        }
        v = *held;
      }
      if (__builtin_add_overflow(v, req.add().delta(), &v)) {
        return InvalidArgumentError("rendezvous add: key '" + key + "' holds " + scope.kv[key] +
                                    "; adding " + std::to_string(req.add().delta()) +
                                    " overflows a 64-bit integer");
      }
      std::string text = std::to_string(v);
      MUSTER_RETURN_IF_ERROR(CheckSet(scope, key, text.size()));
      SetKey(scope, key, std::move(text));
      proto::StoreReply r;
      r.set_counter(v);
      reply(ReplyEnvelope(std::move(r)));
      return Status::Ok();
    }
    case proto::StoreRequest::kCompareSet: {
      const auto& c = req.compare_set();
      MUSTER_RETURN_IF_ERROR(CheckKey("compare_set", c.key()));
      auto it = scope.kv.find(c.key());
      std::string current = it == scope.kv.end() ? "" : it->second;
      proto::StoreReply r;
      if (current == c.expected()) {
        MUSTER_RETURN_IF_ERROR(CheckSet(scope, c.key(), c.desired().size()));
        SetKey(scope, c.key(), c.desired());
        r.add_values(c.desired());
      } else {
        r.add_values(std::move(current));
      }
      reply(ReplyEnvelope(std::move(r)));
      return Status::Ok();
    }
    case proto::StoreRequest::kBarrier:
      MUSTER_RETURN_IF_ERROR(CheckKey("barrier", req.barrier().name()));
      MUSTER_RETURN_IF_ERROR(CheckPark(scope));
      ParkBarrier(scope, req.barrier(), std::move(reply));
      return Status::Ok();
    case proto::StoreRequest::kGather:
      MUSTER_RETURN_IF_ERROR(CheckKey("gather", req.gather().name()));
      MUSTER_RETURN_IF_ERROR(CheckPark(scope));
      return ParkGather(scope, *req.mutable_gather(), reply);
    case proto::StoreRequest::OP_NOT_SET:
      break;
  }
  return InvalidArgumentError("rendezvous store: request has no operation");
}

void RendezvousServer::SetKey(Scope& scope, const std::string& key, std::string value) {
  auto [kv, inserted] = scope.kv.try_emplace(key);
  scope.bytes += static_cast<int64_t>(value.size()) - static_cast<int64_t>(kv->second.size());
  if (inserted) scope.bytes += static_cast<int64_t>(key.size());
  kv->second = std::move(value);
  auto it = scope.watchers.find(key);
  if (it == scope.watchers.end()) return;
  std::unordered_set<uint64_t> ids = std::move(it->second);
  scope.watchers.erase(it);
  for (uint64_t id : ids) {
    auto w = waiters_.find(id);
    if (w == waiters_.end()) continue;  // timed out already
    if (--w->second->missing == 0) Finish(id, Status::Ok());
  }
}

void RendezvousServer::Park(Scope& scope, std::vector<std::string> keys, bool with_values,
                            int64_t timeout_ms, RpcServer::Reply reply) {
  auto w = std::make_unique<Waiter>();
  w->scope = scope.name;
  w->with_values = with_values;
  w->reply = std::move(reply);
  uint64_t id = next_waiter_++;
  for (const auto& k : keys) {
    // A key named twice is missed once.
    if (!scope.kv.count(k) && scope.watchers[k].insert(id).second) ++w->missing;
  }
  w->keys = std::move(keys);
  bool ready = w->missing == 0;
  waiters_.emplace(id, std::move(w));
  ++scope.parked;
  ++parked_callers_;
  if (ready) return Finish(id, Status::Ok());
  auto timeout = ClampTimeout(timeout_ms);
  waiters_[id]->timer = reactor_.PostAfter(timeout, "rdzv.timeout", [this, id, timeout] {
    auto it = waiters_.find(id);
    if (it == waiters_.end()) return;
    std::string missing;
    if (auto s = scopes_.find(it->second->scope); s != scopes_.end()) {
      int shown = 0;
      for (const auto& k : it->second->keys) {
        if (s->second.kv.count(k)) continue;
        if (shown++ < 3) missing += (missing.empty() ? "'" : ", '") + k + "'";
      }
      if (shown > 3) missing += " and " + std::to_string(shown - 3) + " more";
    }
    it->second->timer = 0;
    Finish(id, DeadlineExceededError("rendezvous: " + missing + " not set within " +
                                     std::to_string(timeout.count()) + " ms"));
  });
}

void RendezvousServer::ParkBarrier(Scope& scope, const proto::StoreBarrier& b,
                                   RpcServer::Reply reply) {
  if (b.n() <= 0) {
    reply(ErrorEnvelope(
        0, InvalidArgumentError("rendezvous barrier '" + b.name() + "': n must be positive")));
    return;
  }
  if (b.n() > static_cast<int64_t>(options_.max_parked_per_scope)) {
    reply(ErrorEnvelope(0, InvalidArgumentError("rendezvous barrier '" + b.name() + "': n=" +
                                                std::to_string(b.n()) + " is more than the " +
                                                std::to_string(options_.max_parked_per_scope) +
                                                " requests a scope may park")));
    return;
  }
  const int arrivals = b.arrivals() == 0 ? 1 : b.arrivals();
  if (arrivals < 0 || arrivals > b.n()) {
    reply(ErrorEnvelope(
        0, InvalidArgumentError("rendezvous barrier '" + b.name() +
                                "': " + std::to_string(b.arrivals()) +
                                " arrivals in one request, with n=" + std::to_string(b.n()))));
    return;
  }
  if (!scope.barriers.count(b.name())) {
    if (Status room = CheckRoom(scope, static_cast<int64_t>(b.name().size()), 1); !room.ok()) {
      reply(ErrorEnvelope(0, room));
      return;
    }
    scope.bytes += static_cast<int64_t>(b.name().size());
  }
  BarrierState& bs = scope.barriers[b.name()];
  if (bs.n == 0) bs.n = b.n();
  if (bs.n != b.n()) {
    reply(ErrorEnvelope(0, InvalidArgumentError("rendezvous barrier '" + b.name() +
                                                "': entered with n=" + std::to_string(b.n()) +
                                                " but others use n=" + std::to_string(bs.n))));
    return;
  }
  if (bs.done) {
    reply(ErrorEnvelope(
        0, InvalidArgumentError("rendezvous barrier '" + b.name() + "' already passed with " +
                                std::to_string(bs.n) + " callers; names are single use")));
    return;
  }
  if (bs.arrived + arrivals > bs.n) {
    reply(ErrorEnvelope(0, InvalidArgumentError("rendezvous barrier '" + b.name() +
                                                "': " + std::to_string(bs.arrived) + " of " +
                                                std::to_string(bs.n) + " arrived already, and " +
                                                std::to_string(arrivals) + " more is too many")));
    return;
  }
  auto w = std::make_unique<Waiter>();
  w->scope = scope.name;
  w->barrier = b.name();
  w->arrivals = arrivals;
  w->reply = std::move(reply);
  uint64_t id = next_waiter_++;
  waiters_.emplace(id, std::move(w));
  ++scope.parked;
  parked_callers_ += arrivals;
  bs.waiters.emplace(id, arrivals);
  bs.arrived += arrivals;
  if (bs.arrived == bs.n) {
    bs.done = true;
    std::unordered_map<uint64_t, int> ids = std::move(bs.waiters);
    bs.waiters.clear();
    for (const auto& [wid, count] : ids) Finish(wid, Status::Ok());
    return;
  }
  auto timeout = ClampTimeout(b.timeout_ms());
  std::string scope_name = scope.name;
  waiters_[id]->timer = reactor_.PostAfter(timeout, "rdzv.barrier_timeout", [=, this] {
    auto it = waiters_.find(id);
    if (it == waiters_.end()) return;
    int arrived = 0, n = 0;
    if (auto s = scopes_.find(scope_name); s != scopes_.end()) {
      auto& state = s->second.barriers[b.name()];
      arrived = state.arrived;  // counting this caller, which leaves in Finish
      n = state.n;
    }
    it->second->timer = 0;
    Finish(id, DeadlineExceededError("rendezvous barrier '" + b.name() +
                                     "': " + std::to_string(arrived) + " of " + std::to_string(n) +
                                     " arrived within " + std::to_string(timeout.count()) + " ms"));
  });
}

Status RendezvousServer::ParkGather(Scope& scope, proto::StoreGather& g, RpcServer::Reply& reply) {
  const std::string& name = g.name();
  if (g.n() <= 0 || g.n() > kMaxGatherRanks) {
    return InvalidArgumentError("rendezvous gather '" + name + "': n=" + std::to_string(g.n()) +
                                " is not in 1.." + std::to_string(kMaxGatherRanks));
  }
  // A plain request contributes (rank, value); a relay's, the entries of its batch.
  if (g.batch_size() == 0) {
    auto* e = g.add_batch();
    e->set_rank(g.rank());
    *e->mutable_value() = std::move(*g.mutable_value());
  }
  if (g.batch_size() > g.n()) {
    return InvalidArgumentError("rendezvous gather '" + name +
                                "': " + std::to_string(g.batch_size()) +
                                " entries for n=" + std::to_string(g.n()));
  }
  int64_t value_bytes = 0;
  std::vector<int> ranks;
  ranks.reserve(g.batch_size());
  for (const auto& e : g.batch()) {
    if (e.rank() < 0 || e.rank() >= g.n()) {
      return InvalidArgumentError("rendezvous gather '" + name + "': rank " +
                                  std::to_string(e.rank()) + " is not in 0.." +
                                  std::to_string(g.n() - 1));
    }
    ranks.push_back(e.rank());
    value_bytes += static_cast<int64_t>(e.value().size());
  }
  std::sort(ranks.begin(), ranks.end());
  if (auto dup = std::adjacent_find(ranks.begin(), ranks.end()); dup != ranks.end()) {
    return InvalidArgumentError("rendezvous gather '" + name + "': rank " + std::to_string(*dup) +
                                " appears twice in one request");
  }
  if (auto known = scope.gathers.find(name); known == scope.gathers.end()) {
    MUSTER_RETURN_IF_ERROR(CheckRoom(
        scope, static_cast<int64_t>(name.size()) + GatherOverhead(g.n()) + value_bytes, 1));
  } else {
    MUSTER_RETURN_IF_ERROR(CheckRoom(scope, value_bytes, 0));
  }
  GatherState& gs = scope.gathers[name];
  if (gs.n == 0) {
    gs.n = g.n();
    gs.values.resize(gs.n);
    gs.waiter_of.assign(gs.n, 0);
    scope.bytes += static_cast<int64_t>(name.size()) + GatherOverhead(gs.n);
  }
  if (gs.n != g.n()) {
    return InvalidArgumentError("rendezvous gather '" + name +
                                "': entered with n=" + std::to_string(g.n()) +
                                " but others use n=" + std::to_string(gs.n));
  }
  if (gs.done) {
    return InvalidArgumentError("rendezvous gather '" + name + "' already completed with " +
                                std::to_string(gs.n) + " ranks; names are single use");
  }
  for (int rank : ranks) {
    if (gs.waiter_of[rank] != 0) {
      return InvalidArgumentError("rendezvous gather '" + name + "': rank " + std::to_string(rank) +
                                  " has already contributed");
    }
  }
  auto w = std::make_unique<Waiter>();
  w->scope = scope.name;
  w->gather = name;
  w->gather_ranks = ranks;
  w->accept_zstd = g.accept_zstd();
  w->reply = std::move(reply);
  uint64_t id = next_waiter_++;
  waiters_.emplace(id, std::move(w));
  ++scope.parked;
  parked_callers_ += ranks.size();
  scope.bytes += value_bytes;
  for (auto& e : *g.mutable_batch()) {
    gs.values[e.rank()] = std::move(*e.mutable_value());
    gs.waiter_of[e.rank()] = id;
  }
  gs.arrived += static_cast<int>(ranks.size());
  if (gs.arrived == gs.n) {
    CompleteGather(scope, name, gs);
    return Status::Ok();
  }
  auto timeout = ClampTimeout(g.timeout_ms());
  std::string scope_name = scope.name;
  waiters_[id]->timer = reactor_.PostAfter(timeout, "rdzv.gather_timeout", [=, this] {
    auto it = waiters_.find(id);
    if (it == waiters_.end()) return;
    std::string detail;
    if (auto s = scopes_.find(scope_name); s != scopes_.end()) {
      if (auto st = s->second.gathers.find(name); st != s->second.gathers.end()) {
        const GatherState& state = st->second;
        std::string missing;
        int shown = 0, absent = 0;
        for (int r = 0; r < state.n; ++r) {
          if (state.waiter_of[r] != 0) continue;
          ++absent;
          if (shown++ < 8) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        }
        if (absent > 8) missing += " and " + std::to_string(absent - 8) + " more";
        detail = ": " + std::to_string(state.arrived) + " of " + std::to_string(state.n) +
                 " ranks contributed; missing rank(s) " + missing;
      }
    }
    it->second->timer = 0;
    // Finish withdraws this rank's entry, so the gather never completes with a rank that has
    // already been told it failed.
    Finish(id, DeadlineExceededError("rendezvous gather '" + name + "' not complete within " +
                                     std::to_string(timeout.count()) + " ms" + detail));
  });
  return Status::Ok();
}

void RendezvousServer::CompleteGather(Scope& scope, const std::string& name, GatherState& gs) {
  gs.done = true;
  std::vector<uint64_t> ids = std::move(gs.waiter_of);
  gs.waiter_of.clear();
  // A relay's request holds several ranks: answer it once.
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  proto::StoreGathered all;
  size_t bytes = 0;
  for (auto& v : gs.values) {
    bytes += v.size();
    all.add_values(std::move(v));
  }
  gs.values.clear();
  gs.values.shrink_to_fit();
  // The name stays (names are single use); the entries and per-rank state go.
  scope.bytes -= static_cast<int64_t>(bytes) + GatherOverhead(gs.n);
  // The reply is the serialized entries plus a few bytes of envelope.
  int64_t reply_bytes = static_cast<int64_t>(all.ByteSizeLong()) + 64;
  if (reply_bytes > options_.max_message_bytes) {
    Status too_big = FailedPreconditionError(
        "rendezvous gather '" + name + "': the " + std::to_string(bytes) + " bytes from " +
        std::to_string(gs.n) + " ranks exceed the message size limit of " +
        std::to_string(options_.max_message_bytes) + " bytes");
    for (uint64_t id : ids) Finish(id, too_big);
    return;
  }
  proto::StoreReply r;
  all.SerializeToString(r.mutable_gathered());
  // Callers that take the result compressed (relays, each answering a node's ranks) get it as
  // one zstd frame, compressed once here, when that saves at least an eighth: every copy the
  // store sends is encrypted (CURVE) on its own, so its size is paid once per relay.
  std::shared_ptr<const SerializedReply> zreply;
  size_t zbytes = 0;
  if (r.gathered().size() >= kZstdMinBytes && std::any_of(ids.begin(), ids.end(), [&](uint64_t id) {
        auto w = waiters_.find(id);
        return w != waiters_.end() && w->second->accept_zstd;
      })) {
    std::string z = CompressGathered(r.gathered());
    if (!z.empty() && z.size() <= r.gathered().size() - r.gathered().size() / 8) {
      zbytes = z.size();
      proto::StoreReply zr;
      zr.set_gathered(std::move(z));
      zr.set_gathered_zstd(true);
      zreply = std::make_shared<const SerializedReply>(ReplyEnvelope(std::move(zr)));
    }
  }
  // Serialized once (each form), and the same bytes sent to every caller: only each reply's
  // request id differs.
  std::shared_ptr<const SerializedReply> plain;
  const bool any_plain = !zreply || std::any_of(ids.begin(), ids.end(), [&](uint64_t id) {
    auto w = waiters_.find(id);
    return w != waiters_.end() && !w->second->accept_zstd;
  });
  if (any_plain) plain = std::make_shared<const SerializedReply>(ReplyEnvelope(std::move(r)));
  log::Get("coll.store")
      ->debug("rendezvous gather '{}' of scope {} complete: {} ranks, {} bytes ({} compressed)",
              name, scope.name, gs.n, bytes, zreply ? std::to_string(zbytes) : "not");
  for (uint64_t id : ids) {
    auto w = waiters_.find(id);
    const bool z = zreply && w != waiters_.end() && w->second->accept_zstd;
    Finish(id, Status::Ok(), z ? zreply : plain);
  }
}

void RendezvousServer::Finish(uint64_t id, const Status& status,
                              const std::shared_ptr<const SerializedReply>& result) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return;
  std::unique_ptr<Waiter> w = std::move(it->second);
  waiters_.erase(it);
  if (w->timer != 0) reactor_.CancelTimer(w->timer);
  auto owner = scopes_.find(w->scope);
  if (owner != scopes_.end()) --owner->second.parked;
  parked_callers_ -= w->barrier.empty() ? std::max<size_t>(1, w->gather_ranks.size()) : w->arrivals;
  if (!status.ok()) {
    // Drop this waiter from the watch lists of keys it still missed.
    if (auto s = owner; s != scopes_.end()) {
      for (const auto& k : w->keys) {
        auto wl = s->second.watchers.find(k);
        if (wl == s->second.watchers.end()) continue;
        wl->second.erase(id);
        if (wl->second.empty()) s->second.watchers.erase(wl);
      }
      if (!w->barrier.empty()) {
        auto b = s->second.barriers.find(w->barrier);
        if (b != s->second.barriers.end() && b->second.waiters.erase(id) > 0) {
          b->second.arrived -= w->arrivals;
        }
      }
      if (!w->gather.empty()) {
        auto g = s->second.gathers.find(w->gather);
        bool left = false;
        for (int rank : w->gather_ranks) {
          if (g == s->second.gathers.end() || g->second.done || g->second.waiter_of[rank] != id) {
            continue;
          }
          // The rank leaves the gather; it may contribute again. A gather nobody is in is
          // forgotten, so its n is not fixed by callers that have all given up.
          g->second.waiter_of[rank] = 0;
          s->second.bytes -= static_cast<int64_t>(g->second.values[rank].size());
          g->second.values[rank].clear();
          g->second.values[rank].shrink_to_fit();
          --g->second.arrived;
          left = true;
        }
        if (left) {
          if (g->second.arrived == 0) {
            s->second.bytes -= static_cast<int64_t>(g->first.size()) + GatherOverhead(g->second.n);
            s->second.gathers.erase(g);
          }
        }
      }
    }
    w->reply(ErrorEnvelope(0, status));
    return;
  }
  if (result != nullptr) {
    RpcServer::ReplyWith(w->reply, result);
    return;
  }
  if (!w->with_values) {
    w->reply(ReplyEnvelope({}));
    return;
  }
  if (owner == scopes_.end()) {
    w->reply(ErrorEnvelope(0, AbortedError("rendezvous scope " + w->scope + " was closed")));
    return;
  }
  const Scope& scope = owner->second;
  // A get may name one big key many times: refuse a reply the message limit would drop.
  int64_t reply_bytes = 64;
  for (const auto& k : w->keys) reply_bytes += static_cast<int64_t>(scope.kv.at(k).size()) + 8;
  if (reply_bytes > options_.max_message_bytes) {
    w->reply(ErrorEnvelope(
        0, FailedPreconditionError("rendezvous get: the " + std::to_string(w->keys.size()) +
                                   " values asked for are about " + std::to_string(reply_bytes) +
                                   " bytes, over the message size limit of " +
                                   std::to_string(options_.max_message_bytes))));
    return;
  }
  proto::StoreReply r;
  for (const auto& k : w->keys) r.add_values(scope.kv.at(k));
  w->reply(ReplyEnvelope(std::move(r)));
}

}  // namespace muster::collectives
