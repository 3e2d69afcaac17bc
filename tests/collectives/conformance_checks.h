#pragma once

// The collectives conformance checks: every collective, every op and every dtype, with the
// result compared element by element against a CPU reference. Run by each rank, as a thread
// (tests/unit) or as a process (conformance_rank, under muster run or mpirun).

#include "collectives/communicator.h"

namespace muster::collectives::testing {

struct ConformanceReport {
  int checks = 0;  // collectives run and verified
};

// Runs the checks on `comm`; the first mismatch or failure is returned as an error naming the
// collective, op, dtype, count and element. Every rank of the communicator must call it.
StatusOr<ConformanceReport> RunConformance(Communicator& comm);

}  // namespace muster::collectives::testing
