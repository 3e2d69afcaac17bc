#include "checkpoint/staging.h"

#include <stdlib.h>
#include <sys/mman.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/cuda_status.h"
#include "checkpoint/volume.h"
#include "common/logging.h"

namespace muster::checkpoint {

namespace {
constexpr size_t kHugePage = 2 << 20;
#ifdef MUSTER_HAVE_CUDA
using internal::CudaStatus;
#endif
[[maybe_unused]] Status NoCuda() {
  return FailedPreconditionError(
      "a CUDA tensor was given but this build has no CUDA support (configure with "
      "-DMUSTER_WITH_CUDA=ON on a machine with the CUDA toolkit)");
}
}  // namespace

bool CudaBuiltIn() {
#ifdef MUSTER_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

StagingBuffer::~StagingBuffer() { Free(); }

void StagingBuffer::Free() {
  if (!data_) return;
#ifdef MUSTER_HAVE_CUDA
  if (pinned_) {
    cudaFreeHost(data_);
    data_ = nullptr;
  }
#endif
  if (data_) ::free(data_);
  data_ = nullptr;
  capacity_ = 0;
  pinned_ = false;
}

Status StagingBuffer::Reserve(size_t bytes, bool pinned) {
  if (!CudaBuiltIn()) pinned = false;
  if (data_ && capacity_ >= bytes && (pinned_ || !pinned)) return Status::Ok();
  Free();
  size_t cap = (bytes + kDirectIoAlignment - 1) / kDirectIoAlignment * kDirectIoAlignment;
  if (cap == 0) cap = kDirectIoAlignment;
#ifdef MUSTER_HAVE_CUDA
  if (pinned) {
    void* p = nullptr;
    Status st = CudaStatus(cudaHostAlloc(&p, cap, cudaHostAllocDefault),
                           "cudaHostAlloc of the staging buffer");
    if (st.ok()) {
      data_ = static_cast<char*>(p);
      capacity_ = cap;
      pinned_ = true;
      return Status::Ok();
    }
    // Pageable memory still works (slowly) for device copies; the copy reports a real error.
    log::Get("ckpt.write")->warn("{}; staging in pageable memory", st.ToString());
  }
#endif
  // Big buffers are 2 MiB-aligned and asked to be backed by transparent huge pages: with 4 KiB
  // pages the snapshot's memcpy into a buffer of hundreds of MiB takes TLB misses that the
  // tensors' own memory (numpy and torch madvise their big allocations) does not, and the
  // stall was 1.5-2x a memcpy of the same bytes (docs/benchmarks.md, ckpt-py).
  const bool huge = cap >= kHugePage;
  if (huge) cap = (cap + kHugePage - 1) / kHugePage * kHugePage;
  void* p = nullptr;
  if (::posix_memalign(&p, huge ? kHugePage : kDirectIoAlignment, cap) != 0) {
    return InternalError("cannot allocate " + std::to_string(cap) + " bytes of staging memory");
  }
  if (huge) ::madvise(p, cap, MADV_HUGEPAGE);  // advice only: 4 KiB pages still work
  data_ = static_cast<char*>(p);
  capacity_ = cap;
  pinned_ = false;
  return Status::Ok();
}

void ParallelMemcpy(void* dst, const void* src, size_t n, int threads) {
  constexpr size_t kMinPerThread = 16 << 20;
  if (threads <= 1 || n < 2 * kMinPerThread) {
    std::memcpy(dst, src, n);
    return;
  }
  size_t t = std::min<size_t>(threads, n / kMinPerThread);
  size_t per = (n / t + 4095) / 4096 * 4096;
  std::vector<std::thread> ts;
  for (size_t i = 1; i < t; ++i) {
    size_t off = i * per;
    if (off >= n) break;
    size_t len = std::min(per, n - off);
    ts.emplace_back([=] {
      std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, len);
    });
  }
  std::memcpy(dst, src, std::min(per, n));
  for (auto& th : ts) th.join();
}

Status CopyToHost(void* dst, const void* src, size_t n, MemoryKind src_kind, int threads) {
  if (n == 0) return Status::Ok();
  if (src_kind == MemoryKind::kHost) {
    ParallelMemcpy(dst, src, n, threads);
    return Status::Ok();
  }
#ifdef MUSTER_HAVE_CUDA
  return CudaStatus(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost), "device-to-host copy");
#else
  return NoCuda();
#endif
}

DeviceCopyBatch::DeviceCopyBatch() = default;

DeviceCopyBatch::~DeviceCopyBatch() {
#ifdef MUSTER_HAVE_CUDA
  if (stream_) {
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
    cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
  }
#endif
}

Status DeviceCopyBatch::AddToHost(void* dst, const void* src, size_t n) {
#ifdef MUSTER_HAVE_CUDA
  if (!stream_) {
    cudaStream_t s;
    MUSTER_RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
    stream_ = s;
  }
  if (n == 0) return Status::Ok();
  return CudaStatus(
      cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream_)),
      "cudaMemcpyAsync device-to-host");
#else
  return NoCuda();
#endif
}

Status DeviceCopyBatch::Wait() {
#ifdef MUSTER_HAVE_CUDA
  if (!stream_) return Status::Ok();
  return CudaStatus(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)),
                    "cudaStreamSynchronize");
#else
  return Status::Ok();
#endif
}

}  // namespace muster::checkpoint
