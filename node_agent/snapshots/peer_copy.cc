#include "node_agent/snapshots/peer_copy.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "checkpoint/snapshot_channel.h"
#include "common/log_throttle.h"
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

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

// "tcp://HOST:PORT" -> HOST (brackets of an IPv6 address removed); "" when not tcp.
std::string TcpHost(const std::string& endpoint) {
  constexpr std::string_view kTcp = "tcp://";
  if (endpoint.rfind(kTcp, 0) != 0) return "";
  std::string rest = endpoint.substr(kTcp.size());
  const size_t colon = rest.rfind(':');
  if (colon == std::string::npos) return "";
  std::string host = rest.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return host;
}

StatusOr<AeadKey> AsAeadKey(std::string_view bytes) {
  if (bytes.size() != kAeadKeyBytes) {
    return DataLossError("snapshot session key is " + std::to_string(bytes.size()) +
                         " bytes, not " + std::to_string(kAeadKeyBytes));
  }
  AeadKey k;
  std::memcpy(k.data(), bytes.data(), k.size());
  return k;
}

StatusOr<DataSessionId> AsSessionId(std::string_view bytes) {
  if (bytes.size() != kDataSessionIdBytes) {
    return DataLossError("snapshot session id is " + std::to_string(bytes.size()) + " bytes, not " +
                         std::to_string(kDataSessionIdBytes));
  }
  DataSessionId id;
  std::memcpy(id.data(), bytes.data(), id.size());
  return id;
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

  // --- The data channel (see the header): sessions, opened over CURVE, and the plain TCP
  // connections their sealed frames arrive on.
  struct Session {
    std::string job;
    std::string client_key;  // the CURVE key that opened it ("" when insecure)
    int curve_fd = -1;       // the CURVE connection it was opened over; it ends with it
    AeadKey key{};
    uint64_t last_counter = 0;  // the newest PUT counter accepted: a lower or equal one is a replay
    int data_fd = -1;           // the data connection using it (-1: none yet)
    uint64_t dedup_seed = 0;    // of the chunk digests of its offers (data_channel.h)
  };
  std::map<DataSessionId, Session> sessions;  // GUARDED_BY(mu)
  struct DataConn {
    int fd = -1;
    Clock::time_point accepted;
    bool bound = false;  // GUARDED_BY(mu): has presented a live session
    bool done = false;   // GUARDED_BY(mu): ServeData returned; the thread may be joined
    std::thread thread;
  };
  std::vector<std::unique_ptr<DataConn>> data_conns;  // GUARDED_BY(mu)
  uint64_t data_inflight = 0;                         // GUARDED_BY(mu): bytes being read
  int data_listen_fd = -1;
  int data_port = 0;
  int data_wake[2] = {-1, -1};  // closing data_wake[1] stops the accept loop
  std::thread data_accept;
  std::atomic<int64_t> data_refused{0}, sessions_opened{0};
  // Payload bytes of the frames offered (deduplicated puts), and of the chunks sent for them.
  std::atomic<uint64_t> offered_bytes{0}, received_bytes{0};

  // REQUIRES: mu held. Ends `it`: its data connection, if any, is shut down (its thread closes it).
  void EndSessionLocked(std::map<DataSessionId, Session>::iterator it) {
    if (it->second.data_fd >= 0) ::shutdown(it->second.data_fd, SHUT_RDWR);
    sessions.erase(it);
  }
  // REQUIRES: mu held. Ends the sessions opened over the CURVE connection `fd`.
  void EndSessionsOfConnectionLocked(int fd) {
    for (auto it = sessions.begin(); it != sessions.end();) {
      auto next = std::next(it);
      if (it->second.curve_fd == fd) EndSessionLocked(it);
      it = next;
    }
  }

  // On the reactor: a session for the job of `req`, for the key and connection of `peer`. One per
  // CURVE connection: a new one ends the connection's previous one.
  proto::Envelope OpenSession(const PeerInfo& peer, const proto::Envelope& req) {
    const uint64_t id = req.request_id();
    const std::string& job = req.snapshot_peer_request().job();
    if (Status st = ValidatePathName(job, "snapshot job id"); !st.ok())
      return ErrorEnvelope(id, st);
    const std::string key_name = insecure ? std::string() : peer.public_key;
    if (Status st = Authorize(key_name, job); !st.ok()) return ErrorEnvelope(id, st);
    auto sid = RandomBytes(kDataSessionIdBytes);
    auto key = RandomBytes(kAeadKeyBytes);
    auto seed = RandomBytes(sizeof(uint64_t));
    if (!sid.ok() || !key.ok() || !seed.ok()) {
      return ErrorEnvelope(id, !sid.ok() ? sid.status() : !key.ok() ? key.status() : seed.status());
    }
    Session s{.job = job, .client_key = key_name, .curve_fd = peer.fd};
    std::memcpy(s.key.data(), key->data(), s.key.size());
    std::memcpy(&s.dedup_seed, seed->data(), sizeof(s.dedup_seed));
    const uint64_t dedup_seed = s.dedup_seed;
    DataSessionId session = *AsSessionId(*sid);
    {
      std::lock_guard<std::mutex> l(mu);
      // Again under the lock that inserts it: a Revoke since the check above must not leave a
      // session of a revoked job behind.
      if (Status st = AuthorizeLocked(key_name, job); !st.ok()) return ErrorEnvelope(id, st);
      if (peer.fd >= 0) EndSessionsOfConnectionLocked(peer.fd);
      if (sessions.size() >= static_cast<size_t>(kMaxSnapshotSessions)) {
        return ErrorEnvelope(
            id, UnavailableError("snapshot peer server: " + std::to_string(sessions.size()) +
                                 " data channel sessions open already"));
      }
      sessions.emplace(session, std::move(s));
      by_fd[peer.fd];  // the frames put in this session are logged when the connection closes
    }
    sessions_opened++;
    proto::Envelope out;
    out.set_request_id(id);
    auto* r = out.mutable_snapshot_peer_reply();
    r->set_session_id(*sid);
    r->set_session_key(*key);
    r->set_data_port(static_cast<uint32_t>(data_port));
    r->set_max_payload(store->memory_limit());
    r->set_dedup_chunk_bytes(static_cast<uint32_t>(kDedupChunkBytes));
    r->set_dedup_seed(dedup_seed);
    r->set_whole_offers(true);
    return out;
  }

  Status StartData(const std::string& rpc_endpoint) {
    std::string host = TcpHost(rpc_endpoint);
    if (host.empty()) {
      return InvalidArgumentError("snapshot peer server: endpoint " + rpc_endpoint +
                                  " is not tcp://HOST:PORT");
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const char* node = (host == "*" || host == "0.0.0.0") ? nullptr : host.c_str();
    if (int rc = ::getaddrinfo(node, "0", &hints, &res); rc != 0) {
      return UnavailableError("snapshot data channel: address " + host + ": " + gai_strerror(rc));
    }
    int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      ::freeaddrinfo(res);
      return InternalError(Errno("snapshot data channel: socket"));
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      ::freeaddrinfo(res);
      ::close(fd);
      return UnavailableError(Errno("snapshot data channel: bind " + host));
    }
    ::freeaddrinfo(res);
    sockaddr_storage a{};
    socklen_t len = sizeof(a);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    data_port = a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                        : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
    if (::pipe2(data_wake, O_CLOEXEC) != 0) {
      ::close(fd);
      return InternalError(Errno("snapshot data channel: pipe"));
    }
    data_listen_fd = fd;
    data_accept = std::thread([this] { AcceptData(); });
    return Status::Ok();
  }

  void StopData() {
    if (data_wake[1] >= 0) ::close(data_wake[1]);
    if (data_accept.joinable()) data_accept.join();
    std::vector<std::unique_ptr<DataConn>> conns;
    {
      std::lock_guard<std::mutex> l(mu);
      for (auto& c : data_conns) {
        if (!c->done) ::shutdown(c->fd, SHUT_RDWR);
      }
      conns.swap(data_conns);
      sessions.clear();
    }
    for (auto& c : conns) c->thread.join();
    if (data_listen_fd >= 0) ::close(data_listen_fd);
    if (data_wake[0] >= 0) ::close(data_wake[0]);
  }

  void AcceptData() {
    // The connection threads it starts inherit the class.
    if (Status st = EnterSnapshotThread(cpu, "snap-data-acc"); !st.ok())
      logger->error("{}", st.ToString());
    for (;;) {
      pollfd p[2] = {{data_listen_fd, POLLIN, 0}, {data_wake[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0) {
        if (errno == EINTR) continue;
        logger->error("snapshot data channel: poll: {}", std::strerror(errno));
        return;
      }
      if (p[1].revents) return;
      if (!(p[0].revents & POLLIN)) continue;
      int fd = ::accept4(data_listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // The listener stays readable: without a pause this loop would spin on a core.
          RefuseData(std::string("cannot accept a connection: ") + std::strerror(errno));
          pollfd w{data_wake[0], POLLIN, 0};
          (void)::poll(&w, 1, 100);
        }
        continue;
      }
      std::vector<std::unique_ptr<DataConn>> finished;
      {
        std::lock_guard<std::mutex> l(mu);
        std::erase_if(data_conns, [&](std::unique_ptr<DataConn>& c) {
          if (!c->done) return false;
          finished.push_back(std::move(c));
          return true;
        });
        if (data_conns.size() >= static_cast<size_t>(kMaxSnapshotDataConnections)) {
          // Full: the oldest connection that has not presented a session yet makes room (one
          // that never will cannot keep the agents' own out); none: this one is refused.
          // Only one that has had kSnapshotDataEvictAfter to present it: a forwarder's own new
          // connection cannot be pushed out by connections made right after it.
          DataConn* oldest = nullptr;
          const Clock::time_point now = Clock::now();
          for (auto& c : data_conns) {
            if (!c->bound && now - c->accepted >= kSnapshotDataEvictAfter &&
                (oldest == nullptr || c->accepted < oldest->accepted))
              oldest = c.get();
          }
          if (oldest != nullptr) {
            ::shutdown(oldest->fd, SHUT_RDWR);
            oldest->bound = true;  // shut down once
          }
        }
        if (data_conns.size() >= static_cast<size_t>(kMaxSnapshotDataConnections) + 1) {
          data_refused++;
          logger->warn("snapshot data channel: connection refused ({} open)", data_conns.size());
          ::close(fd);
        } else {
          auto c = std::make_unique<DataConn>();
          c->fd = fd;
          c->accepted = Clock::now();
          const int one = 1;
          ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          DataConn* raw = c.get();
          data_conns.push_back(std::move(c));
          raw->thread = std::thread([this, raw] { ServeData(raw); });
        }
      }
      for (auto& c : finished) c->thread.join();
    }
  }

  // Anyone who reaches the data port can make these: one line per kind of refusal per 10 s, with
  // the count held back since.
  std::mutex throttle_mu;
  LogThrottle throttle{std::chrono::seconds(10), 64};  // GUARDED_BY(throttle_mu)

  void RefuseData(const std::string& why) {
    data_refused++;
    refused++;
    std::optional<int64_t> held;
    {
      std::lock_guard<std::mutex> l(throttle_mu);
      held = throttle.Admit(why.substr(0, why.find_first_of("0123456789(:")), Clock::now());
    }
    if (!held) return;
    if (*held > 0) {
      logger->warn("snapshot data channel: refused: {} ({} more refusals like it held back)", why,
                   *held);
    } else {
      logger->warn("snapshot data channel: refused: {}", why);
    }
  }

  // One data connection: sealed PUTs in, sealed REPLYs out (data_channel.h). Anything that is
  // not a live session's next authentic message ends the connection, counted in data_refused;
  // a frame that is authentic but refused (not admitted, does not fit, stale) gets its reason in
  // a REPLY and the connection goes on.
  void ServeData(DataConn* conn) {
    const int fd = conn->fd;
    if (Status st = EnterSnapshotThread(cpu, "snap-data"); !st.ok())
      logger->error("{}", st.ToString());
    const uint64_t limit = store->memory_limit();
    bool first = true;
    std::optional<DataSessionId> bound;  // the session this connection presented
    while (true) {
      std::string header(kDataHeaderBytes, '\0');
      Clock::time_point deadline;
      if (first) {
        // A connection must start its first message promptly: one that never did the CURVE step
        // holds no more than this header's bytes, and only for this long. (Bytes that arrived in
        // time count even when this thread runs late, as it may at SCHED_IDLE on a busy node.)
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            conn->accepted + kSnapshotDataFirstMessageTimeout - Clock::now());
        pollfd p{fd, POLLIN, 0};
        int ready;
        do {
          ready = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
        } while (ready < 0 && errno == EINTR);
        // The whole header by the same time (a connection that trickles it byte by byte is not
        // held longer), or a second from now when this thread only looked late.
        deadline = std::max(conn->accepted + kSnapshotDataFirstMessageTimeout,
                            Clock::now() + std::chrono::seconds(1));
        Status st =
            ready > 0 ? checkpoint::RecvAll(fd, header.data(), header.size(), deadline)
                      : UnavailableError("nothing within " +
                                         std::to_string(kSnapshotDataFirstMessageTimeout.count()) +
                                         " ms of the connection");
        if (!st.ok()) {
          RefuseData("a connection sent no whole message header: " + st.ToString());
          break;
        }
      } else {
        if (!checkpoint::RecvAll(fd, header.data(), 1).ok()) break;  // idle between frames
        deadline = Clock::now() + kSnapshotFrameTimeout;
        Status st = checkpoint::RecvAll(fd, header.data() + 1, header.size() - 1, deadline);
        if (!st.ok()) {
          RefuseData("truncated message header: " + st.ToString());
          break;
        }
      }
      first = false;
      auto h =
          DecodeDataHeader(header, {DataKind::kPut, DataKind::kOffer, DataKind::kWhole}, limit);
      if (!h.ok()) {
        RefuseData(h.status().ToString());
        break;
      }
      const uint64_t want = uint64_t{h->prefix_length} + h->payload_length;
      AeadKey key{};
      std::string job;
      uint64_t dedup_seed = 0;
      Status busy;
      std::string why;  // set: refused before its body is read
      {
        std::lock_guard<std::mutex> l(mu);
        auto s = sessions.find(h->session);
        if (s == sessions.end()) {
          why = "unknown or ended session";
        } else if (bound && *bound != h->session) {
          why = "another session than the connection's";
        } else if (s->second.data_fd >= 0 && s->second.data_fd != fd) {
          why = "the session is in use by another connection";
        } else if (h->counter <= s->second.last_counter) {
          why = "replayed counter " + std::to_string(h->counter) + " (last " +
                std::to_string(s->second.last_counter) + ")";
        } else if (data_inflight + want > limit) {
          // Its bytes would pass the limit. Closed without a reply: the header is not
          // authenticated yet, and a reply sealed under its counter could reuse the nonce of the
          // reply to the authentic message with that counter (the forwarder takes the close as
          // Unavailable and sends its next frame on a new connection).
          busy = UnavailableError("snapshot peer server busy: " + std::to_string(data_inflight) +
                                  " bytes of frames being read, " + std::to_string(want) +
                                  " more asked");
        } else {
          s->second.data_fd = fd;
          conn->bound = true;
          bound = h->session;
          key = s->second.key;
          job = s->second.job;
          dedup_seed = s->second.dedup_seed;
          data_inflight += want;
        }
      }
      if (!why.empty()) {
        RefuseData(why);
        break;
      }
      if (!busy.ok()) {
        RefuseData(busy.message());
        break;
      }
      deadline = Clock::now() + kSnapshotFrameTimeout +
                 std::chrono::seconds(want / kSnapshotFrameBytesPerSecond);
      auto read = [&](char* out, size_t n) { return checkpoint::RecvAll(fd, out, n, deadline); };
      // What came: a frame (a PUT's, or one assembled from an OFFER's chunks), or, for an OFFER,
      // the verdict instead (a NEED that refused it, or an assembled frame that failed its
      // check); an error: the message did not arrive whole and authentic.
      StatusOr<Received> frame = InternalError("no message");
      if (h->kind == DataKind::kPut) {
        auto put = ReadDataPut(*h, header, key, limit, read,
                               [this](uint64_t n) { return store->TakeBuffer(n); });
        frame = put.ok() ? StatusOr<Received>(Received(std::move(*put)))
                         : StatusOr<Received>(put.status());
      } else {
        frame = ReceiveOffer(fd, *h, header, key, job, dedup_seed, limit, read);
      }
      bool session_live = false;
      int curve_fd = -1;
      {
        std::lock_guard<std::mutex> l(mu);
        data_inflight -= want;
        auto s = sessions.find(h->session);
        session_live = s != sessions.end();
        if (session_live && frame.ok()) {
          s->second.last_counter = h->counter;  // only once the message is authentic
          curve_fd = s->second.curve_fd;
        } else if (session_live) {
          EndSessionLocked(s);  // a message that does not open ends its session
        }
      }
      if (!frame.ok()) {
        RefuseData("put " + std::to_string(h->counter) + ": " + frame.status().ToString());
        break;
      }
      if (!session_live) {
        RefuseData("the session ended (its connection closed or its job was revoked)");
        break;
      }
      if (!frame->frame) {
        refused++;
        if (frame->answered) continue;  // the NEED carried the refusal: no REPLY follows
        logger->error("snapshot from a peer refused: {}", frame->verdict.ToString());
        auto reply = EncodeDataReply(h->session, h->counter, key, frame->verdict);
        if (!reply.ok() || !checkpoint::SendAll(fd, *reply).ok()) break;
        continue;
      }
      // Authentic: what the store and the admission say goes back in the reply.
      checkpoint::SnapshotFrame& got = *frame->frame;
      Status st = got.key.job == job
                      ? Authorize(insecure ? std::string() : SessionKey(h->session), job)
                      : PermissionDenied("this session is for snapshots of job " + job + ", not " +
                                         got.key.job);
      const checkpoint::SnapshotKey key_of_frame = got.key;
      if (st.ok()) {
        // Checked against its xxh3 by ReadDataPut or ReceiveOffer just above.
        st = store->PutDecoded(std::move(got));
        if (!st.ok()) {
          logger->error("snapshot from a peer refused ({}): {}", Describe(key_of_frame),
                        st.ToString());
        }
      }
      if (st.ok()) {
        kept++;
        std::lock_guard<std::mutex> l(mu);
        auto c = by_fd.find(curve_fd);
        if (c != by_fd.end() && !c->second.closed) {
          int64_t& newest = c->second.newest[{key_of_frame.job, key_of_frame.rank}];
          newest = std::max(newest, key_of_frame.step);
        }
      } else {
        refused++;
      }
      auto reply = EncodeDataReply(h->session, h->counter, key, st);
      if (!reply.ok() || !checkpoint::SendAll(fd, *reply).ok()) break;
    }
    std::lock_guard<std::mutex> l(mu);
    if (bound) {
      if (auto s = sessions.find(*bound); s != sessions.end() && s->second.data_fd == fd)
        s->second.data_fd = -1;
    }
    ::close(fd);
    conn->done = true;
  }

  // What one data message (and, for an OFFER, the exchange it starts) delivered.
  struct Received {
    explicit Received(checkpoint::SnapshotFrame f) : frame(std::move(f)) {}
    Received(Status v, bool a) : verdict(std::move(v)), answered(a) {}
    std::optional<checkpoint::SnapshotFrame> frame;  // checked (fields and xxh3)
    Status verdict;                                  // when there is no frame: why
    bool answered = false;  // the verdict went back in the NEED; no REPLY follows
  };

  // The chunk digests of a frame held, under one session's seed: where each digest's chunk is.
  struct Digested {
    std::weak_ptr<const checkpoint::SnapshotFrame> frame;
    uint64_t seed = 0;
    std::vector<ChunkDigest> digests;          // by chunk index
    std::map<ChunkDigest, uint64_t> chunk_of;  // digest -> the first chunk with it
  };
  std::mutex digest_mu;
  std::deque<std::shared_ptr<const Digested>> digested;  // GUARDED_BY(digest_mu); newest last

  // The digests of `f` under `seed`, computed once while it is held.
  std::shared_ptr<const Digested> DigestsOf(
      const std::shared_ptr<const checkpoint::SnapshotFrame>& f, uint64_t seed) {
    {
      std::lock_guard<std::mutex> l(digest_mu);
      for (const auto& d : digested) {
        if (d->seed == seed && d->frame.lock() == f) return d;
      }
    }
    auto d = std::make_shared<Digested>();
    d->frame = f;
    d->seed = seed;
    d->digests = ChunkDigests(f->payload, seed);
    for (uint64_t i = 0; i < d->digests.size(); ++i) d->chunk_of.emplace(d->digests[i], i);
    std::lock_guard<std::mutex> l(digest_mu);
    std::erase_if(digested, [](const auto& e) { return e->frame.expired(); });
    while (digested.size() >= kDigestedFrames) digested.pop_front();
    digested.push_back(d);
    return d;
  }

  // The rest of an OFFER exchange after its header `h` (data_channel.h): the offer, the NEED
  // (with the chunks this agent holds of the frames of the same job, attempt and step, waiting
  // a little for its own rank's frame of that step when it is due), the CHUNKS, and the frame
  // assembled and checked. An error: the exchange did not complete on the wire or a message did
  // not authenticate (the connection is closed).
  StatusOr<Received> ReceiveOffer(int fd, const DataHeader& h, std::string_view header,
                                  const AeadKey& key, const std::string& session_job, uint64_t seed,
                                  uint64_t limit, const DataReader& read) {
    MUSTER_ASSIGN_OR_RETURN(DataOffer offer, ReadDataOffer(h, header, key, limit, read));
    Status admitted = offer.job == session_job
                          ? Authorize(insecure ? std::string() : SessionKey(h.session), session_job)
                          : PermissionDenied("this session is for snapshots of job " + session_job +
                                             ", not " + offer.job);
    if (!admitted.ok()) {
      MUSTER_ASSIGN_OR_RETURN(std::string need,
                              EncodeDataNeed(h.session, h.counter, key, admitted, {}));
      MUSTER_RETURN_IF_ERROR(checkpoint::SendAll(fd, need));
      logger->error("snapshot offer from a peer refused: {}", admitted.ToString());
      return Received(admitted, true);
    }
    const checkpoint::SnapshotKey& k = offer.header.key;
    const uint64_t size = offer.header.payload_length;
    // Where each chunk offered is held here already (by digest, under this session's seed).
    struct Source {
      const checkpoint::SnapshotFrame* frame = nullptr;
      uint64_t chunk = 0;
    };
    // An OFFER has a digest per chunk; a whole-frame offer none (every chunk is asked for
    // unless a frame held here is the one offered).
    const uint64_t chunks = DedupChunkCount(size);
    std::vector<Source> from(chunks);
    std::vector<std::shared_ptr<const checkpoint::SnapshotFrame>> holding =
        store->FramesAt(offer.job, k.attempt, k.step, k.rank, Clock::now() + kDedupSourceWait);
    // The common case, data-parallel ranks: a frame held here has the offered frame's size and
    // xxh3. Its bytes passed that xxh3 when they were kept, so the frame assembled from them
    // passes the final check by definition: nothing is hashed, nothing asked for, and it is
    // copied whole (one pass, no zero fill first).
    const checkpoint::SnapshotFrame* same = nullptr;
    for (const auto& f : holding) {
      if (f->payload.size() == size && f->payload_xxh3 == offer.header.payload_xxh3) {
        same = f.get();
        break;
      }
    }
    ChunkNeeds need(chunks, same == nullptr);
    uint64_t needed = same == nullptr && !offer.whole ? chunks : 0;
    for (const auto& f : holding) {
      if (needed == 0) break;
      const auto d = DigestsOf(f, seed);
      for (uint64_t i = 0; i < offer.digests.size(); ++i) {
        if (!need[i]) continue;
        // In its place first (a frame like this one), else anywhere in the frame.
        if (i < d->digests.size() && d->digests[i] == offer.digests[i] &&
            std::min<uint64_t>(kDedupChunkBytes, f->payload.size() - i * kDedupChunkBytes) ==
                std::min<uint64_t>(kDedupChunkBytes, size - i * kDedupChunkBytes)) {
          from[i] = Source{f.get(), i};
          need[i] = false;
          --needed;
          continue;
        }
        auto c = d->chunk_of.find(offer.digests[i]);
        if (c == d->chunk_of.end()) continue;
        // The same length too (the last chunk of either may be short).
        const uint64_t at = c->second * kDedupChunkBytes;
        const uint64_t len = std::min<uint64_t>(kDedupChunkBytes, f->payload.size() - at);
        if (len != std::min<uint64_t>(kDedupChunkBytes, size - i * kDedupChunkBytes)) continue;
        from[i] = Source{f.get(), c->second};
        need[i] = false;
        --needed;
      }
    }
    MUSTER_ASSIGN_OR_RETURN(std::string ask,
                            EncodeDataNeed(h.session, h.counter, key, Status::Ok(), need));
    MUSTER_RETURN_IF_ERROR(checkpoint::SendAll(fd, ask));
    // Filled whole below (a copy of `same`, or every chunk from a frame held or from CHUNKS).
    std::string payload = store->TakeBuffer(size);
    if (same != nullptr) {
      std::memcpy(payload.data(), same->payload.data(), size);
    } else {
      for (uint64_t i = 0; i < from.size(); ++i) {
        if (from[i].frame == nullptr) continue;
        const uint64_t at = i * kDedupChunkBytes;
        std::memcpy(payload.data() + at,
                    from[i].frame->payload.data() + from[i].chunk * kDedupChunkBytes,
                    std::min<uint64_t>(kDedupChunkBytes, size - at));
      }
    }
    holding.clear();
    std::string chunks_header(kDataHeaderBytes, '\0');
    MUSTER_RETURN_IF_ERROR(read(chunks_header.data(), chunks_header.size()));
    MUSTER_ASSIGN_OR_RETURN(DataHeader ch,
                            DecodeDataHeader(chunks_header, DataKind::kChunks, size));
    if (ch.session != h.session || ch.counter != h.counter) {
      return DataLossError("snapshot data: chunks " + std::to_string(ch.counter) +
                           " do not answer offer " + std::to_string(h.counter));
    }
    MUSTER_RETURN_IF_ERROR(ReadDataChunks(ch, chunks_header, key, need, &payload, read));
    offered_bytes += size;
    received_bytes += ch.payload_length;
    // The frame as assembled, checked against the xxh3 in the forwarder's header: a chunk held
    // here whose digest only collided with the offered one fails here. (A copy of a frame held
    // with that xxh3 already passed the check when it was kept.)
    auto frame =
        same != nullptr
            ? checkpoint::DecodeSnapshotPartsChecked(offer.header, offer.job, std::move(payload))
            : checkpoint::DecodeSnapshotParts(offer.header, offer.job, std::move(payload));
    if (!frame.ok()) {
      return Received(
          DataLossError("the frame assembled from an offer (" + Describe(k) + ", " +
                        std::to_string(ch.payload_length) + " of " + std::to_string(size) +
                        " bytes sent) fails its check: " + frame.status().message()),
          false);
    }
    return Received(std::move(*frame));
  }

  // The key that opened `session` ("" when it has ended).
  std::string SessionKey(const DataSessionId& session) {
    std::lock_guard<std::mutex> l(mu);
    auto s = sessions.find(session);
    return s == sessions.end() ? std::string("(ended)") : s->second.client_key;
  }

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
      // The fd is another connection now: what the old one left is logged as it is, and the
      // sessions it opened end (their kClosed may not have been seen).
      FinishConnection(e.fd, /*force=*/true);
      EndSessionsOfConnectionLocked(e.fd);
      return;
    }
    EndSessionsOfConnectionLocked(e.fd);
    by_fd[e.fd].closed = true;
    FinishConnection(e.fd, /*force=*/false);
  }

  Status Authorize(const std::string& peer_key, const std::string& job) {
    std::lock_guard<std::mutex> l(mu);
    return AuthorizeLocked(peer_key, job);
  }
  Status AuthorizeLocked(const std::string& peer_key, const std::string& job) const {
    if (insecure) return Status::Ok();
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
    if (req.snapshot_peer_request().op() == proto::SnapshotPeerRequest::OPEN_SESSION) {
      proto::Envelope out = OpenSession(peer, req);  // small: answered here, on the reactor
      if (out.has_error()) refused++;
      return reply(std::move(out));
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
  impl_->StopData();
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
  if (Status st = impl->StartData(impl->rpc->endpoint()); !st.ok()) {
    cleanup();
    return st;
  }
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
  // And the job's data channel sessions: their connections are shut down now.
  for (auto it = impl_->sessions.begin(); it != impl_->sessions.end();) {
    auto next = std::next(it);
    if (it->second.job == job) impl_->EndSessionLocked(it);
    it = next;
  }
}

const std::string& SnapshotPeerServer::endpoint() const { return impl_->rpc->endpoint(); }
const std::string& SnapshotPeerServer::public_key() const { return impl_->rpc->public_key(); }
int64_t SnapshotPeerServer::kept() const { return impl_->kept.load(); }
int64_t SnapshotPeerServer::refused() const { return impl_->refused.load(); }
int64_t SnapshotPeerServer::connections() const { return impl_->connections.load(); }
int64_t SnapshotPeerServer::data_refused() const { return impl_->data_refused.load(); }
int64_t SnapshotPeerServer::sessions_opened() const { return impl_->sessions_opened.load(); }
uint64_t SnapshotPeerServer::offered_bytes() const { return impl_->offered_bytes.load(); }
uint64_t SnapshotPeerServer::offered_bytes_received() const { return impl_->received_bytes.load(); }
int SnapshotPeerServer::data_port() const { return impl_->data_port; }
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
uint64_t SnapshotForwarder::offered_bytes() const { return offered_bytes_.load(); }
uint64_t SnapshotForwarder::offered_bytes_sent() const { return offered_sent_bytes_.load(); }
int64_t SnapshotForwarder::whole_offers() const { return whole_offers_.load(); }
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

SnapshotForwarder::Fd& SnapshotForwarder::Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd >= 0) ::close(fd);
    fd = std::exchange(o.fd, -1);
  }
  return *this;
}
SnapshotForwarder::Fd::~Fd() {
  if (fd >= 0) ::close(fd);
}

StatusOr<SnapshotForwarder::Connection> SnapshotForwarder::Open(const SnapshotPeerTarget& t,
                                                                const std::string& job) {
  Connection c;
  c.target = t;
  RpcClient::Options o;
  o.endpoint = t.endpoint;
  o.insecure = options_.insecure;
  o.server_public_key = t.server_key;
  o.client_key = t.client_key;
  MUSTER_ASSIGN_OR_RETURN(c.client, RpcClient::Connect(context_, o));
  connections_++;
  // The session: over CURVE (the key admitted for the job), so its AES key is never in the clear.
  proto::Envelope req;
  auto* r = req.mutable_snapshot_peer_request();
  r->set_op(proto::SnapshotPeerRequest::OPEN_SESSION);
  r->set_job(job);
  MUSTER_ASSIGN_OR_RETURN(proto::Envelope reply,
                          c.client->Call(std::move(req), options_.call_timeout));
  if (!reply.has_snapshot_peer_reply()) {
    return DataLossError("peer answered a snapshot session request with something else");
  }
  const auto& sr = reply.snapshot_peer_reply();
  MUSTER_ASSIGN_OR_RETURN(c.session, AsSessionId(sr.session_id()));
  MUSTER_ASSIGN_OR_RETURN(c.key, AsAeadKey(sr.session_key()));
  if (sr.data_port() == 0 || sr.data_port() > 65535) {
    return DataLossError("peer answered data port " + std::to_string(sr.data_port()));
  }
  c.max_payload = sr.max_payload();
  c.dedup = sr.dedup_chunk_bytes() == kDedupChunkBytes;
  c.dedup_seed = sr.dedup_seed();
  c.whole_offers = c.dedup && sr.whole_offers();
  const std::string host = TcpHost(t.endpoint);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(sr.data_port());
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    return UnavailableError("snapshot data channel: address " + host + ": " + gai_strerror(rc));
  }
  c.data = Fd(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (c.data.fd < 0) {
    ::freeaddrinfo(res);
    return InternalError(Errno("snapshot data channel: socket"));
  }
  // Sends (and the connect) give up after the call timeout; reads wait with a deadline.
  const auto ms = options_.call_timeout.count();
  timeval tv{.tv_sec = static_cast<time_t>(ms / 1000),
             .tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000)};
  ::setsockopt(c.data.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  const int one = 1;
  ::setsockopt(c.data.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  const int rc = ::connect(c.data.fd, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  if (rc != 0) {
    return UnavailableError(Errno("snapshot data channel: connect to " + host + ":" + port));
  }
  return c;
}

Status SnapshotForwarder::Send(const SnapshotPeerTarget& t, const checkpoint::SnapshotFrame& f) {
  auto it = connections_by_job_.find(f.key.job);
  if (it == connections_by_job_.end() || !SameTarget(it->second.target, t)) {
    if (it != connections_by_job_.end()) connections_by_job_.erase(it);
    MUSTER_ASSIGN_OR_RETURN(Connection c, Open(t, f.key.job));
    it = connections_by_job_.insert_or_assign(f.key.job, std::move(c)).first;
  }
  Connection& c = it->second;
  if (c.max_payload > 0 && f.payload.size() > c.max_payload) {
    // The peer would refuse it from its header and close the connection; refused here, the
    // session stays for the next frame, and the reason says what it is.
    return FailedPreconditionError(
        "snapshots of job " + f.key.job + " do not fit on peer " + c.target.node + ": a frame of " +
        std::to_string(f.payload.size()) + " bytes, the peer keeps at most " +
        std::to_string(c.max_payload));
  }
  const int fd = c.data.fd;
  // The whole message within the call timeout plus a second per kSnapshotFrameBytesPerSecond (as
  // the peer reads it: a large frame is not cut for its size); each send within the call timeout
  // (SO_SNDTIMEO), so a peer that stops reading holds the loop no longer than that past it.
  const auto write_allowed = std::chrono::duration_cast<std::chrono::milliseconds>(
      options_.call_timeout +
      std::chrono::seconds(f.payload.size() / kSnapshotFrameBytesPerSecond));
  auto write_deadline = Clock::now() + write_allowed;
  auto write = [&](std::string_view b) {
    if (Clock::now() > write_deadline) {
      return UnavailableError("snapshot data channel: the peer took more than " +
                              std::to_string(write_allowed.count()) + " ms to read a frame of " +
                              std::to_string(f.payload.size()) + " bytes");
    }
    return checkpoint::SendAll(fd, b);
  };
  // The peer's answer (NEED or REPLY) to message `counter`, into `*carried`; its wait starts
  // once what it answers is written.
  auto answer = [&](DataKind kind, uint64_t counter, Status* carried, ChunkNeeds* need) {
    const auto deadline = Clock::now() + options_.call_timeout;
    auto read = [&](char* out, size_t n) { return checkpoint::RecvAll(fd, out, n, deadline); };
    std::string header(kDataHeaderBytes, '\0');
    MUSTER_RETURN_IF_ERROR(read(header.data(), header.size()));
    MUSTER_ASSIGN_OR_RETURN(DataHeader h, DecodeDataHeader(header, kind, f.payload.size()));
    if (h.session != c.session || h.counter != counter) {
      return DataLossError("peer answered message " + std::to_string(counter) +
                           " with an answer to " + std::to_string(h.counter) +
                           " of another session or message");
    }
    return kind == DataKind::kNeed
               ? ReadDataNeed(h, header, c.key, DedupChunkCount(f.payload.size()), read, carried,
                              need)
               : ReadDataReply(h, header, c.key, read, carried);
  };
  Status st, carried;
  if (c.dedup && f.payload.size() >= kMinOfferedPayload) {
    // A deduplicated put (data_channel.h): the digests first, then only the chunks the peer
    // does not hold. Offered whole (no digests) when the peer held the rank's last frame whole.
    const uint64_t counter = ++c.counter;
    ChunkNeeds need;
    bool& held_whole = c.held_whole[f.key.rank];
    const bool whole = c.whole_offers && held_whole;
    held_whole = false;  // until this offer's answer says otherwise
    st = WriteDataOffer(c.session, counter, c.key, f,
                        whole ? std::vector<ChunkDigest>{} : ChunkDigests(f.payload, c.dedup_seed),
                        write);
    if (st.ok()) st = answer(DataKind::kNeed, counter, &carried, &need);
    if (st.ok() && carried.ok()) {
      st = WriteDataChunks(c.session, counter, c.key, f.payload, need, &c.scratch, write);
      if (st.ok()) st = answer(DataKind::kReply, counter, &carried, nullptr);
      if (st.ok()) {
        const uint64_t sent = NeededBytes(f.payload.size(), need);
        offered_bytes_ += f.payload.size();
        offered_sent_bytes_ += sent;
        if (whole) whole_offers_++;
        held_whole = carried.ok() && sent == 0;
        if (auto old = copy_stats_.find(f.key.job);
            old != copy_stats_.end() && old->second.node != t.node) {
          ReportCopies(f.key.job);  // those went to the job's previous peer
        }
        CopyStats& cs = copy_stats_[f.key.job];
        cs.node = t.node;
        cs.offers++;
        cs.offered += f.payload.size();
        cs.sent += sent;
      }
    }
    // The frame assembled from the peer's own chunks failed its check (a digest that only
    // collided): sent again whole.
    if (st.ok() && carried.code() == StatusCode::kDataLoss) {
      if (!c.warned_resend) {  // once per connection
        c.warned_resend = true;
        log::Get("agent.snapshots")
            ->warn("snapshot of {} sent whole after the peer's assembled copy failed: {}",
                   Describe(f.key), carried.ToString());
      }
      carried = Status::Ok();
      write_deadline = Clock::now() + write_allowed;  // the resend's own
      const uint64_t again = ++c.counter;
      st = WriteDataPut(c.session, again, c.key, f, &c.scratch, write);
      if (st.ok()) st = answer(DataKind::kReply, again, &carried, nullptr);
    }
  } else {
    // Sealed straight from the frame held into the chunk that is sent (data_channel.h); the
    // peer checks the frame's xxh3 again once it has opened it.
    const uint64_t counter = ++c.counter;
    st = WriteDataPut(c.session, counter, c.key, f, &c.scratch, write);
    if (st.ok()) st = answer(DataKind::kReply, counter, &carried, nullptr);
  }
  if (st.code() == StatusCode::kUnavailable) {
    st = UnavailableError("no reply from the peer's snapshot data channel: " + st.message());
  }
  // A refusal of this frame by the peer's store or admission keeps the session; anything else
  // (the connection failed, the peer closed it after refusing the message) closes it, and the
  // next frame opens a new one.
  if (!st.ok() ||
      (carried.code() != StatusCode::kOk && carried.code() != StatusCode::kFailedPrecondition &&
       carried.code() != StatusCode::kAborted)) {
    connections_by_job_.erase(f.key.job);
  }
  return st.ok() ? carried : st;
}

void SnapshotForwarder::ReportCopies(const std::string& job) {
  auto cs = copy_stats_.find(job);
  if (cs == copy_stats_.end()) return;
  const CopyStats& v = cs->second;
  log::Get("agent.snapshots")
      ->info(
          "snapshots of {} to peer {}: {} frames offered, {:.1f} MiB, of which {:.1f} MiB "
          "({:.1f}%) sent; the rest the peer held already",
          job, v.node, v.offers, v.offered / 1048576.0, v.sent / 1048576.0,
          v.offered > 0 ? 100.0 * v.sent / v.offered : 0.0);
  copy_stats_.erase(cs);
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
    if (stop_) {
      while (!copy_stats_.empty()) ReportCopies(copy_stats_.begin()->first);
      return;
    }
    std::vector<Connection> closed;
    for (auto c = connections_by_job_.begin(); c != connections_by_job_.end();) {
      auto t = targets_.find(c->first);
      if (t == targets_.end() || !SameTarget(t->second, c->second.target)) {
        ReportCopies(c->first);
        closed.push_back(std::move(c->second));
        c = connections_by_job_.erase(c);
      } else {
        ++c;
      }
    }
    // A job whose connection had already closed (an error) when its target went.
    for (auto cs = copy_stats_.begin(); cs != copy_stats_.end();) {
      const std::string job = (cs++)->first;
      if (!targets_.count(job)) ReportCopies(job);
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
