#include "coordinator/providers/slurm_provider.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string_view>

#include "common/logging.h"
#include "common/strings.h"

extern char** environ;

namespace muster::coordinator::providers {
namespace {

namespace fs = std::filesystem;
constexpr std::chrono::seconds kToolTimeout{30};
// A ledger line for an sbatch not yet answered: this prefix and the Slurm job's unique name.
constexpr std::string_view kIntentPrefix = "name:";

auto Logger() {
  static auto l = log::Get("coord.slurm");
  return l;
}

// Single quotes for a shell word.
std::string Sh(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

StatusOr<std::string> RunTool(const std::vector<std::string>& argv,
                              std::chrono::milliseconds timeout) {
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0) return UnavailableError("pipe failed");
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(out[0]);
    close(out[1]);
    return UnavailableError("pipe failed");
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawnp(&pid, args[0], &fa, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(out[1]);
  close(err[1]);
  if (rc != 0) {
    close(out[0]);
    close(err[0]);
    return UnavailableError(fmt::format("cannot run {}: {}", argv[0], strerror(rc)));
  }
  std::string so, se;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  bool timed_out = false;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    if (poll(fds, 2, static_cast<int>(left.count())) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? so : se).append(buf, n);
      } else {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) close(f.fd);
  }
  if (timed_out) kill(pid, SIGKILL);
  int st = 0;
  waitpid(pid, &st, 0);
  if (timed_out)
    return UnavailableError(
        fmt::format("{} did not answer within {} s", argv[0], timeout.count() / 1000));
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
    return UnavailableError(
        fmt::format("{} failed ({}): {}", argv[0], WIFEXITED(st) ? WEXITSTATUS(st) : -1, Trim(se)));
  return so;
}

SlurmProvider::SlurmProvider(ProviderConfig config, AgentLaunch launch)
    : config_(std::move(config)), launch_(std::move(launch)) {
  nonce_ = fmt::format("{:08x}", std::random_device{}());
  worker_ = std::thread([this] { WorkerLoop(); });
}

std::set<uint64_t> SlurmProvider::Adopt(ProviderLedger* ledger, const KeepFn& keep) {
  ledger_db_ = ledger;
  std::vector<LedgerEntry> entries;
  if (auto loaded = ledger->Load(config_.name); loaded.ok()) {
    entries = std::move(*loaded);
  } else {
    Logger()->error(
        "provider {}: its ledger is not read ({}): what an earlier coordinator "
        "left in Slurm is neither adopted nor scancelled",
        config_.name, loaded.status().ToString());
  }
  // The file an older coordinator kept: its jobs go back, as they did then.
  fs::path legacy = fs::path(config_.slurm.work_dir) / "allocations";
  {
    std::ifstream f(legacy);
    for (std::string job; f >> job;) entries.push_back({job, 0, {}});
  }
  std::set<uint64_t> adopted;
  std::set<std::string> left;
  std::vector<std::pair<uint64_t, std::string>> intents;  // adopted, to look up by name
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& e : entries) {
      ledger_[e.key] = e;
      bool intent = e.key.rfind(kIntentPrefix, 0) == 0;
      if (e.request == 0 || allocs_.count(e.request) || !keep(e.request, e.nodes)) {
        left.insert(e.key);
        continue;
      }
      Alloc& a = allocs_[e.request];
      a.adopted = true;
      a.nodes.insert(e.nodes.begin(), e.nodes.end());
      if (intent) {
        a.name = e.key.substr(kIntentPrefix.size());
        intents.push_back({e.request, e.key});
      } else {
        a.slurm_job = e.key;
      }
      adopted.insert(e.request);
      Logger()->info("provider {}: adopted {} of request {} (nodes {})", config_.name, e.key,
                     e.request, fmt::join(e.nodes, ","));
    }
    // (An unreadable ledger is not overwritten until this process records something.)
    ledger_dirty_ = !entries.empty();
    // Before any request of this process: the leftovers go back, the intents are looked up.
    work_.push_back([this, left] { CancelLeftovers(left); });
    for (const auto& [id, key] : intents) {
      std::string name = key.substr(kIntentPrefix.size());
      work_.push_back([this, id, key, name] { ResolveIntent(id, key, name); });
    }
  }
  cv_.notify_all();
  if (FlushLedger().ok() && fs::exists(legacy)) {
    std::error_code ec;
    fs::remove(legacy, ec);
  }
  return adopted;
}

Status SlurmProvider::FlushLedger() {
  if (ledger_db_ == nullptr) return Status::Ok();
  std::vector<LedgerEntry> entries;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!ledger_dirty_) return Status::Ok();
    for (const auto& [key, e] : ledger_) entries.push_back(e);
    ledger_dirty_ = false;
  }
  Status st = ledger_db_->Save(config_.name, entries);
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    ledger_dirty_ = true;
    Logger()->error("provider {}: ledger not saved: {}", config_.name, st.ToString());
  }
  return st;
}

void SlurmProvider::ResolveIntent(uint64_t id, const std::string& intent, const std::string& name) {
  std::string bin = config_.slurm.bin_dir.empty() ? "" : config_.slurm.bin_dir + "/";
  auto out = RunTool({bin + "squeue", "-h", "-o", "%i", "--name", name}, kToolTimeout);
  if (!out.ok()) {
    // Unknown for now: a Cancel (the request's deadline) scancels it by name.
    Logger()->warn("provider {}: squeue --name {}: {}", config_.name, name, out.status().message());
    return;
  }
  std::string job;
  std::istringstream(*out) >> job;
  std::lock_guard<std::mutex> l(mu_);
  auto it = allocs_.find(id);
  if (job.empty()) {
    // sbatch never submitted it (or it ended already): the request's try failed. Its name is
    // scancelled all the same (it leaves the ledger when that succeeds).
    work_.push_front([this, intent, name] { ScancelByName(intent, name); });
    if (it != allocs_.end() && !it->second.cancelled) {
      failures_.push_back({id, fmt::format("Slurm has no job {}: the sbatch in flight when the "
                                           "coordinator restarted submitted nothing",
                                           name)});
    }
    if (it != allocs_.end()) allocs_.erase(it);
    return;
  }
  auto entry = ledger_.find(intent);
  LedgerEntry e = entry != ledger_.end() ? entry->second : LedgerEntry{intent, id, {}};
  e.key = job;
  ledger_.erase(intent);
  ledger_[job] = e;
  ledger_dirty_ = true;
  if (it == allocs_.end()) {
    work_.push_front([this, job] { CancelLeftovers({job}); });
    return;
  }
  it->second.slurm_job = job;
  Logger()->info("provider {}: request {} is Slurm job {} ({})", config_.name, id, job, name);
  if (it->second.cancelled) work_.push_front([this, id] { Scancel(id); });
}

void SlurmProvider::CancelLeftovers(const std::set<std::string>& left) {
  if (left.empty()) return;
  std::string bin = config_.slurm.bin_dir.empty() ? "" : config_.slurm.bin_dir + "/";
  std::set<std::string> gone;  // scancelled, or ended by themselves
  for (const auto& job : left) {
    bool by_name = job.rfind(kIntentPrefix, 0) == 0;
    // An intent: sbatch had not answered when the coordinator died; the job has that name.
    auto r = by_name ? RunTool({bin + "scancel", "--name", job.substr(kIntentPrefix.size())},
                               kToolTimeout)
                     : RunTool({bin + "scancel", job}, kToolTimeout);
    if (r.ok()) {
      Logger()->warn(
          "provider {}: scancelled Slurm job {}, an allocation a previous coordinator left",
          config_.name, job);
      gone.insert(job);
      continue;
    }
    const std::string& why = r.status().message();
    if (why.find("Invalid job id") != std::string::npos ||
        why.find("already completing or completed") != std::string::npos) {
      gone.insert(job);  // it ended by itself
      continue;
    }
    // Stays in the ledger: tried again at the next start.
    Logger()->error("provider {}: Slurm job {}, left by a previous coordinator, not scancelled: {}",
                    config_.name, job, why);
  }
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& job : gone) ledger_.erase(job);
  ledger_dirty_ = true;
}

SlurmProvider::~SlurmProvider() {
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [id, a] : allocs_) {
      if (a.cancelled) continue;
      a.cancelled = true;
      uint64_t rid = id;
      work_.push_back([this, rid] { Scancel(rid); });
    }
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
  FlushLedger().IgnoreError();  // what the scancels ended is not left for the next start
}

void SlurmProvider::Post(std::function<void()> work) {
  {
    std::lock_guard<std::mutex> l(mu_);
    work_.push_back(std::move(work));
  }
  cv_.notify_all();
}

void SlurmProvider::WorkerLoop() {
  for (;;) {
    std::function<void()> w;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !work_.empty(); });
      if (work_.empty()) return;  // stop_ and nothing left
      w = std::move(work_.front());
      work_.pop_front();
    }
    w();
  }
}

std::string SlurmProvider::BatchScript(const NodeGroupRequest& req) const {
  std::string agent = fmt::format(
      "{} agent --coordinator {} --provider {} --name \"$1\" --gpus {} --slots {} --work-dir "
      "{}/\"$1\"",
      Sh(launch_.muster_bin), Sh(launch_.coordinator), Sh(config_.name), config_.node.gpus,
      config_.node.slots, Sh(config_.slurm.work_dir));
  const NodeTemplate& t = config_.node;
  std::string mkdirs = Sh(config_.slurm.work_dir) + "/\"$1\"";
  if (!t.region.empty()) agent += " --region " + Sh(t.region);
  if (!t.island.empty()) agent += " --island " + Sh(t.island);
  if (!t.gpu_type.empty()) agent += " --gpu-type " + Sh(t.gpu_type);
  for (const auto& [vol, path] : t.volumes) {
    // "{node}" in a path becomes the node's name ("$1" in the script).
    std::string word = Sh(vol + "="), rest = path;
    for (size_t at; (at = rest.find("{node}")) != std::string::npos; rest.erase(0, at + 6))
      word += Sh(rest.substr(0, at)) + "\"$1\"";
    agent += " --volume " + word + Sh(rest);
    mkdirs += " " + word.substr(Sh(vol + "=").size()) + Sh(rest);
  }
  for (const auto& a : launch_.args) agent += " " + Sh(a);
  if (!config_.slurm.agent_args.empty()) agent += " " + config_.slurm.agent_args;
  std::string names;
  for (const auto& n : req.names) names += (names.empty() ? "" : " ") + n;
  // Each step task picks its name by its node index; volumes with {node} get their own dir.
  std::string per_node = fmt::format(
      "set -- $MUSTER_NODE_NAMES; shift \"$SLURM_NODEID\"; mkdir -p {}; exec {}", mkdirs, agent);
  return fmt::format(
      "#!/bin/bash\n"
      "# muster node group: request {} for job {}\n"
      "export MUSTER_NODE_NAMES={}\n"
      "exec srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c {}\n",
      req.id, req.job, Sh(names), Sh(per_node));
}

Status SlurmProvider::Request(const NodeGroupRequest& req) {
  std::error_code ec;
  fs::create_directories(config_.slurm.work_dir, ec);
  if (ec)
    return UnavailableError(
        fmt::format("cannot create {}: {}", config_.slurm.work_dir, ec.message()));
  fs::path script = fs::path(config_.slurm.work_dir) / fmt::format("request-{}.sh", req.id);
  {
    std::ofstream f(script);
    f << BatchScript(req);
    if (!f) return UnavailableError("cannot write " + script.string());
  }
  std::string bin = config_.slurm.bin_dir.empty() ? "" : config_.slurm.bin_dir + "/";
  // The name is unique to this try, so a coordinator that dies before sbatch answers leaves an
  // intent in the ledger by which the next one finds (and scancels) the allocation.
  const std::string name =
      fmt::format("muster-{}-{}-r{}-{}", config_.name, req.job, req.id, nonce_);
  std::vector<std::string> argv = {
      bin + "sbatch",
      "--parsable",
      "--job-name",
      name,
      "--nodes",
      std::to_string(req.names.size()),
      "--exclusive",
      fmt::format("--signal=TERM@{}", config_.slurm.signal_lead_s),
      "--output",
      (fs::path(config_.slurm.work_dir) / fmt::format("request-{}.out", req.id)).string()};
  if (!config_.slurm.partition.empty())
    argv.insert(argv.end(), {"--partition", config_.slurm.partition});
  if (!config_.slurm.gres.empty()) argv.insert(argv.end(), {"--gres", config_.slurm.gres});
  if (!config_.slurm.time_limit.empty())
    argv.insert(argv.end(), {"--time", config_.slurm.time_limit});
  argv.insert(argv.end(), config_.slurm.extra_args.begin(), config_.slurm.extra_args.end());
  argv.push_back(script.string());
  const std::string intent = std::string(kIntentPrefix) + name;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto& a = allocs_[req.id];
    a.name = name;
    a.nodes.insert(req.names.begin(), req.names.end());
    ledger_[intent] = {intent, req.id, req.names};
    ledger_dirty_ = true;
  }
  // Durable before sbatch runs: the allocation may exist before (or without) its answer.
  if (Status st = FlushLedger(); !st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    ledger_.erase(intent);
    allocs_.erase(req.id);
    return UnavailableError("cannot record the request in the provider ledger: " + st.ToString());
  }
  uint64_t id = req.id;
  std::string provider = config_.name;
  Post([this, argv, id, provider, intent, name] {
    auto out = RunTool(argv, kToolTimeout);
    std::lock_guard<std::mutex> l(mu_);
    if (!out.ok()) {
      // sbatch said no: nothing was submitted. It did not answer: it may have been, so the
      // intent stays for the next start, and the allocation is scancelled by name now.
      if (out.status().message().find("did not answer") == std::string::npos) {
        ledger_.erase(intent);
        ledger_dirty_ = true;
      } else {
        work_.push_front([this, intent, name] { ScancelByName(intent, name); });
      }
      failures_.push_back({id, "sbatch: " + out.status().message()});
      return;
    }
    std::string job = TrimCopy(*out);
    if (auto semi = job.find(';'); semi != std::string::npos) job.resize(semi);  // "id;cluster"
    allocs_[id].slurm_job = job;
    LedgerEntry e = ledger_[intent];
    e.key = job;
    ledger_[job] = e;
    ledger_.erase(intent);
    ledger_dirty_ = true;
    Logger()->info("provider {}: request {} is Slurm job {}", provider, id, job);
    if (allocs_[id].cancelled) work_.push_front([this, id] { Scancel(id); });
  });
  return Status::Ok();
}

void SlurmProvider::ScancelByName(const std::string& intent, const std::string& name) {
  std::string bin = config_.slurm.bin_dir.empty() ? "" : config_.slurm.bin_dir + "/";
  auto r = RunTool({bin + "scancel", "--name", name}, kToolTimeout);
  if (!r.ok()) {
    Logger()->warn("provider {}: scancel --name {}: {}", config_.name, name, r.status().message());
    return;  // left in the ledger: the next coordinator tries again
  }
  std::lock_guard<std::mutex> l(mu_);
  ledger_.erase(intent);
  ledger_dirty_ = true;
}

void SlurmProvider::Scancel(uint64_t id) {
  std::string job;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = allocs_.find(id);
    if (it == allocs_.end()) return;
    job = it->second.slurm_job;
    if (job.empty() && it->second.adopted) {
      // An adopted intent not found (yet) by its name: scancelled by name.
      std::string name = it->second.name;
      allocs_.erase(it);
      work_.push_front([this, name] { ScancelByName(std::string(kIntentPrefix) + name, name); });
      return;
    }
    if (job.empty()) return;  // sbatch has not answered: its reply scancels
    allocs_.erase(it);
  }
  std::string bin = config_.slurm.bin_dir.empty() ? "" : config_.slurm.bin_dir + "/";
  auto r = RunTool({bin + "scancel", job}, kToolTimeout);
  if (!r.ok()) {
    // Left in the ledger: the next coordinator tries again.
    Logger()->warn("provider {}: scancel {}: {}", config_.name, job, r.status().message());
  } else {
    Logger()->info("provider {}: scancelled Slurm job {}", config_.name, job);
    std::lock_guard<std::mutex> l(mu_);
    ledger_.erase(job);
    ledger_dirty_ = true;
  }
}

void SlurmProvider::Cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = allocs_.find(id);
    if (it == allocs_.end() || it->second.cancelled) return;
    it->second.cancelled = true;
  }
  Post([this, id] { Scancel(id); });
}

void SlurmProvider::Release(const std::string& node) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [id, a] : allocs_) {
    if (!a.nodes.count(node)) continue;
    a.released.insert(node);
    if (a.released.size() == a.nodes.size() && !a.cancelled) {
      a.cancelled = true;
      uint64_t rid = id;
      work_.push_back([this, rid] { Scancel(rid); });
      cv_.notify_all();
    }
    return;
  }
}

void SlurmProvider::Watch() {
  std::map<std::string, uint64_t> jobs;  // Slurm job -> request
  {
    std::lock_guard<std::mutex> l(mu_);
    watching_ = false;
    for (const auto& [id, a] : allocs_) {
      if (!a.slurm_job.empty() && !a.cancelled) jobs[a.slurm_job] = id;
    }
  }
  if (jobs.empty()) return;
  std::string ids;
  for (const auto& [job, id] : jobs) ids += (ids.empty() ? "" : ",") + job;
  std::string bin = config_.slurm.bin_dir.empty() ? "" : config_.slurm.bin_dir + "/";
  auto out = RunTool({bin + "squeue", "-h", "-o", "%i %T", "-j", ids}, kToolTimeout);
  if (!out.ok()) return;  // the controller may be busy: next time
  std::set<std::string> alive;
  std::istringstream in(*out);
  for (std::string job, state; in >> job >> state;) {
    if (state != "COMPLETING" && state != "COMPLETED" && state != "FAILED" &&
        state != "CANCELLED" && state != "TIMEOUT" && state != "NODE_FAIL" &&
        state != "PREEMPTED" && state != "OUT_OF_MEMORY")
      alive.insert(job);
  }
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& [job, id] : jobs) {
    if (alive.count(job)) continue;
    auto it = allocs_.find(id);
    if (it == allocs_.end() || it->second.cancelled) continue;
    // Its agents are gone: a request still waiting for them fails; nodes that were up are
    // lost nodes to the coordinator (heartbeats stop).
    std::ifstream f(fs::path(config_.slurm.work_dir) / fmt::format("request-{}.out", id));
    std::string line, last;
    while (std::getline(f, line)) {
      if (!line.empty()) last = line;
    }
    failures_.push_back({id, fmt::format("Slurm job {} ended{}", job,
                                         last.empty() ? "" : ": " + last.substr(0, 300))});
    allocs_.erase(it);
    ledger_.erase(job);
    ledger_dirty_ = true;
  }
}

std::vector<RequestFailure> SlurmProvider::Poll() {
  FlushLedger().IgnoreError();  // logged; retried at the next Poll
  auto now = std::chrono::steady_clock::now();
  if (now >= next_watch_) {
    next_watch_ = now + std::chrono::seconds(2);
    std::lock_guard<std::mutex> l(mu_);
    if (!watching_ && !allocs_.empty()) {
      watching_ = true;
      work_.push_back([this] { Watch(); });
      cv_.notify_all();
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  std::vector<RequestFailure> out;
  out.swap(failures_);
  for (const auto& f : out) allocs_.erase(f.id);
  return out;
}

}  // namespace muster::coordinator::providers
