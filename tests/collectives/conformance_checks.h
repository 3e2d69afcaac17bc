#pragma once

// The collectives conformance checks: every collective, every op and every dtype, with the
// result compared element by element against a CPU reference. Run by each rank, as a thread
// (tests/unit) or as a process (conformance_rank, under muster run or mpirun).

#include "collectives/communicator.h"

namespace muster::collectives::testing {

struct ConformanceReport {
  int checks = 0;  // collectives run and verified
};

// Writes / reads element `i` of a buffer of dtype `t` as a double (16-bit types round to
// nearest even). Exact for the small integers the checks use.
void StoreElement(DType t, void* buf, size_t i, double v);
double LoadElement(DType t, const void* buf, size_t i);

// Runs the checks on `comm`; the first mismatch or failure is returned as an error naming the
// collective, op, dtype, count and element. Every rank of the communicator must call it.
StatusOr<ConformanceReport> RunConformance(Communicator& comm);

}  // namespace muster::collectives::testing
