// muster-silent-rank: a rank program that uses runtime::JobContext and never prints: no
// MUSTER_PROGRESS or MUSTER_CHECKPOINT line on stdout or stderr (logging is off). It joins the
// job's collectives, agrees on a stop step, reports progress and commits a checkpoint of step
// `--steps` (argv[1], default 3), all through the context's one store connection and its control
// channel. The agent test checks that the job is still catalogued
// (tests/integration/agent_test.cc).

#include <cstdlib>
#include <string>
#include <vector>

#include "common/logging.h"
#include "runtime/job_context.h"

int main(int argc, char** argv) {
  using namespace muster;
  if (!log::InitLogging("off").ok()) return 2;
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 3;
  auto ctx = runtime::JobContext::FromEnv();
  if (!ctx.ok()) return 2;
  collectives::CommConfig cc;
  cc.name = "silent";
  auto comm = (*ctx)->NewCommunicator(cc);
  if (!comm.ok()) return 3;
  auto ck = (*ctx)->NewCheckpointer();
  if (!ck.ok()) return 4;
  const int rank = (*ctx)->rank(), world = (*ctx)->world_size();
  std::vector<float> w(256, static_cast<float>(rank));
  for (int64_t step = 1; step <= steps; ++step) {
    auto work = (*comm)->AllReduce(w.data(), w.size(), DType::kF32, collectives::ReduceOp::kSum);
    if (!work->Wait().ok()) return 5;
    auto stop = (*ctx)->AgreeToStop(**comm);
    if (!stop.ok()) return 5;
    if (!(*ctx)
             ->Progress(step, steps, 1.0 / static_cast<double>(step), {{"samples_per_s", 10}})
             .ok()) {
      return 6;
    }
    if (*stop) break;
  }
  checkpoint::SaveState s;
  s.tensors.push_back(checkpoint::TensorRef::RowShard("w", checkpoint::DType::kF32, {world, 256},
                                                      rank, 1, w.data()));
  if (!(*ck)->Save(steps, s).ok() || !(*ck)->Wait().ok()) return 7;
  return 0;
}
