#include "launcher/launcher.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "collectives/rendezvous_relay.h"
#include "collectives/rendezvous_server.h"
#include "common/curve.h"
#include "common/exit_codes.h"
#include "common/logging.h"
#include "common/python_path.h"
#include "common/rank_env.h"
#include "common/reactor.h"
#include "common/strings.h"
#include "coordinator/providers/slurm_provider.h"
#include "launcher/remote_run.h"
#include "launcher/slurm_run.h"
#include "node_agent/supervisor.h"

namespace muster::launcher {
namespace {

using node_agent::ChildId;
using node_agent::ChildInfo;
using node_agent::ExitInfo;
using node_agent::OutputStream;
using node_agent::SpawnSpec;
using node_agent::Supervisor;

auto Log() {
  static auto logger = log::Get("launcher");
  return logger;
}

// Writes all of `data`, waiting out a non-blocking destination and retrying short writes.
void WriteAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        pollfd p{fd, POLLOUT, 0};
        ::poll(&p, 1, -1);
        continue;
      }
      return;  // the reader went away (EPIPE): the ranks' output has nowhere to go
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
}

void WriteLine(int fd, const std::string& line) { WriteAll(fd, line + "\n"); }

std::string SignalName(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

std::string GenerateJobId() {
  std::random_device rd;
  char buf[32];
  std::snprintf(buf, sizeof(buf), "run-%08x", rd());
  return buf;
}

Status ValidateJobId(const std::string& id) {
  if (id.empty() || id.size() > 128) {
    return InvalidArgumentError("--job-id must be 1 to 128 characters");
  }
  for (char c : id) {
    if (c == '/' || c == ',' || c == '=' || isspace(static_cast<unsigned char>(c))) {
      return InvalidArgumentError("--job-id '" + id + "': no '/', ',', '=' or whitespace");
    }
  }
  return Status::Ok();
}

// Everything the reactor-side handlers of one job share. Reactor thread only, except `done`.
// OK when `pid` is in the process group of one of `supervisor`'s children (each rank leads its
// own): the launcher's relay serves the ranks and what they start, nothing else.
Status InRankGroup(pid_t pid, Supervisor* supervisor) {
  pid_t pgid = ::getpgid(pid);
  if (pgid < 0) {
    return FailedPreconditionError("process " + std::to_string(pid) +
                                   " is gone: " + std::strerror(errno));
  }
  if (supervisor != nullptr) {
    for (const ChildInfo& c : supervisor->List()) {
      if (c.pid == pgid) return Status::Ok();
    }
  }
  return FailedPreconditionError("process " + std::to_string(pid) + " (process group " +
                                 std::to_string(pgid) + ") is not one of this job's ranks");
}

struct JobState {
  const RunOptions* options = nullptr;
  const RunIo* io = nullptr;
  const std::vector<RankPlan>* plan = nullptr;
  Supervisor* supervisor = nullptr;
  std::map<ChildId, int> rank_of;  // child -> rank
  size_t spawned = 0;
  size_t closed = 0;
  bool stopping = false;

  // The outcome; the first of these to happen decides the exit code.
  std::optional<std::pair<int, ExitInfo>> first_failure;  // rank, how it ended
  bool first_is_peer_failure = false;                     // it exited with kPeerFailureExitCode
  std::optional<int> interrupted_by;                      // signal
  bool timed_out = false;
  std::optional<std::pair<int, Status>> spawn_error;  // rank, why
  int signals_received = 0;

  std::mutex mu;
  std::condition_variable cv;
  bool done = false;  // GUARDED_BY(mu)

  void MaybeDone() {
    if (closed < spawned) return;
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    cv.notify_all();
  }
};

}  // namespace

StatusOr<int> PickFreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoStatus(errno, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoStatus(err, "picking a free port");
  }
  ::close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

std::vector<std::string> DetectGpus() {
  std::vector<std::string> gpus;
  if (auto env = EnvValue("CUDA_VISIBLE_DEVICES")) {
    std::string s = *env;
    size_t start = 0;
    while (start <= s.size()) {
      size_t comma = s.find(',', start);
      if (comma == std::string::npos) comma = s.size();
      if (comma > start) gpus.push_back(s.substr(start, comma - start));
      start = comma + 1;
    }
    return gpus;
  }
  if (DIR* d = ::opendir("/dev")) {
    int count = 0;
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n.size() > 6 && n.rfind("nvidia", 0) == 0 &&
          n.find_first_not_of("0123456789", 6) == std::string::npos) {
        ++count;
      }
    }
    ::closedir(d);
    for (int i = 0; i < count; ++i) gpus.push_back(std::to_string(i));
  }
  return gpus;
}

StatusOr<std::vector<RankPlan>> PlanRanks(const RunOptions& options, const LaunchContext& ctx) {
  if (options.program.empty()) return InvalidArgumentError("no program given");
  std::vector<HostSlots> hosts = options.hosts;
  if (hosts.empty()) {
    int slots = options.np > 0
                    ? options.np
                    : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    hosts.push_back({"localhost", slots});
  }
  int total = 0;
  for (const auto& h : hosts) {
    if (!IsLocalHost(h.host)) {
      return InvalidArgumentError("host '" + h.host +
                                  "' is not this machine: ranks on other hosts are started by node "
                                  "agents through a coordinator (--coordinator), which muster run "
                                  "does not support yet; use localhost");
    }
    total += h.slots;
  }
  int np = options.np > 0 ? options.np : total;
  if (np > total) {
    return InvalidArgumentError("-np " + std::to_string(np) + " is more than the " +
                                std::to_string(total) + " slots of the hosts given");
  }

  // -x NAME takes the value this launcher has (ctx.base_env is its environment).
  MUSTER_ASSIGN_OR_RETURN(auto exported, ResolveExports(options.exports, ctx.base_env));

  AddMusterPythonPath(ctx.base_env, exported);  // `import muster` works in every rank

  // Every rank is on this machine: one node.
  std::vector<RankPlan> plan;
  size_t host_index = 0;
  int used_on_host = 0;
  for (int r = 0; r < np; ++r) {
    while (used_on_host >= hosts[host_index].slots) {
      ++host_index;
      used_on_host = 0;
    }
    ++used_on_host;
    RankPlan p;
    p.rank = r;
    p.local_rank = r;
    p.host = hosts[host_index].host;
    RankEnv env;
    env.rank = r;
    env.world_size = np;
    env.local_rank = p.local_rank;
    env.local_world_size = np;
    env.master_addr = ctx.master_addr;
    env.master_port = ctx.master_port;
    env.cuda_visible_devices =
        ctx.gpus.empty() ? "" : ctx.gpus[static_cast<size_t>(p.local_rank) % ctx.gpus.size()];
    env.job_id = ctx.job_id;
    env.attempt = ctx.attempt;
    env.rdzv_endpoint = ctx.rdzv_endpoint;
    env.rdzv_key = ctx.rdzv_key;
    env.checkpoint_dir = options.checkpoint_dir;
    env.control_fd = Supervisor::kControlFd;  // RunJob spawns with a control channel
    MUSTER_RETURN_IF_ERROR(env.Validate());
    p.env = ComposeRankEnviron(ctx.base_env, exported, env);
    plan.push_back(std::move(p));
  }
  return plan;
}

int RunJob(const RunOptions& options, const RunIo& io) {
  auto fail = [&](const Status& st, int code) {
    WriteLine(io.stderr_fd, "muster run: " + st.message());
    return code;
  };
  if (!options.coordinator.empty()) return RunThroughCoordinator(options, io);
  if (auto env = EnvValue("MUSTER_COORDINATOR")) {
    RunOptions remote = options;
    remote.coordinator = *env;
    return RunThroughCoordinator(remote, io);
  }
  // Inside a Slurm allocation of several nodes and without -H: over the allocation's nodes.
  if (options.hosts.empty()) {
    auto alloc = SlurmAllocationHosts(
        [](const char* name) { return std::getenv(name); },
        [](const std::string& list) -> StatusOr<std::vector<std::string>> {
          MUSTER_ASSIGN_OR_RETURN(
              auto out, coordinator::providers::RunTool({"scontrol", "show", "hostnames", list},
                                                        std::chrono::seconds(10)));
          std::vector<std::string> names;
          std::istringstream in(out);
          for (std::string n; in >> n;) names.push_back(n);
          return names;
        });
    if (!alloc.ok()) return fail(alloc.status(), kExitUsage);
    if (*alloc && (*alloc)->size() > 1) return RunInSlurmAllocation(options, **alloc, io);
  }

  LaunchContext ctx;
  ctx.job_id = options.job_id.empty() ? GenerateJobId() : options.job_id;
  if (Status st = ValidateJobId(ctx.job_id); !st.ok()) return fail(st, kExitUsage);
  ctx.base_env = ProcessEnviron();
  ctx.gpus = DetectGpus();
  auto port = PickFreePort();
  if (!port.ok()) return fail(port.status(), 1);
  ctx.master_port = *port;
  if (!options.log_dir.empty() && ::access(options.log_dir.c_str(), W_OK) != 0) {
    return fail(ErrnoStatus(errno, "--log-dir " + options.log_dir), kExitUsage);
  }

  // Signals are read from a signalfd on the reactor; the reactor thread inherits the mask.
  sigset_t forwarded, old_mask;
  sigemptyset(&forwarded);
  sigaddset(&forwarded, SIGINT);
  sigaddset(&forwarded, SIGTERM);
  sigaddset(&forwarded, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &forwarded, &old_mask);
  struct sigaction ignore_pipe {
  }, old_pipe{};
  ignore_pipe.sa_handler = SIG_IGN;
  ::sigaction(SIGPIPE, &ignore_pipe, &old_pipe);
  int sig_fd = ::signalfd(-1, &forwarded, SFD_CLOEXEC | SFD_NONBLOCK);
  auto restore_signals = [&] {
    if (sig_fd >= 0) ::close(sig_fd);
    ::sigaction(SIGPIPE, &old_pipe, nullptr);
    pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  };
  if (sig_fd < 0) {
    int err = errno;
    restore_signals();
    return fail(ErrnoStatus(err, "signalfd"), 1);
  }

  // The store's per-scope notices are noise on a user's terminal; --log-level debug shows them.
  if (auto store_log = log::Get("coll.store"); store_log->level() == spdlog::level::info) {
    store_log->set_level(spdlog::level::warn);
  }
  Reactor reactor("launcher");
  auto zap = ZapAuthenticator::Create(reactor);
  if (!zap.ok()) {
    restore_signals();
    return fail(zap.status(), 1);
  }
  auto server = collectives::RendezvousServer::Create(reactor, zap->get(), {});
  if (!server.ok()) {
    restore_signals();
    return fail(server.status().WithContext("rendezvous store"), 1);
  }
  auto key = (*server)->AddScope(ctx.job_id, static_cast<uint64_t>(ctx.attempt));
  if (!key.ok()) {
    restore_signals();
    return fail(key.status(), kExitUsage);
  }
  ctx.rdzv_endpoint = (*server)->endpoint();
  ctx.rdzv_key = *key;

  auto plan = PlanRanks(options, ctx);
  if (!plan.ok()) {
    restore_signals();
    return fail(plan.status(), kExitUsage);
  }

  JobState job;
  // The ranks reach the store through a relay on this reactor, as they do under node agents
  // (collectives/rendezvous_relay.h): a local socket in a private directory, one CURVE
  // connection to the store, a gather or barrier sent upstream once, a large gather result
  // handed over once. Only processes in a rank's process group may use it.
  // MUSTER_RDZV_DIRECT=1 keeps the direct path; a relay that cannot start falls back to it.
  std::unique_ptr<collectives::RendezvousRelay> relay;
  if (auto direct = EnvValue("MUSTER_RDZV_DIRECT");
      !direct || (*direct != "1" && *direct != "true" && *direct != "yes")) {
    collectives::RendezvousRelay::Options ro;
    std::error_code ec;
    ro.socket_parent = collectives::PickRelaySocketParent(
        collectives::RelaySocketParentCandidates(), std::filesystem::temp_directory_path(ec));
    ro.upstream_endpoint = ctx.rdzv_endpoint;
    ro.job = ctx.job_id;
    ro.attempt = static_cast<uint64_t>(ctx.attempt);
    for (const RankPlan& r : *plan) ro.local_ranks.push_back(r.rank);
    ro.admit = [&job](pid_t pid) { return InRankGroup(pid, job.supervisor); };
    auto made = [&]() -> StatusOr<std::unique_ptr<collectives::RendezvousRelay>> {
      MUSTER_ASSIGN_OR_RETURN(ro.credentials, collectives::RdzvCredentials::Parse(*key));
      return collectives::RendezvousRelay::Create(reactor, ro);
    }();
    if (made.ok()) {
      relay = std::move(*made);
      ctx.rdzv_endpoint = relay->endpoint();
      plan = PlanRanks(options, ctx);
      if (!plan.ok()) {
        relay.reset();
        restore_signals();
        return fail(plan.status(), kExitUsage);
      }
    } else {
      Log()->warn("job {}: no rendezvous relay ({}); ranks connect to the store", ctx.job_id,
                  made.status().message());
    }
  }
  job.options = &options;
  job.io = &io;
  job.plan = &*plan;
  const auto grace = options.grace;

  Supervisor::Callbacks cb;
  cb.on_line = [&](ChildId id, const std::string& name, OutputStream s, std::string_view line) {
    std::string out;
    out.reserve(line.size() + name.size() + 4);
    if (options.tag_output) out.append("[").append(name).append("] ");
    out.append(line).push_back('\n');
    // A control-channel line (progress, a commit) is shown as if the rank had printed it.
    WriteAll(s == OutputStream::kStderr ? io.stderr_fd : io.stdout_fd, out);
  };
  cb.on_exit = [&](ChildId id, const std::string&, const ExitInfo& e) {
    if (e.success()) return;
    int rank = job.rank_of.at(id);
    bool peer = !e.signaled && e.code == kPeerFailureExitCode;
    if (!job.stopping) {
      // The first failure: it decides the exit code; every other rank is stopped.
      job.first_failure.emplace(rank, e);
      job.first_is_peer_failure = peer;
      job.stopping = true;
      job.supervisor->StopAll(grace);
      return;
    }
    // A rank that saw its peer die may be reaped a moment before the peer itself (the two
    // exits land in the same poll). The culprit is the first later failure that is neither a
    // peer failure nor caused by our own stop.
    if (job.first_failure && job.first_is_peer_failure && !peer && !e.stopped) {
      job.first_failure.emplace(rank, e);
      job.first_is_peer_failure = false;
    }
  };
  cb.on_closed = [&](ChildId, const std::string&) {
    ++job.closed;
    job.MaybeDone();
  };

  std::unique_ptr<Supervisor> supervisor;
  reactor.Start();
  reactor.Call("launcher.start", [&] {
    supervisor = std::make_unique<Supervisor>(reactor, cb);
    job.supervisor = supervisor.get();
    for (const RankPlan& r : *plan) {
      SpawnSpec spec;
      spec.name = std::to_string(r.rank);
      spec.group = ctx.job_id;
      spec.argv = options.program;
      spec.env = r.env;
      spec.control_channel = true;
      spec.stdin_fd = r.rank == 0 ? io.stdin_fd : -1;
      if (!options.log_dir.empty()) {
        spec.log_path = options.log_dir + "/rank-" + std::to_string(r.rank) + ".log";
      }
      auto id = job.supervisor->Spawn(spec);
      if (!id.ok()) {
        job.spawn_error.emplace(r.rank, id.status());
        job.stopping = true;
        job.supervisor->StopAll(grace);
        break;
      }
      job.rank_of[*id] = r.rank;
      ++job.spawned;
    }
    Log()->debug("job {}: started {} ranks of {}", ctx.job_id, job.spawned, options.program[0]);

    reactor.AddFd(sig_fd, "launcher.signal", [&] {
      signalfd_siginfo si;
      while (::read(sig_fd, &si, sizeof(si)) == sizeof(si)) {
        int sig = static_cast<int>(si.ssi_signo);
        if (++job.signals_received > 1) {
          job.supervisor->StopAll(std::chrono::milliseconds(0));  // asked twice: kill now
          continue;
        }
        if (!job.stopping) job.interrupted_by = sig;
        job.stopping = true;
        // The user's signal goes to every rank's process group; SIGKILL follows after --grace.
        job.supervisor->StopAll(grace.count() > 0 ? grace : std::chrono::milliseconds(1), sig);
      }
    });
    if (options.timeout) {
      reactor.PostAfter(*options.timeout, "launcher.timeout", [&] {
        if (job.closed >= job.spawned) return;
        if (!job.stopping) job.timed_out = true;
        job.stopping = true;
        job.supervisor->StopAll(grace);
      });
    }
    job.MaybeDone();
  });

  {
    std::unique_lock<std::mutex> lock(job.mu);
    job.cv.wait(lock, [&] { return job.done; });
  }
  reactor.Call("launcher.finish", [&] {
    reactor.RemoveFd(sig_fd);
    job.supervisor = nullptr;
    supervisor.reset();
    relay.reset();
    server->reset();
    zap->reset();
  });
  reactor.Stop();
  restore_signals();

  // Decide the exit code: the first thing that went wrong.
  int np = static_cast<int>(plan->size());
  if (job.spawn_error) {
    auto& [rank, st] = *job.spawn_error;
    WriteLine(io.stderr_fd, "muster run: rank " + std::to_string(rank) + " on " +
                                (*plan)[rank].host + ": " + st.message());
    return st.code() == StatusCode::kNotFound ? kExitNotFound : kExitCannotExec;
  }
  if (job.first_failure) {
    auto& [rank, e] = *job.first_failure;
    WriteLine(io.stderr_fd, "muster run: rank " + std::to_string(rank) + " (pid " +
                                std::to_string(e.pid) + ") on " + (*plan)[rank].host + " " +
                                e.Describe() + ", the first of " + std::to_string(np) +
                                " ranks to fail; job " + ctx.job_id + " stopped");
    int code = e.ShellCode();
    return code == 0 ? 1 : code;
  }
  if (job.interrupted_by) {
    WriteLine(io.stderr_fd, "muster run: interrupted by " + SignalName(*job.interrupted_by) +
                                "; forwarded to the " + std::to_string(np) + " ranks of job " +
                                ctx.job_id);
    return 128 + *job.interrupted_by;
  }
  if (job.timed_out) {
    WriteLine(io.stderr_fd, "muster run: job " + ctx.job_id + " ran past --timeout " +
                                fmt::format("{:g}", options.timeout->count() / 1000.0) +
                                " s; its " + std::to_string(np) + " ranks were stopped");
    return kExitTimeout;
  }
  return 0;
}

}  // namespace muster::launcher
