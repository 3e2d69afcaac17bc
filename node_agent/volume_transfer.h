#pragma once

// Checkpoint replication between providers, agent to agent (common/proto/replication.proto).
//
// VolumeServer: serves this node's volumes read-only over an RpcServer (CURVE; ZAP domain
// "muster-volumes"). Nothing is readable until AllowTransfer authorizes a client key for one
// job: that key may then read `<volume root>/<job>/...` of any volume, until it expires.
// Paths are checked: no "..", no absolute paths, nothing outside the job's directory.
//
// RemoteVolume: a read-only checkpoint::Volume over that protocol, so checkpoint::Replicate
// copies from another node exactly as from a local directory (every block verified against
// the source MANIFEST, committed only when whole, resumed after a crash).
//
// Thread-safety: VolumeServer lives on a reactor (Allow is thread-safe). RemoteVolume is
// thread-safe (calls are serialized).

#include <map>
#include <memory>
#include <string>
#include <zmq.hpp>

#include "checkpoint/volume.h"
#include "common/curve.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "common/status.h"

namespace muster::node_agent {

inline constexpr char kVolumesZapDomain[] = "muster-volumes";

class VolumeServer {
 public:
  // `volumes`: name -> root directory. `endpoint` e.g. "tcp://198.18.0.11:*".
  // REQUIRES: on the reactor thread or before the reactor starts.
  static StatusOr<std::unique_ptr<VolumeServer>> Create(Reactor& reactor, ZapAuthenticator* zap,
                                                        bool insecure, const std::string& endpoint,
                                                        std::map<std::string, std::string> volumes);
  ~VolumeServer();

  // Lets `client_public_key` read `job`'s directories until `expires_ms` (unix ms).
  void Allow(const std::string& job, const std::string& client_public_key, int64_t expires_ms);

  const std::string& endpoint() const;
  const std::string& public_key() const;

 private:
  struct Impl;
  explicit VolumeServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class RemoteVolume : public checkpoint::Volume {
 public:
  // `volume` names the volume on the serving node; paths given to this Volume are relative to
  // its root. `insecure`: no CURVE (only against an insecure server).
  static StatusOr<std::unique_ptr<RemoteVolume>> Connect(const std::string& endpoint,
                                                         const std::string& server_key,
                                                         const KeyPair& client_key, bool insecure,
                                                         std::string volume);
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

  // One request; used by the files it opens.
  StatusOr<proto::VolumeReply> Call(proto::VolumeRequest request);

 private:
  RemoteVolume() = default;
  zmq::context_t context_;
  std::unique_ptr<RpcClient> rpc_;
  std::string volume_;
};

}  // namespace muster::node_agent
