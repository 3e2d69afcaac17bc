#include "node_agent/volume_transfer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>

#include "common/logging.h"
#include "common/wire.h"

namespace muster::node_agent {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

namespace {

constexpr uint32_t kMaxRead = 4u << 20;
constexpr milliseconds kCallTimeout{20000};

int64_t UnixMs() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A relative path inside `job`'s directory: "job" or "job/..." without "..", "." or "" parts.
bool InsideJob(const std::string& path, const std::string& job) {
  if (path != job && path.rfind(job + "/", 0) != 0) return false;
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    if (slash == std::string::npos) slash = path.size();
    std::string part = path.substr(start, slash - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = slash + 1;
  }
  return true;
}

Status ReadOnly(const std::string& what) {
  return FailedPreconditionError("remote volume is read-only (" + what + ")");
}

}  // namespace

struct VolumeServer::Impl {
  Reactor* reactor = nullptr;
  ZapAuthenticator* zap = nullptr;
  bool insecure = false;
  std::map<std::string, std::string> volumes;
  std::unique_ptr<RpcServer> rpc;
  std::mutex mu;
  // client public key -> (job, expires)
  std::map<std::string, std::pair<std::string, int64_t>> grants;  // GUARDED_BY(mu)

  StatusOr<proto::Envelope> Serve(const PeerInfo& peer, const proto::VolumeRequest& req) {
    std::string job;
    {
      std::lock_guard<std::mutex> l(mu);
      // The authorized key's name is "<job>@<expires>" (see Allow).
      auto at = peer.user_id.rfind('@');
      if (insecure) {
        job = req.path().substr(0, req.path().find('/'));
      } else if (at != std::string::npos) {
        job = peer.user_id.substr(0, at);
        int64_t expires = 0;
        std::from_chars(peer.user_id.data() + at + 1, peer.user_id.data() + peer.user_id.size(),
                        expires);
        if (expires < UnixMs()) return PermissionDenied("transfer key expired");
      }
    }
    if (job.empty() || !InsideJob(req.path(), job)) {
      return PermissionDenied("path " + req.path() + " is outside the transfer's job " + job);
    }
    auto v = volumes.find(req.volume());
    if (v == volumes.end()) return NotFoundError("no volume " + req.volume() + " on this node");
    fs::path p = fs::path(v->second) / req.path();
    proto::Envelope e;
    auto* out = e.mutable_volume_reply();
    std::error_code ec;
    switch (req.op()) {
      case proto::VolumeRequest::STAT: {
        auto st = fs::status(p, ec);
        out->set_exists(fs::exists(st));
        out->set_is_dir(fs::is_directory(st));
        if (fs::is_regular_file(st)) out->set_size(fs::file_size(p, ec));
        if (out->exists()) {
          auto mtime = fs::last_write_time(p, ec);
          auto age = fs::file_time_type::clock::now() - mtime;
          out->set_age_s(std::chrono::duration<double>(age).count());
        }
        return e;
      }
      case proto::VolumeRequest::LIST: {
        if (!fs::is_directory(p, ec)) return NotFoundError("no directory " + req.path());
        for (const auto& d : fs::directory_iterator(p, ec)) {
          out->add_entries(d.path().filename().string());
        }
        if (ec) return ErrnoStatus(ec.value(), "list " + req.path());
        return e;
      }
      case proto::VolumeRequest::READ: {
        std::ifstream in(p, std::ios::binary);
        if (!in) return NotFoundError("cannot open " + req.path());
        uint32_t n = std::min(req.length(), kMaxRead);
        std::string data(n, '\0');
        in.seekg(static_cast<std::streamoff>(req.offset()));
        in.read(data.data(), n);
        data.resize(static_cast<size_t>(std::max<std::streamsize>(0, in.gcount())));
        out->set_data(std::move(data));
        return e;
      }
      default:
        return InvalidArgumentError("unknown volume op");
    }
  }

  static Status PermissionDenied(const std::string& why) {
    return FailedPreconditionError("permission denied: " + why);
  }
};

VolumeServer::VolumeServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
VolumeServer::~VolumeServer() = default;

StatusOr<std::unique_ptr<VolumeServer>> VolumeServer::Create(
    Reactor& reactor, ZapAuthenticator* zap, bool insecure, const std::string& endpoint,
    std::map<std::string, std::string> volumes) {
  auto impl = std::make_unique<Impl>();
  impl->reactor = &reactor;
  impl->zap = zap;
  impl->insecure = insecure;
  impl->volumes = std::move(volumes);
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
      RpcServer::Create(
          reactor, o, [p](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
            uint64_t id = req.request_id();
            StatusOr<proto::Envelope> r = req.has_volume_request()
                                              ? p->Serve(peer, req.volume_request())
                                              : InvalidArgumentError("not a volume request");
            if (!r.ok()) return reply(ErrorEnvelope(id, r.status()));
            r->set_request_id(id);
            reply(std::move(*r));
          }));
  return std::unique_ptr<VolumeServer>(new VolumeServer(std::move(impl)));
}

void VolumeServer::Allow(const std::string& job, const std::string& client_public_key,
                         int64_t expires_ms) {
  if (impl_->insecure || impl_->zap == nullptr) return;
  impl_->zap->Authorize(kVolumesZapDomain,
                        {client_public_key, job + "@" + std::to_string(expires_ms)});
  log::Get("agent.volumes")
      ->info("transfer of {} allowed until {} (key {}...)", job, expires_ms,
             client_public_key.substr(0, 8));
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
    size_t done = 0;
    while (done < n) {
      proto::VolumeRequest r;
      r.set_op(proto::VolumeRequest::READ);
      r.set_path(path_);
      r.set_offset(offset + done);
      r.set_length(static_cast<uint32_t>(std::min<size_t>(n - done, kMaxRead)));
      MUSTER_ASSIGN_OR_RETURN(auto reply, v_->Call(std::move(r)));
      if (reply.data().empty()) break;
      std::memcpy(static_cast<char*>(dst) + done, reply.data().data(), reply.data().size());
      done += reply.data().size();
    }
    return done;
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
  std::unique_ptr<RemoteVolume> v(new RemoteVolume());
  RpcClient::Options o;
  o.endpoint = endpoint;
  o.insecure = insecure;
  o.server_public_key = server_key;
  o.client_key = client_key;
  MUSTER_ASSIGN_OR_RETURN(v->rpc_, RpcClient::Connect(v->context_, o));
  v->volume_ = std::move(volume);
  return v;
}

RemoteVolume::~RemoteVolume() { rpc_.reset(); }

StatusOr<proto::VolumeReply> RemoteVolume::Call(proto::VolumeRequest request) {
  request.set_volume(volume_);
  proto::Envelope e;
  *e.mutable_volume_request() = std::move(request);
  MUSTER_ASSIGN_OR_RETURN(auto reply, rpc_->Call(std::move(e), kCallTimeout));
  if (!reply.has_volume_reply()) return InternalError("volume server sent no volume reply");
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
