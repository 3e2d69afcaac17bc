// Saving from and restoring into CUDA memory through pinned staging. Skipped without a GPU.

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <thread>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "collectives/rendezvous_store.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

TEST(CheckpointGpuTest, SavesFromAndRestoresIntoDeviceMemory) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA device";
  testing::TempDir dir;
  const int64_t rows = 1024, cols = 4096;  // 16 MiB
  auto host = testing::Fill(4, 1, 0, rows * cols);
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, host.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev, host.data(), host.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  CheckpointerOptions o;
  o.dir = dir.path();
  auto ck = *Checkpointer::Create(o);
  SaveState s;
  s.tensors.push_back(
      TensorRef::Replicated("w", DType::kF32, {rows, cols}, dev, MemoryKind::kCuda));
  ASSERT_EQ(ck->Save(4, s), Status::Ok());
  ASSERT_EQ(cudaMemset(dev, 0, host.size() * 4), cudaSuccess);  // the snapshot is already taken
  ASSERT_EQ(ck->Wait(), Status::Ok());
  ASSERT_EQ(VerifyStep(LocalVolume(), dir.path(), 4), Status::Ok());
  ASSERT_EQ(ck->Restore(4, {RestoreRequest::RowShard("w", DType::kF32, {rows, cols}, 100, 500, dev,
                                                     MemoryKind::kCuda)}),
            Status::Ok());
  std::vector<uint32_t> back(500 * cols);
  ASSERT_EQ(cudaMemcpy(back.data(), dev, back.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, testing::Fill(4, 1, 100 * cols, 500 * cols));
  cudaFree(dev);
}

// The restore pipeline on a real GPU: a 64 MiB tensor saved by 4 ranks (threads) in 1 MiB
// windows, restored resharded to 3 ranks and as a column block straight into cudaMalloc'd
// memory through a 2-slot pinned ring (so every slot is refilled many times, each only after
// its cudaMemcpyAsync is done).
TEST(CheckpointGpuTest, RestoresReshardedAndColumnBlocksIntoDeviceMemoryThroughTheRing) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA device";
  testing::TempDir dir;
  const int64_t rows = 4096, cols = 4099;  // rows of 16396 bytes: windows cut rows
  auto store = collectives::NewInMemoryRendezvousStore();
  auto opts = [&](int world, int rank) {
    CheckpointerOptions o;
    o.dir = dir.path();
    o.world_size = world;
    o.rank = rank;
    o.store = store.get();
    o.write_chunk = 1 << 20;
    o.restore_slots = 2;
    return o;
  };
  {
    std::vector<std::thread> ts;
    std::vector<Status> st(4);
    for (int r = 0; r < 4; ++r) {
      ts.emplace_back([&, r] {
        auto ck = Checkpointer::Create(opts(4, r));
        if (!ck.ok()) {
          st[r] = ck.status();
          return;
        }
        auto data = testing::Fill(8, 5, r * 1024 * cols, 1024 * cols);
        SaveState s;
        s.tensors.push_back(
            TensorRef::RowShard("w", DType::kF32, {rows, cols}, r * 1024, 1024, data.data()));
        st[r] = (*ck)->Save(8, s);
        if (st[r].ok()) st[r] = (*ck)->Wait();
      });
    }
    for (auto& t : ts) t.join();
    for (const Status& s : st) ASSERT_EQ(s, Status::Ok());
  }
  auto ck = *Checkpointer::Create(opts(1, 0));
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 1366 * cols * 4), cudaSuccess);
  for (int r = 0; r < 3; ++r) {
    const int64_t r0 = r * 1365, rn = r == 2 ? rows - 2 * 1365 : 1365;
    ASSERT_EQ(cudaMemset(dev, 0, rn * cols * 4), cudaSuccess);
    ASSERT_EQ(ck->Restore(8, {RestoreRequest::RowShard("w", DType::kF32, {rows, cols}, r0, rn, dev,
                                                       MemoryKind::kCuda)}),
              Status::Ok());
    std::vector<uint32_t> back(rn * cols);
    ASSERT_EQ(cudaMemcpy(back.data(), dev, back.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(back, testing::Fill(8, 5, r0 * cols, rn * cols)) << "rank " << r << " of 3";
  }
  // Rows [1000, 3100) x columns [7, 2007): crosses three stored shards, one run per row.
  const int64_t r0 = 1000, rn = 2100, c0 = 7, cn = 2000;
  ASSERT_EQ(cudaMemset(dev, 0, rn * cn * 4), cudaSuccess);
  RestoreRequest block{"w", DType::kF32, {r0, c0}, {rn, cn}, dev, MemoryKind::kCuda};
  ASSERT_EQ(ck->Restore(8, {block}), Status::Ok());
  std::vector<uint32_t> back(rn * cn);
  ASSERT_EQ(cudaMemcpy(back.data(), dev, back.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  auto all = testing::Fill(8, 5, 0, rows * cols);
  for (int64_t i = 0; i < rn; ++i) {
    for (int64_t j = 0; j < cn; ++j) {
      ASSERT_EQ(back[i * cn + j], all[(r0 + i) * cols + c0 + j]) << i << "," << j;
    }
  }
  cudaFree(dev);
}

}  // namespace
}  // namespace muster::checkpoint
