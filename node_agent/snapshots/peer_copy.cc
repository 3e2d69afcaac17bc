#include "node_agent/snapshots/peer_copy.h"

#include <algorithm>
#include <atomic>

#include "common/logging.h"
#include "common/path_name.h"
#include "common/rpc.h"
#include "common/wire.h"

namespace muster::node_agent {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

Status PermissionDenied(const std::string& why) {
  return FailedPreconditionError("permission denied: " + why);
}

bool IsPermissionDenied(const Status& st) {
  return st.code() == StatusCode::kFailedPrecondition &&
         st.message().rfind("permission denied", 0) == 0;
}

// Room for the envelope and the frame's header around a payload.
constexpr int64_t kEnvelopeSlack = 1 << 20;

std::string Describe(const checkpoint::SnapshotKey& k) {
  return k.job + " attempt " + std::to_string(k.attempt) + " rank " + std::to_string(k.rank) +
         " step " + std::to_string(k.step);
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct SnapshotPeerServer::Impl {
  bool insecure = false;
  SnapshotStore* store = nullptr;
  SnapshotCpu cpu = SnapshotCpu::kNormal;
  // The server's own: destroyed in this order by ~SnapshotPeerServer (the reactor stopped first).
  std::unique_ptr<zmq::context_t> context;
  std::unique_ptr<Reactor> reactor;
  std::unique_ptr<ZapAuthenticator> zap;  // null when insecure
  std::unique_ptr<RpcServer> rpc;
  std::shared_ptr<spdlog::logger> logger = log::Get("agent.snapshots");

  // What came over one connection: for the log line when it closes.
  struct ConnectionPuts {
    int pending = 0;      // its requests queued or being served
    bool closed = false;  // its kClosed was seen
    std::map<std::pair<std::string, int32_t>, int64_t> newest;  // (job, rank) -> step kept
  };

  std::mutex mu;
  std::map<std::string, std::string> job_of_key;  // GUARDED_BY(mu): client key -> job
  // GUARDED_BY(mu): requests waiting for the worker, and the bytes of their frames.
  std::deque<std::pair<proto::Envelope, RpcServer::Reply>> work;
  // GUARDED_BY(mu): each queued request's client key and connection (PeerInfo::fd).
  std::deque<std::pair<std::string, int>> keys;
  std::map<int, ConnectionPuts> by_fd;  // GUARDED_BY(mu)
  uint64_t queued_bytes = 0;            // GUARDED_BY(mu)
  bool stop = false;                    // GUARDED_BY(mu)
  std::condition_variable cv;
  std::thread worker;
  std::atomic<int64_t> kept{0}, refused{0}, connections{0};

  // REQUIRES: mu held. Logs a closed connection's newest steps once nothing of it is pending
  // (`force`: now, its fd being another connection's already) and forgets them; the entry
  // goes once no request counted in it is pending.
  void FinishConnection(int fd, bool force) {
    auto it = by_fd.find(fd);
    if (it == by_fd.end() || !it->second.closed || (it->second.pending > 0 && !force)) return;
    for (const auto& [jr, step] : it->second.newest) {
      logger->info("snapshot peer connection closed; it last put job {} rank {} step {}", jr.first,
                   jr.second, step);
    }
    if (it->second.pending == 0) {
      by_fd.erase(it);
    } else {
      it->second.newest.clear();
      it->second.closed = false;
    }
  }

  void OnConnection(const ConnectionEvent& e) {
    std::lock_guard<std::mutex> l(mu);
    if (e.kind == ConnectionEvent::Kind::kAccepted) {
      connections++;
      // The fd is another connection now: what the old one left is logged as it is.
      FinishConnection(e.fd, /*force=*/true);
      return;
    }
    by_fd[e.fd].closed = true;
    FinishConnection(e.fd, /*force=*/false);
  }

  Status Authorize(const std::string& peer_key, const std::string& job) {
    if (insecure) return Status::Ok();
    std::lock_guard<std::mutex> l(mu);
    auto it = job_of_key.find(peer_key);
    if (it == job_of_key.end() || it->second != job) {
      return PermissionDenied("this key is not admitted for snapshots of job " + job);
    }
    return Status::Ok();
  }

  // On the reactor: queue for the worker (the frame is decoded and checked there).
  void Handle(const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
    uint64_t id = req.request_id();
    if (!req.has_snapshot_peer_request()) {
      refused++;
      return reply(ErrorEnvelope(id, InvalidArgumentError("not a snapshot peer request")));
    }
    const uint64_t bytes = req.snapshot_peer_request().frame().size();
    {
      std::lock_guard<std::mutex> l(mu);
      // At most the store's whole limit waits in memory besides what it holds.
      if (!work.empty() && queued_bytes + bytes > store->memory_limit()) {
        refused++;
        return reply(ErrorEnvelope(
            id, UnavailableError("snapshot peer server busy: " + std::to_string(queued_bytes) +
                                 " bytes of frames queued")));
      }
      queued_bytes += bytes;
      keys.emplace_back(insecure ? std::string() : peer.public_key, peer.fd);
      by_fd[peer.fd].pending++;
      work.emplace_back(std::move(req), std::move(reply));
    }
    cv.notify_one();
  }

  // `put`: set to the key of the frame kept, for a PUT that was.
  proto::Envelope Serve(const std::string& peer_key, proto::Envelope& req,
                        std::optional<checkpoint::SnapshotKey>* put) {
    const uint64_t id = req.request_id();
    auto& r = *req.mutable_snapshot_peer_request();
    // The request's own buffer becomes the payload kept: no second copy of it.
    auto frame = checkpoint::DecodeSnapshotFrameInPlace(std::move(*r.mutable_frame()),
                                                        store->memory_limit());
    if (!frame.ok()) return ErrorEnvelope(id, frame.status().WithContext("snapshot frame"));
    if (Status st = Authorize(peer_key, frame->key.job); !st.ok()) return ErrorEnvelope(id, st);
    proto::Envelope out;
    out.set_request_id(id);
    if (r.op() == proto::SnapshotPeerRequest::PUT) {
      const checkpoint::SnapshotKey key = frame->key;
      // Checked against its xxh3 by DecodeSnapshotFrameInPlace just above.
      if (Status st = store->PutDecoded(std::move(*frame)); !st.ok()) {
        logger->error("snapshot from a peer refused ({}): {}", Describe(key), st.ToString());
        return ErrorEnvelope(id, st);
      }
      kept++;
      *put = key;
      out.mutable_snapshot_peer_reply();
      return out;
    }
    if (r.op() == proto::SnapshotPeerRequest::GET) {
      auto held = store->Get(frame->key.job, frame->key.rank, frame->key.step);
      if (!held.ok()) return ErrorEnvelope(id, held.status());
      const checkpoint::SnapshotKey& k = (*held)->key;
      if (k.attempt != frame->key.attempt || k.world_size != frame->key.world_size) {
        return ErrorEnvelope(
            id, NotFoundError("no frame of " + Describe(frame->key) + " here (holds attempt " +
                              std::to_string(k.attempt) + ", world size " +
                              std::to_string(k.world_size) + ")"));
      }
      // Checked against its xxh3 by Get: not hashed again here.
      auto prefix =
          checkpoint::EncodeSnapshotPrefix(k, (*held)->payload.size(), (*held)->payload_xxh3);
      if (!prefix.ok()) return ErrorEnvelope(id, prefix.status());
      std::string* bytes = out.mutable_snapshot_peer_reply()->mutable_frame();
      bytes->reserve(prefix->size() + (*held)->payload.size());
      bytes->append(*prefix).append((*held)->payload);
      return out;
    }
    return ErrorEnvelope(id, InvalidArgumentError("unknown snapshot peer op " +
                                                  std::to_string(static_cast<int>(r.op()))));
  }

  void Loop() {
    if (Status st = EnterSnapshotThread(cpu, "snap-peer"); !st.ok())
      logger->error("{}", st.ToString());
    std::unique_lock<std::mutex> l(mu);
    for (;;) {
      cv.wait(l, [&] { return stop || !work.empty(); });
      if (stop) return;
      auto [req, reply] = std::move(work.front());
      work.pop_front();
      auto [key, fd] = std::move(keys.front());
      keys.pop_front();
      const uint64_t bytes = req.snapshot_peer_request().frame().size();
      l.unlock();
      std::optional<checkpoint::SnapshotKey> put;
      proto::Envelope out = Serve(key, req, &put);  // may move the frame's bytes out of `req`
      if (out.has_error()) refused++;
      req.Clear();
      reply(std::move(out));
      l.lock();
      queued_bytes -= bytes;
      if (auto c = by_fd.find(fd); c != by_fd.end()) {
        if (put) {
          int64_t& newest = c->second.newest[{put->job, put->rank}];
          newest = std::max(newest, put->step);
        }
        c->second.pending--;
        FinishConnection(fd, /*force=*/false);
      }
    }
  }
};

SnapshotPeerServer::SnapshotPeerServer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

SnapshotPeerServer::~SnapshotPeerServer() {
  impl_->reactor->Stop();  // no new requests; a reply sent from now on is dropped
  impl_->rpc.reset();
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  if (impl_->worker.joinable()) impl_->worker.join();
  impl_->zap.reset();
  impl_->reactor.reset();
  impl_->context.reset();
}

StatusOr<std::unique_ptr<SnapshotPeerServer>> SnapshotPeerServer::Create(const Options& options) {
  if (options.store == nullptr) return InvalidArgumentError("snapshot peer server: no store");
  auto impl = std::make_shared<Impl>();
  impl->insecure = options.insecure;
  impl->store = options.store;
  impl->cpu = options.cpu;
  impl->context = std::make_unique<zmq::context_t>();
  MUSTER_RETURN_IF_ERROR(ConfigureSnapshotContext(*impl->context, options.cpu));
  impl->reactor = std::make_unique<Reactor>("snapshots", impl->context.get());
  // Until the reactor runs, a failure below leaves nothing to stop but the objects themselves.
  auto cleanup = [&impl] {
    impl->rpc.reset();
    impl->zap.reset();
    impl->reactor.reset();
  };
  if (!options.insecure) {
    auto zap = ZapAuthenticator::Create(*impl->reactor);
    if (!zap.ok()) {
      cleanup();
      return zap.status().WithContext("snapshot peer server");
    }
    impl->zap = std::move(*zap);
  }
  RpcServer::Options o;
  o.name = "snapshots";
  o.endpoint = options.endpoint;
  o.insecure = options.insecure;
  o.authenticator = impl->zap.get();
  o.zap_domain = kSnapshotsZapDomain;
  Impl* p = impl.get();
  o.on_connection = [p](const ConnectionEvent& e) { p->OnConnection(e); };
  o.max_message_bytes =
      static_cast<int64_t>(std::min<uint64_t>(options.store->memory_limit(), uint64_t{1} << 62)) +
      kEnvelopeSlack;
  if (!options.insecure) {
    auto key = GenerateKeyPair();
    if (!key.ok()) {
      cleanup();
      return key.status();
    }
    o.server_key = *key;
    impl->zap->SetAuthorized(kSnapshotsZapDomain, {});
  }
  auto rpc = RpcServer::Create(
      *impl->reactor, o, [p](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
        p->Handle(peer, std::move(req), std::move(reply));
      });
  if (!rpc.ok()) {
    cleanup();
    return rpc.status();
  }
  impl->rpc = std::move(*rpc);
  impl->reactor->Start();
  const SnapshotCpu cpu = options.cpu;
  impl->reactor->Post("snapshots.cpu", [p, cpu] {
    if (Status st = EnterSnapshotThread(cpu, "snap-peer-rx"); !st.ok())
      p->logger->error("{}", st.ToString());
  });
  impl->worker = std::thread([p] { p->Loop(); });
  return std::unique_ptr<SnapshotPeerServer>(new SnapshotPeerServer(std::move(impl)));
}

Status SnapshotPeerServer::Allow(const std::string& job, const std::string& client_public_key) {
  MUSTER_RETURN_IF_ERROR(ValidatePathName(job, "snapshot job id"));
  if (!IsValidZ85Key(client_public_key)) {
    return InvalidArgumentError("snapshot key for " + job + " is not a z85 CURVE public key");
  }
  if (impl_->insecure) return Status::Ok();
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->job_of_key[client_public_key] = job;
  impl_->zap->Authorize(kSnapshotsZapDomain, {client_public_key, client_public_key});
  return Status::Ok();
}

void SnapshotPeerServer::Revoke(const std::string& job) {
  if (impl_->insecure) return;
  std::lock_guard<std::mutex> l(impl_->mu);
  for (auto it = impl_->job_of_key.begin(); it != impl_->job_of_key.end();) {
    if (it->second != job) {
      ++it;
      continue;
    }
    impl_->zap->Revoke(kSnapshotsZapDomain, it->first);
    it = impl_->job_of_key.erase(it);
  }
}

const std::string& SnapshotPeerServer::endpoint() const { return impl_->rpc->endpoint(); }
const std::string& SnapshotPeerServer::public_key() const { return impl_->rpc->public_key(); }
int64_t SnapshotPeerServer::kept() const { return impl_->kept.load(); }
int64_t SnapshotPeerServer::refused() const { return impl_->refused.load(); }
int64_t SnapshotPeerServer::connections() const { return impl_->connections.load(); }
uint64_t SnapshotPeerServer::refused_handshakes() const {
  return impl_->zap ? impl_->zap->refused_count() : 0;
}

// ---------------------------------------------------------------------------------------------

SnapshotForwarder::SnapshotForwarder(Options options)
    : options_(options), thread_([this] { Loop(); }) {}

SnapshotForwarder::~SnapshotForwarder() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  thread_.join();
}

void SnapshotForwarder::SetTarget(const std::string& job, SnapshotPeerTarget target) {
  std::lock_guard<std::mutex> l(mu_);
  targets_[job] = std::move(target);
  logged_.erase(job);
}

void SnapshotForwarder::ClearJob(const std::string& job) {
  std::lock_guard<std::mutex> l(mu_);
  targets_.erase(job);
  logged_.erase(job);
  std::erase_if(queue_, [&](const auto& f) { return f->key.job == job; });
  cv_.notify_all();
}

void SnapshotForwarder::Offer(std::shared_ptr<const checkpoint::SnapshotFrame> frame) {
  {
    std::lock_guard<std::mutex> l(mu_);
    auto t = targets_.find(frame->key.job);
    if (stop_ || t == targets_.end() || t->second.attempt != frame->key.attempt) return;
    for (auto& q : queue_) {
      if (q->key.job == frame->key.job && q->key.rank == frame->key.rank) {
        q = std::move(frame);  // the newest step matters on recovery, not every step
        ++replaced_;
        return;
      }
    }
    queue_.push_back(std::move(frame));
  }
  cv_.notify_all();
}

bool SnapshotForwarder::WaitIdle(milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  return cv_.wait_for(l, timeout, [&] { return queue_.empty() && !busy_; });
}

int64_t SnapshotForwarder::sent() const {
  std::lock_guard<std::mutex> l(mu_);
  return sent_;
}
int64_t SnapshotForwarder::failed() const {
  std::lock_guard<std::mutex> l(mu_);
  return failed_;
}
int64_t SnapshotForwarder::replaced() const {
  std::lock_guard<std::mutex> l(mu_);
  return replaced_;
}
int64_t SnapshotForwarder::connections() const { return connections_.load(); }
std::string SnapshotForwarder::last_error() const {
  std::lock_guard<std::mutex> l(mu_);
  return last_error_;
}

namespace {

bool SameTarget(const SnapshotPeerTarget& a, const SnapshotPeerTarget& b) {
  return a.attempt == b.attempt && a.endpoint == b.endpoint && a.server_key == b.server_key &&
         a.client_key.public_key == b.client_key.public_key &&
         a.client_key.secret_key == b.client_key.secret_key;
}

}  // namespace

Status SnapshotForwarder::Send(const SnapshotPeerTarget& t, const checkpoint::SnapshotFrame& f) {
  // The frame was checked against its xxh3 when it was kept here: its prefix carries that sum,
  // and the payload is appended to the request as it is held (the peer checks it again).
  MUSTER_ASSIGN_OR_RETURN(std::string prefix, checkpoint::EncodeSnapshotPrefix(
                                                  f.key, f.payload.size(), f.payload_xxh3));
  const int64_t need = static_cast<int64_t>(prefix.size() + f.payload.size()) + kEnvelopeSlack;
  auto it = connections_by_job_.find(f.key.job);
  if (it == connections_by_job_.end() || !SameTarget(it->second.target, t) ||
      it->second.max_message_bytes < need) {
    RpcClient::Options o;
    o.endpoint = t.endpoint;
    o.insecure = options_.insecure;
    o.server_public_key = t.server_key;
    o.client_key = t.client_key;
    // Room for frames up to twice this one's size (a rank's frames keep their size); a larger
    // one opens a connection with more.
    o.max_message_bytes = 2 * need;
    MUSTER_ASSIGN_OR_RETURN(auto client, RpcClient::Connect(context_, o));
    connections_++;
    it = connections_by_job_
             .insert_or_assign(f.key.job, Connection{t, std::move(client), o.max_message_bytes})
             .first;
  }
  proto::Envelope req;
  auto* r = req.mutable_snapshot_peer_request();
  r->set_op(proto::SnapshotPeerRequest::PUT);
  std::string* bytes = r->mutable_frame();
  bytes->reserve(prefix.size() + f.payload.size());
  bytes->append(prefix).append(f.payload);
  auto reply = it->second.client->Call(std::move(req), options_.call_timeout);
  Status st = reply.ok() ? Status::Ok() : reply.status();
  if (st.ok() && !reply->has_snapshot_peer_reply()) {
    st = DataLossError("peer answered a snapshot put with something else");
  }
  if (!st.ok() &&
      (st.code() == StatusCode::kUnavailable || st.code() == StatusCode::kDeadlineExceeded ||
       st.code() == StatusCode::kDataLoss || st.code() == StatusCode::kInternal)) {
    // The connection itself failed (or its state is unknown): the next frame opens a new one.
    // A refusal of this frame (the store is full, the key not admitted) keeps it.
    connections_by_job_.erase(f.key.job);
  }
  return st;
}

void SnapshotForwarder::Loop() {
  auto logger = log::Get("agent.snapshots");
  // Before the context's first socket, which starts its threads.
  if (Status st = ConfigureSnapshotContext(context_, options_.cpu); !st.ok()) {
    logger->error("{}", st.ToString());
  }
  if (Status st = EnterSnapshotThread(options_.cpu, "snap-forward"); !st.ok()) {
    logger->error("{}", st.ToString());
  }
  std::unique_lock<std::mutex> l(mu_);
  // Connections whose job has no target any more, or another one, closed off the lock.
  auto stale = [&] {
    for (const auto& [job, c] : connections_by_job_) {
      auto t = targets_.find(job);
      if (t == targets_.end() || !SameTarget(t->second, c.target)) return true;
    }
    return false;
  };
  for (;;) {
    cv_.wait(l, [&] { return stop_ || !queue_.empty() || stale(); });
    if (stop_) return;
    std::vector<std::unique_ptr<RpcClient>> closed;
    for (auto c = connections_by_job_.begin(); c != connections_by_job_.end();) {
      auto t = targets_.find(c->first);
      if (t == targets_.end() || !SameTarget(t->second, c->second.target)) {
        closed.push_back(std::move(c->second.client));
        c = connections_by_job_.erase(c);
      } else {
        ++c;
      }
    }
    if (!closed.empty()) {
      l.unlock();
      closed.clear();
      l.lock();
      continue;
    }
    auto frame = std::move(queue_.front());
    queue_.pop_front();
    auto t = targets_.find(frame->key.job);
    if (t == targets_.end() || t->second.attempt != frame->key.attempt) continue;
    SnapshotPeerTarget target = t->second;
    busy_ = true;
    l.unlock();
    Status st = Send(target, *frame);
    l.lock();
    busy_ = false;
    if (st.ok()) {
      ++sent_;
      if (logged_.erase(frame->key.job)) {
        logger->info("snapshots of {} reach peer {} again", frame->key.job, target.node);
      }
    } else {
      ++failed_;
      last_error_ = "copy of " + Describe(frame->key) + " to peer " + target.node + " (" +
                    target.endpoint + "): " + st.ToString();
      // Once per job and reason: a peer that refuses every frame does not flood the log.
      auto& prev = logged_[frame->key.job];
      if (prev != st.message()) {
        prev = st.message();
        logger->error("snapshot {}", last_error_);
      }
    }
    cv_.notify_all();
  }
}

// ---------------------------------------------------------------------------------------------

StatusOr<checkpoint::SnapshotFrame> FetchSnapshotFromPeer(
    const std::string& endpoint, const std::string& server_key, const KeyPair& client_key,
    bool insecure, const checkpoint::SnapshotKey& key, uint64_t max_payload, milliseconds timeout,
    const std::atomic<bool>* cancel) {
  MUSTER_ASSIGN_OR_RETURN(std::string ask, checkpoint::EncodeSnapshotFrame(key, ""));
  zmq::context_t context;
  const auto deadline = Clock::now() + timeout;
  Status last = DeadlineExceededError("no attempt made");
  for (;;) {
    if (cancel && cancel->load()) return AbortedError("snapshot fetch cancelled");
    auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) break;
    RpcClient::Options o;
    o.endpoint = endpoint;
    o.insecure = insecure;
    o.server_public_key = server_key;
    o.client_key = client_key;
    o.max_message_bytes =
        static_cast<int64_t>(std::min<uint64_t>(max_payload, uint64_t{1} << 62)) + kEnvelopeSlack;
    auto client = RpcClient::Connect(context, o);
    if (!client.ok()) return client.status();
    proto::Envelope req;
    auto* r = req.mutable_snapshot_peer_request();
    r->set_op(proto::SnapshotPeerRequest::GET);
    r->set_frame(ask);
    auto reply = (*client)->Call(std::move(req), left);
    if (reply.ok()) {
      if (!reply->has_snapshot_peer_reply()) {
        return DataLossError("peer answered a snapshot get with something else");
      }
      MUSTER_ASSIGN_OR_RETURN(
          auto f,
          checkpoint::DecodeSnapshotFrameInPlace(
              std::move(*reply->mutable_snapshot_peer_reply()->mutable_frame()), max_payload));
      if (!(f.key == key)) {
        return DataLossError("peer sent the frame of " + Describe(f.key) + " for " + Describe(key));
      }
      return f;
    }
    last = reply.status();
    bool retry = last.code() == StatusCode::kUnavailable ||
                 last.code() == StatusCode::kDeadlineExceeded || IsPermissionDenied(last);
    if (!retry) return last;
    std::this_thread::sleep_for(milliseconds(50));  // the holder admits the key shortly
  }
  return DeadlineExceededError("snapshot of " + Describe(key) + " from " + endpoint + " within " +
                               std::to_string(timeout.count()) + " ms: " + last.ToString());
}

}  // namespace muster::node_agent
