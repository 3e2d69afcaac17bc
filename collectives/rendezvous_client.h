#pragma once

// RendezvousClient: a rank's connection to the rendezvous store (collectives/rendezvous_server.h).
//
// A rank builds one from the env contract (common/rank_env.h) with ConnectRendezvous(env) or
// ConnectRendezvousFromEnv(), from these fields of RankEnv:
//   rdzv_endpoint  MUSTER_RDZV_ENDPOINT, the server, e.g. "tcp://10.0.0.5:40123", or the local
//                  socket of this node's relay, "unix:///.../rdzv-XXXXXX/s" (a plain Unix
//                  socket, common/local_rpc.h; no CURVE on it)
//   rdzv_key       MUSTER_RDZV_KEY, the attempt's credentials (RdzvCredentials below)
//   job_id         MUSTER_JOB_ID
//   attempt        MUSTER_ATTEMPT (absent means 0)
// A rank program that uses runtime::JobContext gets one shared connection from it instead.
//
// Waiting calls are parked on the server, which answers at the latest when their timeout
// passes; the client allows the server `rpc_slack` beyond that before it reports the server
// unreachable (DeadlineExceeded or Unavailable).
//
// Thread-safety: thread-safe. Each concurrent call uses its own connection (kept in a
// small pool), so a waiting Get in one thread never blocks a Set in another.

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>
#include <zmq.hpp>

#include "collectives/rendezvous_store.h"
#include "common/curve.h"
#include "common/local_rpc.h"
#include "common/proto/envelope.pb.h"
#include "common/rank_env.h"
#include "common/rpc.h"

namespace muster::collectives {

// The MUSTER_RDZV_KEY value: "insecure", or "v1,<server public>,<client public>,<client secret>"
// with three 40-character z85 CURVE keys (z85 has no ','). The client key pair belongs to one
// job attempt; the server accepts it for that attempt's scope only.
struct RdzvCredentials {
  bool insecure = false;
  std::string server_public_key;
  KeyPair client_key;

  static StatusOr<RdzvCredentials> Parse(const std::string& text);
  std::string ToString() const;
};

// True for the local socket of a node agent's relay (collectives/rendezvous_relay.h), a
// "unix://" endpoint: the client talks to it over a plain Unix socket (LocalRpcClient), without
// CURVE (the socket never leaves the host; the relay's header says who may open it), and the
// relay carries the attempt's key to the store.
bool IsLocalRendezvousEndpoint(const std::string& endpoint);

// A gather result that the local relay handed over as a sealed memory file
// (StoreReply.gathered_fd) instead of sending it down the socket to each of its ranks: the file
// mapped read-only, checked (a regular file of the size the reply names, sealed against writes,
// shrinking and growing, so that its bytes are the relay's and stay so: no checksum needed).
// Move-only; unmaps when destroyed.
class MappedGather {
 public:
  // DataLoss when the descriptor is not such a file.
  static StatusOr<MappedGather> FromDescriptor(ScopedFd fd, uint64_t size);
  MappedGather(MappedGather&& o) noexcept : data_(o.data_), size_(o.size_) { o.data_ = nullptr; }
  MappedGather& operator=(MappedGather&&) = delete;
  MappedGather(const MappedGather&) = delete;
  ~MappedGather();
  // The serialized StoreGathered.
  std::string_view bytes() const { return {static_cast<const char*>(data_), size_}; }

 private:
  MappedGather(void* data, size_t size) : data_(data), size_(size) {}
  void* data_ = nullptr;
  size_t size_ = 0;
};

class RendezvousClient final : public RendezvousStore {
 public:
  struct Options {
    std::string endpoint;
    RdzvCredentials credentials;
    std::string job;
    uint64_t attempt = 0;
    // Timeout of calls that do not wait on other ranks (set, add, compare_set).
    std::chrono::milliseconds op_timeout{30000};
    // How long past a waiting call's own timeout the client waits for the server's answer.
    std::chrono::milliseconds rpc_slack{2000};
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
  };

  // Connects lazily: a server that is not up yet is retried until a call's timeout.
  static StatusOr<std::unique_ptr<RendezvousClient>> Connect(Options options);
  ~RendezvousClient() override;

  Status Set(const std::string& key, const std::string& value) override;
  StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) override;
  StatusOr<int64_t> Add(const std::string& key, int64_t delta) override;
  StatusOr<std::string> CompareSet(const std::string& key, const std::string& expected,
                                   const std::string& desired) override;
  Status Wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  Status Barrier(const std::string& name, int n, std::chrono::milliseconds timeout) override;
  StatusOr<std::vector<std::string>> AllGather(const std::string& name, int rank, int n,
                                               const std::string& value,
                                               std::chrono::milliseconds timeout) override;

  const Options& options() const { return options_; }

 private:
  explicit RendezvousClient(Options options);
  // `received`: where the descriptors that came with the reply go (null: closed).
  StatusOr<proto::StoreReply> Call(proto::StoreRequest request, std::chrono::milliseconds timeout,
                                   std::vector<ScopedFd>* received = nullptr);
  // A connection to the endpoint: a LocalRpcClient for a relay's socket, else an RpcClient.
  StatusOr<std::unique_ptr<RpcCaller>> NewCaller();

  Options options_;
  zmq::context_t context_;  // no socket (and no I/O thread) is made in it for a relay's socket
  std::mutex mu_;
  std::vector<std::unique_ptr<RpcCaller>> idle_;  // GUARDED_BY(mu_)
};

// Reads the env contract (above) and connects. InvalidArgument names the variable that is
// missing or malformed.
StatusOr<std::unique_ptr<RendezvousClient>> ConnectRendezvousFromEnv();
// The same from an already parsed env: InvalidArgument when it has no endpoint, key or job id.
StatusOr<std::unique_ptr<RendezvousClient>> ConnectRendezvous(const RankEnv& env);

}  // namespace muster::collectives
