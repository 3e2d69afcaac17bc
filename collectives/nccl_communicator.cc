// The NCCL backend: GPU collectives on device memory. Rank 0 calls ncclGetUniqueId and
// publishes the 128 bytes in the rendezvous store; the others wait for them. Every rank then
// joins with ncclCommInitRankConfig in non-blocking mode and watches ncclCommGetAsyncError
// against the deadline, so a rank that never arrives cannot hang the rest. Collectives are
// enqueued on the communicator's CUDA stream; their Work watches a CUDA event and the
// communicator's async error, and on the communicator's timeout (a dead or stalled peer) calls
// ncclCommAbort, which fails this collective and every later one instead of hanging.
//
// Ordering: a collective runs after the work already enqueued on its device's legacy default
// stream when it is issued (an event recorded there, waited on by the communicator's stream),
// so a rank that computes on the default stream need not synchronize before a collective;
// the Work being done means the collective's results are in place. That wait is also how the
// GPU test holds a collective in flight on one GPU (tests/collectives/nccl_abort_test.cc).

#include "collectives/backends.h"

#ifdef MUSTER_HAVE_NCCL

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <mutex>
#include <thread>

#include "common/logging.h"

namespace muster::collectives::internal {
namespace {

using Clock = std::chrono::steady_clock;

Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return InternalError(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

ncclDataType_t ToNccl(DType t) {
  switch (t) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kF16:
      return ncclFloat16;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    case DType::kU8:
    case DType::kBool:  // moved only (IsReducible)
      return ncclUint8;
    case DType::kI8:
      return ncclInt8;
  }
  return ncclFloat32;
}

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMin:
      return ncclMin;
    case ReduceOp::kMax:
      return ncclMax;
  }
  return ncclSum;
}

// Makes `device` current for a scope and restores the caller's device after it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      cudaSetDevice(device);
    } else {
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// The NCCL communicator and its failure state, shared by the communicator and its Works.
// Thread-safety: all fields GUARDED_BY(mu).
struct Shared {
  std::mutex mu;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  Status failed;

  // Aborts the communicator (once) and records why. REQUIRES: mu held.
  void AbortLocked(Status why) {
    if (!failed.ok()) return;
    failed = std::move(why);
    log::Get("coll.nccl")->error("aborting the NCCL communicator: {}", failed.ToString());
    if (comm) ncclCommAbort(comm);
    comm = nullptr;
  }

  // ncclInProgress counts as ok. REQUIRES: mu held.
  Status AsyncErrorLocked() {
    if (!failed.ok()) return failed;
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &async);
    if (r != ncclSuccess) return AbortedError(std::string("NCCL: ") + ncclGetErrorString(r));
    if (async != ncclSuccess && async != ncclInProgress) {
      return AbortedError(std::string("NCCL async error (a peer failed?): ") +
                          ncclGetErrorString(async) + ": " + ncclGetLastError(comm));
    }
    return Status::Ok();
  }
};

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<Shared> shared, cudaEvent_t event, Clock::time_point op_deadline,
           Status early)
      : shared_(std::move(shared)),
        event_(event),
        op_deadline_(op_deadline),
        status_(early),
        done_(!early.ok() || event == nullptr) {}
  ~NcclWork() override {
    if (event_) cudaEventDestroy(event_);
  }

  Status Wait(Clock::time_point deadline) override {
    for (;;) {
      if (Done()) return status_;
      auto now = Clock::now();
      if (now >= deadline && deadline < op_deadline_) {
        return DeadlineExceededError("NCCL collective still running at the caller's deadline");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  bool Done() override {
    if (done_) return true;
    std::lock_guard<std::mutex> l(shared_->mu);
    Status async = shared_->AsyncErrorLocked();
    if (!async.ok()) {
      shared_->AbortLocked(async);
      return Finish(async);
    }
    cudaError_t q = cudaEventQuery(event_);
    if (q == cudaSuccess) return Finish(Status::Ok());
    if (q != cudaErrorNotReady) return Finish(CudaStatus(q, "event query"));
    if (Clock::now() >= op_deadline_) {
      Status s = DeadlineExceededError(
          "NCCL collective did not finish within the communicator timeout: a peer died or "
          "stalled");
      shared_->AbortLocked(s);
      return Finish(s);
    }
    return false;
  }

 private:
  bool Finish(Status s) {
    status_ = std::move(s);
    done_ = true;
    return true;
  }
  std::shared_ptr<Shared> shared_;
  cudaEvent_t event_;
  Clock::time_point op_deadline_;
  Status status_;
  bool done_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(CommConfig config, std::shared_ptr<Shared> shared)
      : config_(std::move(config)), shared_(std::move(shared)) {}
  ~NcclCommunicator() override {
    std::lock_guard<std::mutex> l(shared_->mu);
    DeviceGuard on(config_.device);
    if (order_event_) cudaEventDestroy(order_event_);
    if (scratch_) cudaFree(scratch_);
    if (shared_->comm) {
      cudaStreamSynchronize(shared_->stream);
      ncclCommDestroy(shared_->comm);
      shared_->comm = nullptr;
    }
    if (shared_->stream) cudaStreamDestroy(shared_->stream);
    shared_->stream = nullptr;
    if (shared_->failed.ok()) shared_->failed = AbortedError("communicator destroyed");
  }

  Backend backend() const override { return Backend::kNccl; }
  int rank() const override { return config_.rank; }
  int size() const override { return config_.size; }

  std::unique_ptr<Work> AllReduce(void* data, size_t count, DType type, ReduceOp op) override {
    if (Status s = CheckReducible("allreduce", type); !s.ok()) return Failed(s);
    return Launch([&] {
      return ncclAllReduce(data, data, count, ToNccl(type), ToNccl(op), shared_->comm,
                           shared_->stream);
    });
  }
  std::unique_ptr<Work> Broadcast(void* data, size_t count, DType type, int root) override {
    if (root < 0 || root >= config_.size) {
      return Failed(
          InvalidArgumentError("broadcast root " + std::to_string(root) + " out of range"));
    }
    return Launch([&] {
      return ncclBroadcast(data, data, count, ToNccl(type), root, shared_->comm, shared_->stream);
    });
  }
  std::unique_ptr<Work> AllGather(const void* send, void* recv, size_t count, DType type) override {
    return Launch([&] {
      return ncclAllGather(send, recv, count, ToNccl(type), shared_->comm, shared_->stream);
    });
  }
  std::unique_ptr<Work> ReduceScatter(const void* send, void* recv, size_t count, DType type,
                                      ReduceOp op) override {
    if (Status s = CheckReducible("reduce_scatter", type); !s.ok()) return Failed(s);
    return Launch([&] {
      return ncclReduceScatter(send, recv, count, ToNccl(type), ToNccl(op), shared_->comm,
                               shared_->stream);
    });
  }
  std::unique_ptr<Work> Barrier() override {
    // A one-element allreduce on a device scratch word.
    if (!scratch_) {
      DeviceGuard on(config_.device);
      if (Status s = CudaStatus(cudaMalloc(&scratch_, sizeof(float)), "malloc"); !s.ok()) {
        return Failed(s);
      }
    }
    return AllReduce(scratch_, 1, DType::kF32, ReduceOp::kSum);
  }

 private:
  std::unique_ptr<Work> Failed(Status s) {
    return std::make_unique<NcclWork>(shared_, nullptr, Clock::now(), std::move(s));
  }

  // Makes the communicator's stream wait for the work already enqueued on the device's legacy
  // default stream. REQUIRES: shared_->mu held, config_.device current.
  Status OrderAfterDefaultStream() {
    if (!order_event_) {
      MUSTER_RETURN_IF_ERROR(CudaStatus(
          cudaEventCreateWithFlags(&order_event_, cudaEventDisableTiming), "event create"));
    }
    MUSTER_RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(order_event_, cudaStreamLegacy), "event record"));
    return CudaStatus(cudaStreamWaitEvent(shared_->stream, order_event_, 0), "stream wait");
  }

  template <typename F>
  std::unique_ptr<Work> Launch(F call) {
    std::lock_guard<std::mutex> l(shared_->mu);
    if (!shared_->failed.ok()) {
      return std::make_unique<NcclWork>(shared_, nullptr, Clock::now(), shared_->failed);
    }
    DeviceGuard on(config_.device);
    auto op_deadline = Clock::now() + config_.timeout;
    if (Status s = OrderAfterDefaultStream(); !s.ok()) {
      return std::make_unique<NcclWork>(shared_, nullptr, Clock::now(), s);
    }
    ncclResult_t r = call();
    if (r == ncclInProgress) {
      // Non-blocking mode may finish enqueueing in the background; the completion event must
      // be recorded after the collective's kernels, so wait for the enqueue (bounded).
      ncclResult_t async = ncclInProgress, q;
      while ((q = ncclCommGetAsyncError(shared_->comm, &async)) == ncclSuccess &&
             async == ncclInProgress && Clock::now() < op_deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      if (q == ncclSuccess && async == ncclInProgress) {
        Status s = DeadlineExceededError(
            "NCCL could not enqueue the collective within the communicator timeout");
        shared_->AbortLocked(s);
        return std::make_unique<NcclWork>(shared_, nullptr, Clock::now(), s);
      }
      r = q != ncclSuccess ? q : async;
    }
    if (r != ncclSuccess) {
      Status s = AbortedError(std::string("NCCL: ") + ncclGetErrorString(r) + ": " +
                              ncclGetLastError(shared_->comm));
      shared_->AbortLocked(s);
      return std::make_unique<NcclWork>(shared_, nullptr, Clock::now(), s);
    }
    cudaEvent_t ev = nullptr;
    Status s = CudaStatus(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "event");
    if (s.ok()) s = CudaStatus(cudaEventRecord(ev, shared_->stream), "event record");
    if (!s.ok()) {
      if (ev) cudaEventDestroy(ev);
      return std::make_unique<NcclWork>(shared_, nullptr, Clock::now(), s);
    }
    return std::make_unique<NcclWork>(shared_, ev, op_deadline, Status::Ok());
  }

  CommConfig config_;
  std::shared_ptr<Shared> shared_;
  void* scratch_ = nullptr;            // Barrier's word, on config_.device
  cudaEvent_t order_event_ = nullptr;  // GUARDED_BY(shared_->mu)
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> NewNcclCommunicator(std::shared_ptr<RendezvousStore> store,
                                                            CommConfig config) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    return FailedPreconditionError("NCCL backend: no CUDA device on this machine");
  }
  if (config.device < 0 || config.device >= devices) {
    return InvalidArgumentError("NCCL backend: device " + std::to_string(config.device) + " of " +
                                std::to_string(devices));
  }
  MUSTER_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(config.device), "set device"));
  auto deadline = Clock::now() + config.timeout;
  const std::string key = "coll/" + config.name + "/nccl/unique_id";
  ncclUniqueId id;
  if (config.rank == 0) {
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess)
      return UnavailableError(std::string("ncclGetUniqueId: ") + ncclGetErrorString(r));
    MUSTER_RETURN_IF_ERROR(store->Set(key, std::string(id.internal, sizeof(id.internal))));
  } else {
    MUSTER_ASSIGN_OR_RETURN(std::string bytes, store->Get(key, config.timeout));
    if (bytes.size() != sizeof(id.internal)) {
      return DataLossError("NCCL unique id in the store has " + std::to_string(bytes.size()) +
                           " bytes, want " + std::to_string(sizeof(id.internal)));
    }
    std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
  }
  auto shared = std::make_shared<Shared>();
  MUSTER_RETURN_IF_ERROR(CudaStatus(
      cudaStreamCreateWithFlags(&shared->stream, cudaStreamNonBlocking), "stream create"));
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&shared->comm, config.size, id, config.rank, &cfg);
  if (r != ncclSuccess && r != ncclInProgress) {
    cudaStreamDestroy(shared->stream);
    return UnavailableError(std::string("ncclCommInitRankConfig: ") + ncclGetErrorString(r));
  }
  for (;;) {
    ncclResult_t async = ncclInProgress;
    ncclCommGetAsyncError(shared->comm, &async);
    if (async == ncclSuccess) break;
    if (async != ncclInProgress || Clock::now() >= deadline) {
      std::string why = async != ncclInProgress
                            ? std::string("NCCL init failed: ") + ncclGetErrorString(async)
                            : "NCCL init did not complete within " +
                                  std::to_string(config.timeout.count()) +
                                  " ms (a rank never joined?)";
      ncclCommAbort(shared->comm);
      shared->comm = nullptr;
      cudaStreamDestroy(shared->stream);
      shared->stream = nullptr;
      if (async == ncclInProgress) return DeadlineExceededError(why);
      return UnavailableError(why);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  log::Get("coll.nccl")
      ->info("rank {}/{} joined on device {}", config.rank, config.size, config.device);
  return std::unique_ptr<Communicator>(new NcclCommunicator(std::move(config), shared));
}

}  // namespace muster::collectives::internal

#else  // !MUSTER_HAVE_NCCL

namespace muster::collectives::internal {
StatusOr<std::unique_ptr<Communicator>> NewNcclCommunicator(std::shared_ptr<RendezvousStore>,
                                                            CommConfig) {
  return FailedPreconditionError(
      "the NCCL backend was not built: configure with -DMUSTER_WITH_CUDA=ON where CUDA and NCCL "
      "are installed (/usr/local/cuda)");
}
}  // namespace muster::collectives::internal

#endif
