// muster-bench recovery: how long a job is down, and how many steps it loses, when its node is
// preempted (with notice) or its agent dies (without), on a real coordinator and real agents on
// loopback. The anchor, measured in the same run, is what restarting the same program by hand
// costs at the very least: `mpirun -np 2` from launch to its first step (no detection, no
// checkpoint handling; torchrun, about 5 s here per the issue, is broken on Debian's Python).
//
// The job: 2 nodes x 1 rank of a shell "trainer" that takes a step every --step-ms, checkpoints
// every --ckpt-every steps (prints MUSTER_CHECKPOINT), checkpoints and exits on a notice, and
// resumes from MUSTER_RESUME_STEP. Each line carries a wall-clock stamp, so the program's own
// start-up (rank spawned -> first step) is reported apart from muster's part (notice or kill ->
// rank spawned).

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "bench/bench.h"
#include "checkpoint/checkpointer.h"
#include "common/curve.h"
#include "common/logging.h"
#include "coordinator/client.h"

extern char** environ;

namespace muster::bench {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int64_t UnixMs() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> a;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execvp(a[0], a.data());
    _exit(127);
  }
  return pid;
}

// Flags every agent of every run gets besides its own (--snapshot-cpu).
std::vector<std::string>& ExtraAgentArgs() {
  static std::vector<std::string> args;
  return args;
}

// The whole machine's CPU time from /proc/stat's first line, in ticks: idle (idle + iowait)
// and all. {-1, -1} when unreadable.
std::pair<double, double> MachineCpuTicks() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  if (!(in >> cpu) || cpu != "cpu") return {-1, -1};
  double idle = 0, all = 0, v = 0;
  for (int i = 0; i < 8 && in >> v; ++i) {
    all += v;
    if (i == 3 || i == 4) idle += v;
  }
  return {idle, all};
}

void KillGroup(pid_t pid, int sig) {
  if (pid <= 0) return;
  ::kill(-pid, sig);
  int st;
  if (sig == SIGKILL) waitpid(pid, &st, 0);
}

// This muster-bench binary (the sh trainer runs its write-step).
std::string SelfPath() {
  std::error_code ec;
  return fs::read_symlink("/proc/self/exe", ec).string();
}

// The trainer's lines: T_START=ms at its start, then per step MUSTER_PROGRESS step=N t=ms. Its
// checkpoints are real (one small step written by `muster-bench write-step` from rank 0): the
// agent reports a printed commit only for a step that is good on the volume.
const char* kTrainer =
    "ckpt() { [ \"$RANK\" != 0 ] || $WRITE_STEP \"$MUSTER_CHECKPOINT_DIR\" $1 || exit 9; "
    "echo MUSTER_CHECKPOINT step=$1; }; "
    "s=${MUSTER_RESUME_STEP:-0}; s=${s:-0}; echo T_START=$(date +%s%3N) resume=$s; "
    "while [ $s -lt $TOTAL ]; do s=$((s+1)); sleep $STEP_S; "
    "echo MUSTER_PROGRESS step=$s total=$TOTAL t=$(date +%s%3N); "
    "if [ -e \"$MUSTER_PREEMPT_FILE\" ]; then ckpt $s; "
    "echo MUSTER_PREEMPTED step=$s; exit 3; fi; "
    "if [ $((s % CKPT_EVERY)) = 0 ]; then ckpt $s; fi; done";

struct AttemptLog {
  int64_t start_ms = 0, first_step_ms = 0, resume = -1, last_step = 0, preempted = -1;
  int64_t last_step_ms = 0, steps = 0;  // the last progress stamp; progress lines
  std::string source;                   // the snapshot trainer's resume source
  // The fine-tune: its "snapshot stall mean X ms max Y ms over N of K KiB (release mean Z ms)"
  // log line (the last).
  double copy_mean_ms = -1, copy_max_ms = -1, release_mean_ms = -1;
  int64_t snapshot_kib = -1;
  // The mean time between progress lines (ms); -1 with fewer than two.
  double MeanStepMs() const {
    return steps > 1 ? static_cast<double>(last_step_ms - first_step_ms) / (steps - 1) : -1;
  }
};

AttemptLog ParseLog(const std::string& text) {
  AttemptLog a;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("T_START=", 0) == 0) {
      a.start_ms = std::atoll(line.c_str() + 8);
      auto r = line.find("resume=");
      if (r != std::string::npos) a.resume = std::atoll(line.c_str() + r + 7);
      auto src = line.find("source=");
      if (src != std::string::npos) a.source = line.substr(src + 7);
    } else if (line.rfind("MUSTER_PROGRESS step=", 0) == 0) {
      a.last_step = std::atoll(line.c_str() + 21);
      auto t = line.find(" t=");
      if (a.first_step_ms == 0 && t != std::string::npos)
        a.first_step_ms = std::atoll(line.c_str() + t + 3);
      if (t != std::string::npos) {
        a.last_step_ms = std::atoll(line.c_str() + t + 3);
        ++a.steps;
      }
    } else if (line.rfind("MUSTER_PREEMPTED step=", 0) == 0) {
      a.preempted = std::atoll(line.c_str() + 22);
    } else if (auto f = line.find("| step "); f != std::string::npos) {
      // The fine-tune's own step line (its MUSTER_PROGRESS goes on the control channel).
      a.last_step = std::max<int64_t>(a.last_step, std::atoll(line.c_str() + f + 7));
      if (auto c = line.find("snapshot stall mean "); c != std::string::npos) {
        double mean = -1, max = -1, release = -1;
        long long n = 0, kib = -1;
        const int got = std::sscanf(
            line.c_str() + c,
            "snapshot stall mean %lf ms max %lf ms over %lld of %lld KiB (release mean %lf ms)",
            &mean, &max, &n, &kib, &release);
        if (got >= 4) {
          a.copy_mean_ms = mean;
          a.copy_max_ms = max;
          a.snapshot_kib = kib;
          if (got == 5) a.release_mean_ms = release;
        }
      }
    } else if (auto r = line.find("resumed from the in-memory snapshot of step ");
               r != std::string::npos) {
      a.source = "snapshot";  // the fine-tune's
      a.resume = std::atoll(line.c_str() + r + 44);
    } else if (auto r = line.find("resumed from step "); r != std::string::npos) {
      a.source = "volume";
      a.resume = std::atoll(line.c_str() + r + 18);
    }
  }
  return a;
}

struct Outcome {
  double down_s = -1;     // event -> first resumed step
  double muster_s = -1;   // event -> the resumed rank started
  double startup_s = -1;  // resumed rank started -> its first step
  int64_t lost_steps = -1;
  double step_ms = -1;                         // attempt 1's mean step time
  std::string source;                          // where the resumed attempt's rank 0 resumed from
  double copy_mean_ms = -1, copy_max_ms = -1;  // the fine-tune's snapshot stall (attempt 1)
  double release_mean_ms = -1;                 // the part of it spent waiting in Release
  int64_t snapshot_kib = -1;
  // CPU the agents themselves used per step of attempt 1 (from step 3 to the interruption).
  double agent_cpu_ms_per_step = -1;
  // The machine's idle CPU over the same steps: percent of all cores' time.
  double idle_pct = -1;
  // The ranks' own CPU per step over the same steps (each rank's share of its core).
  double rank_cpu_ms_per_step = -1;
  // With snapshots: the newest step of the lost node's ranks that the survivor held (the
  // "snapshot peer connection closed; it last put ..." line of its agent's log; the fewest of
  // those ranks), and how far that was behind the interrupted attempt's last step. -1: unknown.
  int64_t peer_step = -1, peer_lag_steps = -1;
  // With snapshots: of the payload the agents' forwarders offered their peers in attempt 1 (the
  // "snapshots of JOB to peer P: N frames offered, X MiB, of which Y MiB (Z%) sent" line each
  // surviving agent logs when attempt 1's copies stop), the percent that had to be sent (the
  // rest the peer held already: the deduplicated put). -1: unknown (nothing offered or logged).
  double offered_mib = -1, offered_sent_pct = -1;
  std::string error;
};

// The snapshot trainer (tests/runtime/snapshot_trainer.cc) instead of the sh or fine-tune one.
struct SnapshotTrainer {
  std::string bin;  // empty: not this trainer
  bool snapshots = false;
  int state_kb = 4096;
};

class Cluster {
 public:
  Cluster(std::string muster, fs::path dir, int hb_timeout_ms, int snapshot_mb = 0)
      : muster_(std::move(muster)),
        dir_(std::move(dir)),
        hb_timeout_ms_(hb_timeout_ms),
        snapshot_mb_(snapshot_mb) {}
  ~Cluster() {
    for (auto& [n, pid] : agents_) KillGroup(pid, SIGKILL);
    KillGroup(coord_, SIGKILL);
  }

  Status Start(int agents) {
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "coord");
    MUSTER_RETURN_IF_ERROR(InitKeysDir(KeysDir{dir_ / "keys"}, true));
    coord_ =
        Spawn({muster_, "coordinator", "--data-dir", (dir_ / "coord").string(), "--keys",
               (dir_ / "keys").string(), "--listen", "tcp://127.0.0.1:*", "--heartbeat-interval-ms",
               "100", "--heartbeat-timeout-ms", std::to_string(hb_timeout_ms_)},
              (dir_ / "coord.log").string());
    for (auto until = Clock::now() + std::chrono::seconds(20);;) {
      if (fs::exists(dir_ / "coord" / "endpoint")) break;
      if (Clock::now() > until) return UnavailableError("the coordinator did not start");
      std::this_thread::sleep_for(milliseconds(20));
    }
    std::ifstream(dir_ / "coord" / "endpoint") >> endpoint_;
    fs::create_directories(dir_ / "volume");
    for (int i = 1; i <= agents; ++i) StartAgent("n" + std::to_string(i));
    coordinator::ClientOptions co;
    co.endpoint = endpoint_;
    co.keys_dir = (dir_ / "keys").string();
    MUSTER_ASSIGN_OR_RETURN(client_, coordinator::CoordinatorClient::Connect(co));
    for (auto until = Clock::now() + std::chrono::seconds(20);;) {
      auto nodes = client_->Nodes();
      int up = 0;
      if (nodes.ok())
        for (const auto& n : nodes->nodes()) up += n.state() == proto::NODE_UP;
      if (up == agents) return Status::Ok();
      if (Clock::now() > until) return UnavailableError("the agents did not register");
      std::this_thread::sleep_for(milliseconds(20));
    }
  }

  void StartAgent(const std::string& name) {
    std::vector<std::string> argv = {muster_,
                                     "agent",
                                     "--coordinator",
                                     endpoint_,
                                     "--keys",
                                     (dir_ / "keys").string(),
                                     "--provider",
                                     "aws",
                                     "--name",
                                     name,
                                     "--slots",
                                     "1",
                                     "--gpus",
                                     "0",
                                     "--volume",
                                     "ckpt=" + (dir_ / "volume").string(),
                                     "--work-dir",
                                     (dir_ / name).string(),
                                     "--grace-ms",
                                     "1000",
                                     "--snapshot-memory-mb",
                                     std::to_string(snapshot_mb_)};
    argv.insert(argv.end(), ExtraAgentArgs().begin(), ExtraAgentArgs().end());
    agents_[name] = Spawn(argv, (dir_ / (name + ".log")).string());
  }
  void KillAgent(const std::string& name) {
    KillGroup(agents_[name], SIGKILL);
    agents_.erase(name);
  }

  coordinator::CoordinatorClient& client() { return *client_; }

  // CPU seconds the agent processes themselves have used (their threads, not their ranks:
  // /proc/<pid>/stat utime + stime); -1 when unreadable.
  double AgentsCpuS() const {
    double ticks = 0;
    for (const auto& [name, pid] : agents_) {
      std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
      std::string stat((std::istreambuf_iterator<char>(in)), {});
      auto close = stat.rfind(')');
      if (close == std::string::npos) return -1;
      std::istringstream fields(stat.substr(close + 2));
      std::string f;
      for (int i = 3; i <= 15 && fields >> f; ++i) {
        if (i == 14 || i == 15) ticks += std::atof(f.c_str());
      }
    }
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
  }

  // CPU seconds the agents' children (their ranks) have used so far; -1 when unreadable.
  double RanksCpuS() const {
    std::set<pid_t> parents;
    for (const auto& [name, pid] : agents_) parents.insert(pid);
    double ticks = 0;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/proc", ec)) {
      const std::string name = e.path().filename().string();
      if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
      std::ifstream in(e.path() / "stat");
      std::string stat((std::istreambuf_iterator<char>(in)), {});
      auto close = stat.rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream fields(stat.substr(close + 2));
      std::string f;
      bool child = false;
      for (int i = 3; i <= 15 && fields >> f; ++i) {
        if (i == 4) child = parents.count(static_cast<pid_t>(std::atoi(f.c_str()))) > 0;
        if (child && (i == 14 || i == 15)) ticks += std::atof(f.c_str());
      }
    }
    if (ec) return -1;
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
  }

  StatusOr<std::string> Log(const std::string& job, int attempt) {
    MUSTER_ASSIGN_OR_RETURN(auto r, client_->Logs(job, 0, 0, 1 << 20, attempt));
    return r.data();
  }

 private:
  std::string muster_;
  fs::path dir_;
  int hb_timeout_ms_;
  int snapshot_mb_;
  pid_t coord_ = -1;
  std::map<std::string, pid_t> agents_;
  std::string endpoint_;
  std::unique_ptr<coordinator::CoordinatorClient> client_;
};

// Runs the job, interrupts it at step `at` (notice or agent kill -9), and measures the recovery.
// `finetune`: the real C++ fine-tune (a gang over Gloo with real checkpoints) instead of the
// shell trainer; its start-up (libtorch, model, Gloo) is then timed from the coordinator's
// "started" event to the first progress line the agent stamped (within one heartbeat).
// `spare`: the job holds the third node as a hot spare (`spares: 1`), which takes the lost
// node's place without a scheduling pass; otherwise the third node is merely free.
// `ft_snapshots`: the fine-tune snapshots its whole train state every step
// (checkpoint.snapshot_every_steps: 1).
// The fine-tune's step time is the agent-stamped progress from step 3 to the interruption.
// `replacement_after_ms` >= 0: no node is free when the agent is killed (the spare is the only
// node the gang does not use; without a spare, a second job of the same priority holds the
// third node, so it is not preempted), and a replacement node's agent is started that long
// after the kill, as a rebooted or newly provisioned node would register: without a spare the
// job waits for it.
Outcome Measure(const std::string& muster, bool with_notice, int step_ms, int ckpt_every, int at,
                int hb_timeout_ms, const std::string& finetune, const SnapshotTrainer& snap = {},
                bool spare = false, bool ft_snapshots = false, int replacement_after_ms = -1) {
  Outcome o;
  const bool no_free = replacement_after_ms >= 0;
  fs::path dir =
      fs::temp_directory_path() /
      ("muster-bench-recovery-" + std::to_string(getpid()) + (with_notice ? "-notice" : "-kill") +
       (snap.snapshots ? "-snap" : "") + (spare ? "-spare" : "") + (ft_snapshots ? "-ftsnap" : "") +
       (no_free ? "-nofree" : ""));
  Cluster c(muster, dir, hb_timeout_ms, snap.snapshots || ft_snapshots ? 1024 : 0);
  if (auto s = c.Start(3); !s.ok()) {
    o.error = s.ToString();
    return o;
  }
  int total = at + 40;
  std::string yaml;
  if (!snap.bin.empty()) {
    yaml = "name: recovery\ncommand: [" + nlohmann::json(snap.bin).dump() + "]\nenv:\n  TOTAL: \"" +
           std::to_string(total) + "\"\n  STEP_MS: \"" + std::to_string(step_ms) +
           "\"\n  CKPT_EVERY: \"" + std::to_string(ckpt_every) + "\"\n  STATE_KB: \"" +
           std::to_string(snap.state_kb) +
           "\"\nnodes: 2\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n" +
           (snap.snapshots ? "  snapshot_every_steps: 1\n" : "");
  } else if (finetune.empty()) {
    yaml = "name: recovery\ncommand: [\"/bin/sh\", \"-c\", " + nlohmann::json(kTrainer).dump() +
           "]\nenv:\n  TOTAL: \"" + std::to_string(total) + "\"\n  STEP_S: \"" +
           Fmt(step_ms / 1000.0, 3) + "\"\n  CKPT_EVERY: \"" + std::to_string(ckpt_every) +
           "\"\n  WRITE_STEP: " + nlohmann::json(SelfPath() + " write-step").dump() +
           "\nnodes: 2\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n";
  } else {
    yaml = "name: recovery\ncommand: [" + nlohmann::json(finetune).dump() +
           ", \"--pretrain\", \"--steps\", \"" + std::to_string(total) +
           "\", \"--ckpt-every\", \"" + std::to_string(ckpt_every) +
           "\", \"--log-every\", \"1\", \"--threads\", \"1\"]\nnodes: 2\nranks_per_node: "
           "1\ncheckpoint:\n  volume: ckpt\n" +
           (ft_snapshots ? "  snapshot_every_steps: 1\n" : "");
  }
  if (spare) yaml += "spares: 1\n";
  auto job = c.client().Submit(yaml, "recovery.yaml");
  if (!job.ok()) {
    o.error = job.status().ToString();
    return o;
  }
  if (no_free && !spare) {
    // The third node goes to another job (placed after the gang, which the submit placed):
    // nothing is free when the gang loses a node.
    auto filler = c.client().Submit("name: filler\ncommand: [\"sleep\", \"600\"]\n", "filler.yaml");
    if (!filler.ok()) {
      o.error = "filler job: " + filler.status().ToString();
      return o;
    }
    for (auto u = Clock::now() + std::chrono::seconds(30);;) {
      auto s = c.client().Status(*filler);
      if (s.ok() && s->jobs_size() == 1 && s->jobs(0).state() == proto::JOB_RUNNING) break;
      if (Clock::now() > u) {
        o.error = "the filler job did not start";
        return o;
      }
      std::this_thread::sleep_for(milliseconds(10));
    }
  }
  proto::JobStatus st;
  auto until = Clock::now() + std::chrono::seconds(60);
  int64_t first_step = 0, first_ms = 0;  // the first progress seen from step 3 on
  double first_cpu_s = -1;
  std::pair<double, double> first_ticks{-1, -1};
  double first_rank_cpu_s = -1;
  for (;;) {
    auto s = c.client().Status(*job);
    if (s.ok() && s->jobs_size() == 1) st = s->jobs(0);
    if (first_step == 0 && st.progress().step() >= 3) {
      first_step = st.progress().step();
      first_ms = st.progress().time_ms();
      first_cpu_s = c.AgentsCpuS();
      first_ticks = MachineCpuTicks();
      first_rank_cpu_s = c.RanksCpuS();
    }
    if (st.progress().step() >= at) break;
    if (Clock::now() > until) {
      o.error = "the job did not reach step " + std::to_string(at);
      return o;
    }
    std::this_thread::sleep_for(milliseconds(10));
  }
  int64_t t_event = UnixMs();
  const double cpu_s = c.AgentsCpuS();
  const auto ticks = MachineCpuTicks();
  const double rank_cpu_s = c.RanksCpuS();
  if (first_rank_cpu_s >= 0 && rank_cpu_s >= 0 && st.progress().step() > first_step) {
    o.rank_cpu_ms_per_step = 1000.0 * (rank_cpu_s - first_rank_cpu_s) /
                             static_cast<double>(st.progress().step() - first_step);
  }
  if (first_ticks.second >= 0 && ticks.second > first_ticks.second) {
    o.idle_pct = 100.0 * (ticks.first - first_ticks.first) / (ticks.second - first_ticks.second);
  }
  if (first_cpu_s >= 0 && cpu_s >= 0 && st.progress().step() > first_step) {
    o.agent_cpu_ms_per_step =
        1000.0 * (cpu_s - first_cpu_s) / static_cast<double>(st.progress().step() - first_step);
  }
  const double progress_step_ms = st.progress().step() > first_step && first_step > 0
                                      ? static_cast<double>(st.progress().time_ms() - first_ms) /
                                            static_cast<double>(st.progress().step() - first_step)
                                      : -1;
  // Not necessarily 1: an attempt that could not start (a rendezvous port taken by another
  // program on this machine) is retried on other ports first.
  const int interrupted = st.attempt();
  if (with_notice) {
    proto::Envelope req;
    req.mutable_preempt_node_request()->set_node(st.nodes(1));
    req.mutable_preempt_node_request()->set_notice_ms(30000);
    auto r = c.client().Call(std::move(req));
    if (!r.ok()) {
      o.error = r.status().ToString();
      return o;
    }
  } else {
    c.KillAgent(st.nodes(1));
  }
  // Until the next attempt has taken a step.
  until = Clock::now() + std::chrono::seconds(120);
  bool replaced = !no_free;
  for (;;) {
    if (!replaced && UnixMs() >= t_event + replacement_after_ms) {
      c.StartAgent("n4");  // the lost node's replacement registers
      replaced = true;
    }
    auto s = c.client().Status(*job);
    if (s.ok() && s->jobs_size() == 1) st = s->jobs(0);
    if (st.attempt() > interrupted &&
        st.progress().step() > std::max<int64_t>(st.resume_step(), 0) &&
        st.progress().time_ms() > t_event) {
      // The status may still show a line the last attempt's survivor printed as it stopped:
      // with stamped logs, the new attempt's own first step decides.
      if (!finetune.empty()) break;
      auto l = c.Log(*job, st.attempt());
      if (l.ok() && ParseLog(*l).first_step_ms != 0) break;
    }
    if (Clock::now() > until) {
      o.error = "the job did not resume";
      return o;
    }
    std::this_thread::sleep_for(milliseconds(10));
  }
  auto first = c.Log(*job, interrupted);
  auto second = c.Log(*job, st.attempt());
  if (!first.ok() || !second.ok()) {
    o.error = "logs: " + (first.ok() ? second.status() : first.status()).ToString();
    return o;
  }
  AttemptLog a = ParseLog(*first), b = ParseLog(*second);
  if (!finetune.empty()) {
    // No stamps in its lines: the coordinator's "started" event and the agent's progress stamp.
    auto events = c.client().Events(*job, 0);
    if (events.ok()) {
      for (const auto& e : events->events()) {
        if (e.kind() == "started" &&
            e.message().rfind("attempt " + std::to_string(st.attempt()) + ":", 0) == 0)
          b.start_ms = e.time_ms();
      }
    }
    b.first_step_ms = st.progress().time_ms();
    // The step it logged it resumed from (the status's resume step is the volume's).
    if (b.resume < 0) b.resume = st.resume_step();
  }
  if (b.start_ms == 0 || b.first_step_ms == 0) {
    o.error = "the resumed attempt's log has no stamps";
    return o;
  }
  o.down_s = (b.first_step_ms - t_event) / 1000.0;
  o.muster_s = (b.start_ms - t_event) / 1000.0;
  o.startup_s = (b.first_step_ms - b.start_ms) / 1000.0;
  o.lost_steps = a.last_step - std::max<int64_t>(b.resume, 0);
  o.step_ms = finetune.empty() ? a.MeanStepMs() : progress_step_ms;
  o.source = b.source;
  o.copy_mean_ms = a.copy_mean_ms;
  o.copy_max_ms = a.copy_max_ms;
  o.release_mean_ms = a.release_mean_ms;
  o.snapshot_kib = a.snapshot_kib;
  if (snap.snapshots || ft_snapshots) {
    const std::string mark = "it last put job " + *job + " rank ";
    const std::string offers = "snapshots of " + *job + " to peer ";
    double offered = 0, sent = 0;
    std::error_code lec;
    for (const auto& e : fs::directory_iterator(dir, lec)) {
      if (e.path().extension() != ".log" || e.path().filename() == "coord.log") continue;
      std::ifstream in(e.path());
      std::map<int64_t, int64_t> newest;  // rank -> the last step logged
      for (std::string line; std::getline(in, line);) {
        if (auto at = line.find(offers); at != std::string::npos) {
          auto of = line.find(" frames offered, ", at);
          double mib = 0, sent_mib = 0;
          if (of != std::string::npos &&
              std::sscanf(line.c_str() + of, " frames offered, %lf MiB, of which %lf MiB", &mib,
                          &sent_mib) == 2) {
            offered += mib;
            sent += sent_mib;
          }
        }
        auto m = line.find(mark);
        long long rank = -1, step = -1;
        if (m != std::string::npos &&
            std::sscanf(line.c_str() + m + mark.size(), "%lld step %lld", &rank, &step) == 2)
          newest[rank] = step;
      }
      for (const auto& [rank, step] : newest)
        if (o.peer_step < 0 || step < o.peer_step) o.peer_step = step;
    }
    if (o.peer_step >= 0) o.peer_lag_steps = a.last_step - o.peer_step;
    if (offered > 0) {
      o.offered_mib = offered;
      o.offered_sent_pct = 100.0 * sent / offered;
    }
  }
  (void)c.client().Cancel(*job);
  std::error_code ec;
  fs::remove_all(dir, ec);
  return o;
}

// mpirun -np 2 of the same trainer, from launch to its first step (median of `reps`).
double MpirunFirstStep(int step_ms, int reps) {
  std::vector<double> s;
  for (int i = 0; i < reps; ++i) {
    fs::path log = fs::temp_directory_path() / ("muster-bench-mpirun-" + std::to_string(getpid()));
    fs::remove(log);
    std::string script = "echo T_FIRST=$(date +%s%3N)";
    int64_t t0 = UnixMs();
    pid_t pid = Spawn({"mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "sh", "-c",
                       "sleep " + Fmt(step_ms / 1000.0, 3) + "; " + script},
                      log.string());
    int st;
    waitpid(pid, &st, 0);
    std::ifstream in(log);
    std::string line;
    int64_t first = 0;
    while (std::getline(in, line)) {
      if (line.rfind("T_FIRST=", 0) == 0) {
        int64_t t = std::atoll(line.c_str() + 8);
        if (first == 0 || t < first) first = t;
      }
    }
    fs::remove(log);
    if (first == 0) return -1;
    s.push_back((first - t0) / 1000.0);
  }
  std::sort(s.begin(), s.end());
  return s.empty() ? -1 : s[s.size() / 2];
}

// `muster-bench recovery --compare-snapshot-cpu`: the fine-tune's kill -9 without snapshots,
// with snapshots at --snapshot-cpu normal and with background, alternated `runs` times (the load
// of a shared machine drifts between runs, not between the three of one round).
template <typename Flags>
int CompareSnapshotCpu(const Flags& f, const std::string& muster, const std::string& ft) {
  if (ft.empty()) {
    std::cerr << "muster-bench recovery: --compare-snapshot-cpu needs the fine-tune\n";
    return 2;
  }
  struct Series {
    std::vector<double> step_ms, agent_cpu, rank_cpu, idle;
    std::vector<int64_t> lost, lag;
    std::vector<double> sent_pct;
    std::vector<std::string> errors;
    void Add(const Outcome& o) {
      if (!o.error.empty()) {
        errors.push_back(o.error);
        return;
      }
      step_ms.push_back(o.step_ms);
      agent_cpu.push_back(o.agent_cpu_ms_per_step);
      rank_cpu.push_back(o.rank_cpu_ms_per_step);
      idle.push_back(o.idle_pct);
      lost.push_back(o.lost_steps);
      lag.push_back(o.peer_lag_steps);
      sent_pct.push_back(o.offered_sent_pct);
    }
  };
  const std::vector<std::string> classes = {"normal", "background"};
  // The median over the runs whose agents logged their offers (-1: none logged), and how many
  // did when not all.
  auto sent_pct_cell = [](const std::vector<double>& runs) -> std::string {
    std::vector<double> known;
    for (double v : runs)
      if (v >= 0) known.push_back(v);
    if (known.empty()) return "-";
    std::sort(known.begin(), known.end());
    std::string s = Fmt(known[known.size() / 2], 1);
    if (known.size() < runs.size()) {
      s += " (" + std::to_string(known.size()) + " of " + std::to_string(runs.size()) + " runs)";
    }
    return s;
  };
  Series off;
  std::map<std::string, Series> on;
  for (int i = 0; i < f.finetune_cost_runs; ++i) {
    ExtraAgentArgs() = {"--snapshot-cpu", "normal"};
    off.Add(Measure(muster, false, f.step_ms, f.ckpt_every, f.at, f.hb_timeout_ms, ft));
    for (const auto& c : classes) {
      ExtraAgentArgs() = {"--snapshot-cpu", c};
      on[c].Add(Measure(muster, false, f.step_ms, f.ckpt_every, f.at, f.hb_timeout_ms, ft, {},
                        false, true));
    }
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? -1.0 : v[v.size() / 2];
  };
  const double base = median(off.step_ms);
  nlohmann::json j;
  j["runs"] = f.finetune_cost_runs;
  j["step_ms_without_snapshots"] = base;
  j["step_ms_without_snapshots_runs"] = off.step_ms;
  j["idle_cpu_pct_without_snapshots"] = median(off.idle);
  j["rank_cpu_ms_per_step_without_snapshots"] = median(off.rank_cpu);
  j["agent_cpu_ms_per_step_without_snapshots"] = median(off.agent_cpu);
  if (!off.errors.empty()) j["errors_without_snapshots"] = off.errors;
  Table t({"snapshot CPU", "step ms", "cost %", "agents' CPU ms/step", "ranks' CPU ms/step",
           "idle CPU %", "lost steps per run", "peer lag per run", "offered bytes sent %",
           "errors"});
  t.Row({"(no snapshots)", Fmt(base, 1), "-", Fmt(median(off.agent_cpu), 1),
         Fmt(median(off.rank_cpu), 1), Fmt(median(off.idle), 1), "-", "-", "-",
         std::to_string(off.errors.size())});
  bool ok = off.errors.empty();
  for (const auto& c : classes) {
    const Series& s = on[c];
    const double ms = median(s.step_ms);
    const double cost = ms > 0 && base > 0 ? 100.0 * (ms / base - 1.0) : -1;
    ok = ok && s.errors.empty();
    j[c] = {{"step_ms", ms},
            {"step_ms_runs", s.step_ms},
            {"step_cost_pct", cost},
            {"agent_cpu_ms_per_step", median(s.agent_cpu)},
            {"rank_cpu_ms_per_step", median(s.rank_cpu)},
            {"idle_cpu_pct", median(s.idle)},
            {"lost_steps_runs", s.lost},
            {"peer_lag_steps_runs", s.lag},
            {"offered_sent_pct_runs", s.sent_pct}};
    if (!s.errors.empty()) j[c]["errors"] = s.errors;
    t.Row({c, Fmt(ms, 1), Fmt(cost, 1), Fmt(median(s.agent_cpu), 1), Fmt(median(s.rank_cpu), 1),
           Fmt(median(s.idle), 1), nlohmann::json(s.lost).dump(), nlohmann::json(s.lag).dump(),
           sent_pct_cell(s.sent_pct), std::to_string(s.errors.size())});
  }
  if (f.json) {
    std::cout << j.dump(2) << "\n";
  } else {
    t.Print();
    std::cout << "the fine-tune's kill -9 at step " << f.at << ", " << f.finetune_cost_runs
              << " runs of each, alternated; medians; the peer lag is how far the survivor's "
                 "copy of the lost rank was behind the gang's last step\n";
  }
  return ok ? 0 : 1;
}

}  // namespace

void AddRecoveryBench(CLI::App& app, Runner* runner) {
  // For the sh trainer: commits one small real step (hidden; not a benchmark).
  auto* ws = app.add_subcommand("write-step", "")->group("");
  auto ws_args = std::make_shared<std::pair<std::string, int64_t>>();
  ws->add_option("dir", ws_args->first)->required();
  ws->add_option("step", ws_args->second)->required();
  ws->callback([=] {
    *runner = [=] {
      checkpoint::CheckpointerOptions o;
      o.dir = ws_args->first;
      o.direct_io = false;
      o.io_threads = 1;
      auto ck = checkpoint::Checkpointer::Create(o);
      std::vector<float> w(1024, static_cast<float>(ws_args->second));
      checkpoint::SaveState state;
      state.tensors.push_back(
          checkpoint::TensorRef::Replicated("w", checkpoint::DType::kF32, {1024}, w.data()));
      Status st = ck.ok() ? (*ck)->Save(ws_args->second, state) : ck.status();
      if (st.ok()) st = (*ck)->Wait();
      if (!st.ok()) std::cerr << "write-step: " << st.ToString() << "\n";
      return st.ok() ? 0 : 1;
    };
  });
  auto* cmd = app.add_subcommand(
      "recovery",
      "Preemption with notice and agent kill -9 on real daemons: downtime and lost steps, "
      "beside an mpirun restart of the same program");
  struct Flags {
    std::string muster, trainer = "finetune", finetune;
    int step_ms = 50, ckpt_every = 10, at = 25, hb_timeout_ms = 1000;
    int replacement_after_ms = 0;
    bool json = false;
    std::string snapshot_trainer;
    int snapshot_state_kb = 4096;
    bool no_snapshots = false;
    int finetune_cost_runs = 1;
    std::string snapshot_cpu;
    bool finetune_only = false;
    bool compare_snapshot_cpu = false;
  };
  auto f = std::make_shared<Flags>();
  cmd->add_option("--muster", f->muster, "the muster binary (default: beside muster-bench)");
  cmd->add_option("--step-ms", f->step_ms, "the trainer's step time")->capture_default_str();
  cmd->add_option("--ckpt-every", f->ckpt_every, "checkpoint interval in steps")
      ->capture_default_str();
  cmd->add_option("--at", f->at, "interrupt at this step")->capture_default_str();
  cmd->add_option("--heartbeat-timeout-ms", f->hb_timeout_ms, "the coordinator's")
      ->capture_default_str();
  cmd->add_option("--trainer", f->trainer,
                  "finetune (the C++ fine-tune, a real gang with real checkpoints) or sh (a "
                  "shell loop: muster's own overhead alone)")
      ->check(CLI::IsMember({"finetune", "sh"}))
      ->capture_default_str();
  cmd->add_option("--finetune", f->finetune, "the muster-finetune binary (default: found)");
  cmd->add_option("--snapshot-trainer", f->snapshot_trainer,
                  "the muster-snapshot-trainer binary for the in-memory snapshot rows (default: "
                  "found in the build)");
  cmd->add_option("--snapshot-state-kb", f->snapshot_state_kb,
                  "the snapshot trainer's state per rank, KiB")
      ->capture_default_str();
  cmd->add_flag("--no-snapshots", f->no_snapshots, "skip the in-memory snapshot rows");
  cmd->add_option("--replacement-after-ms", f->replacement_after_ms,
                  "the no-free-node rows: the lost node's replacement registers this long after "
                  "the kill")
      ->check(CLI::Range(0, 600000))
      ->capture_default_str();
  cmd->add_option("--finetune-cost-runs", f->finetune_cost_runs,
                  "the fine-tune's step time with and without snapshots: the median of this many "
                  "runs of each, alternated (the first pair is the kill -9 rows)")
      ->check(CLI::Range(1, 20))
      ->capture_default_str();
  cmd->add_option("--snapshot-cpu", f->snapshot_cpu,
                  "the agents' --snapshot-cpu (default: the agent's own default)")
      ->check(CLI::IsMember({"background", "normal"}));
  cmd->add_flag("--finetune-only", f->finetune_only,
                "only the fine-tune's kill -9 rows, without and with snapshots (the step-time "
                "cost); no notice, spare, no-free-node or snapshot trainer rows, no mpirun");
  cmd->add_flag("--compare-snapshot-cpu", f->compare_snapshot_cpu,
                "only the fine-tune's kill -9, --finetune-cost-runs times each of: without "
                "snapshots, with snapshots and --snapshot-cpu normal, with snapshots and "
                "background, alternated; a table per class (step-time cost, lost steps, the "
                "peer's lag)");
  cmd->add_flag("--json", f->json, "print JSON");
  cmd->callback([=] {
    *runner = [=] {
      log::InitLogging("error").IgnoreError();
      if (!f->snapshot_cpu.empty()) ExtraAgentArgs() = {"--snapshot-cpu", f->snapshot_cpu};
      if (f->finetune_only && (f->trainer != "finetune" || f->no_snapshots)) {
        std::cerr << "muster-bench recovery: --finetune-only needs the fine-tune and snapshots\n";
        return 2;
      }
      std::string muster = FindMuster(f->muster);
      std::string ft;
      if (f->trainer == "finetune") {
        ft = f->finetune;
        std::error_code ec;
        fs::path self = fs::read_symlink("/proc/self/exe", ec).parent_path();
        if (ft.empty() && fs::exists(self / ".." / "examples" / "finetune" / "muster-finetune", ec))
          ft =
              fs::canonical(self / ".." / "examples" / "finetune" / "muster-finetune", ec).string();
        if (ft.empty()) {
          std::cerr << "muster-bench recovery: muster-finetune not found (built with libtorch?); "
                       "use --trainer sh or --finetune PATH\n";
          return 2;
        }
      }
      // A row not run (--finetune-only) says so instead of a figure.
      Outcome skipped;
      skipped.error = "not run (--finetune-only)";
      const bool all = !f->finetune_only;
      if (f->compare_snapshot_cpu) return CompareSnapshotCpu(*f, muster, ft);
      Outcome notice =
          all ? Measure(muster, true, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, ft)
              : skipped;
      Outcome kill = Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, ft);
      Outcome spare = all ? Measure(muster, false, f->step_ms, f->ckpt_every, f->at,
                                    f->hb_timeout_ms, ft, {}, true)
                          : skipped;
      // No free node when the agent dies: what the spare is for. Without it the job waits for
      // the lost node's replacement to register.
      Outcome no_free =
          all ? Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, ft, {},
                        false, false, f->replacement_after_ms)
              : skipped;
      Outcome spare_no_free =
          all ? Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, ft, {},
                        true, false, f->replacement_after_ms)
              : skipped;
      // The fine-tune itself with snapshots of its whole train state every step: the kill -9
      // above is its volume-only twin (same job otherwise), whose step time is the baseline.
      std::optional<Outcome> ft_snap;
      if (!ft.empty() && !f->no_snapshots) {
        ft_snap = Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, ft, {},
                          false, true);
      }
      // Step times and the agents' own CPU per step, volume only and with snapshots: the kill
      // -9 rows, then more runs of each, alternated (the load of a shared machine drifts).
      std::vector<double> ft_off_ms{kill.step_ms}, ft_on_ms, ft_off_cpu{kill.agent_cpu_ms_per_step},
          ft_on_cpu, ft_off_idle{kill.idle_pct}, ft_on_idle, ft_off_rcpu{kill.rank_cpu_ms_per_step},
          ft_on_rcpu;
      std::vector<int64_t> ft_on_lost, ft_on_lag;
      if (ft_snap) {
        ft_on_ms.push_back(ft_snap->step_ms);
        ft_on_cpu.push_back(ft_snap->agent_cpu_ms_per_step);
        ft_on_idle.push_back(ft_snap->idle_pct);
        ft_on_rcpu.push_back(ft_snap->rank_cpu_ms_per_step);
        ft_on_lost.push_back(ft_snap->lost_steps);
        ft_on_lag.push_back(ft_snap->peer_lag_steps);
        for (int i = 1; i < f->finetune_cost_runs; ++i) {
          Outcome off =
              Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, ft);
          Outcome on = Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms,
                               ft, {}, false, true);
          ft_off_ms.push_back(off.step_ms);
          ft_off_cpu.push_back(off.agent_cpu_ms_per_step);
          ft_on_ms.push_back(on.step_ms);
          ft_on_cpu.push_back(on.agent_cpu_ms_per_step);
          ft_off_idle.push_back(off.idle_pct);
          ft_on_idle.push_back(on.idle_pct);
          ft_off_rcpu.push_back(off.rank_cpu_ms_per_step);
          ft_on_rcpu.push_back(on.rank_cpu_ms_per_step);
          ft_on_lost.push_back(on.lost_steps);
          ft_on_lag.push_back(on.peer_lag_steps);
        }
      }
      auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v.empty() ? -1.0 : v[v.size() / 2];
      };
      const double ft_off = median(ft_off_ms), ft_on = median(ft_on_ms);
      const double ft_cost_pct =
          ft_snap && ft_on > 0 && ft_off > 0 ? 100.0 * (ft_on / ft_off - 1.0) : -1;
      const double ft_copy_pct = ft_snap && ft_snap->copy_mean_ms >= 0 && ft_off > 0
                                     ? 100.0 * ft_snap->copy_mean_ms / ft_off
                                     : -1;
      // In-memory peer snapshots: the same kill -9 with the snapshot trainer (a gang that
      // agrees every step), without snapshots and with one every step; the step time of the
      // first attempt of each is the snapshots' cost.
      std::string st_bin = f->snapshot_trainer;
      if (st_bin.empty() && !f->no_snapshots && all) {
        std::error_code ec;
        fs::path self = fs::read_symlink("/proc/self/exe", ec).parent_path();
        fs::path p = self / ".." / "tests" / "integration" / "muster-snapshot-trainer";
        if (fs::exists(p, ec)) st_bin = fs::canonical(p, ec).string();
      }
      std::optional<Outcome> snap_off, snap_on, snap_spare;
      if (!st_bin.empty() && !f->no_snapshots) {
        snap_off = Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, "",
                           {st_bin, false, f->snapshot_state_kb});
        snap_on = Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, "",
                          {st_bin, true, f->snapshot_state_kb});
        // Both: the spare takes the lost node's rank and fetches that rank's frame from the
        // survivor, which holds it as the lost node's ring peer.
        snap_spare = Measure(muster, false, f->step_ms, f->ckpt_every, f->at, f->hb_timeout_ms, "",
                             {st_bin, true, f->snapshot_state_kb}, true);
      }
      const double cost_pct = snap_on && snap_off && snap_on->step_ms > 0 && snap_off->step_ms > 0
                                  ? 100.0 * (snap_on->step_ms / snap_off->step_ms - 1.0)
                                  : -1;
      double mpirun = all ? MpirunFirstStep(f->step_ms, 3) : -1;
      if (f->json) {
        nlohmann::json j = {{"notice_to_resume_s", notice.down_s},
                            {"notice_muster_s", notice.muster_s},
                            {"notice_startup_s", notice.startup_s},
                            {"lost_steps_with_notice", notice.lost_steps},
                            {"failure_to_resume_s", kill.down_s},
                            {"failure_muster_s", kill.muster_s},
                            {"failure_startup_s", kill.startup_s},
                            {"lost_steps_without_notice", kill.lost_steps},
                            {"failure_spare_to_resume_s", spare.down_s},
                            {"failure_spare_muster_s", spare.muster_s},
                            {"failure_spare_startup_s", spare.startup_s},
                            {"lost_steps_without_notice_spare", spare.lost_steps},
                            {"mpirun_launch_to_first_step_s", mpirun},
                            {"heartbeat_timeout_ms", f->hb_timeout_ms},
                            {"trainer", f->trainer},
                            {"checkpoint_every", f->ckpt_every}};
        j["failure_no_free_node_to_resume_s"] = no_free.down_s;
        j["failure_no_free_node_muster_s"] = no_free.muster_s;
        j["lost_steps_without_notice_no_free_node"] = no_free.lost_steps;
        j["failure_spare_no_free_node_to_resume_s"] = spare_no_free.down_s;
        j["failure_spare_no_free_node_muster_s"] = spare_no_free.muster_s;
        j["lost_steps_without_notice_spare_no_free_node"] = spare_no_free.lost_steps;
        j["replacement_after_ms"] = f->replacement_after_ms;
        if (!notice.error.empty()) j["notice_error"] = notice.error;
        if (!kill.error.empty()) j["failure_error"] = kill.error;
        if (!spare.error.empty()) j["failure_spare_error"] = spare.error;
        if (!no_free.error.empty()) j["failure_no_free_node_error"] = no_free.error;
        if (!spare_no_free.error.empty())
          j["failure_spare_no_free_node_error"] = spare_no_free.error;
        if (ft_snap) {
          j["failure_finetune_snapshots_to_resume_s"] = ft_snap->down_s;
          j["failure_finetune_snapshots_muster_s"] = ft_snap->muster_s;
          j["failure_finetune_snapshots_startup_s"] = ft_snap->startup_s;
          j["lost_steps_without_notice_finetune_snapshots"] = ft_snap->lost_steps;
          j["finetune_snapshots_resumed_from"] = ft_snap->source;
          j["finetune_step_ms_without_snapshots"] = ft_off;
          j["finetune_step_ms_with_snapshots"] = ft_on;
          j["finetune_step_ms_without_snapshots_runs"] = ft_off_ms;
          j["finetune_step_ms_with_snapshots_runs"] = ft_on_ms;
          j["finetune_agent_cpu_ms_per_step_without_snapshots"] = median(ft_off_cpu);
          j["finetune_agent_cpu_ms_per_step_with_snapshots"] = median(ft_on_cpu);
          j["finetune_idle_cpu_pct_without_snapshots"] = median(ft_off_idle);
          j["finetune_idle_cpu_pct_with_snapshots"] = median(ft_on_idle);
          j["finetune_rank_cpu_ms_per_step_without_snapshots"] = median(ft_off_rcpu);
          j["finetune_rank_cpu_ms_per_step_with_snapshots"] = median(ft_on_rcpu);
          j["snapshot_cpu"] = f->snapshot_cpu.empty() ? "default" : f->snapshot_cpu;
          j["finetune_snapshot_peer_step"] = ft_snap->peer_step;
          j["finetune_snapshot_peer_lag_steps"] = ft_snap->peer_lag_steps;
          j["finetune_snapshot_offered_mib"] = ft_snap->offered_mib;
          j["finetune_snapshot_offered_sent_pct"] = ft_snap->offered_sent_pct;
          // Every kill -9 run with snapshots (the row's, then --finetune-cost-runs' others).
          j["lost_steps_without_notice_finetune_snapshots_runs"] = ft_on_lost;
          j["finetune_snapshot_peer_lag_steps_runs"] = ft_on_lag;
          j["finetune_snapshot_step_cost_pct"] = ft_cost_pct;
          j["finetune_snapshot_copy_ms"] = ft_snap->copy_mean_ms;
          j["finetune_snapshot_copy_max_ms"] = ft_snap->copy_max_ms;
          j["finetune_snapshot_release_ms"] = ft_snap->release_mean_ms;
          j["finetune_snapshot_copy_pct"] = ft_copy_pct;
          j["finetune_snapshot_kib"] = ft_snap->snapshot_kib;
          if (!ft_snap->error.empty()) j["failure_finetune_snapshots_error"] = ft_snap->error;
        }
        if (snap_on && snap_off) {
          j["failure_snapshot_trainer_volume_to_resume_s"] = snap_off->down_s;
          j["lost_steps_without_notice_snapshot_trainer_volume"] = snap_off->lost_steps;
          j["failure_snapshots_to_resume_s"] = snap_on->down_s;
          j["failure_snapshots_muster_s"] = snap_on->muster_s;
          j["failure_snapshots_startup_s"] = snap_on->startup_s;
          j["lost_steps_without_notice_snapshots"] = snap_on->lost_steps;
          j["snapshots_peer_lag_steps"] = snap_on->peer_lag_steps;
          j["snapshots_resumed_from"] = snap_on->source;
          j["step_ms_without_snapshots"] = snap_off->step_ms;
          j["step_ms_with_snapshots"] = snap_on->step_ms;
          j["snapshot_step_cost_pct"] = cost_pct;
          j["snapshot_state_kb"] = f->snapshot_state_kb;
          if (!snap_off->error.empty())
            j["failure_snapshot_trainer_volume_error"] = snap_off->error;
          if (!snap_on->error.empty()) j["failure_snapshots_error"] = snap_on->error;
          j["failure_snapshots_spare_to_resume_s"] = snap_spare->down_s;
          j["failure_snapshots_spare_muster_s"] = snap_spare->muster_s;
          j["lost_steps_without_notice_snapshots_spare"] = snap_spare->lost_steps;
          j["snapshots_spare_resumed_from"] = snap_spare->source;
          if (!snap_spare->error.empty()) j["failure_snapshots_spare_error"] = snap_spare->error;
        }
        std::cout << j.dump(2) << "\n";
      } else {
        Table t({"event", "to resumed step s", "muster part s", "program start-up s", "lost steps",
                 "note"});
        auto row = [&](const std::string& name, const Outcome& o, const std::string& note) {
          if (!o.error.empty()) return t.Row({name, "-", "-", "-", "-", o.error});
          t.Row({name, Fmt(o.down_s), Fmt(o.muster_s), Fmt(o.startup_s),
                 std::to_string(o.lost_steps), note});
        };
        row("preemption notice", notice, "checkpoint on notice, requeue");
        // The agent's connections close: lost after the grace (heartbeat interval + 200 ms),
        // with no heartbeat timeout and no lease fence (docs/protocol.md, "Dead or silent").
        row("agent kill -9", kill, "connections closed + 300 ms grace; no timeout, no fence");
        row("agent kill -9 with a spare", spare,
            "spares: 1; the spare replaces the lost node, no scheduling pass");
        const std::string after = std::to_string(f->replacement_after_ms) + " ms after the kill";
        row("agent kill -9, no free node", no_free,
            "another job holds the third node; waits for the replacement, started " + after);
        row("agent kill -9, no free node, a spare", spare_no_free,
            "the spare is the only node not in the gang; replacement started " + after);
        if (ft_snap) {
          row("agent kill -9, fine-tune with snapshots", *ft_snap,
              "every step, " + std::to_string(ft_snap->snapshot_kib) + " KiB/rank; resumed from " +
                  ft_snap->source + "; step " + Fmt(ft_on, 1) + " ms vs " + Fmt(ft_off, 1) +
                  " ms without (" + Fmt(ft_cost_pct, 1) + "%, median of " +
                  std::to_string(ft_on_ms.size()) + "); stall " + Fmt(ft_snap->copy_mean_ms, 2) +
                  " ms (" + Fmt(ft_copy_pct, 1) + "% of a step; " +
                  Fmt(ft_snap->release_mean_ms, 2) + " ms of it in Release); agents' CPU " +
                  Fmt(median(ft_on_cpu), 1) + " vs " + Fmt(median(ft_off_cpu), 1) +
                  " ms per step; ranks' CPU " + Fmt(median(ft_on_rcpu), 1) + " vs " +
                  Fmt(median(ft_off_rcpu), 1) + " ms per step; idle CPU " +
                  Fmt(median(ft_on_idle), 1) + "% vs " + Fmt(median(ft_off_idle), 1) +
                  "%; the peer held step " + std::to_string(ft_snap->peer_step) + ", " +
                  std::to_string(ft_snap->peer_lag_steps) + " behind; every run's lost steps " +
                  nlohmann::json(ft_on_lost).dump() + ", peer lag " +
                  nlohmann::json(ft_on_lag).dump() +
                  (ft_snap->offered_mib > 0
                       ? "; the peer copies sent " + Fmt(ft_snap->offered_sent_pct, 1) +
                             "% of the " + Fmt(ft_snap->offered_mib, 1) +
                             " MiB offered (the peer held the rest)"
                       : std::string("; no peer copy offered")));
        }
        if (snap_on && snap_off) {
          row("agent kill -9, snapshot trainer, volume only", *snap_off,
              "step " + Fmt(snap_off->step_ms, 1) + " ms");
          row("agent kill -9 with snapshots", *snap_on,
              "every step, " + std::to_string(f->snapshot_state_kb) + " KiB/rank; resumed from " +
                  snap_on->source + "; step " + Fmt(snap_on->step_ms, 1) + " ms (" +
                  Fmt(cost_pct, 1) + "% step-time cost); the peer held step " +
                  std::to_string(snap_on->peer_step) + ", " +
                  std::to_string(snap_on->peer_lag_steps) + " behind");
          row("agent kill -9 with snapshots and a spare", *snap_spare,
              "spares: 1; the spare fetches the lost rank's frame from the survivor; resumed "
              "from " +
                  snap_spare->source);
        }
        t.Row({"anchor: mpirun -np 2 start", mpirun < 0 ? "-" : Fmt(mpirun), "-", "-", "-",
               "launch to first step, by hand"});
        t.Print();
        std::cout << "trainer " << f->trainer << "; checkpoint every " << f->ckpt_every << " steps"
                  << (f->trainer == "sh" ? " of " + std::to_string(f->step_ms) + " ms" : "")
                  << "; interrupted at step " << f->at << "\n";
      }
      if (!all) {
        // Only the rows run decide the exit status.
        notice.error.clear();
        spare.error.clear();
        no_free.error.clear();
        spare_no_free.error.clear();
      }
      bool snap_ok = !snap_on || (snap_on->error.empty() && snap_off->error.empty() &&
                                  snap_spare->error.empty());
      const bool ft_ok = !ft_snap || ft_snap->error.empty();
      return notice.error.empty() && kill.error.empty() && spare.error.empty() &&
                     no_free.error.empty() && spare_no_free.error.empty() && snap_ok && ft_ok
                 ? 0
                 : 1;
    };
  });
}

}  // namespace muster::bench
