// muster-snapshot-rank: a rank program that takes in-memory snapshots through
// runtime::JobContext (checkpoint.snapshot_every_steps) and reads the newest one back from its
// agent. It snapshots steps K, 2K, ... up to `--steps` (argv[1]) of a tensor whose values depend
// on the rank and step, checks that the agent returns the newest bit for bit, prints
// "snapshot ok step=N bytes=B", and exits with argv[2] (default 0). Exit codes: 2 env, 5 no
// snapshots offered, 6 a snapshot refused, 7 fetch or restore failed, 8 bytes differ.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "checkpoint/snapshot_state.h"
#include "common/logging.h"
#include "runtime/job_context.h"

int main(int argc, char** argv) {
  using namespace muster;
  if (!log::InitLogging("warn").ok()) return 2;
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 4;
  const int exit_code = argc > 2 ? std::atoi(argv[2]) : 0;
  auto ctx = runtime::JobContext::FromEnv();
  if (!ctx.ok()) return 2;
  auto sender = (*ctx)->NewSnapshotSender();
  const int64_t every = (*ctx)->snapshot_every();
  if (!sender || every <= 0) return 5;
  const int rank = (*ctx)->rank();
  std::vector<float> w(1024), w_last;
  int64_t last = -1;
  for (int64_t step = 1; step <= steps; ++step) {
    for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(rank * 1000 + step + i);
    if (step % every != 0) continue;
    checkpoint::SaveState s;
    s.tensors.push_back(checkpoint::TensorRef::Replicated(
        "w", checkpoint::DType::kF32, {static_cast<int64_t>(w.size())}, w.data()));
    s.metadata = "step=" + std::to_string(step);
    if (!sender->Snapshot(step, s).ok()) return 6;
    last = step;
    w_last = w;
  }
  Status flushed = sender->Flush(std::chrono::seconds(20));
  if (!flushed.ok()) {
    std::fprintf(stderr, "snapshot refused: %s\n", flushed.ToString().c_str());
    return 6;
  }
  auto f = (*ctx)->FetchSnapshot(last, (*ctx)->env().attempt);
  if (!f.ok()) {
    std::fprintf(stderr, "fetch: %s\n", f.status().ToString().c_str());
    return 7;
  }
  std::vector<float> back(w.size(), -1);
  std::string meta;
  if (!checkpoint::RestoreSnapshotState(
           f->payload,
           {checkpoint::RestoreRequest::Whole("w", checkpoint::DType::kF32, back.data(),
                                              back.size() * sizeof(float))},
           &meta)
           .ok()) {
    return 7;
  }
  if (back != w_last || meta != "step=" + std::to_string(last)) return 8;
  std::printf("snapshot ok step=%lld bytes=%zu\n", static_cast<long long>(last), f->payload.size());
  std::fflush(stdout);
  return exit_code;
}
