#include "collectives/communicator.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "collectives/backends.h"
#include "collectives/rendezvous_client.h"
#include "common/logging.h"
#include "common/net_address.h"
#include "common/strings.h"

namespace muster::collectives {

bool IsReducible(DType type) { return type != DType::kBool; }

std::string_view ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
  }
  return "?";
}

std::string_view BackendName(Backend b) {
  switch (b) {
    case Backend::kGloo:
      return "gloo";
    case Backend::kNccl:
      return "nccl";
    case Backend::kMpi:
      return "mpi";
  }
  return "?";
}

StatusOr<Backend> ParseBackend(std::string_view name) {
  for (Backend b : {Backend::kGloo, Backend::kNccl, Backend::kMpi})
    if (BackendName(b) == name) return b;
  return InvalidArgumentError("unknown collectives backend '" + std::string(name) +
                              "' (want gloo, nccl or mpi)");
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

uint16_t FloatToHalf(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t exp = (x >> 23) & 0xff;
  uint32_t mant = x & 0x7fffff;
  if (exp == 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);  // inf / nan
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return sign | 0x7c00;  // overflow to inf
  if (e <= 0) {                       // subnormal or zero
    if (e < -10) return sign;
    mant |= 0x800000;
    int shift = 14 - e;
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return sign | half;
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;  // may carry into exp: correct
  return static_cast<uint16_t>(half);
}

float BFloat16ToFloat(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

uint16_t FloatToBFloat16(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x40);  // nan
  uint32_t rounding = 0x7fff + ((x >> 16) & 1);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(Backend backend,
                                                           std::shared_ptr<RendezvousStore> store,
                                                           CommConfig config) {
  if (config.size < 1 || config.rank < 0 || config.rank >= config.size) {
    return InvalidArgumentError("communicator: rank " + std::to_string(config.rank) +
                                " of world size " + std::to_string(config.size) +
                                " is out of range");
  }
  if (config.timeout.count() <= 0) {
    return InvalidArgumentError("communicator: timeout must be positive");
  }
  if (backend != Backend::kMpi && !store) {
    return InvalidArgumentError("communicator: the " + std::string(BackendName(backend)) +
                                " backend needs a rendezvous store");
  }
  switch (backend) {
    case Backend::kGloo:
      return internal::NewGlooCommunicator(std::move(store), std::move(config));
    case Backend::kNccl:
      return internal::NewNcclCommunicator(std::move(store), std::move(config));
    case Backend::kMpi:
      return internal::NewMpiCommunicator(std::move(store), std::move(config));
  }
  return InvalidArgumentError("communicator: unknown backend");
}

namespace {

// mpirun's own variable: a program it started has no muster rendezvous store.
bool UnderMpirun(const RankEnv& env) {
  return EnvValue("OMPI_COMM_WORLD_SIZE").has_value() && !env.has_rendezvous();
}

}  // namespace

StatusOr<std::unique_ptr<Communicator>> Communicator::FromEnv(CommConfig config, bool want_gpu) {
  MUSTER_ASSIGN_OR_RETURN(RankEnv env, RankEnv::FromProcessEnviron());
  std::shared_ptr<RendezvousStore> store;
  if (!UnderMpirun(env) && env.coll_backend != "mpi") {
    MUSTER_ASSIGN_OR_RETURN(auto client, ConnectRendezvous(env));
    store = std::move(client);
  }
  return FromEnv(env, std::move(store), std::move(config), want_gpu);
}

StatusOr<std::unique_ptr<Communicator>> Communicator::FromEnv(
    const RankEnv& env, std::shared_ptr<RendezvousStore> store, CommConfig config, bool want_gpu) {
  Backend backend = Backend::kGloo;
  if (!env.coll_backend.empty()) {
    MUSTER_ASSIGN_OR_RETURN(backend, ParseBackend(env.coll_backend));
  } else if (UnderMpirun(env)) {
    backend = Backend::kMpi;
  } else if (want_gpu) {
    backend = Backend::kNccl;
  }
  config.rank = env.rank;
  config.size = env.world_size;
  config.device = env.local_rank;
  if (env.coll_timeout_ms) config.timeout = std::chrono::milliseconds(*env.coll_timeout_ms);
  config.host = LocalAddressToward(env.master_addr);
  log::SetContext(env.job_id, "", std::to_string(config.rank));
  if (backend != Backend::kMpi && store == nullptr) {
    return InvalidArgumentError("communicator: the " + std::string(BackendName(backend)) +
                                " backend needs the job's rendezvous store");
  }
  return CreateCommunicator(backend, std::move(store), std::move(config));
}

}  // namespace muster::collectives

namespace muster::collectives::internal {
namespace {

class FinishedWorkImpl final : public Work {
 public:
  explicit FinishedWorkImpl(Status status) : status_(std::move(status)) {}
  Status Wait(std::chrono::steady_clock::time_point) override { return status_; }
  bool Done() override { return true; }

 private:
  const Status status_;
};

}  // namespace

Status CheckReducible(std::string_view collective, DType type) {
  if (IsReducible(type)) return Status::Ok();
  return InvalidArgumentError(std::string(collective) + " of " + std::string(DTypeName(type)) +
                              ": only broadcast and allgather take it (reduce a u8 of 0/1)");
}

std::unique_ptr<Work> FinishedWork(Status status) {
  return std::make_unique<FinishedWorkImpl>(std::move(status));
}

}  // namespace muster::collectives::internal
