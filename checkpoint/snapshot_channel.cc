#include "checkpoint/snapshot_channel.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "checkpoint/snapshot_state.h"
#include "common/logging.h"

namespace muster::checkpoint {

Status SendAll(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return UnavailableError(std::string("snapshot channel: send: ") + std::strerror(errno));
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status RecvAll(int fd, char* out, size_t n,
               std::optional<std::chrono::steady_clock::time_point> deadline) {
  while (n > 0) {
    if (deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          *deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return UnavailableError("snapshot channel: timed out reading");
      pollfd p{fd, POLLIN, 0};
      int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
      if (r < 0 && errno != EINTR) {
        return UnavailableError(std::string("snapshot channel: poll: ") + std::strerror(errno));
      }
      if (r <= 0) continue;
    }
    ssize_t got = ::recv(fd, out, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      return UnavailableError(std::string("snapshot channel: recv: ") + std::strerror(errno));
    }
    if (got == 0) return UnavailableError("snapshot channel: closed by the peer");
    out += got;
    n -= static_cast<size_t>(got);
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<SnapshotClient>> SnapshotClient::Connect(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return InvalidArgumentError("snapshot channel: socket path '" + path + "' is empty or longer " +
                                "than " + std::to_string(sizeof(addr.sun_path) - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return InternalError(std::string("snapshot channel: socket: ") + strerror(errno));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    ::close(fd);
    return UnavailableError("snapshot channel: connect " + path + ": " + std::strerror(e));
  }
  return std::unique_ptr<SnapshotClient>(new SnapshotClient(fd));
}

SnapshotClient::~SnapshotClient() { ::close(fd_); }

Status SnapshotClient::ReadReply() {
  char head[5];
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, head, sizeof(head)));
  uint8_t code = static_cast<uint8_t>(head[0]);
  uint32_t len = 0;
  for (int i = 0; i < 4; ++i) len |= uint32_t{static_cast<unsigned char>(head[1 + i])} << (8 * i);
  if (code > static_cast<uint8_t>(StatusCode::kInternal) || len > kMaxSnapshotReplyMessage) {
    return DataLossError("snapshot channel: malformed reply from the agent");
  }
  std::string msg(len, '\0');
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, msg.data(), len));
  return Status(static_cast<StatusCode>(code), std::move(msg));
}

Status SnapshotClient::SentReply(Status sent) {
  if (sent.ok()) return ReadReply();
  // The agent refuses a frame from its header (too large for its limit, a bad field) and closes
  // the connection before the rest arrives: its answer, already sent, says why; the broken
  // pipe does not.
  Status reply = ReadReply();
  return reply.ok() || reply.code() == StatusCode::kUnavailable ? sent : reply;
}

Status SnapshotClient::Put(const SnapshotKey& key, std::string_view payload) {
  MUSTER_ASSIGN_OR_RETURN(std::string prefix, EncodeSnapshotPrefix(key, payload));
  Status sent = SendAll(fd_, "P");
  if (sent.ok()) sent = SendAll(fd_, prefix);
  if (sent.ok()) sent = SendAll(fd_, payload);
  return SentReply(sent);
}

Status SnapshotClient::Put(std::string_view frame) {
  Status sent = SendAll(fd_, "P");
  if (sent.ok()) sent = SendAll(fd_, frame);
  return SentReply(sent);
}

StatusOr<SnapshotFrame> SnapshotClient::Get(const SnapshotKey& key, uint64_t max_payload) {
  MUSTER_ASSIGN_OR_RETURN(std::string req, EncodeSnapshotFrame(key, ""));
  MUSTER_RETURN_IF_ERROR(SendAll(fd_, "G"));
  MUSTER_RETURN_IF_ERROR(SendAll(fd_, req));
  MUSTER_RETURN_IF_ERROR(ReadReply());
  char lenb[8];
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, lenb, 8));
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= uint64_t{static_cast<unsigned char>(lenb[i])} << (8 * i);
  if (len < kSnapshotHeaderBytes || len - kSnapshotHeaderBytes > max_payload + 256) {
    return DataLossError("snapshot channel: the agent's frame of " + std::to_string(len) +
                         " bytes exceeds the limit");
  }
  std::string bytes(len, '\0');
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, bytes.data(), len));
  MUSTER_ASSIGN_OR_RETURN(SnapshotFrame f,
                          DecodeSnapshotFrameInPlace(std::move(bytes), max_payload));
  if (!(f.key == key)) {
    return DataLossError("snapshot channel: the agent answered with another snapshot (rank " +
                         std::to_string(f.key.rank) + " step " + std::to_string(f.key.step) + ")");
  }
  return f;
}

std::unique_ptr<SnapshotSender> SnapshotSender::Create(SnapshotSenderOptions options) {
  std::unique_ptr<SnapshotSender> s(new SnapshotSender(std::move(options)));
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

SnapshotSender::SnapshotSender(SnapshotSenderOptions options) : options_(std::move(options)) {}

SnapshotSender::~SnapshotSender() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

Status SnapshotSender::Snapshot(int64_t step, const SaveState& state) {
  if (step < 0) return InvalidArgumentError("snapshot: step must not be negative");
  std::string payload;
  {
    std::lock_guard<std::mutex> l(mu_);
    payload.swap(spare_);
  }
  MUSTER_RETURN_IF_ERROR(EncodeSnapshotStateInto(state, &payload));
  {
    std::lock_guard<std::mutex> l(mu_);
    if (pending_) {
      ++replaced_;
      spare_.swap(pending_->second);
    }
    pending_ = std::make_pair(step, std::move(payload));
  }
  cv_.notify_all();
  return Status::Ok();
}

Status SnapshotSender::Flush(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  if (!cv_.wait_for(l, timeout, [&] { return !pending_ && !sending_; })) {
    return DeadlineExceededError("snapshot: still sending to the agent after " +
                                 std::to_string(timeout.count()) + " ms");
  }
  return last_;
}

int64_t SnapshotSender::sent() const {
  std::lock_guard<std::mutex> l(mu_);
  return sent_;
}

int64_t SnapshotSender::replaced() const {
  std::lock_guard<std::mutex> l(mu_);
  return replaced_;
}

void SnapshotSender::Loop() {
  auto log = log::Get("ckpt.snap");
  std::unique_lock<std::mutex> l(mu_);
  while (true) {
    cv_.wait(l, [&] { return stop_ || pending_; });
    if (stop_) return;
    SnapshotKey key = options_.key;
    key.step = pending_->first;
    std::string payload = std::move(pending_->second);
    pending_.reset();
    sending_ = true;
    l.unlock();
    Status s;
    if (!client_) {
      auto c = SnapshotClient::Connect(options_.socket_path);
      if (c.ok()) {
        client_ = std::move(*c);
      } else {
        s = c.status();
      }
    }
    if (client_) {
      s = client_->Put(key, payload);
      // A broken connection is reopened on the next snapshot; a refusal keeps it.
      if (s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDataLoss) {
        client_.reset();
      }
    }
    if (!s.ok()) log->warn("snapshot not kept by the agent: {}", s.ToString());
    l.lock();
    if (spare_.capacity() < payload.capacity()) spare_.swap(payload);
    sending_ = false;
    last_ = s;
    if (s.ok()) ++sent_;
    cv_.notify_all();
  }
}

}  // namespace muster::checkpoint
