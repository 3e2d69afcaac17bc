#pragma once

// Communicator: the collectives a rank of a muster job runs with its peers (allreduce,
// broadcast, allgather, reduce_scatter, barrier), over Gloo (CPU, TCP), NCCL (GPU) or MPI.
//
// A rank program normally calls Communicator::FromEnv(), which reads the env contract
// (common/rank_env.h: RANK, WORLD_SIZE, LOCAL_RANK, MUSTER_RDZV_*, MUSTER_JOB_ID,
// MUSTER_ATTEMPT; OMPI_COMM_WORLD_RANK/SIZE under mpirun), connects to the job's rendezvous
// store and picks a backend; runtime::JobContext builds one over its shared store connection.
// Tests and embedders call CreateCommunicator(kind, store, config).
//
// Collectives are issued in the same order on every rank and run in that order, one at a time,
// on the communicator's worker (Gloo, MPI) or its CUDA stream (NCCL); each returns a Work
// to wait on. Buffers must stay valid until the Work is done. Host memory for Gloo and MPI,
// device memory for NCCL.
// NCCL: a collective starts only after the work already queued on its device's default stream
// (an event recorded there that the communicator's stream waits on), so tensors computed on the
// default stream need no synchronization first, as with PyTorch's NCCL process group.
//
// No hangs: every collective finishes within `CommConfig::timeout` (default 30 s). When a peer
// dies mid-collective, every other rank's Work fails (Aborted or DeadlineExceeded) within that
// timeout, and the communicator stays failed: later collectives fail at once. A rank program
// should then exit with kPeerFailureExitCode (common/exit_codes.h), so that the launcher
// reports the rank that failed first and not its victims.
//
// Thread-safety: a Communicator may be called from any thread, but collectives must be issued
// in the same order on every rank, so one thread per rank should issue them. Work objects are
// waited on by one thread each.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "collectives/rendezvous_store.h"
#include "common/dtype.h"  // DType: what a collective moves
#include "common/exit_codes.h"
#include "common/rank_env.h"
#include "common/status.h"

namespace muster::collectives {

enum class ReduceOp { kSum, kAvg, kMin, kMax };
enum class Backend { kGloo, kNccl, kMpi };

std::string_view ReduceOpName(ReduceOp op);
// Whether AllReduce and ReduceScatter take `type`: every DType but kBool, which collectives
// only move (Broadcast, AllGather); reduce a u8 of 0/1 instead (max: any, min: all). A
// reduction of kBool fails with InvalidArgument and leaves the communicator usable.
bool IsReducible(DType type);
std::string_view BackendName(Backend b);
// "gloo", "nccl", "mpi".
StatusOr<Backend> ParseBackend(std::string_view name);

// IEEE half and bfloat16 <-> float, round to nearest even (reductions of 16-bit types go
// through float).
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
float BFloat16ToFloat(uint16_t b);
uint16_t FloatToBFloat16(float f);

struct CommConfig {
  int rank = 0;
  int size = 1;
  // Every collective, and the rendezvous, fails after this long.
  std::chrono::milliseconds timeout{30000};
  // Keys in the store are prefixed "coll/<name>/", so several communicators can share one.
  std::string name = "world";
  // Gloo: the address this rank listens on for its peers.
  std::string host = "127.0.0.1";
  // NCCL: the CUDA device of this rank (LOCAL_RANK by default under FromEnv).
  int device = 0;
};

// Returned by every collective; done when the collective has finished on this rank.
class Work {
 public:
  virtual ~Work() = default;
  // Waits until the collective is done or `deadline` passes (DeadlineExceeded; the collective
  // goes on and is bounded by the communicator's timeout). Returns the collective's status.
  virtual Status Wait(std::chrono::steady_clock::time_point deadline) = 0;
  Status Wait() { return Wait(std::chrono::steady_clock::time_point::max()); }
  virtual bool Done() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  // Builds this rank's communicator from the env contract. The backend is MUSTER_COLL_BACKEND
  // if set (gloo, nccl, mpi); else MPI when the program runs under mpirun (OMPI_COMM_WORLD_SIZE
  // set and no MUSTER_RDZV_ENDPOINT); else NCCL if `want_gpu` and NCCL was built; else Gloo.
  // `config.rank/size/device` are taken from the environment; the timeout from
  // MUSTER_COLL_TIMEOUT_MS if set.
  static StatusOr<std::unique_ptr<Communicator>> FromEnv(CommConfig config = {},
                                                         bool want_gpu = false);
  // The same from an already parsed env and an already connected store (may be null for MPI;
  // shared, so the caller may keep using it). `config.name` keeps communicators built on one
  // store apart.
  static StatusOr<std::unique_ptr<Communicator>> FromEnv(const RankEnv& env,
                                                         std::shared_ptr<RendezvousStore> store,
                                                         CommConfig config = {},
                                                         bool want_gpu = false);

  virtual Backend backend() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In place: every rank's `data` ends up holding op over all ranks' `data`. Avg of integers
  // truncates toward zero.
  virtual std::unique_ptr<Work> AllReduce(void* data, size_t count, DType type, ReduceOp op) = 0;
  // In place: every rank's `data` ends up holding `root`'s.
  virtual std::unique_ptr<Work> Broadcast(void* data, size_t count, DType type, int root) = 0;
  // `send` holds `count` elements, `recv` size()*count: rank r's block at r*count.
  virtual std::unique_ptr<Work> AllGather(const void* send, void* recv, size_t count,
                                          DType type) = 0;
  // `send` holds size()*count elements; `recv` gets this rank's block (rank*count...) of the
  // reduction over all ranks' `send`.
  virtual std::unique_ptr<Work> ReduceScatter(const void* send, void* recv, size_t count,
                                              DType type, ReduceOp op) = 0;
  virtual std::unique_ptr<Work> Barrier() = 0;
};

// Builds a communicator of `backend` for rank config.rank of config.size, rendezvousing through
// `store` (shared by every communicator built on it). Blocks until every rank has joined or
// config.timeout passes. A backend that was not built gives FailedPrecondition naming the
// CMake option that enables it.
StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(Backend backend,
                                                           std::shared_ptr<RendezvousStore> store,
                                                           CommConfig config);

}  // namespace muster::collectives
