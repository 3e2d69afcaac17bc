// muster-bench ckpt-py: checkpoints of torch tensors saved from Python through muster, beside
// torch.save (+ fsync), DCP's FileSystemWriter where torch supports it, a memcpy of the same
// bytes and an O_DIRECT write of the same size, in one run; and the same state as an in-memory
// snapshot (muster.Snapshotter) to a real SnapshotServer that this subcommand runs in-process, as
// an agent does. The measuring is done by bench/ckpt_py_bench.py under Debian's python3 with the
// build's `muster` package; this subcommand runs it, prints the table and passes its JSON through.

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "bench/bench.h"
#include "common/python_path.h"
#include "node_agent/snapshots/snapshot_server.h"
#include "node_agent/snapshots/snapshot_store.h"

namespace muster::bench {
namespace {

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

void AddCkptPyBench(CLI::App& app, Runner* runner) {
  struct Opts {
    std::string dir = "/tmp/muster-bench-ckpt-py";
    int size_mb = 256;
    int tensors = 8;
    int repeat = 2;
    std::string python = MUSTER_BENCH_PYTHON;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand(
      "ckpt-py", "Python checkpoints through muster beside torch.save, DCP, memcpy and O_DIRECT");
  cmd->add_option("--dir", o->dir, "Scratch directory on the disk to measure")
      ->capture_default_str();
  cmd->add_option("--size-mb", o->size_mb, "State size in MiB")->capture_default_str();
  cmd->add_option("--tensors", o->tensors, "Tensors in the state")->capture_default_str();
  cmd->add_option("--repeat", o->repeat, "Runs of each (the best is reported)")
      ->capture_default_str();
  cmd->add_option("--python", o->python, "The interpreter")->capture_default_str();
  cmd->add_flag("--json", o->json, "Print the JSON only");
  cmd->callback([=] {
    *runner = [=] {
      std::string pydir = MusterPythonDir();
      if (pydir.empty()) {
        std::fprintf(stderr, "ckpt-py: the muster Python package was not built\n");
        return 1;
      }
      // The agent's end of the snapshot channel, with room for its two newest snapshots.
      node_agent::SnapshotStore store(
          {.memory_limit = (uint64_t{3} * static_cast<uint64_t>(o->size_mb) + 16) << 20,
           .keep_steps = 2});
      const std::string snap_dir = "/tmp/muster-bench-snap-" + std::to_string(::getpid());
      auto server = node_agent::SnapshotServer::Start(snap_dir + "/s.sock", &store);
      std::string snap_env;
      if (server.ok()) {
        snap_env = "MUSTER_JOB_ID=bench-ckpt-py MUSTER_SNAPSHOT_EVERY=1 MUSTER_SNAPSHOT_SOCKET=" +
                   Quote((*server)->socket_path()) + " ";
      } else {
        std::fprintf(stderr, "ckpt-py: no snapshot rows: %s\n", server.status().ToString().c_str());
      }
      std::string command = snap_env + "PYTHONPATH=" + Quote(pydir) + " " + Quote(o->python) + " " +
                            Quote(MUSTER_BENCH_PY_SCRIPT) + " --dir " + Quote(o->dir) +
                            " --size-mb " + std::to_string(o->size_mb) + " --tensors " +
                            std::to_string(o->tensors) + " --repeat " + std::to_string(o->repeat) +
                            " 2>/dev/null";
      FILE* p = ::popen(command.c_str(), "r");
      if (!p) return 1;
      std::string text;
      char buf[4096];
      while (size_t n = std::fread(buf, 1, sizeof(buf), p)) text.append(buf, n);
      int rc = ::pclose(p);
      if (server.ok()) {
        server->reset();
        std::error_code ec;
        std::filesystem::remove_all(snap_dir, ec);
      }
      nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
      if (rc != 0 || !j.is_object()) {
        std::fprintf(stderr, "ckpt-py: %s failed (status %d): %s\n", MUSTER_BENCH_PY_SCRIPT, rc,
                     text.c_str());
        return 1;
      }
      if (o->json) {
        std::printf("%s\n", j.dump().c_str());
        return 0;
      }
      double gb = j["bytes"].get<double>() / 1e9;
      double disk = j["disk_write_gbps"].get<double>();
      auto row = [&](Table& t, const std::string& what, double s, const std::string& vs) {
        t.Row({what, Fmt(s, 3), Fmt(gb / s), vs});
      };
      auto cpu_row = [&](Table& t, const std::string& what, double s, const std::string& vs) {
        t.Row({what, Fmt(s, 3), "-", vs});  // CPU seconds: no rate
      };
      Table t({"what (" + Fmt(gb, 2) + " GB, " + std::to_string(o->tensors) + " tensors)",
               "seconds", "GB/s", "vs anchor"});
      row(t, "memcpy of the same bytes (anchor)", j["memcpy_s"].get<double>(), "");
      row(t, "muster.save stall (until it returns)", j["stall_s"].get<double>(),
          Fmt(j["stall_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
      row(t, "O_DIRECT write + fsync, bs=32M (anchor)", j["disk_write_s"].get<double>(), "");
      row(t, "muster.save to commit", j["save_s"].get<double>(),
          Fmt(j["save_gbps"].get<double>() / disk) + "x disk");
      if (j.contains("save_overlap_s")) {
        row(t, "overlap_snapshot: stall", j["stall_overlap_s"].get<double>(),
            Fmt(j["stall_overlap_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
        row(t, "overlap_snapshot: save to commit", j["save_overlap_s"].get<double>(),
            Fmt(j["save_overlap_gbps"].get<double>() / disk) + "x disk");
      }
      if (j.contains("snapshot_stall_s") && j["snapshot_stall_s"].is_number()) {
        row(t, "muster.snapshot stall (until it returns)", j["snapshot_stall_s"].get<double>(),
            Fmt(j["snapshot_stall_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
        row(t, "muster.snapshot until the agent holds it", j["snapshot_held_s"].get<double>(),
            Fmt(j["snapshot_held_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
        cpu_row(t, "muster.snapshot: the rank's CPU s", j["snapshot_cpu_s"].get<double>(),
                Fmt(j["snapshot_cpu_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
      }
      if (j.contains("hold_enter_s") && j["hold_enter_s"].is_number()) {
        const std::string how =
            j.value("hold_in_place", false) ? "" : " (the agent could not: copied)";
        row(t, "muster hold: stall entering the block" + how, j["hold_enter_s"].get<double>(),
            Fmt(j["hold_enter_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
        row(t, "muster hold: stall at an empty block's end", j["hold_end_s"].get<double>(),
            Fmt(j["hold_end_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
        row(t, "muster hold until the agent holds it", j["hold_held_s"].get<double>(),
            Fmt(j["hold_held_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
        cpu_row(t, "muster hold: the rank's CPU s", j["hold_cpu_s"].get<double>(),
                Fmt(j["hold_cpu_s"].get<double>() / j["memcpy_s"].get<double>()) + "x memcpy");
      }
      if (j.contains("torch_save_s") && j["torch_save_s"].is_number()) {
        row(t, "torch.save + fsync", j["torch_save_s"].get<double>(),
            Fmt(j["torch_save_gbps"].get<double>() / disk) + "x disk");
      }
      if (j.contains("dcp_save_s") && j["dcp_save_s"].is_number()) {
        row(t, "DCP FileSystemWriter", j["dcp_save_s"].get<double>(),
            Fmt(j["dcp_save_gbps"].get<double>() / disk) + "x disk");
      } else {
        t.Row({"DCP FileSystemWriter", "-", "-", "not usable with this torch"});
      }
      t.Print();
      return 0;
    };
  });
}

}  // namespace muster::bench
