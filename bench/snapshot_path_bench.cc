// muster-bench snapshot-path: the CPU the agents spend on in-memory snapshots, per step, on the
// whole path a rank's frame takes: the rank's local socket into its agent's SnapshotServer and
// SnapshotStore, then the SnapshotForwarder's copy into the peer agent's SnapshotPeerServer and
// store (a session opened over CURVE, the frames sealed with AES-256-GCM on the data channel:
// node_agent/snapshots/peer_copy.h). Two "agents" (each a store, a local server, a forwarder and
// a peer server on its own reactor, with CURVE and ZAP as in the agent) and two "ranks" (each a
// SnapshotClient putting one frame per step) run in this process; the ranks' own CPU (the
// main thread's) is subtracted, so what is printed is the agents' threads' CPU per step (their
// reactors, ZeroMQ's I/O threads, the servers' and the forwarders' threads), and the minor page
// faults of the process per step. This is the part of `muster-bench recovery`'s "agents' CPU
// per step" that snapshots add, without the fine-tune, Gloo or the coordinator: seconds per
// run, so each change to the path can be measured alone.

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "bench/bench.h"
#include "checkpoint/snapshot_channel.h"
#include "common/curve.h"
#include "common/reactor.h"
#include "node_agent/snapshots/peer_copy.h"
#include "node_agent/snapshots/snapshot_server.h"

namespace muster::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  int kib = 1608;  // the fine-tune's frame per rank in `muster-bench recovery`
  int steps = 200;
  int step_ms = 44;
  bool insecure = false;  // no CURVE between the agents (the data channel is sealed all the same)
  // The two ranks' payloads differ (state that is not replicated, as with sharded optimizers):
  // the peers hold nothing of a copy, so every chunk offered is sent. Default: the same payload,
  // as data-parallel ranks' are.
  bool distinct = false;
  bool json = false;
};

double ProcessCpuS() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_stime.tv_sec + 1e-6 * (r.ru_utime.tv_usec + r.ru_stime.tv_usec);
}
long MinorFaults() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return r.ru_minflt;
}
double ThreadCpuS() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// One node's agent: what AssignmentRunner builds when snapshots are on.
struct Agent {
  std::unique_ptr<node_agent::SnapshotStore> store;
  std::unique_ptr<node_agent::SnapshotPeerServer> peer_server;  // its own reactor and context
  std::unique_ptr<node_agent::SnapshotForwarder> forwarder;
  std::unique_ptr<node_agent::SnapshotServer> local;

  Status Start(const std::string& socket_path, bool insecure) {
    store = std::make_unique<node_agent::SnapshotStore>(
        node_agent::SnapshotStoreOptions{.memory_limit = uint64_t{1} << 30});
    MUSTER_ASSIGN_OR_RETURN(
        peer_server,
        node_agent::SnapshotPeerServer::Create(
            {.endpoint = "tcp://127.0.0.1:*", .insecure = insecure, .store = store.get()}));
    forwarder = std::make_unique<node_agent::SnapshotForwarder>(
        node_agent::SnapshotForwarder::Options{.insecure = insecure});
    auto* fwd = forwarder.get();
    MUSTER_ASSIGN_OR_RETURN(
        local, node_agent::SnapshotServer::Start(
                   socket_path, store.get(),
                   [fwd](std::shared_ptr<const checkpoint::SnapshotFrame> f) { fwd->Offer(f); }));
    return Status::Ok();
  }
  void Stop() {
    local.reset();
    forwarder.reset();
    peer_server.reset();
  }
};

int Run(const Options& o) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("muster-bench-snapshot-path-" + std::to_string(::getpid())))
                              .string();
  auto fail = [&](const Status& s) {
    std::cerr << "muster-bench snapshot-path: " << s.ToString() << "\n";
    return 1;
  };
  auto gang = GenerateKeyPair();
  if (!gang.ok()) return fail(gang.status());
  Agent a[2];
  for (int i = 0; i < 2; ++i) {
    if (Status s = a[i].Start(dir + "/n" + std::to_string(i) + "/s.sock", o.insecure); !s.ok())
      return fail(s);
  }
  const std::string job = "bench";
  for (int i = 0; i < 2; ++i) {
    if (Status s = a[i].peer_server->Allow(job, gang->public_key); !s.ok()) return fail(s);
    Agent& peer = a[1 - i];
    a[i].forwarder->SetTarget(job, {.attempt = 1,
                                    .node = "n" + std::to_string(1 - i),
                                    .endpoint = peer.peer_server->endpoint(),
                                    .server_key = peer.peer_server->public_key(),
                                    .client_key = *gang});
  }
  std::unique_ptr<checkpoint::SnapshotClient> rank[2];
  for (int i = 0; i < 2; ++i) {
    auto c = checkpoint::SnapshotClient::Connect(dir + "/n" + std::to_string(i) + "/s.sock");
    if (!c.ok()) return fail(c.status());
    rank[i] = std::move(*c);
  }
  std::string payload(size_t(o.kib) << 10, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 131 + i / 4096);

  // A few steps to warm up (connections, buffers), then the measured ones.
  const int warm = 5;
  double cpu0 = 0, rank_cpu0 = 0;
  long faults0 = 0;
  auto next = Clock::now();
  for (int step = 1; step <= warm + o.steps; ++step) {
    if (step == warm + 1) {
      for (auto& ag : a) ag.forwarder->WaitIdle(std::chrono::seconds(30));
      cpu0 = ProcessCpuS();
      rank_cpu0 = ThreadCpuS();
      faults0 = MinorFaults();
    }
    payload[step % payload.size()] ^= 1;  // a different payload each step
    for (int i = 0; i < 2; ++i) {
      checkpoint::SnapshotKey key{
          .job = job, .attempt = 1, .rank = i, .world_size = 2, .step = step};
      // --distinct: rank 1's differs from rank 0's in every chunk.
      if (o.distinct && i == 1) {
        for (size_t at = 0; at < payload.size(); at += node_agent::kDedupChunkBytes)
          payload[at] ^= 0x5a;
      }
      Status put = rank[i]->Put(key, payload);
      if (o.distinct && i == 1) {
        for (size_t at = 0; at < payload.size(); at += node_agent::kDedupChunkBytes)
          payload[at] ^= 0x5a;
      }
      if (!put.ok()) return fail(put);
    }
    next += std::chrono::milliseconds(o.step_ms);
    std::this_thread::sleep_until(next);
  }
  for (auto& ag : a) ag.forwarder->WaitIdle(std::chrono::seconds(30));
  const double cpu = ProcessCpuS() - cpu0, rank_cpu = ThreadCpuS() - rank_cpu0;
  const long faults = MinorFaults() - faults0;
  int64_t sent = 0, replaced = 0, failed = 0, kept = 0;
  uint64_t offered = 0, offered_sent = 0;
  for (auto& ag : a) {
    offered += ag.forwarder->offered_bytes();
    offered_sent += ag.forwarder->offered_bytes_sent();
    sent += ag.forwarder->sent();
    replaced += ag.forwarder->replaced();
    failed += ag.forwarder->failed();
    kept += ag.peer_server->kept();
  }
  for (auto& r : rank) r.reset();
  for (auto& ag : a) ag.Stop();
  std::filesystem::remove_all(dir);

  const double per_step_ms = 1000.0 * (cpu - rank_cpu) / o.steps;
  if (o.json) {
    std::cout << nlohmann::json{{"frame_kib", o.kib},
                                {"steps", o.steps},
                                {"agents_cpu_ms_per_step", per_step_ms},
                                {"ranks_cpu_ms_per_step", 1000.0 * rank_cpu / o.steps},
                                {"minor_faults_per_step", double(faults) / o.steps},
                                {"forwarded", sent},
                                {"offered_bytes", offered},
                                {"offered_bytes_sent", offered_sent},
                                {"distinct", o.distinct},
                                {"replaced", replaced},
                                {"failed", failed}}
                     .dump(2)
              << "\n";
    return failed == 0 ? 0 : 1;
  }
  Table t({"frame KiB", "ranks' payloads", "steps", "agents' CPU ms/step", "ranks' CPU ms/step",
           "minor faults/step", "forwarded", "offered bytes sent %", "replaced", "failed"});
  t.Row({std::to_string(o.kib), o.distinct ? "distinct" : "the same", std::to_string(o.steps),
         Fmt(per_step_ms, 2), Fmt(1000.0 * rank_cpu / o.steps, 2), Fmt(double(faults) / o.steps, 0),
         std::to_string(sent),
         offered > 0 ? Fmt(100.0 * offered_sent / offered, 1) : std::string("-"),
         std::to_string(replaced), std::to_string(failed)});
  std::cout << "2 agents x 1 rank, one frame per rank every " << o.step_ms << " ms, "
            << (o.insecure ? "NO CURVE (insecure)" : "CURVE sessions")
            << " and the AES-256-GCM data channel between the agents (kept by the peers: " << kept
            << ")\n";
  t.Print();
  return failed == 0 ? 0 : 1;
}

}  // namespace

void AddSnapshotPathBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand(
      "snapshot-path",
      "In-memory snapshots: the agents' CPU per step for the local hand-over and the sealed copy "
      "to the peer agent");
  auto o = std::make_shared<Options>();
  cmd->add_option("--kib", o->kib, "frame payload per rank, KiB")->capture_default_str();
  cmd->add_option("--steps", o->steps, "measured steps")->capture_default_str();
  cmd->add_option("--step-ms", o->step_ms, "time between steps")->capture_default_str();
  cmd->add_flag(
      "--insecure", o->insecure,
      "no CURVE between the agents (never how an agent runs; the session key then travels in "
      "the clear, and the frames are sealed all the same)");
  cmd->add_flag("--distinct", o->distinct,
                "the two ranks' payloads differ in every chunk (state that is not replicated): "
                "each copy is sent whole; default: the same payload, as data-parallel ranks hold");
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->callback([=] { *runner = [=] { return Run(*o); }; });
}

}  // namespace muster::bench
