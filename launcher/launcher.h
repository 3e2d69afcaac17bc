#pragma once

// The `muster run` launcher: runs one job of N ranks on this machine with mpirun's exit
// semantics and the env contract of DESIGN.md, hosting the job's rendezvous store.
//
//   RunOptions opts = *ParseRunArgs(args);
//   int code = RunJob(opts);   // what `muster run` exits with
//
// What RunJob does:
//   - with --coordinator or $MUSTER_COORDINATOR, hands the job to RunThroughCoordinator
//     (remote_run.h): node agents run it, on any hosts;
//   - otherwise plans the ranks over the hosts, which must all be this machine (another host is
//     refused, naming --coordinator);
//   - serves the rendezvous store (CURVE, one scope for the job's attempt 0) and a free
//     MASTER_PORT, builds each rank's environment (PlanRanks) and spawns the ranks through a
//     node_agent::Supervisor, rank 0 with the launcher's stdin;
//   - writes each rank's output lines whole to the launcher's stdout/stderr (`[R] ` prefix with
//     --tag-output), one write per line, so lines of different ranks never mix;
//   - on the first rank to fail (by exit time): SIGTERM to every other rank's process group,
//     SIGKILL after --grace; prints ONE summary line naming the rank, its host, and its code or
//     signal; exits with that code (128 + signal when killed);
//   - forwards SIGINT/SIGTERM/SIGHUP to every rank (SIGKILL after --grace; a second signal
//     kills at once) and exits 128 + the signal; on --timeout stops the job and exits 124.
//
// Thread-safety: RunJob blocks the calling thread until the job is over and changes the
// calling thread's signal mask while it runs (SIGINT, SIGTERM, SIGHUP are read from a
// signalfd); call it from the main thread of a process that starts no other thread first.

#include <string>
#include <vector>

#include "common/status.h"
#include "launcher/run_options.h"

namespace muster::launcher {

// One rank as planned.
struct RankPlan {
  int rank = 0;
  int local_rank = 0;
  std::string host;
  std::vector<std::string> env;  // the rank's whole environment, "KEY=VALUE"
};

// What the plan needs that is only known at run time.
struct LaunchContext {
  std::string job_id;
  int attempt = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
  std::string rdzv_endpoint;
  std::string rdzv_key;
  std::vector<std::string> base_env;  // the launcher's environment
  // GPU ids for CUDA_VISIBLE_DEVICES, assigned round-robin by local rank; empty: no GPU, and
  // CUDA_VISIBLE_DEVICES is set empty.
  std::vector<std::string> gpus;
};

// Resolves hosts and rank count (InvalidArgument for more ranks than slots, or a host that is
// not this machine) and builds every rank's environment with ComposeRankEnviron
// (common/rank_env.h): the launcher's own environment, then -x, then the env contract, which
// wins over both.
StatusOr<std::vector<RankPlan>> PlanRanks(const RunOptions& options, const LaunchContext& context);

// The GPUs ranks are spread over: $CUDA_VISIBLE_DEVICES of the launcher if set, else one per
// /dev/nvidiaN device.
std::vector<std::string> DetectGpus();

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
StatusOr<int> PickFreePort();

// Where RunJob reads and writes (tests redirect these).
struct RunIo {
  int stdin_fd = 0;  // given to rank 0
  int stdout_fd = 1;
  int stderr_fd = 2;
};

// Runs the job and returns the launcher's exit code (see run_options.h for the codes). Errors
// before any rank started are written to `io.stderr_fd` as one "muster run: ..." line.
int RunJob(const RunOptions& options, const RunIo& io = RunIo());

}  // namespace muster::launcher
