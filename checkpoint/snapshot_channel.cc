#include "checkpoint/snapshot_channel.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "checkpoint/snapshot_state.h"
#include "common/little_endian.h"
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

namespace {

// One recv of up to n bytes (at least one): without a deadline a blocking recv; with one, a
// recv that does not wait first, then poll (at most a second at a time) until bytes arrive.
StatusOr<size_t> RecvSome(int fd, char* out, size_t n,
                          std::optional<std::chrono::steady_clock::time_point> deadline) {
  while (true) {
    ssize_t got = ::recv(fd, out, n, deadline ? MSG_DONTWAIT : 0);
    if (got > 0) return static_cast<size_t>(got);
    if (got == 0) return UnavailableError("snapshot channel: closed by the peer");
    if (errno == EINTR) continue;
    if (!deadline || (errno != EAGAIN && errno != EWOULDBLOCK)) {
      return UnavailableError(std::string("snapshot channel: recv: ") + std::strerror(errno));
    }
    while (true) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          *deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return UnavailableError("snapshot channel: timed out reading");
      pollfd p{fd, POLLIN, 0};
      int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
      if (r < 0 && errno != EINTR) {
        return UnavailableError(std::string("snapshot channel: poll: ") + std::strerror(errno));
      }
      if (r > 0) break;
    }
  }
}

}  // namespace

Status RecvAll(int fd, char* out, size_t n,
               std::optional<std::chrono::steady_clock::time_point> deadline) {
  while (n > 0) {
    MUSTER_ASSIGN_OR_RETURN(size_t got, RecvSome(fd, out, n, deadline));
    out += got;
    n -= got;
  }
  return Status::Ok();
}

BufferedReader::BufferedReader(int fd, size_t capacity) : fd_(fd), buf_(capacity, '\0') {}

Status BufferedReader::Read(char* out, size_t n,
                            std::optional<std::chrono::steady_clock::time_point> deadline) {
  while (n > 0) {
    if (begin_ < end_) {
      const size_t take = std::min(n, end_ - begin_);
      std::memcpy(out, buf_.data() + begin_, take);
      begin_ += take;
      out += take;
      n -= take;
      continue;
    }
    if (n >= buf_.size() / 2) return RecvAll(fd_, out, n, deadline);
    begin_ = end_ = 0;
    MUSTER_ASSIGN_OR_RETURN(end_, RecvSome(fd_, buf_.data(), buf_.size(), deadline));
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
  // A connect to an agent whose backlog is full (it is frozen) gives up after this rather than
  // block the sender's thread (and a Release waiting on it) for ever; sends then have it too.
  const timeval tv{.tv_sec = 10, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    ::close(fd);
    return UnavailableError("snapshot channel: connect " + path + ": " + std::strerror(e));
  }
  return std::unique_ptr<SnapshotClient>(new SnapshotClient(fd));
}

SnapshotClient::~SnapshotClient() { ::close(fd_); }

Status SnapshotClient::ReadReply() {
  char code = 0;
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, &code, 1));
  return ReadReplyAfter(code);
}

Status SnapshotClient::ReadReplyAfter(char code_byte) {
  char head[4];
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, head, sizeof(head)));
  uint8_t code = static_cast<uint8_t>(code_byte);
  uint32_t len = 0;
  for (int i = 0; i < 4; ++i) len |= uint32_t{static_cast<unsigned char>(head[i])} << (8 * i);
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

Status SnapshotClient::PutInPlace(const SnapshotKey& key, const std::vector<SnapshotPart>& parts,
                                  const std::function<void()>& on_read) {
  if (parts.empty() || parts.size() > kMaxSnapshotParts) {
    return InvalidArgumentError("snapshot: a put in place needs 1.." +
                                std::to_string(kMaxSnapshotParts) + " parts, not " +
                                std::to_string(parts.size()));
  }
  uint64_t total = 0;
  for (const SnapshotPart& p : parts) total += p.length;
  // The payload's xxh3 is the agent's to compute: it reads the bytes itself.
  MUSTER_ASSIGN_OR_RETURN(std::string msg, EncodeSnapshotPrefix(key, total, 0));
  msg.insert(msg.begin(), 'V');
  msg += EncodeSnapshotParts(parts);
  Status sent = SendAll(fd_, msg);
  if (!sent.ok()) return SentReply(sent);
  char first = 0;
  MUSTER_RETURN_IF_ERROR(RecvAll(fd_, &first, 1));
  if (first != kSnapshotReadAck) return ReadReplyAfter(first);  // refused before any read
  if (on_read) on_read();
  return ReadReply();
}

std::string EncodeSnapshotParts(const std::vector<SnapshotPart>& parts) {
  std::string msg;
  AppendLe<uint32_t>(msg, static_cast<uint32_t>(parts.size()));
  for (const SnapshotPart& p : parts) {
    msg.push_back(p.in_memory() ? 1 : 0);
    AppendLe<uint64_t>(msg, p.length);
    if (p.in_memory()) {
      AppendLe<uint64_t>(msg, p.address);
    } else {
      msg.append(p.here);
    }
  }
  return msg;
}

StatusOr<std::vector<InMemoryPart>> ReadSnapshotParts(
    const std::function<Status(char* out, size_t n)>& read, std::string* payload,
    const std::function<Status(uint64_t count)>& admit) {
  char count_b[4];
  MUSTER_RETURN_IF_ERROR(read(count_b, 4));
  const uint64_t count = LoadLe<uint32_t>(std::string_view(count_b, 4), 0);
  if (count == 0 || count > kMaxSnapshotParts) {
    return InvalidArgumentError("snapshot: a put in place of " + std::to_string(count) +
                                " parts (1.." + std::to_string(kMaxSnapshotParts) + ")");
  }
  if (admit) MUSTER_RETURN_IF_ERROR(admit(count));
  std::vector<InMemoryPart> out;
  uint64_t at = 0;
  for (uint64_t i = 0; i < count; ++i) {
    char part[9];
    MUSTER_RETURN_IF_ERROR(read(part, 9));
    const uint8_t kind = static_cast<uint8_t>(part[0]);
    const uint64_t len = LoadLe<uint64_t>(std::string_view(part, 9), 1);
    if (kind > 1 || len > payload->size() - at) {
      return DataLossError("snapshot: put in place: part " + std::to_string(i) + " (kind " +
                           std::to_string(kind) + ", " + std::to_string(len) +
                           " bytes) does not fit the " + std::to_string(payload->size()) +
                           "-byte payload at " + std::to_string(at));
    }
    if (kind == 0) {
      MUSTER_RETURN_IF_ERROR(read(payload->data() + at, len));
    } else {
      char addr_b[8];
      MUSTER_RETURN_IF_ERROR(read(addr_b, 8));
      if (len > 0) out.push_back({at, LoadLe<uint64_t>(std::string_view(addr_b, 8), 0), len});
    }
    at += len;
  }
  if (at != payload->size()) {
    return DataLossError("snapshot: put in place: the parts hold " + std::to_string(at) +
                         " bytes, the header says " + std::to_string(payload->size()));
  }
  return out;
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
  {
    std::lock_guard<std::mutex> l(index_mu_);
    MUSTER_RETURN_IF_ERROR(EncodeSnapshotStateInto(state, &payload, &index_));
  }
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

Status SnapshotSender::SnapshotInPlace(int64_t step, const SaveState& state) {
  if (step < 0) return InvalidArgumentError("snapshot: step must not be negative");
  {
    // Known not to be read in place: copied here and queued, as Snapshot() does (training then
    // never waits on a put still in progress, and an unsent older one is replaced).
    std::unique_lock<std::mutex> l(mu_);
    if (in_place_unavailable_ && phase_ == InPlacePhase::kNone) {
      l.unlock();
      return Snapshot(step, state);
    }
  }
  InPlace ip;
  ip.step = step;
  ip.state = state;
  {
    std::lock_guard<std::mutex> l(index_mu_);
    MUSTER_RETURN_IF_ERROR(EncodeSnapshotStateParts(ip.state, &ip.head, &ip.spans, &index_));
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (phase_ != InPlacePhase::kNone) {
      return FailedPreconditionError("snapshot: the previous in-place snapshot was not released");
    }
    if (pending_) {  // a copied one not sent yet: this newer one replaces it
      ++replaced_;
      spare_.swap(pending_->second);
      pending_.reset();
    }
    in_place_ = std::move(ip);
    phase_ = InPlacePhase::kQueued;
  }
  cv_.notify_all();
  return Status::Ok();
}

Status SnapshotSender::Release(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  if (cv_.wait_for(l, timeout, [&] { return phase_ == InPlacePhase::kNone; })) {
    return Status::Ok();
  }
  const int64_t step = in_place_ ? in_place_->step : -1;
  if (phase_ == InPlacePhase::kQueued) {
    in_place_.reset();
    phase_ = InPlacePhase::kNone;
  } else if (phase_ == InPlacePhase::kReading) {
    // The agent checks the connection once it has read: cut, it keeps nothing of this read.
    in_place_cut_ = true;
    if (in_place_fd_ >= 0) {
      ::shutdown(in_place_fd_, SHUT_RDWR);
    } else {
      // Still connecting (a frozen agent's full backlog can hold a connect for seconds), or the
      // put has returned: nothing reads the tensors, and the loop sees the cut before it asks.
      // Free at once rather than when the connect gives up.
      phase_ = InPlacePhase::kNone;
      cv_.notify_all();
    }
  }
  // The read cut (or a copy) ends promptly; the tensors are free only then.
  cv_.wait(l, [&] { return phase_ == InPlacePhase::kNone; });
  return DeadlineExceededError("snapshot: the agent had not taken the in-place snapshot" +
                               (step >= 0 ? " of step " + std::to_string(step) : std::string()) +
                               " after " + std::to_string(timeout.count()) +
                               " ms; given up, training goes on");
}

bool SnapshotSender::in_place() const {
  std::lock_guard<std::mutex> l(mu_);
  return !in_place_unavailable_;
}

Status SnapshotSender::Flush(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  if (!cv_.wait_for(l, timeout,
                    [&] { return !pending_ && !sending_ && phase_ == InPlacePhase::kNone; })) {
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
  // Connects when there is no connection; the outcome.
  auto connect = [&]() -> Status {
    if (client_) return Status::Ok();
    auto c = SnapshotClient::Connect(options_.socket_path);
    if (!c.ok()) return c.status();
    client_ = std::move(*c);
    return Status::Ok();
  };
  // After a put: a broken connection is reopened on the next snapshot; a refusal keeps it.
  auto after = [&](const Status& s) {
    if (s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDataLoss) client_.reset();
    if (!s.ok()) log->warn("snapshot not kept by the agent: {}", s.ToString());
  };
  while (true) {
    cv_.wait(l, [&] { return stop_ || pending_ || phase_ == InPlacePhase::kQueued; });
    if (stop_) {
      // A queued in-place snapshot is dropped: its tensors are free.
      if (phase_ == InPlacePhase::kQueued) {
        in_place_.reset();
        phase_ = InPlacePhase::kNone;
        cv_.notify_all();
      }
      return;
    }
    SnapshotKey key = options_.key;
    if (phase_ == InPlacePhase::kQueued) {
      InPlace ip = std::move(*in_place_);
      in_place_.reset();
      key.step = ip.step;
      const bool try_in_place = !in_place_unavailable_;
      sending_ = true;
      Status s = Status::Ok();
      if (try_in_place) {
        // From here Release may cut the read, not drop it: kReading (no descriptor yet while
        // connecting; a cut then stops it before the put).
        phase_ = InPlacePhase::kReading;
        in_place_cut_ = false;
        l.unlock();
        s = connect();
        l.lock();
        if (s.ok() && in_place_cut_) s = DeadlineExceededError("cut by Release before the put");
        if (s.ok()) {
          in_place_fd_ = client_->fd();
          l.unlock();
          std::vector<SnapshotPart> parts;
          parts.reserve(ip.spans.size() + 2);
          parts.push_back(SnapshotPart::Here(ip.head));
          for (const SnapshotSpan& sp : ip.spans) {
            if (sp.bytes > 0) parts.push_back(SnapshotPart::InMemory(sp.data, sp.bytes));
          }
          if (!ip.state.metadata.empty()) parts.push_back(SnapshotPart::Here(ip.state.metadata));
          s = client_->PutInPlace(key, parts, [&] {
            // Read: the tensors are free now, before the agent's hash and store.
            std::lock_guard<std::mutex> g(mu_);
            if (!in_place_cut_) {
              phase_ = InPlacePhase::kNone;
              in_place_fd_ = -1;
              cv_.notify_all();
            }
          });
          l.lock();
          in_place_fd_ = -1;
          if (in_place_cut_) s = DeadlineExceededError("the put in place was cut by Release");
        }
        const bool unavailable = (s.code() == StatusCode::kFailedPrecondition &&
                                  s.message().rfind(kSnapshotInPlaceUnavailable, 0) == 0) ||
                                 (s.code() == StatusCode::kInvalidArgument &&
                                  s.message().find("unknown op") != std::string::npos);
        if (unavailable) {
          in_place_unavailable_ = true;
          log->info("snapshots are copied here: the agent cannot read them in place ({})",
                    s.message());
        }
      }
      if (try_in_place && !in_place_unavailable_) {
        // Read by the agent (or refused, or cut): the tensors are free. (Unless the agent's
        // read acknowledgement freed them already, and the next snapshot is queued since.)
        if (phase_ == InPlacePhase::kReading) phase_ = InPlacePhase::kNone;
        if (in_place_cut_) client_.reset();  // the connection was shut down
        cv_.notify_all();
        l.unlock();
        after(s);
        l.lock();
        sending_ = false;
        last_ = s;
        if (s.ok()) ++sent_;
        cv_.notify_all();
        continue;
      }
      // The agent cannot read this process: copied here, then put.
      phase_ = InPlacePhase::kCopying;
      std::string payload;
      payload.swap(spare_);
      l.unlock();
      Status enc = EncodeSnapshotStateInto(ip.state, &payload);
      l.lock();
      phase_ = InPlacePhase::kNone;  // copied: the tensors are free
      cv_.notify_all();
      l.unlock();
      if (enc.ok()) enc = connect();
      if (enc.ok()) enc = client_->Put(key, payload);
      after(enc);
      l.lock();
      if (spare_.capacity() < payload.capacity()) spare_.swap(payload);
      sending_ = false;
      last_ = enc;
      if (enc.ok()) ++sent_;
      cv_.notify_all();
      continue;
    }
    key.step = pending_->first;
    std::string payload = std::move(pending_->second);
    pending_.reset();
    sending_ = true;
    l.unlock();
    Status s = connect();
    if (s.ok()) s = client_->Put(key, payload);
    after(s);
    l.lock();
    if (spare_.capacity() < payload.capacity()) spare_.swap(payload);
    sending_ = false;
    last_ = s;
    if (s.ok()) ++sent_;
    cv_.notify_all();
  }
}

}  // namespace muster::checkpoint
