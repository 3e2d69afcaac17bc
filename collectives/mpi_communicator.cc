// The MPI backend: Open MPI's collectives on a duplicate of MPI_COMM_WORLD, for programs run
// under mpirun. mpirun wires the ranks, so the store is not used. MPI has no timeouts: when a
// rank dies, mpirun ends the job (its own no-hang guarantee).

#include "collectives/backends.h"

#ifdef MUSTER_HAVE_MPI

#include <mpi.h>

#include <cstring>
#include <vector>

#include "collectives/queued_communicator.h"
#include "collectives/reduce.h"
#include "common/logging.h"

namespace muster::collectives::internal {
namespace {

// User-defined MPI ops, with the kernels of reduce.h: for the 16-bit float types (MPI has
// none; they reduce through float), and for the 8-bit integers, whose MPI_SUM some Open MPI
// builds compute with saturating vector adds (255 + 1 = 255) where every other backend wraps.
template <DType T, ReduceOp Op>
void ReduceOwn(void* in, void* inout, int* len, MPI_Datatype*) {
  ReduceInto(T, Op, inout, inout, in, static_cast<size_t>(*len));
}

MPI_Datatype ToMpi(DType t) {
  switch (t) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kF64:
      return MPI_DOUBLE;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kU8:
    case DType::kBool:  // moved only (IsReducible)
      return MPI_UINT8_T;
    case DType::kI8:
      return MPI_INT8_T;
    case DType::kF16:
    case DType::kBF16:
      return MPI_UINT16_T;
  }
  return MPI_BYTE;
}

Status Check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return Status::Ok();
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return AbortedError(std::string("MPI ") + what + ": " + std::string(msg, len));
}

class MpiCommunicator final : public QueuedCommunicator {
 public:
  MpiCommunicator(CommConfig config, MPI_Comm comm) : config_(std::move(config)), comm_(comm) {
    auto make = [&](MPI_User_function* fn) {
      MPI_Op op;
      MPI_Op_create(fn, /*commute=*/1, &op);
      return op;
    };
    f16_[0] = make(&ReduceOwn<DType::kF16, ReduceOp::kSum>);
    f16_[1] = make(&ReduceOwn<DType::kF16, ReduceOp::kMin>);
    f16_[2] = make(&ReduceOwn<DType::kF16, ReduceOp::kMax>);
    bf16_[0] = make(&ReduceOwn<DType::kBF16, ReduceOp::kSum>);
    bf16_[1] = make(&ReduceOwn<DType::kBF16, ReduceOp::kMin>);
    bf16_[2] = make(&ReduceOwn<DType::kBF16, ReduceOp::kMax>);
    u8_sum_ = make(&ReduceOwn<DType::kU8, ReduceOp::kSum>);
    i8_sum_ = make(&ReduceOwn<DType::kI8, ReduceOp::kSum>);
    StartWorker();
  }
  ~MpiCommunicator() override {
    StopWorker();
    for (auto& op : f16_) MPI_Op_free(&op);
    for (auto& op : bf16_) MPI_Op_free(&op);
    MPI_Op_free(&u8_sum_);
    MPI_Op_free(&i8_sum_);
    MPI_Comm_free(&comm_);
  }

  Backend backend() const override { return Backend::kMpi; }
  int rank() const override { return config_.rank; }
  int size() const override { return config_.size; }

  std::unique_ptr<Work> AllReduce(void* data, size_t count, DType type, ReduceOp op) override {
    if (Status s = CheckReducible("allreduce", type); !s.ok()) return FinishedWork(s);
    return Enqueue([=, this]() -> Status {
      MUSTER_RETURN_IF_ERROR(Check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count),
                                                 ToMpi(type), Op(type, op), comm_),
                                   "allreduce"));
      if (op == ReduceOp::kAvg) DivideBy(type, data, count, config_.size);
      return Status::Ok();
    });
  }
  std::unique_ptr<Work> Broadcast(void* data, size_t count, DType type, int root) override {
    return Enqueue([=, this]() -> Status {
      if (root < 0 || root >= config_.size)
        return InvalidArgumentError("broadcast root out of range");
      return Check(MPI_Bcast(data, static_cast<int>(count), ToMpi(type), root, comm_), "bcast");
    });
  }
  std::unique_ptr<Work> AllGather(const void* send, void* recv, size_t count, DType type) override {
    return Enqueue([=, this] {
      return Check(MPI_Allgather(send, static_cast<int>(count), ToMpi(type), recv,
                                 static_cast<int>(count), ToMpi(type), comm_),
                   "allgather");
    });
  }
  std::unique_ptr<Work> ReduceScatter(const void* send, void* recv, size_t count, DType type,
                                      ReduceOp op) override {
    if (Status s = CheckReducible("reduce_scatter", type); !s.ok()) return FinishedWork(s);
    return Enqueue([=, this]() -> Status {
      MUSTER_RETURN_IF_ERROR(Check(MPI_Reduce_scatter_block(send, recv, static_cast<int>(count),
                                                            ToMpi(type), Op(type, op), comm_),
                                   "reduce_scatter"));
      if (op == ReduceOp::kAvg) DivideBy(type, recv, count, config_.size);
      return Status::Ok();
    });
  }
  std::unique_ptr<Work> Barrier() override {
    return Enqueue([this] { return Check(MPI_Barrier(comm_), "barrier"); });
  }

 private:
  MPI_Op Op(DType type, ReduceOp op) const {
    int i = op == ReduceOp::kMin ? 1 : op == ReduceOp::kMax ? 2 : 0;
    if (type == DType::kF16) return f16_[i];
    if (type == DType::kBF16) return bf16_[i];
    if (i == 0 && type == DType::kU8) return u8_sum_;
    if (i == 0 && type == DType::kI8) return i8_sum_;
    return i == 1 ? MPI_MIN : i == 2 ? MPI_MAX : MPI_SUM;
  }

  CommConfig config_;
  MPI_Comm comm_;
  MPI_Op f16_[3], bf16_[3];
  MPI_Op u8_sum_, i8_sum_;
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> NewMpiCommunicator(std::shared_ptr<RendezvousStore>,
                                                           CommConfig config) {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    // Collectives run on the communicator's worker thread, one at a time.
    MUSTER_RETURN_IF_ERROR(
        Check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "init"));
    if (provided < MPI_THREAD_SERIALIZED) {
      return FailedPreconditionError("this MPI does not support MPI_THREAD_SERIALIZED");
    }
    // Finalize at exit, after every communicator is gone.
    std::atexit([] {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Finalize();
    });
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank != config.rank || size != config.size) {
    return InvalidArgumentError("MPI says rank " + std::to_string(rank) + " of " +
                                std::to_string(size) + ", the config says " +
                                std::to_string(config.rank) + " of " + std::to_string(config.size));
  }
  MPI_Comm comm;
  MUSTER_RETURN_IF_ERROR(Check(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "comm_dup"));
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  return std::unique_ptr<Communicator>(new MpiCommunicator(std::move(config), comm));
}

}  // namespace muster::collectives::internal

#else  // !MUSTER_HAVE_MPI

namespace muster::collectives::internal {
StatusOr<std::unique_ptr<Communicator>> NewMpiCommunicator(std::shared_ptr<RendezvousStore>,
                                                           CommConfig) {
  return FailedPreconditionError(
      "the MPI backend was not built: install libopenmpi-dev and configure with "
      "-DMUSTER_WITH_MPI=ON");
}
}  // namespace muster::collectives::internal

#endif
