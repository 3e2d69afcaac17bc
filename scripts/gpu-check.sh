#!/usr/bin/env bash
# The GPU check, run on the H100 machine from the project root (see ../shared/GPU.md and
# docs/gpu-results.md):
#   ../shared/device/pack-deps.sh            # on the build machine, once
#   device run: scripts/gpu-check.sh         # with carry [".devdeps"]
# Builds muster with CUDA, NCCL and libtorch, runs the `gpu` tests and the GPU benchmarks, and
# prints a short table last. Every stage runs even if an earlier one failed; the exit code is
# the number of failed stages.
#
# QUICK=1 scripts/gpu-check.sh: only the checks of the NCCL abort path and of checkpoint
# restore onto the GPU (no libtorch, no fine-tune): builds the NCCL and checkpoint gpu test
# binaries and muster-bench, runs them, and the 4 GiB checkpoint benchmark once.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT"
BUILD="${BUILD:-build-gpu}"
declare -a NAMES RESULTS TIMES
failed=0

stage() {  # stage NAME COMMAND...
  local name="$1"; shift
  echo "===== $name: $*"
  local t0=$(date +%s%N)
  "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  local t1=$(date +%s%N)
  NAMES+=("$name"); RESULTS+=("$([ $rc -eq 0 ] && echo ok || echo "FAILED($rc)")")
  TIMES+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1e9}')")
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}

source .devdeps/unpack.sh
TORCH_PREFIX="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)' 2>/dev/null)"
TORCH_LIB="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib"
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvcc --version | tail -1
  grep -m1 NCCL_VERSION_CODE /usr/include/nccl.h 2>/dev/null
  python3 -c 'import torch; print("torch", torch.__version__)'
} 2>&1 | tee "$OUT/machine.txt"

CKPT_DIR=/tmp/muster-gpu-ckpt
if [ "${QUICK:-0}" = 1 ]; then
  stage configure cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DMUSTER_WITH_CUDA=ON -DMUSTER_WITH_TORCH=OFF \
    -DCMAKE_PREFIX_PATH=/opt/devdeps/usr
  stage build cmake --build "$BUILD" -j "$(nproc)" --target collectives_nccl_test \
    collectives_nccl_abort_test checkpoint_gpu_test checkpoint_restore_pipeline_test muster-bench
  stage nccl-abort "$BUILD/tests/collectives/collectives_nccl_abort_test"
  stage nccl-tests "$BUILD/tests/collectives/collectives_nccl_test"
  stage ckpt-gpu-test "$BUILD/tests/checkpoint/checkpoint_gpu_test"
  stage ckpt-pipeline "$BUILD/tests/checkpoint/checkpoint_restore_pipeline_test"
  rm -rf "$CKPT_DIR"
  stage ckpt-cuda "$BUILD/bench/muster-bench" ckpt --ranks 1 --size 4G --dir "$CKPT_DIR" --device cuda
  rm -rf "$CKPT_DIR"
  echo
  echo "===== summary, QUICK ($(date -u +%F) on $(head -1 "$OUT/machine.txt"))"
  printf '%-14s %-12s %8s\n' stage result seconds
  for i in "${!NAMES[@]}"; do printf '%-14s %-12s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"; done
  echo
  grep -hE "^\[ +(OK|FAILED|SKIPPED) +\] .*\([0-9]+ ms\)" "$OUT/nccl-abort.log" "$OUT/nccl-tests.log" \
    "$OUT/ckpt-gpu-test.log"
  echo "checkpoint (4 GiB from GPU memory):"
  grep -E "stall|save|restore|copy|O_DIRECT|memcpy" "$OUT/ckpt-cuda.log" | head -12
  exit $failed
fi

# The muster Python package for the venv's python3 (3.12, torch 2.x): Debian's pybind11 is not
# there, torch's wheel bundles pybind11's headers; only that folder is put on the include path
# (torch/include also holds an fmt that must not shadow the system's).
TORCH_INCLUDE="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)/include"
mkdir -p "$BUILD/pybind11-include"
ln -sfn "$TORCH_INCLUDE/pybind11" "$BUILD/pybind11-include/pybind11"
stage configure cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DMUSTER_WITH_CUDA=ON \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;/opt/devdeps/usr" \
  -DPython_EXECUTABLE="$(command -v python3)" -DMUSTER_PYBIND11_INCLUDE_DIR="$BUILD/pybind11-include"
stage build cmake --build "$BUILD" -j "$(nproc)"
stage unit-tests ctest --test-dir "$BUILD" -L unit -j 8 --no-tests=error --output-on-failure --timeout 120
# The gpu label includes NcclAbortTest (an in-flight collective aborted within the timeout,
# ncclCommAbort taken, the communicator failed afterwards) and CheckpointGpuTest (saves from and
# resharded/column-block restores into cudaMalloc'd memory through the pinned staging ring).
stage gpu-tests ctest --test-dir "$BUILD" -L gpu --no-tests=error --output-on-failure --timeout 300

# Checkpoints from GPU memory: 4 GiB through pinned staging, beside the pinned device-to-host
# copy, an O_DIRECT write and read of the same size, measured in the same run. Restore onto the
# GPU reads through the pinned ring with cudaMemcpyAsync (goal: >= 0.9x the O_DIRECT read);
# every restored byte is compared with the saved state after the timing.
rm -rf "$CKPT_DIR"
stage ckpt-cuda "$BUILD/bench/muster-bench" ckpt --ranks 1 --size 4G --dir "$CKPT_DIR" --device cuda
rm -rf "$CKPT_DIR"
stage ckpt-cuda-json "$BUILD/bench/muster-bench" ckpt --ranks 1 --size 4G --dir "$CKPT_DIR" --device cuda --json
rm -rf "$CKPT_DIR"

# The C++ fine-tune on CUDA, one rank, NCCL through the real ZeroMQ store (muster run -np 1):
# an uninterrupted run, then a run stopped by a notice at its first step and resumed; the two
# final parameter digests must match.
FT="$BUILD/examples/finetune/muster-finetune"
MUSTER="$BUILD/bin/muster"
export CUBLAS_WORKSPACE_CONFIG=:4096:8
FT_ARGS=(--pretrain --device cuda --deterministic --steps 200 --ckpt-every 50 --log-every 50)
rm -rf /tmp/ft-a /tmp/ft-b /tmp/ft-notice
stage finetune-cuda "$MUSTER" run -np 1 --checkpoint-dir /tmp/ft-a -- "$FT" "${FT_ARGS[@]}"
touch /tmp/ft-notice
stage ft-notice bash -c "'$MUSTER' run -np 1 --checkpoint-dir /tmp/ft-b -- '$FT' ${FT_ARGS[*]} --notice-file /tmp/ft-notice; rc=\$?; [ \$rc -eq 3 ] || { echo expected exit 3 on the notice, got \$rc; exit 1; }"
rm -f /tmp/ft-notice
stage ft-resume "$MUSTER" run -np 1 --checkpoint-dir /tmp/ft-b -- "$FT" "${FT_ARGS[@]}"
digest_a="$(grep -ho 'param_digest=[0-9a-f]*' "$OUT/finetune-cuda.log" | tail -1)"
digest_b="$(grep -ho 'param_digest=[0-9a-f]*' "$OUT/ft-resume.log" | tail -1)"
echo "uninterrupted: $digest_a   notice+resume: $digest_b"
stage ft-bit-exact test -n "$digest_a" -a "$digest_a" = "$digest_b"
stage rpc-bench "$BUILD/bench/muster-bench" rpc --iterations 2000

# torch.distributed.checkpoint end to end through muster on torch 2.x (CI's torch 1.13 cannot
# import DCP): dcp.save, dcp.async_save and dcp.load with muster.dcp.MusterStorageWriter/Reader
# at two ranks (Gloo; the tensors on the GPU), every tensor compared bit for bit, then
# `muster ckpt verify`. MUSTER_REQUIRE_DCP=1 turns a skip into a failure.
stage dcp-torch bash -c "cd tests/python && PYTHONPATH='$PWD/$BUILD/python' \
  MUSTER_BIN='$PWD/$MUSTER' MUSTER_REQUIRE_DCP=1 python3 -m unittest -v test_dcp_torch"
# The same bytes saved from Python through muster, torch.save and DCP's FileSystemWriter.
stage ckpt-py "$BUILD/bench/muster-bench" ckpt-py --size-mb 4096 --python "$(command -v python3)" \
  --dir /tmp/muster-gpu-ckpt-py

echo
echo "===== summary ($(date -u +%F) on $(head -1 "$OUT/machine.txt"))"
printf '%-14s %-12s %8s\n' stage result seconds
for i in "${!NAMES[@]}"; do printf '%-14s %-12s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"; done
echo
echo "gpu tests:"
grep -E "Test +#[0-9]+: (NcclAbortTest|NcclTest|CheckpointGpuTest)" "$OUT/gpu-tests.log" |
  sed -E 's/^ *[0-9]+\/[0-9]+ //'
echo "checkpoint (4 GiB from GPU memory):"
grep -E "stall|save|restore|copy|O_DIRECT|memcpy" "$OUT/ckpt-cuda.log" | head -12
echo "fine-tune on CUDA:"
grep -hE "MUSTER_PROGRESS|MUSTER_DONE|MUSTER_PREEMPTED" "$OUT/finetune-cuda.log" | tail -3
echo "dcp end to end (torch 2.x): $(grep -m1 -oE '^(OK|FAILED).*' "$OUT/dcp-torch.log")"
echo "ckpt-py:"
grep -E "memcpy|stall|O_DIRECT|muster.save|torch.save|DCP" "$OUT/ckpt-py.log" | head -8
echo "bit-exact resume: $([ -n "$digest_a" ] && [ "$digest_a" = "$digest_b" ] && echo yes || echo NO) ($digest_a vs $digest_b)"
exit $failed
