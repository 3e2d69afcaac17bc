#pragma once

// Checkpoint replication between providers, agent to agent (common/proto/replication.proto).
//
// VolumeServer: serves this node's volumes read-only over an RpcServer (CURVE; ZAP domain
// "muster-volumes"). Nothing is readable until Allow authorizes a client key for one job: that
// key may then read `<volume root>/<job>/...` of any volume, until Revoke or its expiry; both
// are checked on every request, so an open connection loses access too. It serves only
// regular files and directories inside the job's directory, reached from the volume root one
// component at a time with O_NOFOLLOW: a symbolic link anywhere in the path, a FIFO, a device
// or a socket gets an error reply. The disk is read on worker threads (ServeVolumeRequest),
// never on the reactor, so a slow disk cannot stall the agent's heartbeats or its lease; a
// request that finds every worker busy and the queue full gets Unavailable.
//
// RemoteVolume: a read-only checkpoint::Volume over that protocol, so checkpoint::Replicate
// copies from another node exactly as from a local directory (every block verified against
// the source MANIFEST, committed only when whole, resumed after a crash). The serving node is
// untrusted: every reply is checked against its request (CheckVolumeReply) before any of it is
// used, and a reply that does not fit is DataLoss, never a copy past a buffer.
//
// Thread-safety: VolumeServer lives on a reactor (Allow and Revoke are thread-safe).
// RemoteVolume is thread-safe (calls are serialized). The free functions are pure except
// ServeVolumeRequest, which reads the file system and blocks on it.

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <zmq.hpp>

#include "checkpoint/volume.h"
#include "common/curve.h"
#include "common/proto/replication.pb.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "common/status.h"

namespace muster::node_agent {

inline constexpr char kVolumesZapDomain[] = "muster-volumes";
// The most bytes one READ may ask for.
inline constexpr uint32_t kMaxVolumeRead = 4u << 20;
// The most entries one LIST returns; a larger directory is an error.
inline constexpr size_t kMaxListEntries = 65536;
// Sizes and offsets must fit an off_t.
inline constexpr uint64_t kMaxRemoteFileSize =
    static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

// A request the server may serve for a transfer of `job`: a known op, a valid volume name, a
// valid relative path (common/path_name.h) whose first component is `job`, a READ of at most
// kMaxVolumeRead bytes at an offset that fits an off_t. InvalidArgument or FailedPrecondition
// ("permission denied") naming what is wrong.
Status CheckVolumeRequest(const proto::VolumeRequest& request, const std::string& job);

// Serves a request that passed CheckVolumeRequest from the volume rooted at `root` (the root
// itself may be a symbolic link; nothing under it is followed). Blocks on the disk: call it
// from a worker thread. Errors: NotFound (missing), FailedPrecondition (a symbolic link, a
// FIFO or another non-regular file, too many entries), or the errno's status.
StatusOr<proto::VolumeReply> ServeVolumeRequest(const std::string& root,
                                                const proto::VolumeRequest& request);

// Whether `reply` is a well-formed answer to `request` (replication.proto spells out each op's
// fields): DataLoss naming the field and the values when not.
Status CheckVolumeReply(const proto::VolumeRequest& request, const proto::VolumeReply& reply);

class VolumeServer {
 public:
  // `volumes`: name -> root directory. `endpoint` e.g. "tcp://198.18.0.11:*". `zap` is the
  // reactor context's authenticator (not owned; outlives the server); nullptr only if insecure.
  // REQUIRES: on the reactor thread or before the reactor starts.
  static StatusOr<std::unique_ptr<VolumeServer>> Create(Reactor& reactor, ZapAuthenticator* zap,
                                                        bool insecure, const std::string& endpoint,
                                                        std::map<std::string, std::string> volumes);
  // Stops the workers (waiting for reads in progress). REQUIRES: on the reactor thread or after
  // the reactor stopped.
  ~VolumeServer();

  // Lets `client_public_key` read `job`'s directories until `expires_ms` (unix ms), Revoke, or
  // a later Allow of the same key. InvalidArgument for an invalid job id or key. A no-op (Ok)
  // when insecure: then anyone reads any job.
  Status Allow(const std::string& job, const std::string& client_public_key, int64_t expires_ms);
  // Ends `client_public_key`'s grant for `job` (every grant of `job` when the key is empty):
  // its next request is refused, on a connection already open too.
  void Revoke(const std::string& job, const std::string& client_public_key);
  // Grants that have not expired nor been revoked.
  size_t active_grants() const;

  const std::string& endpoint() const;
  const std::string& public_key() const;

 private:
  struct Impl;
  explicit VolumeServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class RemoteVolume : public checkpoint::Volume {
 public:
  // One request/reply exchange with a volume server (an RpcClient's Call, or a fake in tests).
  using Transport = std::function<StatusOr<proto::Envelope>(proto::Envelope)>;

  // `volume` names the volume on the serving node; paths given to this Volume are relative to
  // its root. `insecure`: no CURVE (only against an insecure server).
  static StatusOr<std::unique_ptr<RemoteVolume>> Connect(const std::string& endpoint,
                                                         const std::string& server_key,
                                                         const KeyPair& client_key, bool insecure,
                                                         std::string volume);
  // Over any transport (the fuzzer's, a test's).
  static std::unique_ptr<RemoteVolume> WithTransport(Transport transport, std::string volume);
  ~RemoteVolume() override;

  StatusOr<std::unique_ptr<checkpoint::WritableFile>> NewWritableFile(const std::string& path,
                                                                      bool direct) override;
  StatusOr<std::unique_ptr<checkpoint::ReadableFile>> NewReadableFile(const std::string& path,
                                                                      bool direct) override;
  Status CreateDirs(const std::string& path) override;
  Status SyncDir(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  StatusOr<std::vector<std::string>> ListDir(const std::string& path) override;
  bool Exists(const std::string& path) override;
  StatusOr<uint64_t> FileSize(const std::string& path) override;
  StatusOr<double> AgeSeconds(const std::string& path) override;
  Status DeleteFile(const std::string& path) override;
  Status RemoveAll(const std::string& path) override;

  // One request (its path validated first); the reply only once CheckVolumeReply accepts it.
  StatusOr<proto::VolumeReply> Call(proto::VolumeRequest request);

 private:
  RemoteVolume() = default;
  zmq::context_t context_;
  std::unique_ptr<RpcClient> rpc_;
  Transport transport_;
  std::string volume_;
};

}  // namespace muster::node_agent
