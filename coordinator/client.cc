#include "coordinator/client.h"

#include <fmt/format.h>

#include <cstdlib>

#include "common/curve.h"
#include "common/strings.h"

namespace muster::coordinator {

std::string JobStateName(proto::JobState s) {
  switch (s) {
    case proto::JOB_PENDING:
      return "pending";
    case proto::JOB_SCHEDULED:
      return "scheduled";
    case proto::JOB_RUNNING:
      return "running";
    case proto::JOB_SUCCEEDED:
      return "succeeded";
    case proto::JOB_FAILED:
      return "failed";
    case proto::JOB_CANCELLED:
      return "cancelled";
    case proto::JOB_REQUEUED:
      return "requeued";
    default:
      return "unknown";
  }
}

StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Connect(ClientOptions o) {
  std::unique_ptr<CoordinatorClient> c(new CoordinatorClient());
  std::string endpoint = o.endpoint;
  if (endpoint.empty()) {
    endpoint = EnvValue("MUSTER_COORDINATOR").value_or("");
  }
  if (endpoint.empty()) {
    return InvalidArgumentError(
        "no coordinator: pass --coordinator tcp://HOST:PORT or set MUSTER_COORDINATOR");
  }
  if (endpoint.find("://") == std::string::npos) endpoint = "tcp://" + endpoint;
  RpcClient::Options ro;
  ro.endpoint = endpoint;
  ro.insecure = o.insecure;
  if (!o.insecure) {
    KeysDir kd = KeysDir::Resolve(o.keys_dir);
    auto client =
        LoadKeyPair(o.key_file.empty() ? kd.client_key() : std::filesystem::path(o.key_file));
    if (!client.ok()) {
      return FailedPreconditionError(
          fmt::format("no client key: {} (run `muster keys init`, or pass --keys DIR)",
                      client.status().message()));
    }
    auto server = LoadKeyPair(kd.coordinator_pub());
    if (!server.ok()) {
      return FailedPreconditionError(
          fmt::format("no coordinator public key: {}", server.status().message()));
    }
    ro.client_key = *client;
    ro.server_public_key = server->public_key;
  }
  MUSTER_ASSIGN_OR_RETURN(c->rpc_, RpcClient::Connect(c->context_, ro));
  c->endpoint_ = endpoint;
  c->timeout_ = o.timeout;
  return c;
}

StatusOr<proto::Envelope> CoordinatorClient::Call(proto::Envelope request) {
  return Call(std::move(request), timeout_);
}

StatusOr<proto::Envelope> CoordinatorClient::Call(proto::Envelope request,
                                                  std::chrono::milliseconds timeout) {
  request.set_deadline_ms(timeout.count());
  auto r = rpc_->Call(std::move(request), timeout);
  if (!r.ok() && r.status().code() == StatusCode::kDeadlineExceeded) {
    return DeadlineExceededError(
        fmt::format("no reply from the coordinator at {} within {} ms (is it running, and does "
                    "it have this key in its authorized_keys?)",
                    endpoint_, timeout.count()));
  }
  return r;
}

StatusOr<std::string> CoordinatorClient::Submit(const std::string& yaml,
                                                const std::string& filename) {
  proto::Envelope e;
  e.mutable_submit_request()->set_yaml(yaml);
  e.mutable_submit_request()->set_filename(filename);
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_submit_reply()) return InternalError("unexpected reply to submit");
  return r.submit_reply().job_id();
}

StatusOr<proto::StatusReply> CoordinatorClient::Status(const std::string& job_id) {
  proto::Envelope e;
  e.mutable_status_request()->set_job_id(job_id);
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_status_reply()) return InternalError("unexpected reply to status");
  return r.status_reply();
}

StatusOr<proto::JobState> CoordinatorClient::Cancel(const std::string& job_id) {
  proto::Envelope e;
  e.mutable_cancel_request()->set_job_id(job_id);
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_cancel_reply()) return InternalError("unexpected reply to cancel");
  return r.cancel_reply().state();
}

StatusOr<proto::NodesReply> CoordinatorClient::Nodes() {
  proto::Envelope e;
  e.mutable_nodes_request();
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_nodes_reply()) return InternalError("unexpected reply to nodes");
  return r.nodes_reply();
}

StatusOr<proto::EventsReply> CoordinatorClient::Events(const std::string& job_id,
                                                       int64_t after_id) {
  proto::Envelope e;
  e.mutable_events_request()->set_job_id(job_id);
  e.mutable_events_request()->set_after_id(after_id);
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_events_reply()) return InternalError("unexpected reply to events");
  return r.events_reply();
}

StatusOr<proto::NodeStatusState> CoordinatorClient::Drain(const std::string& node, bool drain) {
  proto::Envelope e;
  e.mutable_drain_request()->set_node(node);
  e.mutable_drain_request()->set_drain(drain);
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_drain_reply()) return InternalError("unexpected reply to drain");
  return r.drain_reply().state();
}

StatusOr<proto::LogsReply> CoordinatorClient::Logs(const std::string& job_id, int rank,
                                                   int64_t offset, int max_bytes, int attempt,
                                                   proto::LogStream stream, uint64_t generation,
                                                   bool kept) {
  proto::Envelope e;
  auto* l = e.mutable_logs_request();
  l->set_job_id(job_id);
  l->set_rank(rank);
  l->set_offset(offset);
  l->set_max_bytes(max_bytes);
  l->set_attempt(attempt);
  l->set_stream(stream);
  l->set_generation(generation);
  l->set_kept(kept);
  MUSTER_ASSIGN_OR_RETURN(auto r, Call(std::move(e)));
  if (!r.has_logs_reply()) return InternalError("unexpected reply to logs");
  return r.logs_reply();
}

}  // namespace muster::coordinator
