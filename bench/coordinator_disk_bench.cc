// muster-bench coordinator-disk: how long the coordinator's reactor (the thread that answers
// agents' heartbeats) waits on its disk while it records changes.
//
// A Coordinator (real SQLite database in a temp dir, real clock) on its own reactor, with 4
// registered nodes. For `--seconds` per phase, a writer submits jobs through the reactor
// (`--rate` per second; each is a database write), and a prober posts an empty closure every
// 5 ms and times its round trip: what a heartbeat arriving then would wait before it is read.
// Phases: the anchor (`--db-flush-ms 0`: SQLite synchronous=FULL, an fsync per commit on the
// reactor, as before the flusher) and the default flusher, each with the disk quiet and with a
// competing writer in the same directory (`--load-mib` MiB files written and fdatasync'd back to
// back: another process's checkpoints). Timings are shown, never judged.

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <random>
#include <thread>

#include "bench/bench.h"
#include "common/logging.h"
#include "common/reactor.h"
#include "coordinator/coordinator.h"

namespace muster::bench {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

struct PhaseResult {
  std::vector<double> probe_ms;   // the reactor's answer to an empty closure
  std::vector<double> submit_ms;  // a submit handled (its database writes)
  uint64_t load_bytes = 0;
  double seconds = 0;
};

// Writes `mib` MiB files in `dir` and fdatasyncs each, until `stop`.
uint64_t LoadDisk(const fs::path& dir, int mib, const std::atomic<bool>& stop) {
  std::vector<char> buf(1 << 20);
  std::mt19937_64 rng(1);
  for (auto& c : buf) c = static_cast<char>(rng());
  uint64_t written = 0;
  for (int i = 0; !stop; ++i) {
    fs::path p = dir / fmt::format("load-{}", i % 2);
    int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return written;
    for (int m = 0; m < mib && !stop; ++m) {
      if (::write(fd, buf.data(), buf.size()) != static_cast<ssize_t>(buf.size())) break;
      written += buf.size();
    }
    ::fdatasync(fd);
    ::close(fd);
  }
  return written;
}

PhaseResult RunPhase(const fs::path& dir, std::chrono::milliseconds flush, bool load, int seconds,
                     int rate, int load_mib) {
  PhaseResult r;
  fs::path state = dir / fmt::format("state-{}-{}", flush.count(), load);
  coordinator::CoordinatorOptions co;
  co.heartbeat_timeout = std::chrono::hours(1);  // nodes stay up without agents
  co.lease = std::chrono::hours(2);
  auto store = coordinator::CoordinatorDb::Open(state, flush);
  if (!store.ok()) {
    fprintf(stderr, "coordinator-disk: %s\n", store.status().ToString().c_str());
    return r;
  }
  auto coord = coordinator::Coordinator::Create(std::move(*store), co);
  if (!coord.ok()) return r;
  Reactor reactor("bench-coord");
  reactor.Start();
  auto call = [&](proto::Envelope e) {
    (*coord)->Handle("bench", std::move(e), [](proto::Envelope) {});
  };
  reactor.Call("setup", [&] {
    for (int i = 0; i < 4; ++i) {
      proto::Envelope e;
      auto* l = e.mutable_agent_register()->mutable_labels();
      l->set_name("node-" + std::to_string(i));
      l->set_provider("aws");
      l->set_gpus(8);
      l->set_slots(8);
      call(e);
    }
    return 0;
  });
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> loaded{0};
  std::thread loader;
  if (load) loader = std::thread([&] { loaded = LoadDisk(dir, load_mib, stop); });
  std::this_thread::sleep_for(std::chrono::milliseconds(load ? 500 : 0));  // the load under way
  std::thread prober([&] {
    while (!stop) {
      auto t0 = Clock::now();
      reactor.Call("probe", [] { return 0; });
      r.probe_ms.push_back(Ms(Clock::now() - t0));
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  auto start = Clock::now();
  auto end = start + std::chrono::seconds(seconds);
  auto next = start;
  while (Clock::now() < end) {
    double took = reactor.Call("submit", [&] {
      proto::Envelope e;
      e.mutable_submit_request()->set_yaml("name: job\ncommand: x\nnodes: 2\n");
      auto t0 = Clock::now();
      call(e);
      return Ms(Clock::now() - t0);
    });
    r.submit_ms.push_back(took);
    next += std::chrono::microseconds(1000000 / std::max(1, rate));
    std::this_thread::sleep_until(next);
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  stop = true;
  prober.join();
  if (loader.joinable()) loader.join();
  r.load_bytes = loaded;
  reactor.Stop();
  coord->reset();
  std::sort(r.probe_ms.begin(), r.probe_ms.end());
  std::sort(r.submit_ms.begin(), r.submit_ms.end());
  return r;
}

}  // namespace

void AddCoordinatorDiskBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand(
      "coordinator-disk",
      "How long the coordinator's reactor waits on its disk while it records changes: an fsync "
      "per commit (the anchor) against the default flusher, with the disk quiet and loaded");
  struct Opts {
    int seconds = 8, rate = 50, load_mib = 256, flush_ms = 100;
    std::string dir;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--seconds", o->seconds, "Per phase")->capture_default_str();
  cmd->add_option("--rate", o->rate, "Submits per second")->capture_default_str();
  cmd->add_option("--load-mib", o->load_mib, "Size of each fdatasync'd file of the disk load")
      ->capture_default_str();
  cmd->add_option("--flush-ms", o->flush_ms, "The flusher's interval")->capture_default_str();
  cmd->add_option("--dir", o->dir, "Where the databases and the load go (default: the temp dir)");
  cmd->callback([=] {
    *runner = [=]() -> int {
      log::InitLogging("error").IgnoreError();
      fs::path base = o->dir.empty() ? fs::temp_directory_path() : fs::path(o->dir);
      fs::path dir = base / ("muster-bench-coordinator-disk-" + std::to_string(getpid()));
      fs::create_directories(dir);
      Table t({"database sync", "disk", "probes", "reactor wait p50 ms", "p99 ms", "max ms",
               "submit p50 ms", "p99 ms", "max ms", "load MiB/s"});
      auto pct = [](const std::vector<double>& v, double q) {
        return v.empty() ? std::string("-")
                         : Fmt(v[std::min(v.size() - 1, size_t(v.size() * q))], 2);
      };
      for (bool load : {false, true}) {
        for (int flush : {0, o->flush_ms}) {
          auto r = RunPhase(dir, std::chrono::milliseconds(flush), load, o->seconds, o->rate,
                            o->load_mib);
          t.Row({flush == 0 ? "fsync per commit (anchor)" : fmt::format("flusher, {} ms", flush),
                 load ? "loaded" : "quiet", std::to_string(r.probe_ms.size()), pct(r.probe_ms, 0.5),
                 pct(r.probe_ms, 0.99), r.probe_ms.empty() ? "-" : Fmt(r.probe_ms.back(), 1),
                 pct(r.submit_ms, 0.5), pct(r.submit_ms, 0.99),
                 r.submit_ms.empty() ? "-" : Fmt(r.submit_ms.back(), 1),
                 load ? Fmt(r.load_bytes / 1048576.0 / (r.seconds + 0.5), 0) : "-"});
        }
      }
      printf(
          "coordinator with 4 nodes; %d submits/s for %d s per phase (each a database write on "
          "the reactor); a probe every 5 ms times the reactor's answer to an empty closure (what "
          "a heartbeat waits); loaded: %d MiB files written and fdatasync'd back to back in %s\n",
          o->rate, o->seconds, o->load_mib, dir.string().c_str());
      t.Print();
      fs::remove_all(dir);
      return 0;
    };
  });
}

}  // namespace muster::bench
