#include "collectives/rendezvous_client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "common/local_rpc.h"
#include "common/logging.h"

namespace muster::collectives {

StatusOr<RdzvCredentials> RdzvCredentials::Parse(const std::string& text) {
  RdzvCredentials c;
  if (text == "insecure") {
    c.insecure = true;
    return c;
  }
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    size_t comma = text.find(',', start);
    parts.push_back(text.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (parts.size() != 4 || parts[0] != "v1") {
    return InvalidArgumentError(
        "MUSTER_RDZV_KEY: expected 'insecure' or 'v1,<server public>,<client public>,<client "
        "secret>' (" +
        std::to_string(parts.size()) + " comma-separated fields found)");
  }
  for (int i = 1; i < 4; ++i) {
    if (!IsValidZ85Key(parts[i])) {
      return InvalidArgumentError("MUSTER_RDZV_KEY: field " + std::to_string(i + 1) +
                                  " is not a 40-character z85 CURVE key");
    }
  }
  c.server_public_key = parts[1];
  c.client_key = {parts[2], parts[3]};
  MUSTER_ASSIGN_OR_RETURN(std::string derived, PublicKeyFromSecret(parts[3]));
  if (derived != parts[2]) {
    return InvalidArgumentError("MUSTER_RDZV_KEY: the client public key does not match its secret");
  }
  return c;
}

bool IsLocalRendezvousEndpoint(const std::string& endpoint) { return IsUnixEndpoint(endpoint); }

StatusOr<MappedGather> MappedGather::FromDescriptor(ScopedFd fd, uint64_t size) {
  // Sealed first: then nobody (the relay included) can change, shrink or grow it any more, and
  // the size checked next is the size mapped, with the bytes the relay wrote.
  constexpr int kSeals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0 || (seals & kSeals) != kSeals) {
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
      return DataLossError("rendezvous gather: the relay's result is not a file of " +
                           std::to_string(size) + " bytes");
    }
    return DataLossError(
        "rendezvous gather: the relay's result file is not sealed against "
        "writes (seals " +
        std::to_string(seals) + ")");
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) ||
      static_cast<uint64_t>(st.st_size) != size || st.st_size == 0) {
    return DataLossError("rendezvous gather: the relay's result is not a file of " +
                         std::to_string(size) + " bytes");
  }
  void* data = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (data == MAP_FAILED) {
    return DataLossError(std::string("rendezvous gather: cannot map the relay's result: ") +
                         std::strerror(errno));
  }
  return MappedGather(data, static_cast<size_t>(size));
}

MappedGather::~MappedGather() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

std::string RdzvCredentials::ToString() const {
  if (insecure) return "insecure";
  return "v1," + server_public_key + "," + client_key.public_key + "," + client_key.secret_key;
}

RendezvousClient::RendezvousClient(Options options) : options_(std::move(options)), context_(1) {}

RendezvousClient::~RendezvousClient() {
  std::lock_guard<std::mutex> l(mu_);
  idle_.clear();
}

StatusOr<std::unique_ptr<RendezvousClient>> RendezvousClient::Connect(Options options) {
  if (options.endpoint.empty()) {
    return InvalidArgumentError("rendezvous client: no endpoint (MUSTER_RDZV_ENDPOINT)");
  }
  if (options.job.empty())
    return InvalidArgumentError("rendezvous client: no job id (MUSTER_JOB_ID)");
  std::unique_ptr<RendezvousClient> c(new RendezvousClient(std::move(options)));
  // Open the first connection now, so a malformed endpoint fails here.
  MUSTER_ASSIGN_OR_RETURN(auto rpc, c->NewCaller());
  c->idle_.push_back(std::move(rpc));
  return c;
}

StatusOr<std::unique_ptr<RpcCaller>> RendezvousClient::NewCaller() {
  if (IsLocalRendezvousEndpoint(options_.endpoint)) {
    // A node agent's relay: a plain Unix socket, no ZeroMQ (and no I/O thread in this rank).
    LocalRpcClient::Options lo;
    lo.endpoint = options_.endpoint;
    lo.max_message_bytes = options_.max_message_bytes;
    MUSTER_ASSIGN_OR_RETURN(auto local, LocalRpcClient::Connect(lo));
    return std::unique_ptr<RpcCaller>(std::move(local));
  }
  RpcClient::Options ro;
  ro.endpoint = options_.endpoint;
  ro.insecure = options_.credentials.insecure;
  ro.server_public_key = options_.credentials.server_public_key;
  ro.client_key = options_.credentials.client_key;
  ro.max_message_bytes = options_.max_message_bytes;
  MUSTER_ASSIGN_OR_RETURN(auto rpc, RpcClient::Connect(context_, ro));
  return std::unique_ptr<RpcCaller>(std::move(rpc));
}

StatusOr<proto::StoreReply> RendezvousClient::Call(proto::StoreRequest request,
                                                   std::chrono::milliseconds timeout,
                                                   std::vector<ScopedFd>* received) {
  std::unique_ptr<RpcCaller> rpc;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!idle_.empty()) {
      rpc = std::move(idle_.back());
      idle_.pop_back();
    }
  }
  if (!rpc) {
    MUSTER_ASSIGN_OR_RETURN(rpc, NewCaller());
  }
  request.mutable_scope()->set_job(options_.job);
  request.mutable_scope()->set_attempt(options_.attempt);
  proto::Envelope env;
  *env.mutable_store_request() = std::move(request);
  auto reply = rpc->Call(std::move(env), timeout, received);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (idle_.size() < 4) idle_.push_back(std::move(rpc));
  }
  if (!reply.ok()) return reply.status();
  if (!reply->has_store_reply()) {
    return InternalError("rendezvous: the server at " + options_.endpoint +
                         " answered with something other than a StoreReply");
  }
  return std::move(*reply->mutable_store_reply());
}

Status RendezvousClient::Set(const std::string& key, const std::string& value) {
  proto::StoreRequest r;
  r.mutable_set()->set_key(key);
  r.mutable_set()->set_value(value);
  return Call(std::move(r), options_.op_timeout).status();
}

StatusOr<std::string> RendezvousClient::Get(const std::string& key,
                                            std::chrono::milliseconds timeout) {
  proto::StoreRequest r;
  r.mutable_get()->add_keys(key);
  r.mutable_get()->set_timeout_ms(timeout.count());
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r), timeout + options_.rpc_slack));
  if (reply.values_size() != 1) {
    return InternalError("rendezvous get: expected one value, got " +
                         std::to_string(reply.values_size()));
  }
  return std::move(*reply.mutable_values(0));
}

StatusOr<int64_t> RendezvousClient::Add(const std::string& key, int64_t delta) {
  proto::StoreRequest r;
  r.mutable_add()->set_key(key);
  r.mutable_add()->set_delta(delta);
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r), options_.op_timeout));
  return reply.counter();
}

StatusOr<std::string> RendezvousClient::CompareSet(const std::string& key,
                                                   const std::string& expected,
                                                   const std::string& desired) {
  proto::StoreRequest r;
  r.mutable_compare_set()->set_key(key);
  r.mutable_compare_set()->set_expected(expected);
  r.mutable_compare_set()->set_desired(desired);
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r), options_.op_timeout));
  if (reply.values_size() != 1) return InternalError("rendezvous compare_set: malformed reply");
  return std::move(*reply.mutable_values(0));
}

Status RendezvousClient::Wait(const std::vector<std::string>& keys,
                              std::chrono::milliseconds timeout) {
  if (keys.empty()) return Status::Ok();
  proto::StoreRequest r;
  for (const auto& k : keys) r.mutable_wait()->add_keys(k);
  r.mutable_wait()->set_timeout_ms(timeout.count());
  return Call(std::move(r), timeout + options_.rpc_slack).status();
}

Status RendezvousClient::Barrier(const std::string& name, int n,
                                 std::chrono::milliseconds timeout) {
  proto::StoreRequest r;
  r.mutable_barrier()->set_name(name);
  r.mutable_barrier()->set_n(n);
  r.mutable_barrier()->set_timeout_ms(timeout.count());
  return Call(std::move(r), timeout + options_.rpc_slack).status();
}

StatusOr<std::vector<std::string>> RendezvousClient::AllGather(const std::string& name, int rank,
                                                               int n, const std::string& value,
                                                               std::chrono::milliseconds timeout) {
  // The server checks these too; failing here saves a round trip and a parked request.
  if (n <= 0 || n > kMaxGatherRanks) {
    return InvalidArgumentError("rendezvous gather '" + name + "': n=" + std::to_string(n) +
                                " is not in 1.." + std::to_string(kMaxGatherRanks));
  }
  if (rank < 0 || rank >= n) {
    return InvalidArgumentError("rendezvous gather '" + name + "': rank " + std::to_string(rank) +
                                " is not in 0.." + std::to_string(n - 1));
  }
  proto::StoreRequest r;
  auto& g = *r.mutable_gather();
  g.set_name(name);
  g.set_rank(rank);
  g.set_n(n);
  g.set_value(value);
  g.set_timeout_ms(timeout.count());
  std::vector<ScopedFd> fds;
  MUSTER_ASSIGN_OR_RETURN(auto reply, Call(std::move(r), timeout + options_.rpc_slack, &fds));
  if (reply.gathered_zstd()) {  // only a relay asks for that (rendezvous_codec.h)
    return DataLossError("rendezvous gather '" + name +
                         "': the server sent a compressed result, which this client did not ask "
                         "for");
  }
  proto::StoreGathered all;
  bool parsed = false;
  if (reply.gathered_fd()) {
    if (fds.size() != 1) {
      return DataLossError("rendezvous gather '" + name + "': the reply names a result file, and " +
                           std::to_string(fds.size()) + " descriptors came with it (want 1)");
    }
    MUSTER_ASSIGN_OR_RETURN(MappedGather shared,
                            MappedGather::FromDescriptor(std::move(fds[0]), reply.gathered_size()));
    parsed = all.ParseFromArray(shared.bytes().data(), static_cast<int>(shared.bytes().size()));
  } else {
    parsed = all.ParseFromString(reply.gathered());
  }
  if (!parsed) {
    return DataLossError("rendezvous gather '" + name + "': the server's reply does not parse");
  }
  if (all.values_size() != n) {
    return InternalError("rendezvous gather '" + name + "': expected " + std::to_string(n) +
                         " entries, got " + std::to_string(all.values_size()));
  }
  return std::vector<std::string>(std::make_move_iterator(all.mutable_values()->begin()),
                                  std::make_move_iterator(all.mutable_values()->end()));
}

StatusOr<std::unique_ptr<RendezvousClient>> ConnectRendezvousFromEnv() {
  MUSTER_ASSIGN_OR_RETURN(RankEnv env, RankEnv::FromProcessEnviron());
  return ConnectRendezvous(env);
}

StatusOr<std::unique_ptr<RendezvousClient>> ConnectRendezvous(const RankEnv& env) {
  RendezvousClient::Options o;
  o.endpoint = env.rdzv_endpoint;
  if (o.endpoint.empty()) {
    return InvalidArgumentError("MUSTER_RDZV_ENDPOINT is not set: not started by muster?");
  }
  if (env.rdzv_key.empty()) return InvalidArgumentError("MUSTER_RDZV_KEY is not set");
  MUSTER_ASSIGN_OR_RETURN(o.credentials, RdzvCredentials::Parse(env.rdzv_key));
  o.job = env.job_id;
  if (o.job.empty()) return InvalidArgumentError("MUSTER_JOB_ID is not set");
  o.attempt = static_cast<uint64_t>(env.attempt);
  return RendezvousClient::Connect(std::move(o));
}

}  // namespace muster::collectives
