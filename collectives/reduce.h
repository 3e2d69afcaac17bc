#pragma once

// CPU reduction kernels shared by the Gloo and MPI backends and the conformance tests'
// reference: elementwise c = a op b, and the final division of Avg. f16 and bf16 are computed
// in float and rounded back.

#include <cstddef>

#include "collectives/communicator.h"

namespace muster::collectives {

// c[i] = a[i] op b[i] for i < n. Avg combines as Sum (see DivideBy). c may alias a or b.
// Integer sums wrap (two's complement), as NCCL's and MPI's do.
// REQUIRES: IsReducible(type) (kBool is not).
void ReduceInto(DType type, ReduceOp op, void* c, const void* a, const void* b, size_t n);
// data[i] /= divisor (integers truncate toward zero). REQUIRES: IsReducible(type).
void DivideBy(DType type, void* data, size_t n, int divisor);

}  // namespace muster::collectives
