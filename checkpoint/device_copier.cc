#include "checkpoint/device_copier.h"

#include <string>
#include <vector>

#include "checkpoint/cuda_status.h"

namespace muster::checkpoint {

namespace {

#ifdef MUSTER_HAVE_CUDA

using internal::CudaStatus;

// One stream for every host-to-device copy of a restore (they share the PCIe link's one
// direction anyway) and one event per staging slot, so a reader waits only for the copies out
// of the slot it is about to refill. The stream and events are kept across restores.
class CudaDeviceCopier final : public DeviceCopier {
 public:
  ~CudaDeviceCopier() override {
    if (device_ >= 0) cudaSetDevice(device_);
    if (stream_) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }

  bool WantsPinnedStaging() const override { return true; }

  Status Begin(int slots) override {
    int device = 0;
    MUSTER_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
    if (stream_ && device != device_) {
      // The caller moved to another device since the last restore: start over there.
      cudaSetDevice(device_);
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
      for (cudaEvent_t e : events_) cudaEventDestroy(e);
      events_.clear();
      stream_ = nullptr;
      MUSTER_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device), "cudaSetDevice"));
    }
    device_ = device;
    if (!stream_) {
      MUSTER_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                        "cudaStreamCreate"));
    }
    while (static_cast<int>(events_.size()) < slots) {
      cudaEvent_t e = nullptr;
      MUSTER_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                                        "cudaEventCreate for a staging slot"));
      events_.push_back(e);
    }
    return Status::Ok();
  }

  Status CopyAsync(int slot, void* dst, const void* src, size_t n) override {
    (void)slot;
    if (n == 0) return Status::Ok();
    MUSTER_RETURN_IF_ERROR(OnDevice());
    return CudaStatus(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream_),
                      "cudaMemcpyAsync host-to-device from the staging ring");
  }

  Status Release(int slot) override {
    MUSTER_RETURN_IF_ERROR(OnDevice());
    return CudaStatus(cudaEventRecord(events_.at(slot), stream_), "cudaEventRecord");
  }

  Status AwaitSlot(int slot) override {
    MUSTER_RETURN_IF_ERROR(OnDevice());
    return CudaStatus(cudaEventSynchronize(events_.at(slot)),
                      "host-to-device copy out of the staging ring");
  }

  Status Finish() override {
    if (!stream_) return Status::Ok();
    MUSTER_RETURN_IF_ERROR(OnDevice());
    return CudaStatus(cudaStreamSynchronize(stream_), "host-to-device copies of the restore");
  }

 private:
  // Reader threads start on device 0; the stream belongs to device_.
  Status OnDevice() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur == device_) return Status::Ok();
    return CudaStatus(cudaSetDevice(device_), "cudaSetDevice");
  }

  int device_ = -1;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;  // one per slot; only Begin resizes it
};

#else  // !MUSTER_HAVE_CUDA

class NoCudaCopier final : public DeviceCopier {
 public:
  bool WantsPinnedStaging() const override { return false; }
  Status Begin(int) override {
    return FailedPreconditionError(
        "restore into a CUDA tensor, but this build has no CUDA support (configure with "
        "-DMUSTER_WITH_CUDA=ON on a machine with the CUDA toolkit)");
  }
  Status CopyAsync(int, void*, const void*, size_t) override { return Begin(0); }
  Status Release(int) override { return Status::Ok(); }
  Status AwaitSlot(int) override { return Status::Ok(); }
  Status Finish() override { return Status::Ok(); }
};

#endif

}  // namespace

std::unique_ptr<DeviceCopier> NewCudaDeviceCopier() {
#ifdef MUSTER_HAVE_CUDA
  return std::make_unique<CudaDeviceCopier>();
#else
  return std::make_unique<NoCudaCopier>();
#endif
}

}  // namespace muster::checkpoint
