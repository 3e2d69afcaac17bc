// Saving from and restoring into CUDA memory through pinned staging. Skipped without a GPU.

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
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

}  // namespace
}  // namespace muster::checkpoint
