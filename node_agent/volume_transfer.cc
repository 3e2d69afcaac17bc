#include "node_agent/volume_transfer.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "common/logging.h"
#include "common/path_name.h"
#include "common/wire.h"

namespace muster::node_agent {

using std::chrono::milliseconds;

namespace {

constexpr milliseconds kCallTimeout{20000};
// Disk reads run on this many workers; requests beyond the queue are refused (Unavailable) so
// a stalled disk costs memory for a bounded number of requests only.
constexpr int kReadWorkers = 2;
constexpr size_t kMaxQueuedReads = 64;

int64_t UnixMs() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status ReadOnly(const std::string& what) {
  return FailedPreconditionError("remote volume is read-only (" + what + ")");
}

Status PermissionDenied(const std::string& why) {
  return FailedPreconditionError("permission denied: " + why);
}

const char* OpName(proto::VolumeRequest::Op op) {
  switch (op) {
    case proto::VolumeRequest::STAT:
      return "STAT";
    case proto::VolumeRequest::LIST:
      return "LIST";
    case proto::VolumeRequest::READ:
      return "READ";
    default:
      return "an unknown op";
  }
}

std::vector<std::string> SplitPath(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    size_t slash = path.find('/', start);
    parts.push_back(path.substr(start, slash == std::string::npos ? slash : slash - start));
    if (slash == std::string::npos) return parts;
    start = slash + 1;
  }
}

// An owned file descriptor.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_;
};

const char* KindOf(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

// Why `name` under `dirfd` could not be opened (errno `err`): symbolic links and special
// files are named as such; a missing entry is NotFound.
Status Refusal(int dirfd, const std::string& name, const std::string& shown, int err) {
  struct stat st;
  if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    if (S_ISLNK(st.st_mode)) {
      return FailedPreconditionError(shown + " is a symbolic link: not followed");
    }
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
      return FailedPreconditionError(shown + " is " + KindOf(st.st_mode) +
                                     ": only regular files are served");
    }
    if (err == ENOTDIR) return NotFoundError(shown + " is not a directory");
  }
  if (err == ENOENT || err == ENOTDIR) return NotFoundError("no " + shown);
  return ErrnoStatus(err, shown);
}

std::string Joined(const std::vector<std::string>& parts, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) out += (i ? "/" : "") + parts[i];
  return out;
}

// Opens the directory `parts[0..n)` under `root`, one component at a time, following no
// symbolic link.
StatusOr<Fd> OpenDirBeneath(const std::string& root, const std::vector<std::string>& parts,
                            size_t n) {
  Fd dir(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() < 0) return ErrnoStatus(errno, "volume root " + root);
  for (size_t i = 0; i < n; ++i) {
    int fd = ::openat(dir.get(), parts[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return Refusal(dir.get(), parts[i], Joined(parts, i + 1), errno);
    dir = Fd(fd);
  }
  return dir;
}

double AgeOf(const struct stat& st) {
  auto mtime = std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(
          std::chrono::seconds(st.st_mtim.tv_sec) + std::chrono::nanoseconds(st.st_mtim.tv_nsec)));
  return std::chrono::duration<double>(std::chrono::system_clock::now() - mtime).count();
}

StatusOr<proto::VolumeReply> Stat(const std::string& root, const std::vector<std::string>& parts,
                                  const std::string& path) {
  proto::VolumeReply out;
  auto dir = OpenDirBeneath(root, parts, parts.size() - 1);
  if (!dir.ok()) {
    if (dir.status().code() == StatusCode::kNotFound) return out;  // exists = false
    return dir.status();
  }
  struct stat st;
  if (::fstatat(dir->get(), parts.back().c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) return out;
    return ErrnoStatus(errno, path);
  }
  if (S_ISLNK(st.st_mode))
    return FailedPreconditionError(path + " is a symbolic link: not followed");
  if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
    return FailedPreconditionError(path + " is " + KindOf(st.st_mode) +
                                   ": only regular files are served");
  }
  out.set_exists(true);
  out.set_is_dir(S_ISDIR(st.st_mode));
  if (S_ISREG(st.st_mode)) out.set_size(static_cast<uint64_t>(st.st_size));
  out.set_age_s(AgeOf(st));
  return out;
}

StatusOr<proto::VolumeReply> List(const std::string& root, const std::vector<std::string>& parts,
                                  const std::string& path) {
  MUSTER_ASSIGN_OR_RETURN(Fd dir, OpenDirBeneath(root, parts, parts.size()));
  int fd = dir.get();
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) return ErrnoStatus(errno, "list " + path);
  dir.release();  // owned by `d` now
  proto::VolumeReply out;
  Status st = Status::Ok();
  for (;;) {
    errno = 0;
    struct dirent* e = ::readdir(d);
    if (e == nullptr) {
      if (errno != 0) st = ErrnoStatus(errno, "list " + path);
      break;
    }
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    // Names that could not be asked for, links and special files are not listed.
    if (!ValidatePathName(name, "entry").ok()) continue;
    unsigned char type = e->d_type;
    if (type == DT_UNKNOWN) {
      struct stat s;
      if (::fstatat(fd, e->d_name, &s, AT_SYMLINK_NOFOLLOW) != 0) continue;
      type = S_ISREG(s.st_mode) ? DT_REG : S_ISDIR(s.st_mode) ? DT_DIR : DT_UNKNOWN;
    }
    if (type != DT_REG && type != DT_DIR) continue;
    if (static_cast<size_t>(out.entries_size()) >= kMaxListEntries) {
      st = FailedPreconditionError(path + " has more than " + std::to_string(kMaxListEntries) +
                                   " entries");
      break;
    }
    out.add_entries(std::move(name));
  }
  ::closedir(d);
  if (!st.ok()) return st;
  return out;
}

StatusOr<proto::VolumeReply> Read(const std::string& root, const std::vector<std::string>& parts,
                                  const std::string& path, uint64_t offset, uint32_t length) {
  MUSTER_ASSIGN_OR_RETURN(Fd dir, OpenDirBeneath(root, parts, parts.size() - 1));
  // O_NONBLOCK: opening a FIFO must not wait for a writer (fstat refuses it right after).
  Fd f(::openat(dir.get(), parts.back().c_str(),
                O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (f.get() < 0) return Refusal(dir.get(), parts.back(), path, errno);
  struct stat st;
  if (::fstat(f.get(), &st) != 0) return ErrnoStatus(errno, path);
  if (!S_ISREG(st.st_mode)) {
    return FailedPreconditionError(path + " is " + KindOf(st.st_mode) +
                                   ": only regular files are served");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  proto::VolumeReply out;
  out.set_offset(offset);
  out.set_size(size);
  if (offset >= size) return out;
  const uint64_t want = std::min<uint64_t>(length, size - offset);
  std::string data(want, '\0');
  uint64_t got = 0;
  while (got < want) {
    ssize_t n = ::pread(f.get(), data.data() + got, want - got, static_cast<off_t>(offset + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus(errno, "read " + path);
    if (n == 0) break;
    got += static_cast<uint64_t>(n);
  }
  if (got < want) {
    return DataLossError(path + " ended at byte " + std::to_string(offset + got) +
                         " while read, before its size " + std::to_string(size));
  }
  out.set_data(std::move(data));
  return out;
}

// A fixed pool of threads for disk reads with a bounded queue.
class ReadPool {
 public:
  ReadPool(int threads, size_t max_queued) : max_queued_(max_queued) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~ReadPool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  // False when the queue is full (the task is dropped).
  bool Submit(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_ || queue_.size() >= max_queued_) return false;
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return true;
  }

 private:
  void Run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
        if (stop_) return;  // queued requests are dropped: their clients time out
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }

  const size_t max_queued_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // GUARDED_BY(mu_)
  bool stop_ = false;                        // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

}  // namespace

Status CheckVolumeRequest(const proto::VolumeRequest& req, const std::string& job) {
  switch (req.op()) {
    case proto::VolumeRequest::STAT:
    case proto::VolumeRequest::LIST:
    case proto::VolumeRequest::READ:
      break;
    default:
      return InvalidArgumentError("unknown volume op " + std::to_string(req.op()));
  }
  MUSTER_RETURN_IF_ERROR(ValidatePathName(req.volume(), "volume name"));
  MUSTER_RETURN_IF_ERROR(ValidateRelativePath(req.path(), "path"));
  if (req.path() != job && req.path().rfind(job + "/", 0) != 0) {
    return PermissionDenied("path " + QuoteForError(req.path()) +
                            " is outside the transfer's job " + QuoteForError(job));
  }
  if (req.op() == proto::VolumeRequest::READ) {
    if (req.length() > kMaxVolumeRead) {
      return InvalidArgumentError("READ of " + std::to_string(req.length()) + " bytes: at most " +
                                  std::to_string(kMaxVolumeRead));
    }
    if (req.offset() > kMaxRemoteFileSize) {
      return InvalidArgumentError("READ at offset " + std::to_string(req.offset()) +
                                  ": out of range");
    }
  }
  return Status::Ok();
}

StatusOr<proto::VolumeReply> ServeVolumeRequest(const std::string& root,
                                                const proto::VolumeRequest& req) {
  MUSTER_RETURN_IF_ERROR(ValidateRelativePath(req.path(), "path"));
  std::vector<std::string> parts = SplitPath(req.path());
  switch (req.op()) {
    case proto::VolumeRequest::STAT:
      return Stat(root, parts, req.path());
    case proto::VolumeRequest::LIST:
      return List(root, parts, req.path());
    case proto::VolumeRequest::READ:
      return Read(root, parts, req.path(), req.offset(),
                  std::min<uint32_t>(req.length(), kMaxVolumeRead));
    default:
      return InvalidArgumentError("unknown volume op " + std::to_string(req.op()));
  }
}

Status CheckVolumeReply(const proto::VolumeRequest& req, const proto::VolumeReply& r) {
  auto lie = [&](const std::string& what) {
    return DataLossError(std::string("volume server's reply to ") + OpName(req.op()) + " " +
                         QuoteForError(req.path()) + ": " + what);
  };
  switch (req.op()) {
    case proto::VolumeRequest::STAT:
      if (r.entries_size() != 0 || !r.data().empty() || r.offset() != 0) {
        return lie("entries, data or offset set in a STAT reply");
      }
      if (!r.exists()) {
        if (r.is_dir() || r.size() != 0 || r.age_s() != 0) {
          return lie("is_dir, size or age set for an entry that does not exist");
        }
        return Status::Ok();
      }
      if (r.size() > kMaxRemoteFileSize) {
        return lie("size " + std::to_string(r.size()) + " is out of range");
      }
      if (r.is_dir() && r.size() != 0) {
        return lie("size " + std::to_string(r.size()) + " for a directory");
      }
      if (!std::isfinite(r.age_s())) return lie("age is not a finite number");
      return Status::Ok();
    case proto::VolumeRequest::LIST:
      if (r.exists() || r.is_dir() || r.size() != 0 || r.age_s() != 0 || !r.data().empty() ||
          r.offset() != 0) {
        return lie("fields other than entries set in a LIST reply");
      }
      if (static_cast<size_t>(r.entries_size()) > kMaxListEntries) {
        return lie(std::to_string(r.entries_size()) + " entries, more than " +
                   std::to_string(kMaxListEntries));
      }
      for (const auto& e : r.entries()) {
        if (Status st = ValidatePathName(e, "entry"); !st.ok()) return lie(st.message());
      }
      return Status::Ok();
    case proto::VolumeRequest::READ: {
      if (r.exists() || r.is_dir() || r.age_s() != 0 || r.entries_size() != 0) {
        return lie("fields other than offset, size and data set in a READ reply");
      }
      if (r.offset() != req.offset()) {
        return lie("offset " + std::to_string(r.offset()) + ", asked for " +
                   std::to_string(req.offset()));
      }
      if (r.size() > kMaxRemoteFileSize) {
        return lie("file size " + std::to_string(r.size()) + " is out of range");
      }
      const uint64_t got = r.data().size();
      if (got > req.length()) {
        return lie(std::to_string(got) + " bytes, more than the " + std::to_string(req.length()) +
                   " asked for");
      }
      const uint64_t expected =
          req.offset() >= r.size() ? 0 : std::min<uint64_t>(req.length(), r.size() - req.offset());
      if (got != expected) {
        return lie(std::to_string(got) + " bytes at offset " + std::to_string(req.offset()) +
                   " of a file of " + std::to_string(r.size()) + " bytes; expected " +
                   std::to_string(expected));
      }
      return Status::Ok();
    }
    default:
      return InvalidArgumentError("unknown volume op " + std::to_string(req.op()));
  }
}

// ---------------------------------------------------------------------------------------------

struct VolumeServer::Impl {
  struct Grant {
    std::string job;
    int64_t expires_ms = 0;
  };
  // Shared with the expiry timers, which may fire after the server is gone.
  struct Grants {
    std::mutex mu;
    std::map<std::string, Grant> by_key;  // GUARDED_BY(mu); ZAP names the peer by its key
  };

  Reactor* reactor = nullptr;
  ZapAuthenticator* zap = nullptr;
  bool insecure = false;
  std::map<std::string, std::string> volumes;
  std::shared_ptr<Grants> grants = std::make_shared<Grants>();
  std::unique_ptr<RpcServer> rpc;
  std::unique_ptr<ReadPool> pool;

  // Drops expired grants (and their keys from ZAP). REQUIRES: g.mu held.
  static void PruneLocked(Grants& g, ZapAuthenticator* zap, int64_t now) {
    for (auto it = g.by_key.begin(); it != g.by_key.end();) {
      if (it->second.expires_ms > now) {
        ++it;
        continue;
      }
      log::Get("agent.volumes")
          ->info("transfer grant of {} expired (key {}...)", it->second.job,
                 it->first.substr(0, 8));
      if (zap) zap->Revoke(kVolumesZapDomain, it->first);
      it = g.by_key.erase(it);
    }
  }

  // The job `peer` may read, checked on every request.
  StatusOr<std::string> Authorize(const PeerInfo& peer, const proto::VolumeRequest& req) {
    if (insecure) return req.path().substr(0, req.path().find('/'));
    std::lock_guard<std::mutex> l(grants->mu);
    PruneLocked(*grants, zap, UnixMs());
    auto it = grants->by_key.find(peer.user_id);
    if (it == grants->by_key.end()) {
      return PermissionDenied("this key has no transfer grant (revoked, expired or never given)");
    }
    return it->second.job;
  }

  void Handle(const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
    uint64_t id = req.request_id();
    auto fail = [&](const Status& st) { reply(ErrorEnvelope(id, st)); };
    if (!req.has_volume_request()) return fail(InvalidArgumentError("not a volume request"));
    const proto::VolumeRequest& vr = req.volume_request();
    auto job = Authorize(peer, vr);
    if (!job.ok()) return fail(job.status());
    if (Status st = CheckVolumeRequest(vr, *job); !st.ok()) return fail(st);
    auto v = volumes.find(vr.volume());
    if (v == volumes.end())
      return fail(NotFoundError("no volume " + vr.volume() + " on this node"));
    bool queued =
        pool->Submit([root = v->second, vr = std::move(*req.mutable_volume_request()), reply, id] {
          auto r = ServeVolumeRequest(root, vr);
          if (!r.ok()) return reply(ErrorEnvelope(id, r.status()));
          proto::Envelope e;
          e.set_request_id(id);
          *e.mutable_volume_reply() = std::move(*r);
          reply(std::move(e));
        });
    if (!queued) {
      fail(UnavailableError("volume server busy: " + std::to_string(kMaxQueuedReads) +
                            " requests queued"));
    }
  }
};

VolumeServer::VolumeServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

VolumeServer::~VolumeServer() {
  impl_->rpc.reset();   // no new requests
  impl_->pool.reset();  // waits for reads in progress; their replies are dropped
}

StatusOr<std::unique_ptr<VolumeServer>> VolumeServer::Create(
    Reactor& reactor, ZapAuthenticator* zap, bool insecure, const std::string& endpoint,
    std::map<std::string, std::string> volumes) {
  if (!insecure && zap == nullptr) {
    return InvalidArgumentError("volume server: CURVE needs a ZAP authenticator");
  }
  auto impl = std::make_unique<Impl>();
  impl->reactor = &reactor;
  impl->zap = zap;
  impl->insecure = insecure;
  impl->volumes = std::move(volumes);
  impl->pool = std::make_unique<ReadPool>(kReadWorkers, kMaxQueuedReads);
  RpcServer::Options o;
  o.name = "volumes";
  o.endpoint = endpoint;
  o.insecure = insecure;
  o.authenticator = zap;
  o.zap_domain = kVolumesZapDomain;
  if (!insecure) {
    MUSTER_ASSIGN_OR_RETURN(o.server_key, GenerateKeyPair());
    zap->SetAuthorized(kVolumesZapDomain, {});
  }
  Impl* p = impl.get();
  MUSTER_ASSIGN_OR_RETURN(
      impl->rpc,
      RpcServer::Create(reactor, o,
                        [p](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
                          p->Handle(peer, std::move(req), std::move(reply));
                        }));
  return std::unique_ptr<VolumeServer>(new VolumeServer(std::move(impl)));
}

Status VolumeServer::Allow(const std::string& job, const std::string& client_public_key,
                           int64_t expires_ms) {
  MUSTER_RETURN_IF_ERROR(ValidatePathName(job, "transfer job id"));
  if (!IsValidZ85Key(client_public_key)) {
    return InvalidArgumentError("transfer key for " + job + " is not a z85 CURVE public key");
  }
  if (impl_->insecure) return Status::Ok();
  int64_t now = UnixMs();
  if (expires_ms <= now) {
    return InvalidArgumentError("transfer grant of " + job + " expires in the past (" +
                                std::to_string(expires_ms) + ")");
  }
  {
    std::lock_guard<std::mutex> l(impl_->grants->mu);
    Impl::PruneLocked(*impl_->grants, impl_->zap, now);
    impl_->grants->by_key[client_public_key] = {job, expires_ms};
    impl_->zap->Authorize(kVolumesZapDomain, {client_public_key, client_public_key});
  }
  // Dropped at its expiry even if no request comes again.
  std::weak_ptr<Impl::Grants> weak = impl_->grants;
  ZapAuthenticator* zap = impl_->zap;
  impl_->reactor->PostAfter(milliseconds(expires_ms - now + 1), "volumes.expire", [weak, zap] {
    if (auto g = weak.lock()) {
      std::lock_guard<std::mutex> l(g->mu);
      Impl::PruneLocked(*g, zap, UnixMs());
    }
  });
  log::Get("agent.volumes")
      ->info("transfer of {} allowed until {} (key {}...)", job, expires_ms,
             client_public_key.substr(0, 8));
  return Status::Ok();
}

void VolumeServer::Revoke(const std::string& job, const std::string& client_public_key) {
  if (impl_->insecure) return;
  std::lock_guard<std::mutex> l(impl_->grants->mu);
  auto& by_key = impl_->grants->by_key;
  for (auto it = by_key.begin(); it != by_key.end();) {
    bool match =
        it->second.job == job && (client_public_key.empty() || it->first == client_public_key);
    if (!match) {
      ++it;
      continue;
    }
    log::Get("agent.volumes")
        ->info("transfer grant of {} revoked (key {}...)", job, it->first.substr(0, 8));
    impl_->zap->Revoke(kVolumesZapDomain, it->first);
    it = by_key.erase(it);
  }
}

size_t VolumeServer::active_grants() const {
  std::lock_guard<std::mutex> l(impl_->grants->mu);
  size_t n = 0;
  int64_t now = UnixMs();
  for (const auto& [key, g] : impl_->grants->by_key) n += g.expires_ms > now;
  return n;
}

const std::string& VolumeServer::endpoint() const { return impl_->rpc->endpoint(); }
const std::string& VolumeServer::public_key() const { return impl_->rpc->public_key(); }

// ---------------------------------------------------------------------------------------------

namespace {

class RemoteFile : public checkpoint::ReadableFile {
 public:
  RemoteFile(RemoteVolume* v, std::string path, uint64_t size)
      : v_(v), path_(std::move(path)), size_(size) {}

  StatusOr<size_t> ReadAt(uint64_t offset, void* dst, size_t n) override {
    if (offset >= size_) return size_t{0};
    const uint64_t want = std::min<uint64_t>(n, size_ - offset);
    uint64_t done = 0;
    while (done < want) {
      proto::VolumeRequest r;
      r.set_op(proto::VolumeRequest::READ);
      r.set_path(path_);
      r.set_offset(offset + done);
      const uint32_t length =
          static_cast<uint32_t>(std::min<uint64_t>(want - done, kMaxVolumeRead));
      r.set_length(length);
      // Call checks the reply against the request: at most `length` bytes, at this offset.
      MUSTER_ASSIGN_OR_RETURN(auto reply, v_->Call(std::move(r)));
      if (reply.size() != size_) {
        return DataLossError("source file " + path_ + " changed size from " +
                             std::to_string(size_) + " to " + std::to_string(reply.size()) +
                             " during the copy");
      }
      const size_t got = reply.data().size();
      if (got == 0 || got > length) {  // CheckVolumeReply rules both out; never copy past dst
        return DataLossError("source file " + path_ + ": a READ reply of " + std::to_string(got) +
                             " bytes for " + std::to_string(length) + " asked");
      }
      std::memcpy(static_cast<char*>(dst) + done, reply.data().data(), got);
      done += got;
    }
    return static_cast<size_t>(done);
  }
  StatusOr<uint64_t> Size() override { return size_; }

 private:
  RemoteVolume* v_;
  std::string path_;
  uint64_t size_;
};

}  // namespace

StatusOr<std::unique_ptr<RemoteVolume>> RemoteVolume::Connect(const std::string& endpoint,
                                                              const std::string& server_key,
                                                              const KeyPair& client_key,
                                                              bool insecure, std::string volume) {
  MUSTER_RETURN_IF_ERROR(ValidatePathName(volume, "volume name"));
  std::unique_ptr<RemoteVolume> v(new RemoteVolume());
  RpcClient::Options o;
  o.endpoint = endpoint;
  o.insecure = insecure;
  o.server_public_key = server_key;
  o.client_key = client_key;
  MUSTER_ASSIGN_OR_RETURN(v->rpc_, RpcClient::Connect(v->context_, o));
  RpcClient* rpc = v->rpc_.get();
  v->transport_ = [rpc](proto::Envelope e) { return rpc->Call(std::move(e), kCallTimeout); };
  v->volume_ = std::move(volume);
  return v;
}

std::unique_ptr<RemoteVolume> RemoteVolume::WithTransport(Transport transport, std::string volume) {
  std::unique_ptr<RemoteVolume> v(new RemoteVolume());
  v->transport_ = std::move(transport);
  v->volume_ = std::move(volume);
  return v;
}

RemoteVolume::~RemoteVolume() {
  transport_ = nullptr;
  rpc_.reset();
}

StatusOr<proto::VolumeReply> RemoteVolume::Call(proto::VolumeRequest request) {
  MUSTER_RETURN_IF_ERROR(ValidateRelativePath(request.path(), "remote path"));
  request.set_volume(volume_);
  proto::Envelope e;
  *e.mutable_volume_request() = request;
  MUSTER_ASSIGN_OR_RETURN(auto reply, transport_(std::move(e)));
  if (!reply.has_volume_reply()) {
    return DataLossError(std::string("volume server sent no volume reply to ") +
                         OpName(request.op()) + " " + QuoteForError(request.path()));
  }
  MUSTER_RETURN_IF_ERROR(CheckVolumeReply(request, reply.volume_reply()));
  return std::move(*reply.mutable_volume_reply());
}

StatusOr<std::unique_ptr<checkpoint::WritableFile>> RemoteVolume::NewWritableFile(
    const std::string& path, bool) {
  return ReadOnly("write " + path);
}

StatusOr<std::unique_ptr<checkpoint::ReadableFile>> RemoteVolume::NewReadableFile(
    const std::string& path, bool) {
  proto::VolumeRequest r;
  r.set_op(proto::VolumeRequest::STAT);
  r.set_path(path);
  MUSTER_ASSIGN_OR_RETURN(auto st, Call(std::move(r)));
  if (!st.exists() || st.is_dir()) return NotFoundError("no file " + path + " at the source");
  return std::unique_ptr<checkpoint::ReadableFile>(new RemoteFile(this, path, st.size()));
}

Status RemoteVolume::CreateDirs(const std::string& path) { return ReadOnly("mkdir " + path); }
Status RemoteVolume::SyncDir(const std::string&) { return Status::Ok(); }
Status RemoteVolume::Rename(const std::string& from, const std::string&) {
  return ReadOnly("rename " + from);
}

StatusOr<std::vector<std::string>> RemoteVolume::ListDir(const std::string& path) {
  proto::VolumeRequest r;
  r.set_op(proto::VolumeRequest::LIST);
  r.set_path(path);
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r)));
  return std::vector<std::string>(reply.entries().begin(), reply.entries().end());
}

bool RemoteVolume::Exists(const std::string& path) {
  proto::VolumeRequest r;
  r.set_op(proto::VolumeRequest::STAT);
  r.set_path(path);
  auto reply = Call(std::move(r));
  return reply.ok() && reply->exists();
}

StatusOr<uint64_t> RemoteVolume::FileSize(const std::string& path) {
  proto::VolumeRequest r;
  r.set_op(proto::VolumeRequest::STAT);
  r.set_path(path);
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r)));
  if (!reply.exists()) return NotFoundError("no file " + path + " at the source");
  return reply.size();
}

StatusOr<double> RemoteVolume::AgeSeconds(const std::string& path) {
  proto::VolumeRequest r;
  r.set_op(proto::VolumeRequest::STAT);
  r.set_path(path);
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r)));
  if (!reply.exists()) return NotFoundError("no entry " + path + " at the source");
  return reply.age_s();
}

Status RemoteVolume::DeleteFile(const std::string& path) { return ReadOnly("delete " + path); }
Status RemoteVolume::RemoveAll(const std::string& path) { return ReadOnly("remove " + path); }

}  // namespace muster::node_agent
