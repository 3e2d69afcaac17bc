#include "common/local_rpc.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>
#include <unordered_map>

#include "common/logging.h"
#include "common/wire.h"

namespace muster {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxSocketPath = sizeof(sockaddr_un::sun_path) - 1;  // 107 and a NUL
// A read asks for at least this much (the frame's missing bytes when more).
constexpr size_t kReadChunk = 16 << 10;
// Bytes read from one connection in one pass of the loop: one busy peer cannot starve others.
constexpr size_t kReadPerPass = 1 << 20;
// At most this much buffer is added per read, whatever a frame's header announces: memory
// follows the bytes that came, not what a peer claims.
constexpr size_t kMaxReadChunk = 1 << 20;
// Malformed frames in a row after which a connection is closed.
constexpr int kMaxMalformed = 16;
constexpr int kEventsPerPass = 256;

uint32_t Load32(const char* p) {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  return static_cast<uint32_t>(b[0]) | static_cast<uint32_t>(b[1]) << 8 |
         static_cast<uint32_t>(b[2]) << 16 | static_cast<uint32_t>(b[3]) << 24;
}

void Store32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// `env` as a frame, serialized straight into it (the sizes cached by ByteSizeLong).
std::string EnvelopeFrame(const proto::Envelope& env) {
  const size_t size = env.ByteSizeLong();
  std::string frame(kLocalFrameHeader + size, '\0');
  Store32(frame.data(), static_cast<uint32_t>(size));
  env.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(frame.data() + kLocalFrameHeader));
  return frame;
}

std::string ErrnoText(int err) { return std::strerror(err); }

// send(2), or sendmsg(2) with `fd` passed (SCM_RIGHTS) when fd >= 0. Non-blocking.
ssize_t SendWithFd(int sock, const char* data, size_t size, int fd) {
  if (fd < 0) return ::send(sock, data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
  iovec iov{const_cast<char*>(data), size};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
}

int64_t RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return std::max<int64_t>(left, 0);
}

}  // namespace

ScopedFd& ScopedFd::operator=(ScopedFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}

ScopedFd::~ScopedFd() {
  if (fd_ >= 0) ::close(fd_);
}

bool IsUnixEndpoint(std::string_view endpoint) {
  return endpoint.substr(0, kUnixScheme.size()) == kUnixScheme;
}

StatusOr<std::string> UnixEndpointPath(std::string_view endpoint) {
  if (!IsUnixEndpoint(endpoint)) {
    return InvalidArgumentError("'" + std::string(endpoint.substr(0, 256)) +
                                "' is not a unix:// endpoint");
  }
  std::string path(endpoint.substr(kUnixScheme.size()));
  if (path.empty() || path[0] != '/') {
    return InvalidArgumentError("the socket path of '" + std::string(endpoint.substr(0, 256)) +
                                "' is not absolute");
  }
  if (path.size() > kMaxSocketPath || path.find('\0') != std::string::npos) {
    return InvalidArgumentError("the socket path of '" + std::string(endpoint.substr(0, 256)) +
                                "' does not fit a Unix socket address (" +
                                std::to_string(kMaxSocketPath) + " bytes)");
  }
  return path;
}

std::string LocalFrame(std::string_view body) {
  std::string frame(kLocalFrameHeader + body.size(), '\0');
  Store32(frame.data(), static_cast<uint32_t>(body.size()));
  std::memcpy(frame.data() + kLocalFrameHeader, body.data(), body.size());
  return frame;
}

StatusOr<ScopedFd> ConnectUnixSocket(const std::string& endpoint, Clock::time_point deadline) {
  MUSTER_ASSIGN_OR_RETURN(std::string path, UnixEndpointPath(endpoint));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    ScopedFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) {
      return UnavailableError("cannot open a socket for " + endpoint + ": " + ErrnoText(errno));
    }
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) {
      return fd;
    }
    const int err = errno;
    const bool retry = err == ENOENT || err == ECONNREFUSED || err == EAGAIN || err == EINTR;
    if (!retry) return UnavailableError("cannot connect to " + endpoint + ": " + ErrnoText(err));
    if (Clock::now() + pause > deadline) {
      return DeadlineExceededError("cannot connect to " + endpoint + " (" + ErrnoText(err) +
                                   ") before the call's timeout");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

ssize_t RecvWithDescriptors(int sock, char* data, size_t size, std::vector<ScopedFd>* fds,
                            bool* truncated) {
  iovec iov{data, size};
  alignas(cmsghdr) char control[CMSG_SPACE(kMaxReceivedDescriptors * sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t r = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  if (r <= 0) return r;
  // Descriptors come only with the bytes they were sent with: each is owned from here on.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t k = 0; k < n; ++k) {
      int got = -1;
      std::memcpy(&got, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
      fds->emplace_back(got);
    }
  }
  *truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  return r;
}

// --- LocalFrameReader ------------------------------------------------------------------------

char* LocalFrameReader::Prepare(size_t n) {
  if (begin_ > 0 && cap_ - end_ < n) {
    std::memmove(data_.get(), data_.get() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (cap_ - end_ < n) {
    size_t cap = std::max(end_ + n, 2 * cap_);
    std::unique_ptr<char[]> grown(new char[cap]);
    if (end_ > begin_) std::memcpy(grown.get(), data_.get() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
    data_ = std::move(grown);
    cap_ = cap;
  }
  return data_.get() + end_;
}

void LocalFrameReader::Commit(size_t n) { end_ += std::min(n, cap_ - end_); }

void LocalFrameReader::Append(const char* data, size_t n) {
  if (n == 0) return;
  std::memcpy(Prepare(n), data, n);
  Commit(n);
}

LocalFrameReader::Result LocalFrameReader::Next(std::string_view* frame, uint64_t* announced) {
  const size_t avail = end_ - begin_;
  if (avail < kLocalFrameHeader) return Result::kNeedMore;
  const uint32_t len = Load32(data_.get() + begin_);
  if (static_cast<int64_t>(len) > max_) {
    if (announced != nullptr) *announced = len;
    return Result::kTooLarge;
  }
  if (avail - kLocalFrameHeader < len) return Result::kNeedMore;
  *frame = std::string_view(data_.get() + begin_ + kLocalFrameHeader, len);
  begin_ += kLocalFrameHeader + len;
  // The bytes stay where they are until the next Prepare: *frame remains valid.
  if (begin_ == end_) begin_ = end_ = 0;
  return Result::kFrame;
}

size_t LocalFrameReader::missing() const {
  const size_t avail = end_ - begin_;
  if (avail < kLocalFrameHeader) return kLocalFrameHeader - avail;
  const uint32_t len = Load32(data_.get() + begin_);
  if (static_cast<int64_t>(len) > max_) return 0;
  const size_t whole = kLocalFrameHeader + len;
  return avail >= whole ? 0 : whole - avail;
}

// --- LocalRpcServer --------------------------------------------------------------------------

// The server's sockets, shared with Reply closures so that a reply after the server has gone is
// dropped. Reactor thread only.
struct LocalRpcServer::Core : std::enable_shared_from_this<LocalRpcServer::Core> {
  struct Conn {
    explicit Conn(int64_t max) : in(max) {}
    int fd = -1;
    PeerInfo peer;
    LocalFrameReader in;
    struct Out {
      std::string bytes;
      std::shared_ptr<const ScopedFd> fd;  // passed with the first byte; null once sent
      // Sent instead, with request id `id`, when `fd` cannot be passed.
      std::shared_ptr<const proto::Envelope> fallback;
      uint64_t id = 0;
    };
    std::deque<Out> out;  // frames not yet written; the first from out_off on
    size_t out_off = 0;
    int64_t out_bytes = 0;
    bool want_write = false;  // EPOLLOUT is in its interest set
    bool closing = false;     // close once `out` is written; read nothing more
    int malformed = 0;        // frames in a row that were not Envelopes
  };

  Reactor* reactor = nullptr;
  Options options;
  Handler handler;
  int64_t max_queued = 0;
  int epfd = -1;
  int listen_fd = -1;
  bool listening = false;  // listen_fd is in epfd (taken out for a while when out of fds)
  bool open = true;
  uint64_t next_conn = 1;
  uint64_t refused = 0;    // connections closed at accept: past max_connections
  uint64_t malformed = 0;  // frames that were not Envelopes (for the log's rate)
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns;

  void OnReadable();
  void Accept();
  // Reads what `id` sent and hands its whole frames to the handler.
  void Read(uint64_t id);
  // Handles the frames buffered for `id`; false once the connection is gone or closing.
  bool Dispatch(uint64_t id);
  void Send(uint64_t id, std::string frame, std::shared_ptr<const ScopedFd> fd = nullptr,
            std::shared_ptr<const proto::Envelope> fallback = nullptr, uint64_t request = 0);
  // Writes what it can of `out` from `off`; the bytes written, or -1 with errno. A descriptor
  // the kernel refuses to pass (ETOOMANYREFS) is dropped for the frame's fallback.
  ssize_t WriteOut(Conn& c, Conn::Out& out, size_t off);
  void Flush(uint64_t id);
  void Interest(Conn& c, uint64_t id);
  void Close(uint64_t id);
  void Shutdown();
};

void LocalRpcServer::Core::OnReadable() {
  auto self = shared_from_this();  // a handler may destroy the server
  epoll_event events[kEventsPerPass];
  int n = epoll_wait(epfd, events, kEventsPerPass, 0);
  for (int i = 0; i < n && open; ++i) {
    const uint64_t id = events[i].data.u64;
    if (id == 0) {
      Accept();
      continue;
    }
    if ((events[i].events & EPOLLOUT) != 0) Flush(id);
    if ((events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0) Read(id);
  }
}

void LocalRpcServer::Core::Accept() {
  auto logger = log::Get("rpc");
  for (int i = 0; i < kEventsPerPass && open; ++i) {
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      const int err = errno;
      logger->error("{}: accept on {}: {}", options.name, options.path, ErrnoText(err));
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        // The listener stays readable while the connection waits: stop watching it for a
        // moment instead of spinning on the same error.
        (void)epoll_ctl(epfd, EPOLL_CTL_DEL, listen_fd, nullptr);
        listening = false;
        std::weak_ptr<Core> weak = shared_from_this();
        reactor->PostAfter(std::chrono::milliseconds(100), options.name + ".relisten", [weak] {
          auto core = weak.lock();
          if (!core || !core->open || core->listening) return;
          epoll_event ev{};
          ev.events = EPOLLIN;
          ev.data.u64 = 0;
          if (epoll_ctl(core->epfd, EPOLL_CTL_ADD, core->listen_fd, &ev) == 0) {
            core->listening = true;
          }
        });
      }
      return;
    }
    if (conns.size() >= static_cast<size_t>(options.max_connections)) {
      // Told why, best effort (a new connection's buffer is empty, so this rarely blocks).
      const std::string refusal = EnvelopeFrame(
          ErrorEnvelope(0, UnavailableError(options.name + ": " + std::to_string(conns.size()) +
                                            " connections are open, the most it serves at once")));
      (void)::send(fd, refusal.data(), refusal.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      ::close(fd);
      ++refused;
      if ((refused & (refused - 1)) == 0) {  // the 1st, 2nd, 4th, 8th...
        logger->warn("{}: {} connections open, the most it holds: refused a new one ({} so far)",
                     options.name, conns.size(), refused);
      }
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      logger->warn("{}: SO_PEERCRED of a new connection: {}", options.name, ErrnoText(errno));
      ::close(fd);
      continue;
    }
    const uint64_t id = next_conn++;
    auto c = std::make_unique<Conn>(options.max_message_bytes);
    c->fd = fd;
    c->peer.routing_id = "local-" + std::to_string(id);
    c->peer.user_id = "uid " + std::to_string(cred.uid);
    // As ZeroMQ spells an ipc peer: "host:uid:gid:pid", the pid last.
    c->peer.address = "unix:" + std::to_string(cred.uid) + ":" + std::to_string(cred.gid) + ":" +
                      std::to_string(cred.pid);
    c->peer.role = KeyRole::kLegacy;
    c->peer.fd = fd;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = id;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
      logger->error("{}: cannot watch a new connection: {}", options.name, ErrnoText(errno));
      ::close(fd);
      continue;
    }
    conns.emplace(id, std::move(c));
  }
}

void LocalRpcServer::Core::Read(uint64_t id) {
  size_t budget = kReadPerPass;
  for (;;) {
    auto it = conns.find(id);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    if (c.closing) {  // reads nothing more; a peer gone meanwhile fails the write and closes
      Flush(id);
      return;
    }
    const size_t want = std::min(std::max(c.in.missing(), kReadChunk), kMaxReadChunk);
    char* into = c.in.Prepare(want);
    ssize_t r = ::recv(c.fd, into, want, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      log::Get("rpc")->debug("{}: recv from {}: {}", options.name, c.peer.address,
                             ErrnoText(errno));
      Close(id);
      return;
    }
    if (r == 0) {  // the peer closed (exit, kill -9): replies still owed to it are dropped
      Close(id);
      return;
    }
    c.in.Commit(static_cast<size_t>(r));
    if (!Dispatch(id)) return;
    // A short read took everything there was: no second recv only to hear EAGAIN.
    if (static_cast<size_t>(r) < want) return;
    if (budget <= static_cast<size_t>(r)) return;  // the rest in a later pass (level-triggered)
    budget -= static_cast<size_t>(r);
  }
}

bool LocalRpcServer::Core::Dispatch(uint64_t id) {
  auto logger = log::Get("rpc");
  for (;;) {
    if (!open) return false;
    auto it = conns.find(id);
    if (it == conns.end()) return false;
    Conn& c = *it->second;
    std::string_view frame;
    uint64_t announced = 0;
    switch (c.in.Next(&frame, &announced)) {
      case LocalFrameReader::Result::kNeedMore:
        return true;
      case LocalFrameReader::Result::kTooLarge: {
        logger->warn(
            "{}: {} sent a message of {} bytes, over the limit of {}: closing its "
            "connection",
            options.name, c.peer.address, announced, options.max_message_bytes);
        c.closing = true;
        Send(id, EnvelopeFrame(ErrorEnvelope(
                     0, InvalidArgumentError("message of " + std::to_string(announced) +
                                             " bytes exceeds the limit of " +
                                             std::to_string(options.max_message_bytes) +
                                             " bytes; the connection is closed"))));
        // Send closed it if it wrote everything; else it waits for EPOLLOUT, reading nothing.
        if (auto left = conns.find(id); left != conns.end()) Interest(*left->second, id);
        return false;
      }
      case LocalFrameReader::Result::kFrame:
        break;
    }
    auto env = ParseEnvelope(frame.data(), frame.size());
    if (!env.ok()) {
      ++malformed;
      if ((malformed & (malformed - 1)) == 0) {  // the 1st, 2nd, 4th, 8th...
        logger->warn("{}: from {}: {} ({} malformed so far)", options.name, c.peer.address,
                     env.status().message(), malformed);
      }
      if (++c.malformed >= kMaxMalformed) {
        c.closing = true;
        Send(id, EnvelopeFrame(ErrorEnvelope(
                     0, InvalidArgumentError(env.status().message() + "; " +
                                             std::to_string(kMaxMalformed) +
                                             " malformed messages in a row: the connection is "
                                             "closed"))));
        if (auto left = conns.find(id); left != conns.end()) Interest(*left->second, id);
        return false;
      }
      Send(id, EnvelopeFrame(ErrorEnvelope(0, env.status())));
      continue;
    }
    c.malformed = 0;
    Reply reply = LocalServerReply{weak_from_this(), reactor, id, env->request_id(),
                                   std::make_shared<std::atomic<bool>>(false)};
    const PeerInfo peer = c.peer;  // the handler may close the connection
    const auto* field = proto::Envelope::descriptor()->FindFieldByNumber(env->payload_case());
    auto start = Clock::now();
    handler(peer, std::move(*env), std::move(reply));
    auto took = Clock::now() - start;
    if (took > std::chrono::milliseconds(100)) {
      logger->warn("{}: request {} from {} took {} ms", options.name,
                   field ? field->name() : "empty", peer.address,
                   std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
    }
  }
}

void LocalRpcServer::Core::Interest(Conn& c, uint64_t id) {
  epoll_event ev{};
  ev.events = (c.closing ? 0u : static_cast<uint32_t>(EPOLLIN)) |
              (c.want_write ? static_cast<uint32_t>(EPOLLOUT) : 0u);
  ev.data.u64 = id;
  (void)epoll_ctl(epfd, EPOLL_CTL_MOD, c.fd, &ev);
}

ssize_t LocalRpcServer::Core::WriteOut(Conn& c, Conn::Out& out, size_t off) {
  for (;;) {
    const int fd = out.fd && off == 0 ? out.fd->get() : -1;
    ssize_t w = SendWithFd(c.fd, out.bytes.data() + off, out.bytes.size() - off, fd);
    if (w >= 0) {
      if (w > 0) out.fd.reset();  // went with the first byte
      return w;
    }
    if (errno == EINTR) continue;
    if (errno == ETOOMANYREFS && fd >= 0 && out.fallback) {
      // This user has too many descriptors in flight: the same answer without one.
      log::Get("rpc")->warn("{}: cannot pass a descriptor to {} ({}): replying without it",
                            options.name, c.peer.address, ErrnoText(errno));
      proto::Envelope plain = *out.fallback;
      plain.set_request_id(out.id);
      out.fd.reset();
      out.fallback.reset();
      out.bytes = EnvelopeFrame(plain);
      continue;
    }
    return -1;
  }
}

void LocalRpcServer::Core::Send(uint64_t id, std::string frame, std::shared_ptr<const ScopedFd> fd,
                                std::shared_ptr<const proto::Envelope> fallback, uint64_t request) {
  if (!open) return;
  auto it = conns.find(id);
  if (it == conns.end()) return;  // the peer has gone: dropped, as ZeroMQ drops it
  Conn& c = *it->second;
  Conn::Out out{std::move(frame), std::move(fd), std::move(fallback), request};
  size_t written = 0;
  if (c.out.empty()) {
    ssize_t w = WriteOut(c, out, 0);
    if (w < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        // EPIPE, ECONNRESET: the peer has gone; ETOOMANYREFS without a fallback.
        log::Get("rpc")->debug("{}: send to {}: {}", options.name, c.peer.address,
                               ErrnoText(errno));
        Close(id);
        return;
      }
      w = 0;
    }
    written = static_cast<size_t>(w);
    if (written == out.bytes.size()) {
      if (c.closing) Close(id);
      return;
    }
  }
  c.out_bytes += static_cast<int64_t>(out.bytes.size() - written);
  if (c.out.empty()) c.out_off = written;
  c.out.push_back(std::move(out));
  if (c.out_bytes > max_queued) {
    log::Get("rpc")->warn(
        "{}: {} does not read its replies ({} bytes wait, more than {}): closing its connection",
        options.name, c.peer.address, c.out_bytes, max_queued);
    Close(id);
    return;
  }
  if (!c.want_write) {
    c.want_write = true;
    Interest(c, id);
  }
}

void LocalRpcServer::Core::Flush(uint64_t id) {
  auto it = conns.find(id);
  if (it == conns.end()) return;
  Conn& c = *it->second;
  while (!c.out.empty()) {
    Conn::Out& f = c.out.front();
    const size_t before = f.bytes.size();
    ssize_t w = WriteOut(c, f, c.out_off);
    if (w < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      log::Get("rpc")->debug("{}: send to {}: {}", options.name, c.peer.address, ErrnoText(errno));
      Close(id);
      return;
    }
    // A fallback taken in place of the frame changes what is queued.
    c.out_bytes += static_cast<int64_t>(f.bytes.size()) - static_cast<int64_t>(before);
    c.out_off += static_cast<size_t>(w);
    c.out_bytes -= w;
    if (c.out_off < f.bytes.size()) return;
    c.out.pop_front();
    c.out_off = 0;
  }
  if (c.closing) {
    Close(id);
    return;
  }
  c.want_write = false;
  Interest(c, id);
}

void LocalRpcServer::Core::Close(uint64_t id) {
  auto it = conns.find(id);
  if (it == conns.end()) return;
  (void)epoll_ctl(epfd, EPOLL_CTL_DEL, it->second->fd, nullptr);
  ::close(it->second->fd);
  conns.erase(it);
}

void LocalRpcServer::Core::Shutdown() {
  if (!open) return;
  open = false;
  for (auto& [id, c] : conns) ::close(c->fd);
  conns.clear();
  if (listen_fd >= 0) ::close(listen_fd);
  if (epfd >= 0) ::close(epfd);
  listen_fd = epfd = -1;
  ::unlink(options.path.c_str());
}

void LocalServerReply::operator()(proto::Envelope out) const {
  if (replied->exchange(true)) return;
  out.set_request_id(id);
  std::string frame = EnvelopeFrame(out);
  if (reactor->InReactorThread()) {
    if (auto core = weak.lock()) core->Send(connection, std::move(frame));
    return;
  }
  reactor->Post("local-rpc.reply", [weak = weak, c = connection, frame = std::move(frame)] {
    if (auto core = weak.lock()) core->Send(c, std::move(frame));
  });
}

void LocalServerReply::Send(std::shared_ptr<const SerializedReply> serialized,
                            std::shared_ptr<const ScopedFd> fd,
                            std::shared_ptr<const proto::Envelope> fallback) const {
  if (replied->exchange(true)) return;
  const size_t size = serialized->size(id);
  std::string frame(kLocalFrameHeader + size, '\0');
  Store32(frame.data(), static_cast<uint32_t>(size));
  serialized->WriteTo(id, frame.data() + kLocalFrameHeader);
  if (!fd) fallback.reset();
  if (reactor->InReactorThread()) {
    if (auto core = weak.lock()) {
      core->Send(connection, std::move(frame), std::move(fd), std::move(fallback), id);
    }
    return;
  }
  reactor->Post("local-rpc.reply",
                [weak = weak, c = connection, frame = std::move(frame), fd = std::move(fd),
                 fallback = std::move(fallback), id = id]() mutable {
                  if (auto core = weak.lock()) {
                    core->Send(c, std::move(frame), std::move(fd), std::move(fallback), id);
                  }
                });
}

bool ReplyWithDescriptor(const RpcServer::Reply& reply,
                         std::shared_ptr<const SerializedReply> serialized,
                         std::shared_ptr<const ScopedFd> fd,
                         std::shared_ptr<const proto::Envelope> fallback) {
  const LocalServerReply* local = reply.target<LocalServerReply>();
  if (local == nullptr) return false;
  local->Send(std::move(serialized), std::move(fd), std::move(fallback));
  return true;
}

LocalRpcServer::LocalRpcServer(Reactor& reactor, std::string endpoint, std::shared_ptr<Core> core)
    : reactor_(reactor), endpoint_(std::move(endpoint)), core_(std::move(core)) {}

StatusOr<std::unique_ptr<LocalRpcServer>> LocalRpcServer::Create(Reactor& reactor, Options options,
                                                                 Handler handler) {
  const std::string what = options.name + ": cannot serve " + options.path;
  if (options.path.empty() || options.path[0] != '/') {
    return InvalidArgumentError(what + ": not an absolute path");
  }
  if (options.path.size() > kMaxSocketPath) {
    return InvalidArgumentError(what + ": the path does not fit a Unix socket address (" +
                                std::to_string(kMaxSocketPath) + " bytes)");
  }
  if (options.max_message_bytes <= 0 || options.max_message_bytes > UINT32_MAX) {
    return InvalidArgumentError(what + ": the message limit must be in 1..2^32-1 bytes");
  }
  auto core = std::make_shared<Core>();
  core->reactor = &reactor;
  core->handler = std::move(handler);
  core->max_queued = options.max_queued_bytes > 0
                         ? options.max_queued_bytes
                         : std::max<int64_t>(2 * options.max_message_bytes, 1 << 20);
  if (options.max_connections <= 0) {
    rlimit lim{};
    getrlimit(RLIMIT_NOFILE, &lim);
    const uint64_t half = lim.rlim_cur == RLIM_INFINITY ? 16384 : lim.rlim_cur / 2;
    options.max_connections = static_cast<int>(std::clamp<uint64_t>(half, 64, 1 << 20));
  }
  core->options = std::move(options);
  const Options& o = core->options;
  core->listen_fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (core->listen_fd < 0) return UnavailableError(what + ": socket: " + ErrnoText(errno));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, o.path.data(), o.path.size());
  if (::bind(core->listen_fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    ::close(core->listen_fd);
    return UnavailableError(what + ": bind: " + ErrnoText(err));
  }
  // Core's Shutdown unlinks the path from here on.
  auto fail = [&](const std::string& step) {
    const int err = errno;
    core->Shutdown();
    return UnavailableError(what + ": " + step + ": " + ErrnoText(err));
  };
  // Thousands of ranks may connect at once (the kernel caps this at net.core.somaxconn).
  if (::listen(core->listen_fd, 4096) != 0) return fail("listen");
  core->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (core->epfd < 0) return fail("epoll_create1");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  if (epoll_ctl(core->epfd, EPOLL_CTL_ADD, core->listen_fd, &ev) != 0) return fail("epoll_ctl");
  core->listening = true;
  std::weak_ptr<Core> weak = core;
  // The connections are watched by the server's own epoll set, which the reactor watches as
  // one descriptor: the reactor's set holds one entry per server, not one per connection.
  reactor.AddFd(core->epfd, o.name + ".recv", [weak] {
    if (auto c = weak.lock(); c && c->open) c->OnReadable();
  });
  std::string endpoint = std::string(kUnixScheme) + o.path;
  log::Get("rpc")->debug("{}: serving {}", o.name, endpoint);
  return std::unique_ptr<LocalRpcServer>(
      new LocalRpcServer(reactor, std::move(endpoint), std::move(core)));
}

LocalRpcServer::~LocalRpcServer() {
  if (!core_) return;
  const bool own = reactor_.InReactorThread() || !reactor_.running();
  if (own && core_->epfd >= 0) reactor_.RemoveFd(core_->epfd);
  core_->Shutdown();
}

size_t LocalRpcServer::connections() const { return core_->conns.size(); }

// --- LocalRpcClient --------------------------------------------------------------------------

LocalRpcClient::LocalRpcClient(Options options)
    : options_(std::move(options)), in_(options_.max_message_bytes) {}

LocalRpcClient::~LocalRpcClient() { Drop(); }

StatusOr<std::unique_ptr<LocalRpcClient>> LocalRpcClient::Connect(Options options) {
  MUSTER_RETURN_IF_ERROR(UnixEndpointPath(options.endpoint).status());
  if (options.max_message_bytes <= 0 || options.max_message_bytes > UINT32_MAX) {
    return InvalidArgumentError("client for " + options.endpoint +
                                ": the message limit must be in 1..2^32-1 bytes");
  }
  return std::unique_ptr<LocalRpcClient>(new LocalRpcClient(std::move(options)));
}

void LocalRpcClient::Drop() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  in_ = LocalFrameReader(options_.max_message_bytes);
  fds_.clear();
}

Status LocalRpcClient::Open(Clock::time_point deadline) {
  MUSTER_ASSIGN_OR_RETURN(ScopedFd fd, ConnectUnixSocket(options_.endpoint, deadline));
  fd_ = fd.release();
  return Status::Ok();
}

StatusOr<proto::Envelope> LocalRpcClient::Call(proto::Envelope request,
                                               std::chrono::milliseconds timeout) {
  return Call(std::move(request), timeout, nullptr);
}

StatusOr<proto::Envelope> LocalRpcClient::Call(proto::Envelope request,
                                               std::chrono::milliseconds timeout,
                                               std::vector<ScopedFd>* received) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto deadline = Clock::now() + timeout;
  const uint64_t id = next_id_++;
  MUSTER_RETURN_IF_ERROR(StampRequest(request, id, timeout, options_.max_message_bytes).status());
  const std::string frame = EnvelopeFrame(request);
  auto no_reply = [&] {
    Drop();
    return DeadlineExceededError("no reply from " + options_.endpoint + " within " +
                                 std::to_string(timeout.count()) + " ms");
  };
  auto gone = [&](const std::string& how) {
    Drop();
    return UnavailableError("the server at " + options_.endpoint + " " + how);
  };

  // Send. A pooled connection that the server closed since its last use is found here (EPIPE
  // before any byte of this request reached it) and opened once more.
  bool fresh = fd_ < 0;
  if (fresh) MUSTER_RETURN_IF_ERROR(Open(deadline));
  size_t sent = 0;
  while (sent < frame.size()) {
    ssize_t w = ::send(fd_, frame.data() + sent, frame.size() - sent, MSG_NOSIGNAL);
    if (w >= 0) {
      sent += static_cast<size_t>(w);
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      pollfd p{fd_, POLLOUT, 0};
      int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(RemainingMs(deadline), INT32_MAX)));
      if (r == 0) {
        Drop();
        return DeadlineExceededError("could not send the request to " + options_.endpoint +
                                     " within " + std::to_string(timeout.count()) +
                                     " ms: the server does not read");
      }
      continue;
    }
    if ((err == EPIPE || err == ECONNRESET) && sent == 0 && !fresh) {
      Drop();
      fresh = true;
      MUSTER_RETURN_IF_ERROR(Open(deadline));
      continue;
    }
    return gone("closed the connection (" + ErrnoText(err) + ")");
  }

  // Receive.
  for (;;) {
    std::string_view got;
    uint64_t announced = 0;
    switch (in_.Next(&got, &announced)) {
      case LocalFrameReader::Result::kTooLarge:
        Drop();
        return InternalError("the reply from " + options_.endpoint + " announces " +
                             std::to_string(announced) + " bytes, over the message limit of " +
                             std::to_string(options_.max_message_bytes));
      case LocalFrameReader::Result::kFrame: {
        auto reply = ParseEnvelope(got.data(), got.size());
        if (!reply.ok()) {
          Drop();
          return InternalError("unreadable reply from " + options_.endpoint + ": " +
                               reply.status().message());
        }
        // Descriptors belong to the reply they came with: those read so far go with this one.
        std::vector<ScopedFd> fds = std::move(fds_);
        fds_.clear();
        if (reply->request_id() != id && reply->request_id() != 0) continue;  // stale
        if (received != nullptr) {
          for (auto& f : fds) received->push_back(std::move(f));
        }
        if (reply->has_error()) {
          // request_id 0: the server could not read the request; after a message too large it
          // closes the connection as well.
          if (reply->request_id() == 0) Drop();
          return ErrorToStatus(reply->error());
        }
        return std::move(reply).value();
      }
      case LocalFrameReader::Result::kNeedMore:
        break;
    }
    const size_t want = std::min<size_t>(std::max<size_t>(in_.missing(), 4096), kMaxReadChunk);
    bool truncated = false;
    ssize_t r = RecvWithDescriptors(fd_, in_.Prepare(want), want, &fds_, &truncated);
    if (r > 0) {
      in_.Commit(static_cast<size_t>(r));
      if (truncated) {
        Drop();
        rlimit lim{};
        getrlimit(RLIMIT_NOFILE, &lim);
        return DataLossError("file descriptors from " + options_.endpoint +
                             " were dropped by the kernel: more than " +
                             std::to_string(kMaxReceivedDescriptors) +
                             " came with one read, or this process is at its open-file limit (" +
                             std::to_string(lim.rlim_cur) + ")");
      }
      continue;
    }
    if (r == 0) return gone("closed the connection before it replied");
    const int err = errno;
    if (err == EINTR) continue;
    if (err != EAGAIN && err != EWOULDBLOCK) {
      return gone("closed the connection before it replied (" + ErrnoText(err) + ")");
    }
    pollfd p{fd_, POLLIN, 0};
    int ready =
        ::poll(&p, 1, static_cast<int>(std::min<int64_t>(RemainingMs(deadline), INT32_MAX)));
    if (ready == 0) return no_reply();
  }
}

}  // namespace muster
