#include "collectives/store_server.h"

#include <algorithm>
#include <cctype>

#include "common/logging.h"
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

proto::Envelope ReplyEnvelope(proto::StoreReply r) {
  proto::Envelope env;
  *env.mutable_store_reply() = std::move(r);
  return env;
}

}  // namespace

// A parked get, wait or barrier. Reactor thread only.
struct StoreServer::Waiter {
  std::string scope;
  std::vector<std::string> keys;  // get/wait: the keys asked for, in order
  size_t missing = 0;             // get/wait: how many of `keys` are still unset
  bool with_values = false;
  std::string barrier;  // barrier: its name
  std::string gather;   // gather: its name
  int gather_rank = -1;
  RpcServer::Reply reply;
  Reactor::TimerId timer = 0;
};

StoreServer::StoreServer(Reactor& reactor, ZapAuthenticator* authenticator, Options options)
    : reactor_(reactor), authenticator_(authenticator), options_(std::move(options)) {}

StatusOr<std::unique_ptr<StoreServer>> StoreServer::Create(Reactor& reactor,
                                                           ZapAuthenticator* authenticator,
                                                           Options options) {
  if (!options.insecure) {
    if (authenticator == nullptr) {
      return InvalidArgumentError("rendezvous store: a CURVE store needs a ZapAuthenticator");
    }
    if (options.server_key.secret_key.empty()) {
      MUSTER_ASSIGN_OR_RETURN(options.server_key, GenerateKeyPair());
    }
  }
  std::unique_ptr<StoreServer> s(new StoreServer(reactor, authenticator, std::move(options)));
  RpcServer::Options ro;
  ro.name = "rdzv";
  ro.endpoint = s->options_.endpoint;
  ro.insecure = s->options_.insecure;
  ro.server_key = s->options_.server_key;
  ro.authenticator = authenticator;
  ro.zap_domain = s->options_.zap_domain;
  ro.max_message_bytes = s->options_.max_message_bytes;
  StoreServer* raw = s.get();
  MUSTER_ASSIGN_OR_RETURN(
      s->rpc_,
      RpcServer::Create(reactor, ro,
                        [raw](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
                          raw->Handle(peer, std::move(req), std::move(reply));
                        }));
  s->endpoint_ = s->rpc_->endpoint();
  if (!s->options_.insecure) s->options_.server_key.public_key = s->rpc_->public_key();
  log::Get("coll.store")
      ->info("rendezvous store serving {}{}", s->endpoint_,
             s->options_.insecure ? " (INSECURE)" : "");
  return s;
}

StoreServer::~StoreServer() {
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
auto StoreServer::OnReactor(const char* name, F fn) -> decltype(fn()) {
  if (reactor_.InReactorThread() || !reactor_.running()) return fn();
  return reactor_.Call(name, std::move(fn));
}

StatusOr<std::string> StoreServer::AddScope(const std::string& job, uint64_t attempt,
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

Status StoreServer::Set(const std::string& job, uint64_t attempt, const std::string& key,
                        const std::string& value) {
  std::string name = ScopeName(job, attempt);
  return OnReactor("rdzv.host_set", [&]() -> Status {
    auto it = scopes_.find(name);
    if (it == scopes_.end()) return NotFoundError("rendezvous scope " + name + " is not open");
    SetKey(it->second, key, value);
    return Status::Ok();
  });
}

void StoreServer::RemoveScope(const std::string& job, uint64_t attempt) {
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

std::chrono::milliseconds StoreServer::ClampTimeout(int64_t timeout_ms) const {
  return std::min(std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0)),
                  options_.max_timeout);
}

void StoreServer::Handle(const PeerInfo& peer, proto::Envelope&& request, RpcServer::Reply reply) {
  auto fail = [&](const Status& s) { reply(ErrorEnvelope(request.request_id(), s)); };
  if (!request.has_store_request()) {
    return fail(InvalidArgumentError("rendezvous store: expected a StoreRequest"));
  }
  proto::StoreRequest& req = *request.mutable_store_request();
  std::string name = ScopeName(req.scope().job(), req.scope().attempt());
  // Under CURVE the connection's key names its scope; a request may not reach past it.
  if (!options_.insecure && peer.user_id != name) {
    log::Get("coll.store")
        ->warn("rendezvous: refused a request for scope {} from {} (key of scope {})", name,
               peer.address, peer.user_id);
    return fail(FailedPreconditionError("rendezvous store: this client's key belongs to scope '" +
                                        peer.user_id + "', not '" + name + "'"));
  }
  auto it = scopes_.find(name);
  if (it == scopes_.end()) {
    return fail(FailedPreconditionError("rendezvous store: scope '" + name +
                                        "' is not open (attempt ended or never started)"));
  }
  Status st = Dispatch(it->second, req, reply);
  if (!st.ok()) fail(st);
}

Status StoreServer::Dispatch(Scope& scope, proto::StoreRequest& req, RpcServer::Reply& reply) {
  switch (req.op_case()) {
    case proto::StoreRequest::kSet: {
      SetKey(scope, req.set().key(), std::move(*req.mutable_set()->mutable_value()));
      reply(ReplyEnvelope({}));
      return Status::Ok();
    }
    case proto::StoreRequest::kGet: {
      auto& g = *req.mutable_get();
      if (g.keys().empty()) return InvalidArgumentError("rendezvous get: no keys");
      std::vector<std::string> keys(std::make_move_iterator(g.mutable_keys()->begin()),
                                    std::make_move_iterator(g.mutable_keys()->end()));
      Park(scope, std::move(keys), /*with_values=*/true, g.timeout_ms(), std::move(reply));
      return Status::Ok();
    }
    case proto::StoreRequest::kWait: {
      auto& w = *req.mutable_wait();
      std::vector<std::string> keys(std::make_move_iterator(w.mutable_keys()->begin()),
                                    std::make_move_iterator(w.mutable_keys()->end()));
      Park(scope, std::move(keys), /*with_values=*/false, w.timeout_ms(), std::move(reply));
      return Status::Ok();
    }
    case proto::StoreRequest::kAdd: {
      const std::string& key = req.add().key();
      int64_t v = 0;
      if (auto it = scope.kv.find(key); it != scope.kv.end()) {
        size_t used = 0;
        try {
          v = std::stoll(it->second, &used);
        } catch (const std::exception&) {
          used = std::string::npos;
        }
        if (used != it->second.size()) {
          return InvalidArgumentError("rendezvous add: key '" + key + "' does not hold an integer");
        }
      }
      v += req.add().delta();
      SetKey(scope, key, std::to_string(v));
      proto::StoreReply r;
      r.set_counter(v);
      reply(ReplyEnvelope(std::move(r)));
      return Status::Ok();
    }
    case proto::StoreRequest::kCompareSet: {
      const auto& c = req.compare_set();
      auto it = scope.kv.find(c.key());
      std::string current = it == scope.kv.end() ? "" : it->second;
      proto::StoreReply r;
      if (current == c.expected()) {
        SetKey(scope, c.key(), c.desired());
        r.add_values(c.desired());
      } else {
        r.add_values(std::move(current));
      }
      reply(ReplyEnvelope(std::move(r)));
      return Status::Ok();
    }
    case proto::StoreRequest::kBarrier:
      ParkBarrier(scope, req.barrier(), std::move(reply));
      return Status::Ok();
    case proto::StoreRequest::kGather:
      return ParkGather(scope, *req.mutable_gather(), reply);
    case proto::StoreRequest::OP_NOT_SET:
      break;
  }
  return InvalidArgumentError("rendezvous store: request has no operation");
}

void StoreServer::SetKey(Scope& scope, const std::string& key, std::string value) {
  scope.kv[key] = std::move(value);
  auto it = scope.watchers.find(key);
  if (it == scope.watchers.end()) return;
  std::vector<uint64_t> ids = std::move(it->second);
  scope.watchers.erase(it);
  for (uint64_t id : ids) {
    auto w = waiters_.find(id);
    if (w == waiters_.end()) continue;  // timed out already
    if (--w->second->missing == 0) Finish(id, Status::Ok());
  }
}

void StoreServer::Park(Scope& scope, std::vector<std::string> keys, bool with_values,
                       int64_t timeout_ms, RpcServer::Reply reply) {
  auto w = std::make_unique<Waiter>();
  w->scope = scope.name;
  w->with_values = with_values;
  w->reply = std::move(reply);
  uint64_t id = next_waiter_++;
  for (const auto& k : keys) {
    if (!scope.kv.count(k)) {
      ++w->missing;
      scope.watchers[k].push_back(id);
    }
  }
  w->keys = std::move(keys);
  bool ready = w->missing == 0;
  waiters_.emplace(id, std::move(w));
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

void StoreServer::ParkBarrier(Scope& scope, const proto::StoreBarrier& b, RpcServer::Reply reply) {
  if (b.n() <= 0) {
    reply(ErrorEnvelope(
        0, InvalidArgumentError("rendezvous barrier '" + b.name() + "': n must be positive")));
    return;
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
  auto w = std::make_unique<Waiter>();
  w->scope = scope.name;
  w->barrier = b.name();
  w->reply = std::move(reply);
  uint64_t id = next_waiter_++;
  waiters_.emplace(id, std::move(w));
  bs.waiters.push_back(id);
  if (static_cast<int>(bs.waiters.size()) == bs.n) {
    bs.done = true;
    std::vector<uint64_t> ids = std::move(bs.waiters);
    bs.waiters.clear();
    for (uint64_t wid : ids) Finish(wid, Status::Ok());
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
      std::erase(state.waiters, id);  // this caller leaves the barrier
      arrived = static_cast<int>(state.waiters.size()) + 1;
      n = state.n;
    }
    it->second->timer = 0;
    Finish(id, DeadlineExceededError("rendezvous barrier '" + b.name() +
                                     "': " + std::to_string(arrived) + " of " + std::to_string(n) +
                                     " arrived within " + std::to_string(timeout.count()) + " ms"));
  });
}

Status StoreServer::ParkGather(Scope& scope, proto::StoreGather& g, RpcServer::Reply& reply) {
  const std::string& name = g.name();
  if (g.n() <= 0 || g.n() > kMaxGatherRanks) {
    return InvalidArgumentError("rendezvous gather '" + name + "': n=" + std::to_string(g.n()) +
                                " is not in 1.." + std::to_string(kMaxGatherRanks));
  }
  if (g.rank() < 0 || g.rank() >= g.n()) {
    return InvalidArgumentError("rendezvous gather '" + name + "': rank " +
                                std::to_string(g.rank()) + " is not in 0.." +
                                std::to_string(g.n() - 1));
  }
  GatherState& gs = scope.gathers[name];
  if (gs.n == 0) {
    gs.n = g.n();
    gs.values.resize(gs.n);
    gs.waiter_of.assign(gs.n, 0);
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
  if (gs.waiter_of[g.rank()] != 0) {
    return InvalidArgumentError("rendezvous gather '" + name + "': rank " +
                                std::to_string(g.rank()) + " has already contributed");
  }
  auto w = std::make_unique<Waiter>();
  w->scope = scope.name;
  w->gather = name;
  w->gather_rank = g.rank();
  w->reply = std::move(reply);
  uint64_t id = next_waiter_++;
  waiters_.emplace(id, std::move(w));
  gs.values[g.rank()] = std::move(*g.mutable_value());
  gs.waiter_of[g.rank()] = id;
  if (++gs.arrived == gs.n) {
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

void StoreServer::CompleteGather(Scope& scope, const std::string& name, GatherState& gs) {
  gs.done = true;
  std::vector<uint64_t> ids = std::move(gs.waiter_of);
  gs.waiter_of.clear();
  proto::StoreGathered all;
  size_t bytes = 0;
  for (auto& v : gs.values) {
    bytes += v.size();
    all.add_values(std::move(v));
  }
  gs.values.clear();
  gs.values.shrink_to_fit();
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
  const proto::Envelope env = ReplyEnvelope(std::move(r));
  log::Get("coll.store")
      ->debug("rendezvous gather '{}' of scope {} complete: {} ranks, {} bytes", name, scope.name,
              gs.n, bytes);
  for (uint64_t id : ids) Finish(id, Status::Ok(), &env);
}

void StoreServer::Finish(uint64_t id, const Status& status, const proto::Envelope* result) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return;
  std::unique_ptr<Waiter> w = std::move(it->second);
  waiters_.erase(it);
  if (w->timer != 0) reactor_.CancelTimer(w->timer);
  if (!status.ok()) {
    // Drop this waiter from the watch lists of keys it still missed.
    if (auto s = scopes_.find(w->scope); s != scopes_.end()) {
      for (const auto& k : w->keys) {
        auto wl = s->second.watchers.find(k);
        if (wl == s->second.watchers.end()) continue;
        std::erase(wl->second, id);
        if (wl->second.empty()) s->second.watchers.erase(wl);
      }
      if (!w->barrier.empty()) {
        auto b = s->second.barriers.find(w->barrier);
        if (b != s->second.barriers.end()) std::erase(b->second.waiters, id);
      }
      if (!w->gather.empty()) {
        auto g = s->second.gathers.find(w->gather);
        if (g != s->second.gathers.end() && !g->second.done &&
            g->second.waiter_of[w->gather_rank] == id) {
          // The rank leaves the gather; it may contribute again. A gather nobody is in is
          // forgotten, so its n is not fixed by callers that have all given up.
          g->second.waiter_of[w->gather_rank] = 0;
          g->second.values[w->gather_rank].clear();
          if (--g->second.arrived == 0) s->second.gathers.erase(g);
        }
      }
    }
    w->reply(ErrorEnvelope(0, status));
    return;
  }
  if (result != nullptr) {
    w->reply(*result);
    return;
  }
  if (!w->with_values) {
    w->reply(ReplyEnvelope({}));
    return;
  }
  const Scope& scope = scopes_.at(w->scope);
  proto::StoreReply r;
  for (const auto& k : w->keys) r.add_values(scope.kv.at(k));
  w->reply(ReplyEnvelope(std::move(r)));
}

}  // namespace muster::collectives
