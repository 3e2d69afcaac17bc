// muster-bench allreduce --np N: nccl-tests-style rows (bytes, time, algbw, busbw with
// busbw = algbw * 2(n-1)/n) for muster's Communicator (Gloo backend, CURVE store rendezvous)
// beside raw Gloo (FileStore rendezvous, the same gloo::allreduce) and Open MPI (mpirun,
// MPI_Allreduce), all as N local processes, f32 sum, in place, 1 KiB to 64 MiB.
//
// The parent re-executes this binary as the ranks (`muster-bench allreduce-rank`); rank 0
// prints one "ROW <bytes> <seconds per op>" line per size.

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench/bench.h"
#include "collectives/communicator.h"
#include "collectives/rendezvous_server.h"

#ifdef MUSTER_HAVE_GLOO
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>
#endif
#ifdef MUSTER_HAVE_MPI
#include <mpi.h>
#endif

extern "C" char** environ;

namespace muster::bench {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<size_t> Sizes(size_t lo, size_t hi) {
  std::vector<size_t> out;
  for (size_t b = lo; b <= hi; b *= 4) out.push_back(b);
  return out;
}

int Iters(size_t bytes) {
  return static_cast<int>(std::clamp<size_t>((32u << 20) / bytes, 3, 100));
}

// Times `op` (an allreduce of `count` floats) after a warm-up, between `barrier`s.
template <typename Op, typename Barrier>
void Sweep(int rank, size_t lo, size_t hi, Op op, Barrier barrier) {
  for (size_t bytes : Sizes(lo, hi)) {
    size_t count = bytes / sizeof(float);
    op(count);
    op(count);
    barrier();
    int iters = Iters(bytes);
    auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) op(count);
    double s = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
    if (rank == 0) std::printf("ROW %zu %.9f\n", bytes, s);
  }
  std::fflush(stdout);
}

int RankMain(const std::string& mode, size_t lo, size_t hi) {
  std::vector<float> data(hi / sizeof(float), 1.0f);
  if (mode == "muster") {
    auto comm = collectives::Communicator::FromEnv();
    if (!comm.ok()) {
      std::cerr << "allreduce-rank: " << comm.status() << "\n";
      return 1;
    }
    auto& c = **comm;
    Status failed;
    Sweep(
        c.rank(), lo, hi,
        [&](size_t n) {
          Status s = c.AllReduce(data.data(), n, DType::kF32, collectives::ReduceOp::kSum)->Wait();
          if (!s.ok() && failed.ok()) failed = s;
        },
        [&] { (void)c.Barrier()->Wait(); });
    if (!failed.ok()) {
      std::cerr << "allreduce-rank: " << failed << "\n";
      return kPeerFailureExitCode;
    }
    return 0;
  }
#ifdef MUSTER_HAVE_GLOO
  if (mode == "gloo") {
    int rank = std::atoi(std::getenv("RANK")), size = std::atoi(std::getenv("WORLD_SIZE"));
    gloo::rendezvous::FileStore store(std::getenv("GLOO_FILESTORE"));
    gloo::transport::tcp::attr attr;
    attr.hostname = "127.0.0.1";
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    ctx->connectFullMesh(store, dev);
    uint32_t tag = 1;
    Sweep(
        rank, lo, hi,
        [&](size_t n) {
          gloo::AllreduceOptions o(ctx);
          o.setOutput(data.data(), n);
          o.setReduceFunction(
              static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
          o.setTag(tag++);
          gloo::allreduce(o);
        },
        [&] {
          gloo::BarrierOptions o(ctx);
          o.setTag(tag++);
          gloo::barrier(o);
        });
    return 0;
  }
#endif
#ifdef MUSTER_HAVE_MPI
  if (mode == "mpi") {
    MPI_Init(nullptr, nullptr);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    Sweep(
        rank, lo, hi,
        [&](size_t n) {
          MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM,
                        MPI_COMM_WORLD);
        },
        [&] { MPI_Barrier(MPI_COMM_WORLD); });
    MPI_Finalize();
    return 0;
  }
#endif
  std::cerr << "allreduce-rank: mode '" << mode << "' is not built\n";
  return 2;
}

// Runs `argvs` (one per process), each with its extra env, and returns rank 0's ROW lines
// (bytes -> seconds). The first process's stdout is rank 0's (or mpirun's).
StatusOr<std::map<size_t, double>> RunProcesses(
    const std::vector<std::vector<std::string>>& argvs,
    const std::vector<std::map<std::string, std::string>>& envs) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe");
  std::vector<pid_t> pids;
  for (size_t p = 0; p < argvs.size(); ++p) {
    std::map<std::string, std::string> env;
    for (char** e = environ; *e; ++e) {
      std::string kv = *e;
      auto eq = kv.find('=');
      if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (auto& [k, v] : envs[p]) env[k] = v;
    std::vector<std::string> flat;
    for (auto& [k, v] : env) flat.push_back(k + "=" + v);
    std::vector<char*> a, e;
    for (auto& s : argvs[p]) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    for (auto& s : flat) e.push_back(s.data());
    e.push_back(nullptr);
    pid_t pid = fork();
    if (pid == 0) {
      if (p == 0)
        dup2(fds[1], 1);
      else {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
      }
      execve(a[0], a.data(), e.data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof(buf))) > 0) out.append(buf, n);
  close(fds[0]);
  int failures = 0;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    failures += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  if (failures) return InternalError(std::to_string(failures) + " rank processes failed");
  std::map<size_t, double> rows;
  std::istringstream is(out);
  std::string tag;
  size_t bytes;
  double s;
  while (is >> tag >> bytes >> s)
    if (tag == "ROW") rows[bytes] = s;
  return rows;
}

void Merge(std::map<size_t, double>& best, const std::map<size_t, double>& run) {
  for (auto& [bytes, s] : run)
    if (!best.count(bytes) || s < best[bytes]) best[bytes] = s;
}

struct Args {
  int rounds = 2;
  int np = 4;
  size_t lo = 1024, hi = 64u << 20;
  bool json = false;
};

int Parent(const Args& args, const std::string& self) {
  std::map<std::string, std::map<size_t, double>> results;
  std::vector<std::string> order;
  auto rank_argv = [&](const std::string& mode) {
    return std::vector<std::string>{self,          "allreduce-rank",       "--mode",
                                    mode,          "--min-bytes",          std::to_string(args.lo),
                                    "--max-bytes", std::to_string(args.hi)};
  };
  // muster: ranks rendezvous through a CURVE store hosted here, as under `muster run`.
  // Rounds alternate the implementations; each size keeps its best time (a shared machine).
  for (int round = 0; round < args.rounds; ++round) {
    {
      Reactor reactor("allreduce-bench");
      auto zap = std::move(*ZapAuthenticator::Create(reactor));
      auto server = collectives::RendezvousServer::Create(reactor, zap.get(), {});
      if (!server.ok()) {
        std::cerr << server.status() << "\n";
        return 1;
      }
      std::string creds = *(*server)->AddScope("bench", 0);
      reactor.Start();
      std::vector<std::vector<std::string>> argvs;
      std::vector<std::map<std::string, std::string>> envs;
      for (int r = 0; r < args.np; ++r) {
        argvs.push_back(rank_argv("muster"));
        envs.push_back({{"RANK", std::to_string(r)},
                        {"WORLD_SIZE", std::to_string(args.np)},
                        {"LOCAL_RANK", std::to_string(r)},
                        {"MASTER_ADDR", "127.0.0.1"},
                        {"MUSTER_JOB_ID", "bench"},
                        {"MUSTER_ATTEMPT", "0"},
                        {"MUSTER_RDZV_ENDPOINT", (*server)->endpoint()},
                        {"MUSTER_RDZV_KEY", creds},
                        {"MUSTER_COLL_BACKEND", "gloo"},
                        {"MUSTER_COLL_TIMEOUT_MS", "120000"}});
      }
      auto rows = RunProcesses(argvs, envs);
      reactor.Call("stop", [&] {
        server->reset();
        zap.reset();
      });
      reactor.Stop();
      if (!rows.ok()) {
        std::cerr << "muster: " << rows.status() << "\n";
        return 1;
      }
      Merge(results["muster"], *rows);
      if (round == 0) order.push_back("muster");
    }
#ifdef MUSTER_HAVE_GLOO
    {
      auto dir = std::filesystem::temp_directory_path() /
                 ("muster-bench-gloo-" + std::to_string(getpid()));
      std::filesystem::create_directories(dir);
      std::vector<std::vector<std::string>> argvs;
      std::vector<std::map<std::string, std::string>> envs;
      for (int r = 0; r < args.np; ++r) {
        argvs.push_back(rank_argv("gloo"));
        envs.push_back({{"RANK", std::to_string(r)},
                        {"WORLD_SIZE", std::to_string(args.np)},
                        {"GLOO_FILESTORE", dir.string()}});
      }
      auto rows = RunProcesses(argvs, envs);
      std::filesystem::remove_all(dir);
      if (!rows.ok()) {
        std::cerr << "raw gloo: " << rows.status() << "\n";
        return 1;
      }
      Merge(results["gloo"], *rows);
      if (round == 0) order.push_back("gloo");
    }
#endif
#ifdef MUSTER_HAVE_MPI
    if (access("/usr/bin/mpirun", X_OK) == 0) {
      std::vector<std::string> argv = {"/usr/bin/mpirun",
                                       "--allow-run-as-root",
                                       "--oversubscribe",
                                       "--mca",
                                       "btl_tcp_if_include",
                                       "lo",
                                       "-np",
                                       std::to_string(args.np)};
      for (auto& a : rank_argv("mpi")) argv.push_back(a);
      auto rows = RunProcesses({argv}, {{}});
      if (!rows.ok()) {
        std::cerr << "mpirun: " << rows.status() << "\n";
        return 1;
      }
      Merge(results["mpi"], *rows);
      if (round == 0) order.push_back("mpi");
    }
#endif
  }
  const double factor = 2.0 * (args.np - 1) / args.np;
  auto algbw = [](size_t bytes, double s) { return bytes / s / 1e9; };
  if (args.json) {
    nlohmann::json out = nlohmann::json::array();
    for (auto& impl : order)
      for (auto& [bytes, s] : results[impl])
        out.push_back({{"impl", impl},
                       {"np", args.np},
                       {"bytes", bytes},
                       {"time_us", s * 1e6},
                       {"algbw_gbps", algbw(bytes, s)},
                       {"busbw_gbps", algbw(bytes, s) * factor}});
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << "allreduce, f32 sum, in place, " << args.np << " local processes, best of "
            << args.rounds << " rounds; busbw = algbw * 2(n-1)/n; GB/s = 1e9 B/s\n";
  std::vector<std::string> cols = {"bytes"};
  for (auto& impl : order) {
    cols.push_back(impl + " us");
    cols.push_back(impl + " algbw");
    cols.push_back(impl + " busbw");
  }
  if (results.count("gloo")) cols.push_back("muster/gloo");
  Table t(cols);
  for (auto& [bytes, _] : results["muster"]) {
    std::vector<std::string> row = {std::to_string(bytes)};
    for (auto& impl : order) {
      double s = results[impl].count(bytes) ? results[impl][bytes] : 0;
      row.push_back(Fmt(s * 1e6, 1));
      row.push_back(Fmt(s ? algbw(bytes, s) : 0, 3));
      row.push_back(Fmt(s ? algbw(bytes, s) * factor : 0, 3));
    }
    if (results.count("gloo") && results["gloo"].count(bytes)) {
      row.push_back(Fmt(results["gloo"][bytes] / results["muster"][bytes], 2));
    }
    t.Row(row);
  }
  t.Print();
  return 0;
}

}  // namespace

void AddAllreduceBench(CLI::App& app, Runner* runner) {
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("allreduce",
                                 "Allreduce busbw: muster (Gloo backend) vs raw Gloo vs Open MPI");
  cmd->add_option("--np", args->np, "Processes")->check(CLI::Range(2, 64));
  cmd->add_option("--min-bytes", args->lo, "Smallest size")->check(CLI::Range(4, 1 << 30));
  cmd->add_option("--max-bytes", args->hi, "Largest size")->check(CLI::Range(4, 1 << 30));
  cmd->add_option("--rounds", args->rounds, "Rounds per implementation; best time kept")
      ->check(CLI::Range(1, 20));
  cmd->add_flag("--json", args->json, "Print JSON rows instead of a table");
  cmd->callback([=] {
    *runner = [=] {
      char self[4096];
      ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
      if (n <= 0) return 1;
      self[n] = 0;
      return Parent(*args, self);
    };
  });

  auto rank = std::make_shared<Args>();
  auto mode = std::make_shared<std::string>();
  auto* r = app.add_subcommand("allreduce-rank", "(internal) one rank of `allreduce`");
  r->group("");
  r->add_option("--mode", *mode)->required();
  r->add_option("--min-bytes", rank->lo);
  r->add_option("--max-bytes", rank->hi);
  r->callback([=] { *runner = [=] { return RankMain(*mode, rank->lo, rank->hi); }; });
}

}  // namespace muster::bench
