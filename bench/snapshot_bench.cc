// muster-bench snapshot: what an in-memory snapshot costs a rank (SnapshotSender::Snapshot, the
// training stall: the copy of its state) and how long until its agent holds it (the hand-over
// on the local socket, off the training thread), beside a memcpy of the same bytes measured in
// the same run. The agent's end is a real SnapshotServer and SnapshotStore in this process.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <vector>

#include "bench/bench.h"
#include "checkpoint/snapshot_channel.h"
#include "node_agent/snapshots/snapshot_server.h"

namespace muster::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Options {
  std::vector<int> sizes_mib = {16, 64, 256};
  int reps = 5;
  bool json = false;
};

int Run(const Options& o) {
  std::string dir = (std::filesystem::temp_directory_path() /
                     ("muster-bench-snapshot-" + std::to_string(::getpid())))
                        .string();
  int max_mib = *std::max_element(o.sizes_mib.begin(), o.sizes_mib.end());
  node_agent::SnapshotStore store({.memory_limit = uint64_t{3} * max_mib << 20, .keep_steps = 2});
  auto server = node_agent::SnapshotServer::Start(dir + "/s.sock", &store);
  if (!server.ok()) {
    std::cerr << "muster-bench snapshot: " << server.status().ToString() << "\n";
    return 1;
  }
  Table t({"state MiB", "memcpy s", "snapshot stall s", "stall/memcpy", "held by agent s"});
  nlohmann::json rows = nlohmann::json::array();
  for (int mib : o.sizes_mib) {
    size_t n = size_t(mib) << 20;
    std::vector<char> state(n), copy(n);
    for (size_t i = 0; i < n; i += 4096) state[i] = static_cast<char>(i / 4096);
    auto sender = checkpoint::SnapshotSender::Create(
        {.socket_path = dir + "/s.sock", .key = {.job = "bench", .rank = 0, .world_size = 1}});
    double memcpy_s = 1e9, stall_s = 1e9, held_s = 1e9;
    for (int r = 0; r < o.reps; ++r) {
      auto t0 = Clock::now();
      std::memcpy(copy.data(), state.data(), n);
      memcpy_s = std::min(memcpy_s, Since(t0));
      checkpoint::SaveState s;
      s.tensors.push_back(checkpoint::TensorRef::Replicated(
          "w", checkpoint::DType::kU8, {static_cast<int64_t>(n)}, state.data()));
      t0 = Clock::now();
      Status st = sender->Snapshot(r + 1, s);
      stall_s = std::min(stall_s, Since(t0));
      if (st.ok()) st = sender->Flush(std::chrono::seconds(60));
      held_s = std::min(held_s, Since(t0));
      if (!st.ok()) {
        std::cerr << "muster-bench snapshot: " << st.ToString() << "\n";
        return 1;
      }
    }
    store.DropJob("bench");
    t.Row({std::to_string(mib), Fmt(memcpy_s, 4), Fmt(stall_s, 4), Fmt(stall_s / memcpy_s, 2),
           Fmt(held_s, 4)});
    rows.push_back({{"state_mib", mib},
                    {"memcpy_s", memcpy_s},
                    {"snapshot_stall_s", stall_s},
                    {"held_by_agent_s", held_s}});
  }
  server->reset();
  std::filesystem::remove_all(dir);
  if (o.json) {
    std::cout << rows.dump(2) << "\n";
  } else {
    std::cout << "in-memory snapshot of one rank's state (best of " << o.reps << ")\n";
    t.Print();
  }
  return 0;
}

}  // namespace

void AddSnapshotBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand(
      "snapshot",
      "In-memory snapshot: the rank's stall and the hand-over to its agent, beside memcpy");
  auto o = std::make_shared<Options>();
  cmd->add_option("--sizes-mib", o->sizes_mib, "State sizes in MiB (default 16 64 256)");
  cmd->add_option("--reps", o->reps, "Repetitions per size (best is shown)");
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->callback([=] { *runner = [=] { return Run(*o); }; });
}

}  // namespace muster::bench
