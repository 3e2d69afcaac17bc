// The NCCL backend on real GPUs (ctest label `gpu`): skipped cleanly where there is none.
// Ranks are threads, one GPU each, on the in-memory store.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "collectives/communicator.h"
#include "tests/collectives/conformance_checks.h"

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
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
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
      Status s = (*comm)->AllReduce(d, kCount, DType::kF32, ReduceOp::kSum)->Wait();
      if (!s.ok()) return fail(s);
      cudaMemcpy(h.data(), d, kCount * sizeof(float), cudaMemcpyDeviceToHost);
      float want = size * (size + 1) / 2.0f;
      for (size_t i = 0; i < kCount; i += 4099)
        if (h[i] != want) return fail(DataLossError("allreduce: " + std::to_string(h[i])));
      s = (*comm)->AllGather(d, all, kCount, DType::kF32)->Wait();
      if (!s.ok()) return fail(s);
      s = (*comm)->ReduceScatter(all, d, kCount / size, DType::kF32, ReduceOp::kMax)->Wait();
      if (!s.ok()) return fail(s);
      s = (*comm)->Broadcast(d, kCount, DType::kF32, 0)->Wait();
      if (!s.ok()) return fail(s);
      s = (*comm)->Barrier()->Wait();
      if (!s.ok()) return fail(s);
      // bool is moved, never reduced: refused at once, naming it; the communicator goes on.
      s = (*comm)->AllReduce(d, kCount, DType::kBool, ReduceOp::kMax)->Wait();
      if (s.code() != StatusCode::kInvalidArgument ||
          s.message().find("bool") == std::string::npos) {
        return fail(InternalError("bool allreduce gave " + s.ToString()));
      }
      s = (*comm)->Broadcast(d, kCount, DType::kBool, 0)->Wait();
      if (!s.ok()) return fail(s);
      cudaFree(d);
      cudaFree(all);
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < size; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

// Every op and dtype against a CPU reference, on as many GPUs as there are (one on the test
// machine: NCCL refuses two ranks on one GPU). Rank r holds v_i = (i % 7) + 1 + r.
TEST(NcclTest, EveryOpAndDtypeMatchesTheCpuReference) {
  const int size = std::min(Gpus(), 8);
  if (size == 0) GTEST_SKIP() << "no CUDA device";
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  constexpr size_t kCount = 4096;
  const DType types[] = {DType::kF32, DType::kF64, DType::kF16, DType::kBF16,
                         DType::kI32, DType::kI64, DType::kU8,  DType::kI8};
  const ReduceOp ops[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax};
  std::vector<std::vector<std::string>> failures(size);
  std::vector<std::thread> ranks;
  for (int r = 0; r < size; ++r) {
    ranks.emplace_back([&, r] {
      auto& fails = failures[r];
      CommConfig c;
      c.rank = r;
      c.size = size;
      c.device = r;
      c.name = "sweep";
      auto comm = CreateCommunicator(Backend::kNccl, store, c);
      if (!comm.ok()) return fails.push_back(comm.status().ToString());
      cudaSetDevice(r);
      void* d = nullptr;
      void* all = nullptr;
      cudaMalloc(&d, kCount * 8);
      cudaMalloc(&all, kCount * 8 * size);
      std::vector<char> h(kCount * 8 * size);
      for (DType t : types) {
        const size_t es = DTypeSize(t);
        auto load = [&] {
          for (size_t i = 0; i < kCount; ++i)
            testing::StoreElement(t, h.data(), i, (i % 7) + 1 + r);
          cudaMemcpy(d, h.data(), kCount * es, cudaMemcpyHostToDevice);
        };
        for (ReduceOp op : ops) {
          load();
          Status s = (*comm)->AllReduce(d, kCount, t, op)->Wait();
          if (!s.ok()) {
            fails.push_back(std::string(DTypeName(t)) + " " + s.ToString());
            continue;
          }
          cudaMemcpy(h.data(), d, kCount * es, cudaMemcpyDeviceToHost);
          for (size_t i = 0; i < kCount; ++i) {
            double base = (i % 7) + 1, sum = size * base + size * (size - 1) / 2.0;
            double want = op == ReduceOp::kSum   ? sum
                          : op == ReduceOp::kMin ? base
                          : op == ReduceOp::kMax ? base + size - 1
                                                 : sum / size;
            if (op == ReduceOp::kAvg &&
                (t == DType::kI32 || t == DType::kI64 || t == DType::kU8 || t == DType::kI8)) {
              want = std::trunc(want);
            }
            double got = testing::LoadElement(t, h.data(), i);
            if (std::abs(got - want) > 1e-2 * std::max(1.0, std::abs(want))) {
              fails.push_back(std::string(DTypeName(t)) + " allreduce " +
                              std::string(ReduceOpName(op)) + " [" + std::to_string(i) +
                              "]: " + std::to_string(got) + " want " + std::to_string(want));
              break;
            }
          }
        }
        // broadcast from the last rank, allgather, reduce_scatter(sum).
        load();
        Status s = (*comm)->Broadcast(d, kCount, t, size - 1)->Wait();
        cudaMemcpy(h.data(), d, kCount * es, cudaMemcpyDeviceToHost);
        if (!s.ok() || testing::LoadElement(t, h.data(), 5) != (5 % 7) + 1 + (size - 1)) {
          fails.push_back(std::string(DTypeName(t)) + " broadcast " + s.ToString());
        }
        load();
        s = (*comm)->AllGather(d, all, kCount, t)->Wait();
        cudaMemcpy(h.data(), all, kCount * es * size, cudaMemcpyDeviceToHost);
        for (int q = 0; s.ok() && q < size; ++q) {
          if (testing::LoadElement(t, h.data(), q * kCount + 3) != 3 + 1 + q) {
            fails.push_back(std::string(DTypeName(t)) + " allgather from rank " +
                            std::to_string(q));
          }
        }
        if (!s.ok()) fails.push_back(std::string(DTypeName(t)) + " allgather " + s.ToString());
        for (int q = 0; q < size; ++q)
          for (size_t i = 0; i < kCount; ++i)
            testing::StoreElement(t, h.data(), q * kCount + i, (i % 7) + 1 + r);
        cudaMemcpy(all, h.data(), kCount * es * size, cudaMemcpyHostToDevice);
        s = (*comm)->ReduceScatter(all, d, kCount, t, ReduceOp::kSum)->Wait();
        cudaMemcpy(h.data(), d, kCount * es, cudaMemcpyDeviceToHost);
        double want9 = size * ((9 % 7) + 1.0) + size * (size - 1) / 2.0;
        if (!s.ok() || testing::LoadElement(t, h.data(), 9) != want9) {
          fails.push_back(std::string(DTypeName(t)) + " reduce_scatter " + s.ToString());
        }
      }
      cudaFree(d);
      cudaFree(all);
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < size; ++r) {
    EXPECT_TRUE(failures[r].empty()) << "rank " << r << ": " << failures[r].front() << " (and "
                                     << failures[r].size() - 1 << " more)";
  }
}

TEST(NcclTest, InitTimesOutAndAbortsWhenAPeerNeverJoins) {
  if (Gpus() == 0) GTEST_SKIP() << "no CUDA device";
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
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
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  auto comm = CreateCommunicator(Backend::kNccl, store, CommConfig{});
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace muster::collectives
