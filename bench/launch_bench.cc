// muster-bench launch: `muster run -np N /bin/true` beside `mpirun -np N /bin/true` (Open MPI,
// the anchor) in the same run, and the teardown time of each after one rank exits 3 while the
// others sleep.
//
// Teardown is timed from the moment the failing rank is released (a FIFO it reads from) to
// the launcher's exit, once every rank has said it is running.

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench/bench.h"

extern char** environ;

namespace muster::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Starts argv with stdout to a pipe (returned in *out_fd) or /dev/null; stderr to /dev/null.
pid_t Spawn(const std::vector<std::string>& argv, int* out_fd) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  int p[2] = {-1, -1};
  if (out_fd) {
    if (pipe2(p, O_CLOEXEC) != 0) return -1;
    posix_spawn_file_actions_adddup2(&fa, p[1], 1);
  } else {
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  }
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (out_fd) {
    close(p[1]);
    *out_fd = p[0];
  }
  return rc == 0 ? pid : -1;
}

// A run that takes longer than this is killed and reported as hung (mpirun -np 64 with
// --oversubscribe hangs on the 2-core build machine).
double g_run_timeout_s = 30;
constexpr double kHung = -2;

// Exit code, or -1 after killing a run that passed g_run_timeout_s.
int WaitExit(pid_t pid, bool* hung = nullptr) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd >= 0) {
    pollfd p{pidfd, POLLIN, 0};
    int ready = poll(&p, 1, static_cast<int>(g_run_timeout_s * 1000));
    close(pidfd);
    if (ready == 0) {
      kill(pid, SIGKILL);
      if (hung) *hung = true;
    }
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (hung && *hung) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Median wall time of `reps` runs of argv; -1 if a run fails.
double MedianSeconds(const std::vector<std::string>& argv, int reps) {
  std::vector<double> s;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    pid_t pid = Spawn(argv, nullptr);
    if (pid < 0) return -1;
    bool hung = false;
    int code = WaitExit(pid, &hung);
    if (hung) return kHung;
    if (code != 0) return -1;
    s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(s.begin(), s.end());
  return s[s.size() / 2];
}

// One teardown: the launcher runs np ranks; rank 0 exits 3 when released, the others sleep.
// Returns seconds from the release to the launcher's exit (-1 on trouble).
double TeardownOnce(const std::vector<std::string>& launcher_prefix, int np) {
  std::string fifo = "/tmp/muster-bench-fifo-" + std::to_string(getpid());
  unlink(fifo.c_str());
  if (mkfifo(fifo.c_str(), 0600) != 0) return -1;
  std::string script = "if [ \"$OMPI_COMM_WORLD_RANK\" = 0 ]; then echo ready; read x < " + fifo +
                       "; exit 3; fi; echo ready; exec sleep 100";
  std::vector<std::string> argv = launcher_prefix;
  argv.insert(argv.end(), {"-np", std::to_string(np), "sh", "-c", script});
  int out = -1;
  pid_t pid = Spawn(argv, &out);
  if (pid < 0) return -1;
  // Wait until every rank runs.
  std::string text;
  int ready = 0;
  auto deadline = Clock::now() + std::chrono::seconds(60);
  while (ready < np && Clock::now() < deadline) {
    pollfd p{out, POLLIN, 0};
    if (poll(&p, 1, 1000) <= 0) continue;
    char buf[4096];
    ssize_t n = read(out, buf, sizeof(buf));
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
    ready = static_cast<int>(std::count(text.begin(), text.end(), '\n'));
  }
  double seconds = -1;
  if (ready >= np) {
    auto t0 = Clock::now();
    int w = open(fifo.c_str(), O_WRONLY);
    if (w >= 0) {
      (void)!write(w, "\n", 1);
      close(w);
    }
    bool hung = false;
    int code = WaitExit(pid, &hung);
    if (hung) {
      close(out);
      unlink(fifo.c_str());
      return kHung;
    }
    seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (code != 3) {
      std::cerr << argv[0] << " exited " << code << " instead of the rank's 3\n";
    }
  } else {
    kill(pid, SIGKILL);
    WaitExit(pid);
  }
  close(out);
  unlink(fifo.c_str());
  return seconds;
}

double MedianTeardown(const std::vector<std::string>& prefix, int np, int reps) {
  std::vector<double> s;
  for (int i = 0; i < reps; ++i) {
    double t = TeardownOnce(prefix, np);
    if (t < 0) return t;
    s.push_back(t);
  }
  std::sort(s.begin(), s.end());
  return s[s.size() / 2];
}

std::string Secs(double s) {
  if (s == kHung) return "hung >" + Fmt(g_run_timeout_s, 0) + "s";
  return s < 0 ? "failed" : Fmt(s, 3);
}

}  // namespace

void AddLaunchBench(CLI::App& app, Runner* runner) {
  auto* cmd =
      app.add_subcommand("launch", "muster run vs mpirun: launch of /bin/true and teardown");
  struct Flags {
    std::vector<int> np = {1, 4, 16, 64};
    int reps = 5;
    int teardown_np = 4;
    std::string muster;
    bool json = false;
  };
  auto f = std::make_shared<Flags>();
  cmd->add_option("--np", f->np, "rank counts (default 1 4 16 64)");
  cmd->add_option("--reps", f->reps, "runs per row; the median is shown (default 5)");
  cmd->add_option("--teardown-np", f->teardown_np, "ranks in the teardown test (default 4)");
  cmd->add_option("--muster", f->muster, "the muster binary (default: beside muster-bench)");
  cmd->add_option("--run-timeout", g_run_timeout_s,
                  "seconds after which a run is killed and shown as hung (default 30)");
  cmd->add_flag("--json", f->json, "print JSON instead of tables");
  cmd->callback([f, runner] {
    *runner = [f] {
      std::string muster = FindMuster(f->muster);
      std::vector<std::string> muster_run = {muster, "run"};
      std::vector<std::string> mpirun = {"mpirun", "--allow-run-as-root", "--oversubscribe"};
      nlohmann::json j;
      j["launch"] = nlohmann::json::array();
      Table launch({"np", "muster run s", "mpirun s", "muster/mpirun"});
      for (int np : f->np) {
        auto with = [&](std::vector<std::string> prefix) {
          prefix.insert(prefix.end(), {"-np", std::to_string(np), "/bin/true"});
          return prefix;
        };
        double m = MedianSeconds(with(muster_run), f->reps);
        double o = MedianSeconds(with(mpirun), f->reps);
        double ratio = (m > 0 && o > 0) ? m / o : -1;
        launch.Row({std::to_string(np), Secs(m), Secs(o), ratio < 0 ? "-" : Fmt(ratio, 2) + "x"});
        auto val = [](double v) { return v < 0 ? nlohmann::json(nullptr) : nlohmann::json(v); };
        j["launch"].push_back({{"np", np},
                               {"muster_s", val(m)},
                               {"mpirun_s", val(o)},
                               {"ratio", val(ratio)},
                               {"mpirun_hung", o == kHung},
                               {"muster_hung", m == kHung}});
      }
      double tm = MedianTeardown(muster_run, f->teardown_np, f->reps);
      double to = MedianTeardown(mpirun, f->teardown_np, f->reps);
      j["teardown"] = {{"np", f->teardown_np}, {"muster_s", tm}, {"mpirun_s", to}};
      if (f->json) {
        std::cout << j.dump(2) << "\n";
      } else {
        std::cout << "launch: median wall time of `-np N /bin/true` over " << f->reps << " runs\n";
        launch.Print();
        std::cout << "\nteardown (a launcher that did not exit 3 is reported on stderr): rank 0 "
                     "exits 3 while "
                  << f->teardown_np - 1 << " ranks sleep; release -> launcher exit, median of "
                  << f->reps << "\n";
        Table t({"launcher", "seconds"});
        t.Row({"muster run", Secs(tm)});
        t.Row({"mpirun", Secs(to)});
        t.Print();
      }
      return tm < 0 ? 1 : 0;  // a broken anchor is shown, not a failure of muster
    };
  });
}

}  // namespace muster::bench
