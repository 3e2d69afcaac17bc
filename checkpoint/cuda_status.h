#pragma once

// The Status of a CUDA runtime call, for the checkpoint code that touches device memory.

#ifdef MUSTER_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <string>

#include "common/status.h"

namespace muster::checkpoint::internal {

inline Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return InternalError(std::string("cuda: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace muster::checkpoint::internal

#endif  // MUSTER_HAVE_CUDA
