// muster-test-write-step DIR STEP [BYTES [announce]]: commits a real checkpoint of STEP (one
// rank, one f32 tensor of BYTES bytes, default 4096, its values derived from STEP) into the job
// directory DIR with checkpoint::Checkpointer, so shell-script ranks in tests can print a
// `MUSTER_CHECKPOINT step=N` line for a step that exists. With "announce" the checkpointer's
// own commit callback prints that line, with the commit latency it measured (`seconds=S`).
// Exits 0 once the step is committed.

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "common/control_channel.h"

int main(int argc, char** argv) {
  using namespace muster::checkpoint;
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s DIR STEP [BYTES]\n", argv[0]);
    return 2;
  }
  int64_t step = std::atoll(argv[2]);
  int64_t bytes = argc > 3 ? std::atoll(argv[3]) : 4096;
  if (step <= 0 || bytes < 4) {
    std::fprintf(stderr, "STEP must be > 0 and BYTES >= 4\n");
    return 2;
  }
  CheckpointerOptions o;
  o.dir = argv[1];
  o.direct_io = false;
  o.io_threads = 1;
  if (argc > 4 && std::string(argv[4]) == "announce") {
    o.on_commit = [](int64_t step, double seconds) {
      std::printf("%s\n", muster::CheckpointLine(step, seconds).c_str());
      std::fflush(stdout);
    };
  }
  auto ck = Checkpointer::Create(o);
  if (!ck.ok()) {
    std::fprintf(stderr, "%s\n", ck.status().ToString().c_str());
    return 1;
  }
  std::vector<float> w(static_cast<size_t>(bytes / 4), static_cast<float>(step));
  SaveState state;
  state.tensors.push_back(
      TensorRef::Replicated("w", DType::kF32, {static_cast<int64_t>(w.size())}, w.data()));
  auto st = (*ck)->Save(step, state);
  if (st.ok()) st = (*ck)->Wait();
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}
