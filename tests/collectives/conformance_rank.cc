// muster-conformance-rank: one rank of the collectives conformance checks, built from the env
// contract (Communicator::FromEnv), for multi-process tests under muster run, mpirun, or a test
// that spawns ranks itself.
//
//   muster-conformance-rank            run every check; exit 0, or 1 on a wrong result
//   muster-conformance-rank --loop     allreduce in a loop until a collective fails; prints
//                                      "looping" once the first one has succeeded
//   muster-conformance-rank --gpu      prefer NCCL (device buffers are not supported by the
//                                      checks: use with MUSTER_COLL_BACKEND=gloo|mpi)
//
// A collective that fails because a peer died or stopped answering exits with
// kPeerFailureExitCode (75), after printing how long the failing collective took.

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "collectives/communicator.h"
#include "common/logging.h"
#include "tests/collectives/conformance_checks.h"

using namespace muster;
using namespace muster::collectives;

namespace {

int ExitFor(const Status& s) {
  switch (s.code()) {
    case StatusCode::kAborted:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kUnavailable:
      return kPeerFailureExitCode;
    default:
      return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  log::InitLogging(std::getenv("MUSTER_LOG_LEVEL") ? std::getenv("MUSTER_LOG_LEVEL") : "warn")
      .IgnoreError();
  bool loop = argc > 1 && std::strcmp(argv[1], "--loop") == 0;
  auto comm = Communicator::FromEnv();
  if (!comm.ok()) {
    std::fprintf(stderr, "conformance_rank: %s\n", comm.status().ToString().c_str());
    return ExitFor(comm.status());
  }
  Communicator& c = **comm;
  if (!loop) {
    auto report = testing::RunConformance(c);
    if (!report.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", c.rank(), report.status().ToString().c_str());
      return ExitFor(report.status());
    }
    std::printf("rank %d of %d (%s): %d checks ok\n", c.rank(), c.size(),
                std::string(BackendName(c.backend())).c_str(), report->checks);
    return 0;
  }
  std::vector<float> data(1 << 16, 1.0f);
  for (long i = 0;; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    Status s = c.AllReduce(data.data(), data.size(), DType::kF32, ReduceOp::kAvg)->Wait();
    if (!s.ok()) {
      double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("rank %d: allreduce %ld failed after %.0f ms: %s\n", c.rank(), i, ms,
                  s.ToString().c_str());
      std::fflush(stdout);
      return ExitFor(s);
    }
    if (i == 0) {
      std::printf("looping\n");
      std::fflush(stdout);
    }
  }
}
