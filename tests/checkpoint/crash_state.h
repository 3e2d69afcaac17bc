#pragma once

// The state the crash child saves and the crash test checks: two ranks, a row-sharded "w",
// a replicated "bias" and a row-sharded "big", all determined by the step.

#include "checkpoint/checkpointer.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint::testing {

inline constexpr int kCrashWorld = 2;
inline constexpr int64_t kCrashRows = 384, kCrashCols = 1024, kCrashBias = 1000;

struct CrashRank {
  std::vector<uint32_t> w, bias, big;
  SaveState state;
};

inline CrashRank MakeCrashRank(int64_t step, int rank) {
  CrashRank c;
  const int64_t rows = kCrashRows / kCrashWorld, r0 = rank * rows;
  c.w = Fill(step, 1, r0 * kCrashCols, rows * kCrashCols);
  c.bias = Fill(step, 2, 0, kCrashBias);
  c.big = Fill(step, 3, r0 * kCrashCols * 2, rows * kCrashCols * 2);
  c.state.tensors.push_back(
      TensorRef::RowShard("w", DType::kI32, {kCrashRows, kCrashCols}, r0, rows, c.w.data()));
  c.state.tensors.push_back(
      TensorRef::Replicated("bias", DType::kI32, {kCrashBias}, c.bias.data()));
  c.state.tensors.push_back(TensorRef::RowShard("big", DType::kI32, {kCrashRows, kCrashCols * 2},
                                                r0, rows, c.big.data()));
  c.state.metadata = "step=" + std::to_string(step);
  return c;
}

}  // namespace muster::checkpoint::testing
