#pragma once

// Host staging memory and host<->device copies for checkpoints.
//
// StagingBuffer is the host memory a save snapshots into (and the ring a restore reads into,
// checkpoint/restore_pipeline.h). It is reused across saves and grows only when a bigger state
// arrives. Where CUDA was found at build time (MUSTER_HAVE_CUDA) and a
// state holds CUDA tensors, it is pinned with cudaHostAlloc so device-to-host copies run at
// full PCIe speed with cudaMemcpyAsync; otherwise it is page-aligned ordinary memory (aligned
// for O_DIRECT either way); from 2 MiB on, 2 MiB-aligned and madvise(MADV_HUGEPAGE)d, so that
// copies into it run at the speed of copies between the tensors' own (huge-page) memory.
//
// Thread-safety: a StagingBuffer belongs to one owner; the copy functions are thread-safe.

#include <cstddef>
#include <cstdint>

#include "common/status.h"

namespace muster::checkpoint {

enum class MemoryKind { kHost, kCuda };

class StagingBuffer {
 public:
  StagingBuffer() = default;
  ~StagingBuffer();
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;

  // Makes the buffer hold at least `bytes`, pinned if `pinned` (and CUDA is built in).
  // Keeps the current allocation when it is big enough and pinned enough.
  Status Reserve(size_t bytes, bool pinned);

  char* data() const { return data_; }
  size_t capacity() const { return capacity_; }
  bool pinned() const { return pinned_; }

 private:
  void Free();
  char* data_ = nullptr;
  size_t capacity_ = 0;
  bool pinned_ = false;
};

// True when this build has CUDA support (MUSTER_HAVE_CUDA).
bool CudaBuiltIn();

// Copies `n` bytes of `src` (host or CUDA memory) into host memory `dst`. Host copies of large
// buffers are split across up to `threads` threads.
Status CopyToHost(void* dst, const void* src, size_t n, MemoryKind src_kind, int threads = 1);
// (Restores copy host-to-device through checkpoint/device_copier.h.)

// A set of device-to-host copies issued on one CUDA stream and awaited together: the staging
// snapshot of many CUDA tensors overlaps their transfers.
class DeviceCopyBatch {
 public:
  DeviceCopyBatch();
  ~DeviceCopyBatch();
  DeviceCopyBatch(const DeviceCopyBatch&) = delete;
  DeviceCopyBatch& operator=(const DeviceCopyBatch&) = delete;

  Status AddToHost(void* dst, const void* src, size_t n);
  // Waits for every copy added so far.
  Status Wait();

 private:
  void* stream_ = nullptr;
};

// Copies host memory with up to `threads` threads (a plain memcpy for small sizes).
void ParallelMemcpy(void* dst, const void* src, size_t n, int threads = 4);

}  // namespace muster::checkpoint
