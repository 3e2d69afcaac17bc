#pragma once

// DeviceCopier: how a restore moves verified bytes out of its host staging ring into device
// memory (RestoreRequest::memory == MemoryKind::kCuda). The default, NewCudaDeviceCopier(), is
// the CUDA runtime: cudaMemcpyAsync host-to-device on one stream, with a CUDA event per staging
// slot, from pinned staging. Tests substitute a fake device (it copies host memory, as late as
// the protocol allows) so the restore pipeline's ordering is checked on machines without a GPU;
// that is the seam LevelDB's Env is for storage.
//
// Protocol, for each staging slot s in [0, slots) of one restore (Begin .. Finish):
//   CopyAsync(s, ...) any number of times, reading from slot s's memory; then Release(s): the
//   slot's copies are all enqueued. Slot s's memory may be overwritten only after AwaitSlot(s)
//   has returned OK (the copies out of it are done). Finish() waits for every copy and ends the
//   restore; it is called even after an error, so no copy still reads the staging memory once
//   the restore returns.
//
// Thread-safety: calls for different slots may come from different threads at once; the calls
// for one slot come from one thread at a time. Begin and Finish are called by one thread with
// no other call in progress.

#include <cstddef>
#include <memory>

#include "common/status.h"

namespace muster::checkpoint {

class DeviceCopier {
 public:
  virtual ~DeviceCopier() = default;

  // True if the host staging memory should be pinned (page-locked) for fast DMA.
  virtual bool WantsPinnedStaging() const = 0;

  // Starts a restore staged through `slots` slots. Errors here (no device) fail the restore
  // before anything is read.
  virtual Status Begin(int slots) = 0;
  // Enqueues a copy of `n` bytes of staging memory `src` (inside slot `slot`) to device `dst`.
  virtual Status CopyAsync(int slot, void* dst, const void* src, size_t n) = 0;
  // Marks the end of the copies out of `slot` since it was last awaited.
  virtual Status Release(int slot) = 0;
  // Waits until every copy out of `slot` enqueued before its last Release is done. OK for a
  // slot never released.
  virtual Status AwaitSlot(int slot) = 0;
  // Waits for every enqueued copy; the destinations then hold the bytes.
  virtual Status Finish() = 0;
};

// The CUDA runtime's copier: the stream and events live on the device that is current on the
// thread calling Begin; worker threads switch to it. Without CUDA in the build, Begin fails
// with FailedPrecondition naming the CMake option.
std::unique_ptr<DeviceCopier> NewCudaDeviceCopier();

}  // namespace muster::checkpoint
