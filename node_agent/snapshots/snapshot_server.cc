#include "node_agent/snapshots/snapshot_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>

#include "checkpoint/manifest.h"  // Xxh3
#include "checkpoint/snapshot_channel.h"
#include "common/logging.h"
#include "common/path_name.h"

namespace muster::node_agent {
namespace {

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

#ifdef SO_PEERPIDFD
constexpr int kSoPeerPidfd = SO_PEERPIDFD;
#else
constexpr int kSoPeerPidfd = 77;  // Linux's value; older headers lack it
#endif

std::string Reply(const Status& s) {
  std::string msg = s.message().substr(0, checkpoint::kMaxSnapshotReplyMessage);
  std::string out(1, static_cast<char>(s.code()));
  uint32_t n = static_cast<uint32_t>(msg.size());
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + msg;
}

}  // namespace

int64_t ReadRegions(const RegionReader& read, std::vector<iovec> local, std::vector<iovec> remote) {
  if (local.size() != remote.size()) return -EINVAL;
  for (size_t k = 0; k < local.size(); ++k) {
    if (local[k].iov_len != remote[k].iov_len) return -EINVAL;
  }
  int64_t total = 0;
  size_t first = 0;
  while (first < remote.size()) {
    if (remote[first].iov_len == 0) {
      ++first;
      continue;
    }
    const size_t n = std::min<size_t>(remote.size() - first, IOV_MAX);
    const ssize_t got = read(local.data() + first, n, remote.data() + first);
    if (got < 0) return -errno;
    if (got == 0) return -EFAULT;  // nothing more could be read: a region is not mapped
    total += got;
    // Past what was read (a call may stop short: the kernel reads at most ~2 GiB per call, and
    // stops at a region it cannot read, which the next call then reports).
    for (size_t left = static_cast<size_t>(got); left > 0;) {
      const size_t take = std::min(left, remote[first].iov_len);
      remote[first].iov_base = static_cast<char*>(remote[first].iov_base) + take;
      remote[first].iov_len -= take;
      local[first].iov_base = static_cast<char*>(local[first].iov_base) + take;
      local[first].iov_len -= take;
      left -= take;
      if (remote[first].iov_len == 0) ++first;
    }
  }
  return total;
}

SnapshotServer::SnapshotServer(std::string path, SnapshotStore* store, OnPut on_put,
                               std::chrono::milliseconds frame_timeout, PeerCheck peer_check,
                               SnapshotCpu cpu)
    : path_(std::move(path)),
      store_(store),
      on_put_(std::move(on_put)),
      frame_timeout_(frame_timeout),
      peer_check_(std::move(peer_check)),
      cpu_(cpu) {}

StatusOr<std::unique_ptr<SnapshotServer>> SnapshotServer::Start(
    std::string socket_path, SnapshotStore* store, OnPut on_put,
    std::chrono::milliseconds frame_timeout, PeerCheck peer_check, SnapshotCpu cpu) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.empty() || socket_path.size() >= sizeof(addr.sun_path)) {
    return InvalidArgumentError("snapshot socket path '" + socket_path +
                                "' is empty or too long for a Unix socket");
  }
  std::filesystem::path dir = std::filesystem::path(socket_path).parent_path();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || ::chmod(dir.c_str(), 0700) != 0) {
    return UnavailableError("snapshot socket directory " + dir.string() + ": " +
                            (ec ? ec.message() : std::strerror(errno)));
  }
  ::unlink(socket_path.c_str());  // a predecessor's (kill -9 leaves it)
  std::unique_ptr<SnapshotServer> s(new SnapshotServer(socket_path, store, std::move(on_put),
                                                       frame_timeout, std::move(peer_check), cpu));
  s->listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->listen_fd_ < 0) return InternalError(Errno("snapshot socket"));
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());
  if (::bind(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(s->listen_fd_, 64) != 0) {
    return UnavailableError(Errno("snapshot socket " + socket_path));
  }
  if (::pipe2(s->wake_, O_CLOEXEC) != 0) return InternalError(Errno("snapshot server pipe"));
  s->accept_thread_ = std::thread([p = s.get()] { p->AcceptLoop(); });
  return s;
}

SnapshotServer::~SnapshotServer() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
  }
  if (wake_[1] >= 0) ::close(wake_[1]);
  if (accept_thread_.joinable()) accept_thread_.join();
  std::vector<std::unique_ptr<Conn>> conns;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& c : conns_) {
      if (!c->done) ::shutdown(c->fd, SHUT_RDWR);
    }
    conns.swap(conns_);
  }
  for (auto& c : conns) c->thread.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (wake_[0] >= 0) ::close(wake_[0]);
  ::unlink(path_.c_str());
}

void SnapshotServer::AcceptLoop() {
  auto log = log::Get("agent.snap");
  // The connection threads it starts inherit the class.
  if (Status st = EnterSnapshotThread(cpu_, "snap-accept"); !st.ok())
    log->error("{}", st.ToString());
  while (true) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      log->error("snapshot server: poll: {}", std::strerror(errno));
      return;
    }
    if (p[1].revents) return;
    if (!(p[0].revents & POLLIN)) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::vector<std::unique_ptr<Conn>> finished;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto it = conns_.begin(); it != conns_.end();) {
        if ((*it)->done) {
          finished.push_back(std::move(*it));
          it = conns_.erase(it);
        } else {
          ++it;
        }
      }
      if (stopping_ || conns_.size() >= static_cast<size_t>(kMaxSnapshotConnections)) {
        log->warn("snapshot server: connection refused ({} open)", conns_.size());
        ::close(fd);
      } else {
        auto c = std::make_unique<Conn>();
        c->fd = fd;
        ucred cred{};
        socklen_t len = sizeof(cred);
        if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
          c->pid = cred.pid;
          // The process itself, not its number: a put in place reads its memory only while
          // this says it has not exited (its pid could be another process's by then).
          // SO_PEERPIDFD (Linux 6.5) names the process that connected, not a process that may
          // have taken its pid since; pidfd_open of the pid where the kernel is older.
          int pidfd = -1;
          socklen_t plen = sizeof(pidfd);
          if (::getsockopt(fd, SOL_SOCKET, kSoPeerPidfd, &pidfd, &plen) != 0) pidfd = -1;
          c->pidfd = pidfd >= 0 ? pidfd : static_cast<int>(::syscall(SYS_pidfd_open, cred.pid, 0));
        }
        Conn* raw = c.get();
        conns_.push_back(std::move(c));
        raw->thread = std::thread([this, raw] { Serve(raw); });
      }
    }
    for (auto& c : finished) c->thread.join();
  }
}

void SnapshotServer::Serve(Conn* conn) {
  const int fd = conn->fd;
  auto log = log::Get("agent.snap");
  if (Status st = EnterSnapshotThread(cpu_, "snap-conn"); !st.ok()) log->error("{}", st.ToString());
  const uint64_t limit = store_->memory_limit();
  checkpoint::BufferedReader in(fd);  // a request's fields, a few recv calls in all
  while (true) {
    char op = 0;
    if (!in.Read(&op, 1).ok()) break;  // idle between requests: no limit
    // The rest of the request must follow promptly (kSnapshotFrameTimeout).
    auto deadline = std::chrono::steady_clock::now() + frame_timeout_;
    std::string header(checkpoint::kSnapshotHeaderBytes, '\0');
    Status s = in.Read(header.data(), header.size(), deadline);
    if (!s.ok()) {
      log->warn("snapshot channel: request header: {}; connection closed", s.ToString());
      break;
    }
    auto h = checkpoint::DecodeSnapshotHeader(header, limit);
    if (!h.ok() || (op != 'P' && op != 'G' && op != 'V')) {
      Status bad = h.ok() ? InvalidArgumentError("snapshot channel: unknown op " +
                                                 std::to_string(static_cast<int>(op)))
                          : h.status();
      log->warn("snapshot channel: {}", bad.ToString());
      (void)checkpoint::SendAll(fd, Reply(bad));
      break;
    }
    const uint64_t want = h->job_length + h->payload_length;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (inflight_ + want > limit) {
        s = UnavailableError("snapshot channel: the agent is already reading " +
                             std::to_string(inflight_) + " bytes of snapshots; " +
                             std::to_string(want) + " more would pass its limit of " +
                             std::to_string(limit));
      } else {
        inflight_ += want;
      }
    }
    if (!s.ok()) {
      (void)checkpoint::SendAll(fd, Reply(s));
      break;
    }
    if (op == 'V') {
      const bool keep = ServeInPlace(
          conn, &in, *h, deadline + std::chrono::seconds(want / kSnapshotFrameBytesPerSecond));
      {
        std::lock_guard<std::mutex> l(mu_);
        inflight_ -= want;
      }
      if (!keep) break;
      continue;
    }
    // The job id, then the payload straight into the buffer the store keeps: no second copy.
    std::string job(h->job_length, '\0');
    std::string payload = store_->TakeBuffer(h->payload_length);
    deadline += std::chrono::seconds(want / kSnapshotFrameBytesPerSecond);
    Status read = in.Read(job.data(), job.size(), deadline);
    if (read.ok()) read = in.Read(payload.data(), payload.size(), deadline);
    if (!read.ok()) {
      log->warn("snapshot channel: frame of {} bytes: {}; connection closed", want,
                read.ToString());
    }
    auto f = read.ok() ? checkpoint::DecodeSnapshotParts(*h, job, std::move(payload))
                       : StatusOr<checkpoint::SnapshotFrame>(read);
    payload = std::string();
    {
      std::lock_guard<std::mutex> l(mu_);
      inflight_ -= want;
    }
    if (!read.ok()) break;
    if (!f.ok()) {
      log->warn("snapshot channel: {}", f.status().ToString());
      (void)checkpoint::SendAll(fd, Reply(f.status()));
      break;
    }
    if (Status may = CheckRank(*conn, f->key); !may.ok()) {
      if (!checkpoint::SendAll(fd, Reply(may)).ok()) break;
      continue;
    }
    if (op == 'P') {
      checkpoint::SnapshotKey key = f->key;
      // Checked against its xxh3 by DecodeSnapshotParts just above: not hashed again.
      std::shared_ptr<const checkpoint::SnapshotFrame> held;
      Status put = store_->PutDecoded(std::move(*f), on_put_ ? &held : nullptr);
      if (!put.ok())
        log->warn("snapshot of job {} rank {} step {}: {}", key.job, key.rank, key.step,
                  put.ToString());
      if (put.ok() && held) on_put_(std::move(held));
      if (!checkpoint::SendAll(fd, Reply(put)).ok()) break;
      continue;
    }
    auto held = store_->Get(f->key.job, f->key.rank, f->key.step);
    if (held.ok() && !((*held)->key == f->key)) {
      held = NotFoundError("snapshot of job " + f->key.job + " rank " +
                           std::to_string(f->key.rank) + " step " + std::to_string(f->key.step) +
                           " is held for another attempt or world size");
    }
    if (!held.ok()) {
      if (!checkpoint::SendAll(fd, Reply(held.status())).ok()) break;
      continue;
    }
    // The frame held was checked against its xxh3 by Get: its prefix, then its payload as it
    // is held, without hashing or copying it again.
    const checkpoint::SnapshotFrame& held_frame = **held;
    auto prefix = checkpoint::EncodeSnapshotPrefix(held_frame.key, held_frame.payload.size(),
                                                   held_frame.payload_xxh3);
    if (!prefix.ok()) {
      if (!checkpoint::SendAll(fd, Reply(prefix.status())).ok()) break;
      continue;
    }
    std::string out = Reply(Status::Ok());
    uint64_t n = prefix->size() + held_frame.payload.size();
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
    out += *prefix;
    if (!checkpoint::SendAll(fd, out).ok() || !checkpoint::SendAll(fd, held_frame.payload).ok())
      break;
  }
  std::lock_guard<std::mutex> l(mu_);
  ::close(fd);
  if (conn->pidfd >= 0) ::close(conn->pidfd);
  conn->done = true;
}

Status SnapshotServer::CheckRank(const Conn& conn, const checkpoint::SnapshotKey& key) const {
  if (!peer_check_) return Status::Ok();
  Status may =
      conn.pid > 0
          ? peer_check_(conn.pid, key)
          : FailedPreconditionError("permission denied: the connecting process is unknown");
  if (!may.ok()) {
    log::Get("agent.snap")
        ->warn("snapshot channel: process {} refused: {}", conn.pid, may.ToString());
  }
  return may;
}

bool SnapshotServer::ServeInPlace(Conn* conn, checkpoint::BufferedReader* in,
                                  const checkpoint::SnapshotHeader& h,
                                  std::chrono::steady_clock::time_point deadline) {
  const int fd = conn->fd;
  auto log = log::Get("agent.snap");
  auto read = [&](char* out, size_t n) { return in->Read(out, n, deadline); };
  // Malformed: answered, and the connection closed (the stream cannot be followed past it).
  auto malformed = [&](const Status& st) {
    log->warn("snapshot channel: put in place: {}; connection closed", st.ToString());
    (void)checkpoint::SendAll(fd, Reply(st));
    return false;
  };
  std::string job(h.job_length, '\0');
  if (Status st = read(job.data(), job.size()); !st.ok()) return malformed(st);
  checkpoint::SnapshotKey key = h.key;
  key.job = job;
  if (Status st = ValidatePathName(job, "snapshot job id"); !st.ok()) {
    return malformed(DataLossError(st.message()));
  }
  // Only a rank may have its part list parsed and its memory read (the rest of the request is
  // unread: the connection closes after the answer).
  if (Status may = CheckRank(*conn, key); !may.ok()) {
    (void)checkpoint::SendAll(fd, Reply(may));
    return false;
  }
  // The parts: inline bytes straight into the payload, in-memory ones noted for the read. Their
  // bookkeeping (kSnapshotPartCost each) is charged to the same budget as the payload.
  uint64_t charged = 0;
  struct Uncharge {
    SnapshotServer* s;
    uint64_t* n;
    ~Uncharge() {
      std::lock_guard<std::mutex> l(s->mu_);
      s->inflight_ -= *n;
    }
  } uncharge{this, &charged};
  const uint64_t limit = store_->memory_limit();
  auto admit = [&](uint64_t count) -> Status {
    const uint64_t cost = count * kSnapshotPartCost;
    std::lock_guard<std::mutex> l(mu_);
    if (inflight_ + cost > limit) {
      return UnavailableError("snapshot channel: the agent is already reading " +
                              std::to_string(inflight_) +
                              " bytes of snapshots; a put in place "
                              "of " +
                              std::to_string(count) + " parts would pass its limit");
    }
    inflight_ += cost;
    charged = cost;
    return Status::Ok();
  };
  std::string payload = store_->TakeBuffer(h.payload_length);  // the parts fill it whole
  auto parts = checkpoint::ReadSnapshotParts(read, &payload, admit);
  if (!parts.ok()) return malformed(parts.status());
  std::vector<iovec> local, remote;
  local.reserve(parts->size());
  remote.reserve(parts->size());
  for (const checkpoint::InMemoryPart& p : *parts) {
    local.push_back({payload.data() + p.at, p.length});
    remote.push_back({reinterpret_cast<void*>(p.address), p.length});
  }
  auto unavailable = [&](const std::string& why) {
    return checkpoint::SendAll(fd, Reply(FailedPreconditionError(
                                       std::string(checkpoint::kSnapshotInPlaceUnavailable) + why)))
        .ok();
  };
  if (!in_place_) return unavailable("this agent does not read ranks' memory");
  if (conn->pid <= 0 || conn->pidfd < 0) {
    return unavailable("the connecting process is not known by a pidfd");
  }
  // The rank's memory, straight into the payload.
  const int64_t got = ReadRegions(
      [pid = conn->pid](const iovec* l, size_t n, const iovec* r) {
        return ::process_vm_readv(pid, l, n, r, n, 0);
      },
      local, remote);
  if (got < 0 && (-got == EPERM || -got == ENOSYS || -got == ESRCH)) {
    return unavailable(std::string("process_vm_readv: ") + std::strerror(static_cast<int>(-got)));
  }
  if (got < 0) {
    Status bad = InvalidArgumentError(
        "snapshot channel: put in place: reading process " + std::to_string(conn->pid) + ": " +
        std::strerror(static_cast<int>(-got)) + ": a region it named is not readable");
    log->warn("{}", bad.ToString());
    return checkpoint::SendAll(fd, Reply(bad)).ok();
  }
  // Read while the rank still waited: its connection open (a rank that gave up shut it down
  // before changing its tensors) and the process the one that connected (not exited, so its
  // pid is not another's).
  char c;
  const ssize_t peek = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  pollfd pp{conn->pidfd, POLLIN, 0};
  if (peek == 0 || (peek < 0 && errno != EAGAIN && errno != EWOULDBLOCK) ||
      ::poll(&pp, 1, 0) != 0) {
    log->warn(
        "snapshot channel: put in place of job {} rank {} step {}: the rank went away or gave "
        "up while it was read; not kept",
        key.job, key.rank, key.step);
    return false;
  }
  if (peek > 0 || in->buffered() > 0) {
    return malformed(
        InvalidArgumentError("snapshot channel: put in place: more bytes before the reply"));
  }
  // The rank's tensors are free from here: it is told at once, before the hash and the store.
  if (!checkpoint::SendAll(fd, std::string_view(&checkpoint::kSnapshotReadAck, 1)).ok()) {
    return false;
  }
  checkpoint::SnapshotHeader read_h = h;
  read_h.payload_xxh3 = checkpoint::Xxh3(payload.data(), payload.size());
  auto f = checkpoint::DecodeSnapshotPartsChecked(read_h, job, std::move(payload));
  if (!f.ok()) return malformed(f.status());
  std::shared_ptr<const checkpoint::SnapshotFrame> held;
  Status put = store_->PutDecoded(std::move(*f), on_put_ ? &held : nullptr);
  if (!put.ok())
    log->warn("snapshot of job {} rank {} step {}: {}", key.job, key.rank, key.step,
              put.ToString());
  if (put.ok() && held) on_put_(std::move(held));
  return checkpoint::SendAll(fd, Reply(put)).ok();
}

}  // namespace muster::node_agent
