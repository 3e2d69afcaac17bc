#!/usr/bin/env bash
# Checkpoint GPU check, for the H100 machine (see ../shared/GPU.md; call it from
# scripts/gpu-check.sh or on its own, from the project root, after `source .devdeps/unpack.sh`).
# Builds the checkpoint targets, runs the `gpu` checkpoint test, then the checkpoint benchmark
# with the state in GPU memory (pinned staging, cudaMemcpyAsync), without and with overlap,
# and with host memory as a reference. SIZE defaults to 4G; DIR must be on the disk to measure.
set -euo pipefail
SIZE=${SIZE:-4G}
DIR=${DIR:-/tmp/muster-ckpt-gpu-check}
BUILD=${BUILD:-build-gpu}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMUSTER_WITH_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target checkpoint_gpu_test checkpoint_test muster-bench
"$BUILD"/tests/checkpoint/checkpoint_gpu_test
"$BUILD"/tests/checkpoint/checkpoint_test --gtest_brief=1
for mode in "--device cuda" "--device cuda --overlap" "--device cpu"; do
  rm -rf "$DIR"
  echo "== muster-bench ckpt --ranks 1 --size $SIZE $mode"
  "$BUILD"/bench/muster-bench ckpt --ranks 1 --size "$SIZE" --dir "$DIR" $mode 2>/dev/null
done
rm -rf "$DIR"
