// `muster agent`: argument parsing only; the agent is node_agent/agent.h.

#include <signal.h>
#include <unistd.h>

#include <iostream>
#include <limits>
#include <optional>
#include <thread>

#include "cli/commands.h"
#include "common/curve.h"
#include "common/logging.h"
#include "common/strings.h"
#include "http/http_server.h"
#include "node_agent/agent.h"
#include "node_agent/rank_reaper.h"

namespace muster::cli {

void AddAgentCommands(CLI::App& app, Runner* runner) {
  {
    // Started by `muster agent` itself (node_agent/rank_reaper.h); hidden.
    auto* reaper = app.add_subcommand("rank-reaper", "");
    reaper->group("");
    auto pids = std::make_shared<std::string>();
    reaper->add_option("--pids", *pids)->required();
    reaper->callback([=] { *runner = [=] { return node_agent::RunRankReaper(3, *pids); }; });
  }
  auto* cmd = app.add_subcommand(
      "agent", "Run the node agent: registers this node, starts and supervises ranks");
  auto o = std::make_shared<node_agent::AgentOptions>();
  struct Flags {
    std::string name, provider, region, island, gpu_type, gpus = "auto", address, work_dir;
    int slots = 0;
    std::vector<std::string> volumes;
    double notice_s = 30;
    int grace_ms = 5000;
    int64_t rank_log_max_mb = 64;
    int64_t snapshot_memory_mb = 0;
    std::string snapshot_cpu = "normal";
  };
  auto f = std::make_shared<Flags>();
  cmd->add_option("--coordinator", o->coordinator,
                  "Coordinator endpoint, tcp://HOST:PORT (default: $MUSTER_COORDINATOR)");
  cmd->add_option("--keys", o->keys_dir,
                  "Keys directory with coordinator.pub and the agent's key (default: "
                  "$MUSTER_KEYS, else ~/.muster)");
  cmd->add_option("--key", o->key_file,
                  "The agent's key pair, made with `muster keys add --role agent` (default: "
                  "agent.key in the keys directory; client.key in one made before keys had "
                  "roles)");
  cmd->add_flag("--insecure", o->insecure,
                "No CURVE to the coordinator nor for the job stores (tests only)");
  cmd->add_option("--provider", f->provider, "Provider label (aws, gcp, lambda, ...)")->required();
  cmd->add_option("--region", f->region, "Region label");
  cmd->add_option("--island", f->island, "Island label (NVLink/InfiniBand domain)");
  cmd->add_option("--gpu-type", f->gpu_type, "GPU type label (h100, ...)");
  cmd->add_option("--gpus", f->gpus, "GPUs on this node, or auto")->capture_default_str();
  cmd->add_option("--slots", f->slots, "Rank slots (default: the GPUs, else the CPUs)")
      ->check(CLI::Range(0, 4096));
  cmd->add_option("--volume", f->volumes, "A mounted volume, NAME=PATH (repeatable)");
  cmd->add_option("--name", f->name, "Node name (default: the hostname)");
  cmd->add_option("--address", f->address,
                  "Address other nodes reach this one at (default: the one that routes to the "
                  "coordinator)");
  cmd->add_option("--work-dir", f->work_dir, "Logs and state (default: ./muster-agent)");
  cmd->add_option("--preempt-file", o->preempt_file,
                  "A preemption notice once this file exists (it may hold the seconds left)");
  cmd->add_option("--aws-metadata", o->aws_metadata,
                  "Poll the AWS spot instance-action at this metadata URL "
                  "(http://169.254.169.254 on EC2)");
  cmd->add_option("--gcp-metadata", o->gcp_metadata,
                  "Poll the GCE preempted flag at this metadata URL "
                  "(http://metadata.google.internal on GCE)");
  cmd->add_option("--notice", f->notice_s,
                  "Seconds of notice assumed for SIGTERM and sources that give no time")
      ->capture_default_str();
  cmd->add_option("--grace-ms", f->grace_ms, "SIGTERM to SIGKILL grace when stopping ranks")
      ->capture_default_str();
  cmd->add_option("--rank-log-max-mb", f->rank_log_max_mb,
                  "Rotate a rank's log file past this many MiB (0: never)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20))
      ->capture_default_str();
  cmd->add_option("--snapshot-memory-mb", f->snapshot_memory_mb,
                  "MiB of memory for jobs' in-memory snapshots (checkpoint.snapshot_every_steps); "
                  "a job whose snapshots do not fit is refused them (0: none)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30))
      ->capture_default_str();
  cmd->add_option(
         "--snapshot-cpu", f->snapshot_cpu,
         "CPU class of the in-memory snapshot work (taking ranks' frames, sealing them for and "
         "opening them from the peer agent): 'background' runs it at SCHED_IDLE, on cores the "
         "ranks leave idle, so it does not slow them, and the peer's copies fall behind (more "
         "steps lost on a node loss) when the ranks and their data loaders keep every core busy; "
         "'normal' (the default: snapshots are there to lose at most a step) competes with the "
         "ranks and keeps the peer's copies current. Heartbeats, the lease and control calls "
         "always stay at the normal class (docs/job-spec.md)")
      ->check(CLI::IsMember({"background", "normal"}))
      ->capture_default_str();
  cmd->add_option("--http", o->http,
                  "Serve the agent's own /metrics (Prometheus) on HOST:PORT (e.g. 127.0.0.1:8781; "
                  "port 0: any). Beyond loopback every request needs the bearer token in "
                  "<keys>/http_token");
  cmd->add_option("--rank-log-keep", o->rank_log_keep,
                  "Rotated parts kept of each rank log file (the oldest is dropped)")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  cmd->callback([=] {
    *runner = [=]() -> int {
      auto& l = o->labels;
      l.set_name(f->name);
      l.set_provider(f->provider);
      l.set_region(f->region);
      l.set_island(f->island);
      l.set_gpu_type(f->gpu_type);
      l.set_address(f->address);
      int gpus = 0;
      if (f->gpus == "auto") {
        gpus = node_agent::CountGpus();
      } else {
        std::optional<int64_t> n = ParseInt64(f->gpus);
        gpus = n && *n >= 0 && *n <= std::numeric_limits<int>::max() ? static_cast<int>(*n) : -1;
        if (gpus < 0) {
          std::cerr << "muster agent: --gpus must be a number or auto, not " << f->gpus << "\n";
          return 2;
        }
      }
      l.set_gpus(gpus);
      int slots = f->slots > 0
                      ? f->slots
                      : (gpus > 0 ? gpus : static_cast<int>(std::thread::hardware_concurrency()));
      l.set_slots(slots);
      for (const auto& v : f->volumes) {
        auto eq = v.find('=');
        if (eq == std::string::npos || eq == 0 || eq + 1 == v.size()) {
          std::cerr << "muster agent: --volume wants NAME=PATH, not " << v << "\n";
          return 2;
        }
        auto* vol = l.add_volumes();
        vol->set_name(v.substr(0, eq));
        vol->set_path(v.substr(eq + 1));
      }
      o->work_dir = f->work_dir.empty() ? "muster-agent" : f->work_dir;
      o->default_notice = std::chrono::seconds(static_cast<int64_t>(f->notice_s));
      o->stop_grace = std::chrono::milliseconds(f->grace_ms);
      o->rank_log_max_bytes = f->rank_log_max_mb << 20;
      o->snapshot_memory = static_cast<uint64_t>(f->snapshot_memory_mb) << 20;
      o->snapshot_cpu = *node_agent::ParseSnapshotCpu(f->snapshot_cpu);  // checked above
      if (Status st = node_agent::CheckSnapshotCpuAllowed(o->snapshot_cpu); !st.ok()) {
        std::cerr << "muster agent: " << st.message() << "\n";
        return 2;
      }
      if (!o->http.empty()) {
        auto hp = http::ParseListen(o->http);
        if (!hp.ok()) {
          std::cerr << "muster agent: " << hp.status().message() << "\n";
          return 2;
        }
        if (!http::IsLoopbackHost(hp->first)) {
          auto token = LoadHttpToken(KeysDir::Resolve(o->keys_dir));
          if (!token.ok()) {
            std::cerr << "muster agent: " << token.status().message() << "\n";
            return 1;
          }
          o->http_token = *token;
        }
      }
      // Signals go to sigwait below; threads started from here inherit the mask.
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGINT);
      sigaddset(&set, SIGTERM);
      sigaddset(&set, SIGUSR1);  // a registration refused for good (on_fatal below)
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      o->on_fatal = [](const Status&) { ::kill(::getpid(), SIGUSR1); };
      std::error_code ec;
      o->rank_reaper_bin = std::filesystem::read_symlink("/proc/self/exe", ec).string();
      auto agent = node_agent::Agent::Start(*o);
      if (agent.ok()) log::SetContext("", (*agent)->labels().name(), "");
      if (agent.ok() && !(*agent)->metrics_url().empty()) {
        std::cout << "agent metrics on " << (*agent)->metrics_url() << std::endl;
      }
      if (!agent.ok()) {
        std::cerr << "muster agent: " << agent.status().message() << "\n";
        return agent.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
      }
      int sig = 0;
      sigwait(&set, &sig);
      auto logger = log::Get("agent");
      if (sig == SIGUSR1) {
        // The session logged why (critical); nothing runs that the coordinator still wants.
        logger->critical("the coordinator refused this node for good: stopping");
        (*agent)->Shutdown(o->stop_grace);
        return 1;
      }
      if (sig == SIGTERM) {
        // The node is going away: checkpoint on notice, then stop.
        node_agent::PreemptionNotice n;
        n.source = "sigterm";
        n.deadline = std::chrono::system_clock::now() + o->default_notice;
        n.detail = "SIGTERM to the agent";
        (*agent)->Notice(n);
        logger->warn("SIGTERM: treating it as a preemption notice of {} s (SIGINT stops at once)",
                     o->default_notice.count());
        (*agent)->WaitIdle(o->default_notice + o->stop_grace);
      } else {
        logger->info("SIGINT: stopping every rank");
      }
      (*agent)->Shutdown(o->stop_grace);
      return 0;
    };
  });
}

}  // namespace muster::cli
