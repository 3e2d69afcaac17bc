// The NCCL backend on real GPUs (ctest label `gpu`): skipped cleanly where there is none.
// Ranks are threads, one GPU each, on the in-memory store.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <thread>

#include "collectives/communicator.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;

int Gpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

TEST(NcclTest, AllReduceBroadcastAllGatherReduceScatterOnDevices) {
  const int size = std::min(Gpus(), 8);
  if (size == 0) GTEST_SKIP() << "no CUDA device";
  std::shared_ptr<Store> store = NewInMemoryStore();
  constexpr size_t kCount = 1 << 20;
  std::vector<Status> results(size);
  std::vector<std::thread> ranks;
  for (int r = 0; r < size; ++r) {
    ranks.emplace_back([&, r] {
      auto fail = [&](Status s) { results[r] = s; };
      CommConfig c;
      c.rank = r;
      c.size = size;
      c.device = r;
      c.timeout = 30s;
      auto comm = CreateCommunicator(Backend::kNccl, store, c);
      if (!comm.ok()) return fail(comm.status());
      cudaSetDevice(r);
      float* d = nullptr;
      float* all = nullptr;
      cudaMalloc(&d, kCount * sizeof(float));
      cudaMalloc(&all, kCount * size * sizeof(float));
      std::vector<float> h(kCount, static_cast<float>(r + 1));
      cudaMemcpy(d, h.data(), kCount * sizeof(float), cudaMemcpyHostToDevice);
      Status s = (*comm)->AllReduce(d, kCount, DataType::kF32, ReduceOp::kSum)->Wait();
      if (!s.ok()) return fail(s);
      cudaMemcpy(h.data(), d, kCount * sizeof(float), cudaMemcpyDeviceToHost);
      float want = size * (size + 1) / 2.0f;
      for (size_t i = 0; i < kCount; i += 4099)
        if (h[i] != want) return fail(DataLossError("allreduce: " + std::to_string(h[i])));
      s = (*comm)->AllGather(d, all, kCount, DataType::kF32)->Wait();
      if (!s.ok()) return fail(s);
      s = (*comm)->ReduceScatter(all, d, kCount / size, DataType::kF32, ReduceOp::kMax)->Wait();
      if (!s.ok()) return fail(s);
      s = (*comm)->Broadcast(d, kCount, DataType::kF32, 0)->Wait();
      if (!s.ok()) return fail(s);
      s = (*comm)->Barrier()->Wait();
      if (!s.ok()) return fail(s);
      cudaFree(d);
      cudaFree(all);
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < size; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST(NcclTest, InitTimesOutAndAbortsWhenAPeerNeverJoins) {
  if (Gpus() == 0) GTEST_SKIP() << "no CUDA device";
  std::shared_ptr<Store> store = NewInMemoryStore();
  CommConfig c;
  c.rank = 0;
  c.size = 2;  // rank 1 never comes
  c.timeout = 2s;
  auto t0 = std::chrono::steady_clock::now();
  auto comm = CreateCommunicator(Backend::kNccl, store, c);
  auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kDeadlineExceeded) << comm.status();
  EXPECT_LT(took, 10s);
}

TEST(NcclTest, WithoutAGpuTheBackendSaysSo) {
  if (Gpus() > 0) GTEST_SKIP() << "this machine has a GPU";
  std::shared_ptr<Store> store = NewInMemoryStore();
  auto comm = CreateCommunicator(Backend::kNccl, store, CommConfig{});
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace muster::collectives
