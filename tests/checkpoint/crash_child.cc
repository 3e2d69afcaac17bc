// checkpoint_crash_child replicate SRC DST STEP: replicates one step (killed mid-copy by the
// test).
// checkpoint_crash_child DIR START_STEP: two ranks (threads, in-memory store) save steps
// START_STEP, START_STEP+1, ... into DIR until the process is killed. Prints "ready" once the
// checkpointers exist. Used by crash_test.cc, which kills it with SIGKILL at random instants.

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "checkpoint/replicate.h"
#include "common/logging.h"
#include "tests/checkpoint/crash_state.h"

using namespace muster::checkpoint;

int main(int argc, char** argv) {
  // checkpoint_crash_child replicate SRC DST STEP: one replication, then exit 0.
  if (argc == 5 && std::string(argv[1]) == "replicate") {
    muster::log::InitLogging("error").IgnoreError();
    std::printf("ready\n");
    std::fflush(stdout);
    auto r = Replicate(LocalVolume(), argv[2], LocalVolume(), argv[3], std::atoll(argv[4]));
    return r.ok() ? 0 : 1;
  }
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s DIR START_STEP\n", argv[0]);
    return 2;
  }
  muster::log::InitLogging("error").IgnoreError();
  const std::string dir = argv[1];
  const int64_t start = std::atoll(argv[2]);
  auto store = muster::collectives::NewInMemoryRendezvousStore();
  std::vector<std::unique_ptr<Checkpointer>> cks;
  for (int r = 0; r < testing::kCrashWorld; ++r) {
    CheckpointerOptions o;
    o.dir = dir;
    o.rank = r;
    o.world_size = testing::kCrashWorld;
    o.store = store.get();
    o.write_chunk = 256 << 10;  // many writes per shard: more instants to die between
    o.retention = {.keep_last = 3, .keep_every = 0};
    o.overlap_snapshot = std::getenv("MUSTER_CKPT_OVERLAP") != nullptr;
    auto ck = Checkpointer::Create(o);
    if (!ck.ok()) {
      std::fprintf(stderr, "%s\n", ck.status().ToString().c_str());
      return 1;
    }
    cks.push_back(std::move(*ck));
  }
  std::printf("ready\n");
  std::fflush(stdout);
  std::vector<std::thread> ts;
  for (int r = 0; r < testing::kCrashWorld; ++r) {
    ts.emplace_back([&, r] {
      for (int64_t step = start;; ++step) {
        auto c = testing::MakeCrashRank(step, r);
        auto st = cks[r]->Save(step, c.state);
        if (!st.ok()) std::_Exit(3);
      }
    });
  }
  for (auto& t : ts) t.join();
  return 0;
}
