#pragma once

// CoordinatorClient: typed calls to a coordinator, for the CLI and `muster run`. Resolves the
// endpoint (`--coordinator`, else $MUSTER_COORDINATOR) and keys (`--keys`, else $MUSTER_KEYS,
// else ~/.muster: client.key and coordinator.pub).
//
// Thread-safety: calls are serialized (RpcClient).

#include <chrono>
#include <memory>
#include <string>
#include <zmq.hpp>

#include "common/proto/envelope.pb.h"
#include "common/rpc.h"
#include "common/status.h"
#include "coordinator/node_state.h"  // NodeStateText, for the CLI

namespace muster::coordinator {

struct ClientOptions {
  std::string endpoint;  // "" : $MUSTER_COORDINATOR
  std::string keys_dir;  // "" : $MUSTER_KEYS, else ~/.muster
  std::string key_file;  // our key pair; "" : <keys_dir>/client.key
  bool insecure = false;
  std::chrono::milliseconds timeout{10000};
};

class CoordinatorClient {
 public:
  static StatusOr<std::unique_ptr<CoordinatorClient>> Connect(ClientOptions options);

  // Sends any request envelope; returns the reply or its error as a Status.
  StatusOr<proto::Envelope> Call(proto::Envelope request);
  StatusOr<proto::Envelope> Call(proto::Envelope request, std::chrono::milliseconds timeout);

  StatusOr<std::string> Submit(const std::string& yaml, const std::string& filename);
  StatusOr<proto::StatusReply> Status(const std::string& job_id);
  StatusOr<proto::JobState> Cancel(const std::string& job_id);
  StatusOr<proto::NodesReply> Nodes();
  StatusOr<proto::EventsReply> Events(const std::string& job_id, int64_t after_id);
  StatusOr<proto::NodeStatusState> Drain(const std::string& node, bool drain);
  // `generation`: the last reply's, so the offset follows the rank's log across rotation.
  // `kept`: the last reply's (the offset counts in the coordinator's kept copy).
  StatusOr<proto::LogsReply> Logs(const std::string& job_id, int rank, int64_t offset,
                                  int max_bytes, int attempt = 0,
                                  proto::LogStream stream = proto::LOG_MERGED,
                                  uint64_t generation = 0, bool kept = false);

  const std::string& endpoint() const { return endpoint_; }

 private:
  CoordinatorClient() = default;
  zmq::context_t context_;
  std::unique_ptr<RpcClient> rpc_;
  std::string endpoint_;
  std::chrono::milliseconds timeout_{10000};
};

// "pending", "running", ...
std::string JobStateName(proto::JobState state);

}  // namespace muster::coordinator
