// An NCCL collective that cannot finish is aborted within the communicator's timeout (ctest
// label `gpu`; skipped where there is no GPU).
//
// How a collective is held in flight on one GPU: NCCL refuses two ranks on one GPU, and a
// world-size-2 communicator whose peer never joins never gets past init, so no collective can
// be issued on it (NcclTest.InitTimesOutAndAbortsWhenAPeerNeverJoins covers that abort). A
// stalled peer's effect on a rank is a collective that is enqueued but does not complete; the
// test makes one the same way a slow producer would: the NCCL backend orders every collective
// after the work already on the device's default stream, and the test puts a host callback
// there that blocks until it is opened. The collective is then enqueued and stuck, and:
//   - Wait with a caller's deadline shorter than the timeout returns DeadlineExceeded at that
//     deadline and aborts nothing (the collective goes on);
//   - Wait without a deadline returns DeadlineExceeded within the communicator's timeout (plus
//     slack), having called ncclCommAbort (logged by coll.nccl);
//   - the communicator stays failed: the next collective fails at once.
// The gate is opened as soon as the abort is logged (ncclCommAbort may wait for the device), or
// after a generous limit, so a broken abort path fails the test instead of hanging it.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "collectives/communicator.h"
#include "tests/testing/log_capture.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

int Gpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// A host callback on a CUDA stream that blocks the stream until Open().
class StreamGate {
 public:
  static void CUDART_CB Block(void* self) {
    auto* g = static_cast<StreamGate*>(self);
    std::unique_lock<std::mutex> l(g->mu_);
    g->cv_.wait(l, [&] { return g->open_; });
  }
  void Open() {
    {
      std::lock_guard<std::mutex> l(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST(NcclAbortTest, AnInFlightCollectiveIsAbortedWithinTheTimeout) {
  if (Gpus() == 0) GTEST_SKIP() << "no CUDA device: the NCCL abort path needs a GPU";
  testing::LogCapture logs;
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  CommConfig c;
  c.timeout = 3s;
  auto comm_or = CreateCommunicator(Backend::kNccl, store, c);
  ASSERT_TRUE(comm_or.ok()) << comm_or.status();
  auto comm = std::move(*comm_or);
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  constexpr size_t kCount = 1 << 16;
  float* send = nullptr;
  float* recv = nullptr;
  ASSERT_EQ(cudaMalloc(&send, kCount * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&recv, kCount * sizeof(float)), cudaSuccess);

  // Unobstructed, the collective completes (at world size 1, allgather copies send to recv).
  ASSERT_EQ(comm->AllGather(send, recv, kCount, DType::kF32)->Wait(Clock::now() + 10s),
            Status::Ok());

  StreamGate gate;
  ASSERT_EQ(cudaLaunchHostFunc(cudaStreamLegacy, &StreamGate::Block, &gate), cudaSuccess);
  bool opened_by_abort = false;
  std::thread opener([&] {
    opened_by_abort = logs.WaitFor("aborting the NCCL communicator", 30s);
    gate.Open();
  });

  const auto t0 = Clock::now();
  auto work = comm->AllGather(send, recv, kCount, DType::kF32);
  // The caller's own deadline: it gives up waiting; the collective is not aborted.
  Status early = work->Wait(Clock::now() + 300ms);
  EXPECT_EQ(early.code(), StatusCode::kDeadlineExceeded) << early;
  EXPECT_FALSE(work->Done());
  for (const auto& line : logs.Lines()) {
    EXPECT_EQ(line.find("aborting the NCCL communicator"), std::string::npos) << line;
  }

  // No deadline of the caller's: the communicator's timeout aborts it.
  Status st = work->Wait();
  const auto took = Clock::now() - t0;
  opener.join();
  EXPECT_EQ(st.code(), StatusCode::kDeadlineExceeded) << st;
  EXPECT_TRUE(opened_by_abort)
      << "ncclCommAbort was never reached; the gate was opened by the test's 30 s limit";
  EXPECT_GE(took, c.timeout);
  EXPECT_LT(took, c.timeout + 5s) << "the aborted collective returned "
                                  << std::chrono::duration<double>(took).count() << " s after "
                                  << "it was issued, with a " << c.timeout.count() << " ms timeout";

  // The communicator stays failed: later collectives fail at once instead of hanging.
  const auto t1 = Clock::now();
  Status next = comm->AllReduce(recv, kCount, DType::kF32, ReduceOp::kSum)->Wait();
  EXPECT_FALSE(next.ok());
  EXPECT_LT(Clock::now() - t1, 1s);

  comm.reset();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaFree(send);
  cudaFree(recv);
}

}  // namespace
}  // namespace muster::collectives
