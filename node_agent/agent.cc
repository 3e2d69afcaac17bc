#include "node_agent/agent.h"

#include <arpa/inet.h>
#include <fmt/ranges.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "checkpoint/replicate.h"
#include "collectives/store_server.h"
#include "common/curve.h"
#include "common/logging.h"
#include "common/path_name.h"
#include "common/python_path.h"
#include "common/rank_env.h"
#include "common/reactor.h"
#include "coordinator/client.h"
#include "coordinator/job_spec.h"
#include "node_agent/checkpoint_steps.h"
#include "node_agent/lease_watchdog.h"
#include "node_agent/outbox.h"
#include "node_agent/replication_queue.h"
#include "node_agent/supervisor.h"
#include "node_agent/torch_env.h"
#include "node_agent/volume_transfer.h"

#ifdef MUSTER_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace muster::node_agent {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

int64_t UnixMs() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t ToUnixMs(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(t.time_since_epoch()).count();
}

std::string GroupOf(const std::string& job, int attempt) {
  return job + "/" + std::to_string(attempt);
}

// "<server secret>,<client secret>" (coordinator.proto, StartAssignment.rendezvous_key).
struct RdzvKeys {
  KeyPair server, client;
};
StatusOr<RdzvKeys> ParseRdzvKey(const std::string& text) {
  size_t comma = text.find(',');
  if (comma == std::string::npos) return InvalidArgumentError("malformed rendezvous key");
  RdzvKeys k;
  k.server.secret_key = text.substr(0, comma);
  k.client.secret_key = text.substr(comma + 1);
  MUSTER_ASSIGN_OR_RETURN(k.server.public_key, PublicKeyFromSecret(k.server.secret_key));
  MUSTER_ASSIGN_OR_RETURN(k.client.public_key, PublicKeyFromSecret(k.client.secret_key));
  return k;
}

bool ParseDouble(std::string_view v, double* out) {
  try {
    size_t used = 0;
    *out = std::stod(std::string(v), &used);
    return used == v.size();
  } catch (...) {
    return false;
  }
}

bool ParseInt(std::string_view v, int64_t* out) {
  auto r = std::from_chars(v.data(), v.data() + v.size(), *out);
  return r.ec == std::errc() && r.ptr == v.data() + v.size();
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
    s.remove_suffix(1);
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  return s;
}

// Ranks a previous incarnation of this agent started (it was killed -9): their attempt has been
// declared lost and requeued, so they must not run on. Each rank leads its process group. The
// rank itself died with its agent (the supervisor's PR_SET_PDEATHSIG), but processes it
// started may live on in its group. While any member of a group lives the kernel does not
// hand its number out again, so a group whose leader is gone is still this rank's; a leader
// that exists with another start time is an unrelated process that reused the number.
void KillLeftovers(const fs::path& pids_file, const std::shared_ptr<spdlog::logger>& logger) {
  std::ifstream in(pids_file);
  pid_t pid;
  uint64_t start;
  std::string group;
  while (in >> pid >> start >> group) {
    if (pid <= 1 || start == 0) continue;
    uint64_t now = ProcessStartTime(pid);
    if (now != 0 && now != start) continue;  // the number was reused
    if (::kill(-pid, SIGKILL) == 0) {
      logger->warn("killed rank process group {} of {} left by a previous agent", pid, group);
    }
  }
  std::error_code ec;
  fs::remove(pids_file, ec);
}

}  // namespace

std::optional<proto::Progress> ParseProgressLine(std::string_view line) {
  line = Trim(line);
  constexpr std::string_view kTag = "MUSTER_PROGRESS";
  if (line.substr(0, kTag.size()) != kTag) return std::nullopt;
  line.remove_prefix(kTag.size());
  if (!line.empty() && line.front() != ' ' && line.front() != '\t') return std::nullopt;
  proto::Progress p;
  bool have_step = false;
  while (!line.empty()) {
    line = Trim(line);
    size_t end = line.find_first_of(" \t");
    std::string_view tok = line.substr(0, end);
    line = end == std::string_view::npos ? std::string_view() : line.substr(end);
    size_t eq = tok.find('=');
    if (eq == std::string_view::npos) continue;
    std::string_view k = tok.substr(0, eq), v = tok.substr(eq + 1);
    int64_t i = 0;
    double d = 0;
    if (k == "step" && ParseInt(v, &i) && i >= 0) {
      p.set_step(i);
      have_step = true;
    } else if (k == "total" && ParseInt(v, &i) && i >= 0) {
      p.set_total_steps(i);
    } else if (k == "loss" && ParseDouble(v, &d)) {
      p.set_loss(d);
    } else if (k == "throughput" && ParseDouble(v, &d)) {
      p.set_throughput(d);
    } else if (k == "unit") {
      p.set_throughput_unit(std::string(v));
    } else if (k.size() > 6 && k.substr(k.size() - 6) == "_per_s" && ParseDouble(v, &d) &&
               p.throughput_unit().empty()) {
      p.set_throughput(d);
      p.set_throughput_unit(std::string(k.substr(0, k.size() - 6)) + "/s");
    }
  }
  if (!have_step) return std::nullopt;
  return p;
}

std::optional<int64_t> ParseCheckpointLine(std::string_view line) {
  line = Trim(line);
  constexpr std::string_view kTag = "MUSTER_CHECKPOINT step=";
  if (line.substr(0, kTag.size()) != kTag) return std::nullopt;
  line.remove_prefix(kTag.size());
  size_t end = line.find_first_of(" \t");
  int64_t step = 0;
  if (!ParseInt(line.substr(0, end), &step) || step <= 0) return std::nullopt;
  return step;
}

int CountGpus() {
#ifdef MUSTER_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
#else
  return 0;
#endif
}

bool TcpPortInUse(const std::string& address, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (address.empty() || address == "*") {
    a.sin_addr.s_addr = htonl(INADDR_ANY);
  } else if (::inet_pton(AF_INET, address.c_str(), &a.sin_addr) != 1) {
    return false;  // a name, not an address: the bind itself will tell
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  bool in_use = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 && errno == EADDRINUSE;
  ::close(fd);
  return in_use;
}

std::string LocalAddressFor(const std::string& endpoint) {
  // tcp://HOST:PORT
  std::string s = endpoint;
  if (auto p = s.find("://"); p != std::string::npos) s = s.substr(p + 3);
  auto colon = s.rfind(':');
  std::string host = colon == std::string::npos ? s : s.substr(0, colon);
  std::string port = colon == std::string::npos ? "7070" : s.substr(colon + 1);
  if (host.empty() || host == "*" || host == "0.0.0.0") return "127.0.0.1";
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
    return "127.0.0.1";
  }
  std::string out = "127.0.0.1";
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    sockaddr_in local{};
    socklen_t len = sizeof(local);
    char buf[INET_ADDRSTRLEN];
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0 &&
        ::inet_ntop(AF_INET, &local.sin_addr, buf, sizeof(buf)) != nullptr) {
      out = buf;
    }
  }
  if (fd >= 0) ::close(fd);
  ::freeaddrinfo(res);
  return out;
}

// ---------------------------------------------------------------------------------------------

struct Agent::Impl {
  struct Assignment {
    proto::StartAssignment spec;
    std::string group;
    std::map<ChildId, int> rank_of;   // child -> global rank
    std::map<ChildId, pid_t> pid_of;  // child -> its pid, which leads its process group
    std::set<int> live;               // global ranks not yet reaped
    size_t open = 0;                  // children not yet closed
    std::unique_ptr<collectives::StoreServer> store;
    std::string volume_path;
    fs::path notice_path;
    bool stopping = false;  // a stop (or a notice) reached it: exits are not failures
    bool checkpoint_asked = false;
    bool all_exited_sent = false;
    Reactor::TimerId deadline_timer = 0;
    int64_t last_commit = 0;  // the newest step reported as committed
  };

  AgentOptions options;
  proto::NodeLabels labels;
  std::unique_ptr<coordinator::CoordinatorClient> ctl;   // control thread
  std::unique_ptr<coordinator::CoordinatorClient> poll;  // poll thread
  std::shared_ptr<spdlog::logger> logger = log::Get("agent");

  // Reactor thread only.
  std::unique_ptr<Reactor> reactor;
  std::unique_ptr<ZapAuthenticator> zap;
  std::unique_ptr<Supervisor> supervisor;
  std::unique_ptr<VolumeServer> volume_server;
  std::map<std::string, Assignment> assignments;  // by group
  std::map<ChildId, std::string> group_of;
  std::map<std::string, proto::Progress> progress;  // newest per job, not yet sent
  std::optional<PreemptionNotice> notice;

  // Shared between threads.
  mutable std::mutex mu;
  std::condition_variable cv;
  bool stop = false;               // GUARDED_BY(mu)
  std::string session;             // GUARDED_BY(mu)
  milliseconds hb_interval{1000};  // GUARDED_BY(mu)
  milliseconds lease{0};           // GUARDED_BY(mu); 0: not registered yet
  Outbox outbox;                   // GUARDED_BY(mu): reports and log chunks
  // Stops the ranks when the lease runs out, whatever the reactor does (lease_watchdog.h).
  std::unique_ptr<LeaseWatchdog> watchdog;
  // Retention (checkpoint.keep) runs here, off the reactor: job directory -> keep.
  std::thread prune_thread;
  std::map<std::string, int> prune_queue;  // GUARDED_BY(mu)
  std::atomic<bool> ever_registered{false};
  std::thread control_thread, poll_thread;
  // Replications: the running copies' threads (each with its "finished" flag, so finished
  // ones are joined as new ones start) and which copies run or wait (ReplicationQueue).
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>>
      copiers;                    // GUARDED_BY(mu)
  ReplicationQueue replications;  // GUARDED_BY(mu)
  std::unique_ptr<NoticeWatcher> watcher;

  static int64_t SteadyMs() {
    return std::chrono::duration_cast<milliseconds>(Clock::now().time_since_epoch()).count();
  }

  // ---- threads talking to the coordinator

  void Queue(proto::Envelope e) {
    {
      std::lock_guard<std::mutex> l(mu);
      uint64_t dropped = outbox.dropped_log_chunks();
      outbox.Push(std::move(e));
      if (outbox.dropped_log_chunks() != dropped) {
        logger->warn("coordinator away: dropped the oldest log chunk waiting for it ({} so far)",
                     outbox.dropped_log_chunks());
      }
    }
    cv.notify_all();
  }

  void QueueReport(proto::AgentReport r) {
    r.set_node(labels.name());
    proto::Envelope e;
    *e.mutable_agent_report() = std::move(r);
    Queue(std::move(e));
  }

  std::string Session() {
    std::lock_guard<std::mutex> l(mu);
    return session;
  }

  void ForgetSession(const std::string& stale) {
    std::lock_guard<std::mutex> l(mu);
    if (session == stale) session.clear();
  }

  // Heartbeats and reports give up well inside the lease, so a reply that was lost (the
  // coordinator restarted) is asked for again before the lease runs out.
  milliseconds ControlTimeout() {
    std::lock_guard<std::mutex> l(mu);
    if (lease.count() <= 0) return options.call_timeout;
    return std::clamp(lease / 3, milliseconds(200), options.call_timeout);
  }

  void ApplyActions(const google::protobuf::RepeatedPtrField<proto::AgentAction>& actions) {
    for (const auto& a : actions) {
      reactor->Post("agent.action", [this, a] { OnAction(a); });
    }
  }

  bool Register() {
    proto::Envelope req;
    auto* r = req.mutable_agent_register();
    *r->mutable_labels() = labels;
    r->set_agent_version("muster 0.1");
    auto running = reactor->Call("agent.running", [this] { return Running(); });
    for (auto& ra : running) *r->add_running() = std::move(ra);
    auto sent = Clock::now();
    auto reply = ctl->Call(std::move(req), options.call_timeout);
    if (!reply.ok()) {
      logger->warn("register with {} failed: {}", ctl->endpoint(), reply.status().ToString());
      return false;
    }
    const auto& reg = reply->agent_registered();
    {
      std::lock_guard<std::mutex> l(mu);
      session = reg.session_id();
      hb_interval = milliseconds(std::max<int64_t>(50, reg.heartbeat_interval_ms()));
      lease = milliseconds(std::max<int64_t>(reg.lease_ms(), 2 * hb_interval.count()));
      watchdog->Feed(sent, lease);
    }
    bool first = !ever_registered.exchange(true);
    logger->info("{} with {} as {} (session {}, {} assignment(s) running, lease {} ms)",
                 first ? "registered" : "re-registered", ctl->endpoint(), labels.name(),
                 reg.session_id(), running.size(), reg.lease_ms());
    ApplyActions(reg.actions());
    return true;
  }

  void Heartbeat(const std::string& sid) {
    proto::Envelope req;
    auto* h = req.mutable_agent_heartbeat();
    h->set_node(labels.name());
    h->set_session_id(sid);
    auto [running, prog] = reactor->Call("agent.snapshot", [this] {
      auto p = std::move(progress);
      progress.clear();
      return std::make_pair(Running(), std::move(p));
    });
    for (auto& ra : running) *h->add_running() = std::move(ra);
    for (auto& [job, p] : prog) *h->add_progress() = p;
    auto sent = Clock::now();
    auto reply = ctl->Call(std::move(req), ControlTimeout());
    if (!reply.ok()) {
      if (reply.status().code() == StatusCode::kNotFound) {
        // Not a renewal of the lease: the registration that follows is.
        logger->warn("coordinator forgot session {}: registering again", sid);
        ForgetSession(sid);
      } else {
        logger->warn("heartbeat failed: {}", reply.status().ToString());
        // Give the progress back so the next heartbeat carries it.
        reactor->Post("agent.progress_back", [this, prog = std::move(prog)] {
          for (auto& [job, p] : prog) progress.try_emplace(job, p);
        });
      }
      return;
    }
    {
      std::lock_guard<std::mutex> l(mu);
      watchdog->Feed(sent, lease);
    }
    ApplyActions(reply->agent_heartbeat_reply().actions());
  }

  // Sends the oldest outbox message. False when it could not (kept for later).
  bool SendOne(const std::string& sid) {
    proto::Envelope e;
    {
      std::lock_guard<std::mutex> l(mu);
      if (outbox.empty()) return false;
      e = outbox.front();
    }
    if (e.has_agent_report()) e.mutable_agent_report()->set_session_id(sid);
    if (e.has_agent_log_chunk()) e.mutable_agent_log_chunk()->set_session_id(sid);
    auto reply = ctl->Call(e, ControlTimeout());
    if (!reply.ok() && reply.status().code() == StatusCode::kNotFound && e.has_agent_report()) {
      // Unknown session: register again first, then resend.
      ForgetSession(sid);
      return false;
    }
    if (!reply.ok() && (reply.status().code() == StatusCode::kDeadlineExceeded ||
                        reply.status().code() == StatusCode::kUnavailable)) {
      return false;  // coordinator away: keep it
    }
    if (!reply.ok()) {
      logger->warn("coordinator refused a report: {}", reply.status().ToString());
    }
    std::lock_guard<std::mutex> l(mu);
    if (!outbox.empty()) outbox.pop_front();
    return true;
  }

  void ControlLoop() {
    auto next_hb = Clock::now();
    auto retry_at = Clock::now();
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu);
        if (stop && outbox.empty()) return;
      }
      std::string sid = Session();
      if (sid.empty()) {
        if (Clock::now() >= retry_at) {
          if (Register()) {
            next_hb = Clock::now();
            continue;
          }
          retry_at = Clock::now() + milliseconds(500);
        }
        std::unique_lock<std::mutex> l(mu);
        if (stop) return;  // no coordinator: the last reports cannot go anywhere
        cv.wait_until(l, retry_at, [&] { return stop; });
        continue;
      }
      bool sent = false;
      while (SendOne(sid)) sent = true;
      if (Clock::now() >= next_hb) {
        Heartbeat(sid);
        std::lock_guard<std::mutex> l(mu);
        next_hb = Clock::now() + hb_interval;
      }
      std::unique_lock<std::mutex> l(mu);
      if (stop && (outbox.empty() || !sent)) {
        if (outbox.empty()) return;
        // Could not send: one more try after a short pause, then give up.
        cv.wait_for(l, milliseconds(200));
        l.unlock();
        while (SendOne(sid)) {
        }
        return;
      }
      bool outbox_stuck = !outbox.empty();
      auto until = outbox_stuck ? std::min(next_hb, Clock::now() + milliseconds(200)) : next_hb;
      cv.wait_until(l, until, [&] { return stop || (!outbox.empty() && !outbox_stuck); });
    }
  }

  void PollLoop() {
    for (;;) {
      {
        std::lock_guard<std::mutex> l(mu);
        if (stop) return;
      }
      std::string sid = Session();
      if (sid.empty()) {
        std::unique_lock<std::mutex> l(mu);
        cv.wait_for(l, milliseconds(100), [&] { return stop || !session.empty(); });
        continue;
      }
      proto::Envelope req;
      auto* p = req.mutable_agent_poll();
      p->set_node(labels.name());
      p->set_session_id(sid);
      p->set_wait_ms(10000);
      auto reply = poll->Call(std::move(req), milliseconds(10000) + options.call_timeout);
      if (reply.ok()) {
        ApplyActions(reply->agent_actions().actions());
        continue;
      }
      std::unique_lock<std::mutex> l(mu);
      cv.wait_for(l, milliseconds(300), [&] { return stop; });
    }
  }

  // ---- reactor thread

  std::vector<proto::RunningAssignment> Running() {
    std::vector<proto::RunningAssignment> out;
    for (auto& [g, a] : assignments) {
      if (a.live.empty()) continue;
      proto::RunningAssignment ra;
      ra.set_job_id(a.spec.job_id());
      ra.set_attempt(a.spec.attempt());
      ra.set_node_rank(a.spec.node_rank());
      for (int r : a.live) ra.add_live_ranks(r);
      out.push_back(std::move(ra));
    }
    return out;
  }

  void OnAction(const proto::AgentAction& a) {
    switch (a.action_case()) {
      case proto::AgentAction::kStart:
        return StartAssignment(a.start());
      case proto::AgentAction::kStop:
        return StopAssignment(a.stop());
      case proto::AgentAction::kFetchLog:
        return FetchLog(a.fetch_log());
      case proto::AgentAction::kAllowTransfer:
        if (volume_server) {
          Status st = volume_server->Allow(a.allow_transfer().job_id(),
                                           a.allow_transfer().client_public_key(),
                                           a.allow_transfer().expires_ms());
          if (!st.ok()) logger->warn("transfer grant refused: {}", st.ToString());
        }
        return;
      case proto::AgentAction::kRevokeTransfer:
        if (volume_server) {
          volume_server->Revoke(a.revoke_transfer().job_id(),
                                a.revoke_transfer().client_public_key());
        }
        return;
      case proto::AgentAction::kReplicate:
        return StartReplication(a.replicate());
      default:
        logger->warn("ignoring an action this agent does not know (case {})",
                     static_cast<int>(a.action_case()));
    }
  }

  // rank-R.log holds both streams; rank-R.stdout and rank-R.stderr one each (split_streams).
  fs::path LogPath(const std::string& job, int attempt, int rank,
                   proto::LogStream stream = proto::LOG_MERGED) const {
    const char* ext = stream == proto::LOG_STDOUT   ? ".stdout"
                      : stream == proto::LOG_STDERR ? ".stderr"
                                                    : ".log";
    return options.work_dir / "logs" / job / ("attempt-" + std::to_string(attempt)) /
           ("rank-" + std::to_string(rank) + ext);
  }

  // `retryable`: neither the job's fault nor the node's (a port in use); retried elsewhere.
  void StartError(const proto::StartAssignment& s, const std::string& why, bool retryable = false) {
    logger->error("job {} attempt {}: cannot start: {}", s.job_id(), s.attempt(), why);
    proto::AgentReport r;
    r.set_job_id(s.job_id());
    r.set_attempt(s.attempt());
    r.set_start_error(why);
    r.set_start_retryable(retryable);
    r.set_all_exited(true);
    QueueReport(std::move(r));
  }

  void StartAssignment(const proto::StartAssignment& given) {
    proto::StartAssignment s = given;  // the resume step may be corrected below
    // The job id names directories on volumes and under the work directory.
    if (Status st = ValidatePathName(s.job_id(), "job id"); !st.ok()) {
      return StartError(s, st.message());
    }
    std::string group = GroupOf(s.job_id(), s.attempt());
    if (assignments.count(group)) return;  // delivered twice
    if (notice) return StartError(s, "node has a preemption notice (" + notice->source + ")");
    if (s.command_size() == 0 || s.ranks_per_node() <= 0 || s.nnodes() <= 0) {
      return StartError(s, "empty command or no ranks");
    }
    Assignment a;
    a.spec = s;
    a.group = group;
    if (!s.checkpoint_volume().empty()) {
      for (const auto& v : labels.volumes()) {
        if (v.name() == s.checkpoint_volume()) a.volume_path = v.path();
      }
      std::error_code ec;
      if (a.volume_path.empty()) {
        return StartError(s, "volume " + s.checkpoint_volume() + " is not mounted here");
      }
      if (!fs::is_directory(a.volume_path, ec)) {
        return StartError(
            s, "volume " + s.checkpoint_volume() + " at " + a.volume_path + " is not a directory");
      }
    }
    // Never start from a step that is not on this volume: the newest good one there instead.
    std::string resume_fallback;
    if (!a.volume_path.empty() && s.resume_step() >= 0) {
      auto choice =
          ChooseResumeStep((fs::path(a.volume_path) / s.job_id()).string(), s.resume_step());
      if (!choice.problem.empty()) {
        resume_fallback =
            fmt::format("resume step {} is not a good checkpoint on volume {} of {} ({}): {}",
                        s.resume_step(), s.checkpoint_volume(), labels.name(), choice.problem,
                        choice.step >= 0 ? "resuming from step " + std::to_string(choice.step) +
                                               ", the newest good one there"
                                         : std::string("no good step there, starting fresh"));
        logger->warn("job {} attempt {}: {}", s.job_id(), s.attempt(), resume_fallback);
        s.set_resume_step(choice.step);
        (*s.mutable_env())["MUSTER_RESUME_STEP"] =
            choice.step >= 0 ? std::to_string(choice.step) : "";
        a.spec = s;
      }
    }
    // Rendezvous credentials: every node derives the same from the coordinator's key.
    std::string creds = "insecure";
    std::optional<RdzvKeys> keys;
    if (!options.insecure) {
      auto k = ParseRdzvKey(s.rendezvous_key());
      if (!k.ok()) return StartError(s, "rendezvous key: " + k.status().message());
      keys = *k;
      creds =
          "v1," + k->server.public_key + "," + k->client.public_key + "," + k->client.secret_key;
    }
    if (s.host_rendezvous()) {
      // The ports this attempt was given must be free here: the store's, and MASTER_PORT that
      // rank 0's program binds (torch's TCPStore). A port some other program holds is not the
      // job's fault: the coordinator retries on other ports.
      const std::string bind_address =
          labels.address().empty() ? std::string("0.0.0.0") : labels.address();
      std::vector<int> ports = {s.rendezvous_port()};
      if (s.master_port() > 0) ports.push_back(s.master_port());
      for (int port : ports) {
        if (TcpPortInUse(bind_address, port)) {
          return StartError(s, "port " + std::to_string(port) + " is in use on this node", true);
        }
      }
      collectives::StoreServer::Options so;
      so.endpoint = "tcp://" + bind_address + ":" + std::to_string(s.rendezvous_port());
      so.insecure = options.insecure;
      if (keys) so.server_key = keys->server;
      auto store = collectives::StoreServer::Create(*reactor, zap.get(), so);
      if (!store.ok()) {
        return StartError(s,
                          "rendezvous store on port " + std::to_string(s.rendezvous_port()) + ": " +
                              store.status().message(),
                          TcpPortInUse(bind_address, s.rendezvous_port()));
      }
      auto scope = (*store)->AddScope(s.job_id(), s.attempt(), keys ? &keys->client : nullptr);
      if (!scope.ok()) return StartError(s, "rendezvous scope: " + scope.status().message());
      a.store = std::move(*store);
    }
    std::error_code ec;
    fs::create_directories(options.work_dir / "notice", ec);
    a.notice_path =
        options.work_dir / "notice" / (s.job_id() + ".attempt-" + std::to_string(s.attempt()));
    fs::remove(a.notice_path, ec);
    fs::create_directories(LogPath(s.job_id(), s.attempt(), 0).parent_path(), ec);
    if (ec) return StartError(s, "log directory: " + ec.message());

    // The env contract (common/rank_env.h), from the assignment's fields.
    RankEnv contract;
    contract.world_size = s.nnodes() * s.ranks_per_node();
    contract.local_world_size = s.ranks_per_node();
    contract.node_rank = s.node_rank();
    contract.nnodes = s.nnodes();
    contract.master_addr = s.master_addr();
    contract.master_port = s.master_port();
    contract.job_id = s.job_id();
    contract.attempt = s.attempt();
    contract.rdzv_endpoint = "tcp://" + s.master_addr() + ":" + std::to_string(s.rendezvous_port());
    contract.rdzv_key = creds;
    contract.checkpoint_dir =
        a.volume_path.empty() ? "" : (fs::path(a.volume_path) / s.job_id()).string();
    if (s.resume_step() >= 0) contract.resume_step = s.resume_step();
    if (s.checkpoint_every_steps() > 0) contract.checkpoint_every = s.checkpoint_every_steps();
    if (s.checkpoint_every_s() > 0) contract.checkpoint_every_s = s.checkpoint_every_s();
    contract.preempt_file = a.notice_path.string();
    contract.node = labels.name();
    contract.provider = labels.provider();
    contract.control_fd = Supervisor::kControlFd;
    if (Status st = contract.Validate(); !st.ok()) return StartError(s, st.message());
    std::map<std::string, std::string> job_env(s.env().begin(), s.env().end());
    const std::vector<std::string> inherited = ProcessEnviron();
    AddMusterPythonPath(inherited, job_env);  // `import muster` works in every rank
    AddGlooSocketIfname(inherited, s.master_addr(), s.nnodes(), job_env);  // torch's Gloo
    int rpn = s.ranks_per_node();
    int world = contract.world_size;
    for (int local = 0; local < rpn; ++local) {
      int rank = s.node_rank() * rpn + local;
      contract.rank = rank;
      contract.local_rank = local;
      contract.cuda_visible_devices =
          labels.gpus() > 0 ? std::to_string(local % labels.gpus()) : std::string();
      SpawnSpec spec;
      spec.name = std::to_string(rank);
      spec.group = group;
      spec.argv.assign(s.command().begin(), s.command().end());
      spec.env = ComposeRankEnviron(inherited, job_env, contract);
      spec.control_channel = true;
      spec.log_path = LogPath(s.job_id(), s.attempt(), rank).string();
      if (s.split_streams()) {
        spec.stream_log_paths[0] = LogPath(s.job_id(), s.attempt(), rank, proto::LOG_STDOUT);
        spec.stream_log_paths[1] = LogPath(s.job_id(), s.attempt(), rank, proto::LOG_STDERR);
      }
      auto id = supervisor->Spawn(spec);
      if (!id.ok()) {
        supervisor->StopGroup(group, milliseconds(0));
        for (auto& [cid, r] : a.rank_of) group_of[cid] = group;
        a.stopping = true;
        a.all_exited_sent = true;  // the start error below says it all
        a.open = a.rank_of.size();
        std::string why = "rank " + std::to_string(rank) + ": " + id.status().message();
        if (a.open > 0) assignments.emplace(group, std::move(a));
        return StartError(s, why);
      }
      a.rank_of[*id] = rank;
      a.live.insert(rank);
      group_of[*id] = group;
      for (const auto& c : supervisor->List()) {
        if (c.id != *id) continue;
        a.pid_of[*id] = c.pid;
        watchdog->AddGroup(c.pid, group + " rank " + std::to_string(rank));
      }
    }
    a.open = a.rank_of.size();
    SaveRanks();
    logger->info("job {} attempt {}: started ranks {}..{} of {} (node rank {} of {}){}", s.job_id(),
                 s.attempt(), s.node_rank() * rpn, s.node_rank() * rpn + rpn - 1, world,
                 s.node_rank(), s.nnodes(),
                 a.store ? ", serving the rendezvous store on " + a.store->endpoint() : "");
    assignments.emplace(group, std::move(a));
    proto::AgentReport r;
    r.set_job_id(s.job_id());
    r.set_attempt(s.attempt());
    r.set_started(true);
    if (!resume_fallback.empty() && s.node_rank() == 0) {
      r.set_resume_fallback(resume_fallback);
      r.set_resume_fallback_step(s.resume_step());
    }
    QueueReport(std::move(r));
  }

  // Asks the assignment's ranks to checkpoint and stop: the store key `muster/preempt` (on the
  // node that hosts the store) and the notice file (every node). Value: the deadline, unix ms.
  void AskCheckpoint(Assignment& a, int64_t deadline_ms, const std::string& why) {
    if (a.checkpoint_asked) return;
    a.checkpoint_asked = true;
    a.stopping = true;
    std::string value = std::to_string(deadline_ms);
    {
      std::ofstream f(a.notice_path.string() + ".tmp");
      f << std::max<int64_t>(1, (deadline_ms - UnixMs() + 999) / 1000) << "\n";
    }
    std::error_code ec;
    fs::rename(a.notice_path.string() + ".tmp", a.notice_path, ec);
    if (a.store) {
      a.store->Set(a.spec.job_id(), a.spec.attempt(), "muster/preempt", value).IgnoreError();
    }
    SendNoticeSignal(a);
    logger->warn("job {} attempt {}: asked ranks to checkpoint and stop within {} ms ({})",
                 a.spec.job_id(), a.spec.attempt(), deadline_ms - UnixMs(), why);
  }

  // The job spec's opt-in `notice_signal`: the notice also reaches the ranks as a signal.
  void SendNoticeSignal(Assignment& a) {
    auto it = a.spec.env().find(std::string(coordinator::kNoticeSignalEnv));
    if (it == a.spec.env().end()) return;
    static const std::map<std::string, int> kSignals = {{"SIGTERM", SIGTERM}, {"SIGINT", SIGINT},
                                                        {"SIGHUP", SIGHUP},   {"SIGUSR1", SIGUSR1},
                                                        {"SIGUSR2", SIGUSR2}, {"SIGQUIT", SIGQUIT}};
    auto sig = kSignals.find(it->second);
    if (sig == kSignals.end()) {
      logger->warn("job {}: notice signal '{}' is not one muster sends", a.spec.job_id(),
                   it->second);
      return;
    }
    for (const auto& [child, rank] : a.rank_of) {
      if (a.live.count(rank)) supervisor->Signal(child, sig->second).IgnoreError();
    }
  }

  void ArmDeadline(Assignment& a, int64_t deadline_ms, milliseconds grace) {
    if (a.deadline_timer != 0) reactor->CancelTimer(a.deadline_timer);
    auto delay = milliseconds(std::max<int64_t>(0, deadline_ms - UnixMs()));
    std::string group = a.group;
    a.deadline_timer = reactor->PostAfter(delay, "agent.deadline", [this, group, grace] {
      auto it = assignments.find(group);
      if (it == assignments.end() || it->second.live.empty()) return;
      it->second.deadline_timer = 0;
      logger->warn("job {}: checkpoint deadline reached; stopping its ranks", group);
      supervisor->StopGroup(group, grace);
    });
  }

  void StopAssignment(const proto::StopAssignment& s) {
    auto it = assignments.find(GroupOf(s.job_id(), s.attempt()));
    if (it == assignments.end() || it->second.live.empty()) return;  // already stopped
    Assignment& a = it->second;
    a.stopping = true;
    milliseconds grace(std::max<int64_t>(0, s.grace_ms()));
    if (s.checkpoint_first() && s.checkpoint_deadline_ms() > UnixMs()) {
      AskCheckpoint(a, s.checkpoint_deadline_ms(),
                    "coordinator: reason " + proto::StopReason_Name(s.reason()));
      ArmDeadline(a, s.checkpoint_deadline_ms(), grace);
      return;
    }
    logger->info("job {} attempt {}: stopping ranks ({}, grace {} ms)", s.job_id(), s.attempt(),
                 proto::StopReason_Name(s.reason()), grace.count());
    supervisor->StopGroup(a.group, grace);
  }

  void FetchLog(const proto::FetchLog& f) {
    proto::Envelope e;
    auto* c = e.mutable_agent_log_chunk();
    c->set_node(labels.name());
    c->set_fetch_id(f.fetch_id());
    if (Status st = ValidatePathName(f.job_id(), "job id"); !st.ok()) {
      c->set_error(st.message());
      c->set_eof(true);
      return Queue(std::move(e));
    }
    fs::path path = LogPath(f.job_id(), f.attempt(), f.rank(), f.stream());
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      c->set_error(std::string("no ") +
                   (f.stream() == proto::LOG_STDOUT   ? "stdout log"
                    : f.stream() == proto::LOG_STDERR ? "stderr log"
                                                      : "log") +
                   " for rank " + std::to_string(f.rank()) + " of " + f.job_id() + " attempt " +
                   std::to_string(f.attempt()) + " on " + labels.name());
      return Queue(std::move(e));
    }
    in.seekg(0, std::ios::end);
    int64_t size = in.tellg();
    int64_t max = f.max_bytes() > 0 ? std::min(f.max_bytes(), 1 << 20) : 64 << 10;
    // An offset past the end: the log was rotated since (Supervisor::Options), so the reader
    // goes on from the start of the new file.
    int64_t off = f.offset() < 0      ? std::max<int64_t>(0, size - max)
                  : f.offset() > size ? 0
                                      : f.offset();
    int64_t n = std::min(max, size - off);
    std::string data(static_cast<size_t>(n), '\0');
    in.seekg(off);
    in.read(data.data(), n);
    c->set_data(std::move(data));
    c->set_next_offset(off + n);
    bool live = false;
    if (auto it = assignments.find(GroupOf(f.job_id(), f.attempt())); it != assignments.end()) {
      live = it->second.live.count(f.rank()) > 0 || it->second.open > 0;
    }
    c->set_eof(!live && off + n >= size);
    Queue(std::move(e));
  }

  // The assignment a child belongs to, and the child's global rank; null once forgotten.
  Assignment* AssignmentOf(ChildId id, int* rank) {
    auto g = group_of.find(id);
    if (g == group_of.end()) return nullptr;
    auto it = assignments.find(g->second);
    if (it == assignments.end()) return nullptr;
    *rank = it->second.rank_of[id];
    return &it->second;
  }

  // A line of a rank's stdout, stderr or control channel: all are parsed alike.
  void OnLine(ChildId id, std::string_view line) {
    int rank = 0;
    Assignment* found = AssignmentOf(id, &rank);
    if (found == nullptr) return;
    Assignment& a = *found;
    if (auto p = ParseProgressLine(line)) {
      // The lowest rank reporting since the last heartbeat wins (rank 0 preferred).
      auto& cur = progress[a.spec.job_id()];
      if (!cur.job_id().empty() && rank > cur.rank()) return;
      p->set_rank(rank);
      p->set_job_id(a.spec.job_id());
      p->set_time_ms(UnixMs());
      cur = *p;
      return;
    }
    if (rank == 0 && !a.volume_path.empty()) {
      if (auto step = ParseCheckpointLine(line)) OnCommitLine(a, *step);
    }
  }

  // Rank 0 printed `MUSTER_CHECKPOINT step=N`: reported only once the step is good on the
  // volume (the catalog records only steps that exist), then checkpoint.keep is applied. Done
  // here on the reactor, before the rank's exit is queued, so a commit is always reported
  // before the exit that follows it; the check opens only regular files (checkpoint_steps.h).
  void OnCommitLine(Assignment& a, int64_t step) {
    if (step <= a.last_commit) return;  // printed again
    std::string job_dir = (fs::path(a.volume_path) / a.spec.job_id()).string();
    if (Status st = StepIsGood(job_dir, step); !st.ok()) {
      logger->error(
          "job {}: rank 0 printed MUSTER_CHECKPOINT step={}, but it is not a good "
          "checkpoint on volume {}: not reported ({})",
          a.group, step, a.spec.checkpoint_volume(), st.message());
      return;
    }
    a.last_commit = step;
    proto::AgentReport r;
    r.set_job_id(a.spec.job_id());
    r.set_attempt(a.spec.attempt());
    r.set_checkpoint_step(step);
    r.set_checkpoint_volume(a.spec.checkpoint_volume());
    QueueReport(std::move(r));
    QueuePrune(job_dir, a.spec.checkpoint_keep());
  }

  void OnExit(ChildId id, const ExitInfo& info) {
    int rank = 0;
    Assignment* found = AssignmentOf(id, &rank);
    if (found == nullptr) return;
    Assignment& a = *found;
    a.live.erase(rank);
    proto::AgentReport r;
    r.set_job_id(a.spec.job_id());
    r.set_attempt(a.spec.attempt());
    auto* x = r.add_exits();
    x->set_rank(rank);
    x->set_exit_code(info.signaled ? -1 : info.code);
    x->set_signal(info.signaled ? info.signal : 0);
    x->set_time_ms(UnixMs());
    x->set_stopped_by_agent(a.stopping || info.stopped);
    if (info.success() || a.stopping) {
      logger->info("job {} rank {} {}", a.group, rank, info.Describe());
    } else {
      logger->warn("job {} rank {} {}", a.group, rank, info.Describe());
    }
    if (a.live.empty()) {
      r.set_all_exited(true);
      a.all_exited_sent = true;
      if (a.deadline_timer != 0) reactor->CancelTimer(a.deadline_timer);
      a.deadline_timer = 0;
      if (a.store) {
        a.store->RemoveScope(a.spec.job_id(), a.spec.attempt());
        a.store.reset();
      }
      std::error_code ec;
      fs::remove(a.notice_path, ec);
    }
    if (!a.all_exited_sent || a.live.empty()) QueueReport(std::move(r));
    SaveRanks();
  }

  void OnClosed(ChildId id) {
    auto g = group_of.find(id);
    if (g == group_of.end()) return;
    std::string group = g->second;
    group_of.erase(g);
    auto it = assignments.find(group);
    if (it == assignments.end()) return;
    if (auto p = it->second.pid_of.find(id); p != it->second.pid_of.end()) {
      watchdog->RemoveGroup(p->second);
    }
    if (--it->second.open == 0 && it->second.live.empty()) assignments.erase(it);
  }

  // A ReplicateCheckpoint from the coordinator: copies a committed checkpoint from another
  // node's volume into ours on a thread of its own, one copy at a time per job and volume, the
  // newest step asked for next (ReplicationQueue); superseded requests are reported as such.
  void StartReplication(const proto::ReplicateCheckpoint& r) {
    ReplicationQueue::Offered offered;
    {
      std::lock_guard<std::mutex> l(mu);
      if (stop) return;
      for (auto it = copiers.begin(); it != copiers.end();) {
        if (it->second->load()) {
          it->first.join();
          it = copiers.erase(it);
        } else {
          ++it;
        }
      }
      offered = replications.Offer(r);
      if (offered.start) {
        auto finished = std::make_shared<std::atomic<bool>>(false);
        copiers.emplace_back(std::thread([this, first = *offered.start, finished] {
                               for (std::optional<proto::ReplicateCheckpoint> next = first; next;) {
                                 QueueReport(CopyCheckpoint(*next));
                                 std::lock_guard<std::mutex> l(mu);
                                 next = stop ? std::nullopt : replications.Finished(*next);
                               }
                               finished->store(true);
                             }),
                             finished);
      }
    }
    for (const auto& [req, by] : offered.superseded) {
      logger->info("replication of {} step {} superseded by step {}", req.job_id(), req.step(), by);
      proto::AgentReport rep;
      rep.set_job_id(req.job_id());
      rep.set_checkpoint_step(req.step());
      rep.set_checkpoint_volume(req.volume());
      rep.set_replicate_superseded_by(by);
      rep.set_transfer_key(TransferKeyOf(req));
      QueueReport(std::move(rep));
    }
  }

  // The public half of `r`'s transfer key (the coordinator revokes that grant when the copy
  // ends); empty if the secret is malformed.
  static std::string TransferKeyOf(const proto::ReplicateCheckpoint& r) {
    auto pub = PublicKeyFromSecret(r.client_secret());
    return pub.ok() ? *pub : "";
  }

  // Copies `r`'s step into our volume; the report for the coordinator (a verified replica or
  // the error).
  proto::AgentReport CopyCheckpoint(const proto::ReplicateCheckpoint& r) {
    std::string root;
    for (const auto& v : labels.volumes()) {
      if (v.name() == r.volume()) root = v.path();
    }
    proto::AgentReport rep;
    rep.set_job_id(r.job_id());
    rep.set_checkpoint_step(r.step());
    rep.set_checkpoint_volume(r.volume());
    rep.set_transfer_key(TransferKeyOf(r));
    auto t0 = Clock::now();
    // The job id becomes <volume root>/<job>: a name, never a path that leaves the volume.
    Status st = ValidatePathName(r.job_id(), "job id to replicate");
    if (!st.ok()) {
      // reported below
    } else if (root.empty()) {
      st = NotFoundError("volume " + r.volume() + " is not mounted on " + labels.name());
    } else {
      KeyPair client;
      client.secret_key = r.client_secret();
      auto pub = PublicKeyFromSecret(client.secret_key);
      if (!options.insecure && !pub.ok()) {
        st = pub.status();
      } else {
        if (pub.ok()) client.public_key = *pub;
        // The source authorizes our key when its AllowTransfer arrives: retry a refusal.
        for (int attempt = 0;; ++attempt) {
          auto remote = RemoteVolume::Connect(r.source_endpoint(), r.source_key(), client,
                                              options.insecure, r.volume());
          if (!remote.ok()) {
            st = remote.status();
            break;
          }
          // RemoteVolume::Exists reads a refused handshake as "no such step": ask once in a
          // way that surfaces the refusal (Unavailable, retried below) before copying.
          if (auto probe = (*remote)->ListDir(r.job_id()); !probe.ok()) {
            if (probe.status().code() == StatusCode::kUnavailable && attempt < 5) {
              std::this_thread::sleep_for(milliseconds(200 * (attempt + 1)));
              continue;
            }
            if (probe.status().code() == StatusCode::kDeadlineExceeded) {
              // The source does not answer (gone, or restarted elsewhere): report it now; the
              // coordinator retries from the source's current endpoint.
              st = probe.status().WithContext("source " + r.source_node());
              break;
            }
          }
          auto report = checkpoint::Replicate(remote->get(), r.job_id(), checkpoint::LocalVolume(),
                                              (fs::path(root) / r.job_id()).string(), r.step());
          if (report.ok()) {
            double s = std::chrono::duration<double>(Clock::now() - t0).count();
            logger->info("replicated {} step {} from {} ({} shard(s), {:.1f} MiB{}, {:.2f} s)",
                         r.job_id(), r.step(), r.source_node(), report->shards_copied,
                         report->bytes_copied / 1048576.0,
                         report->already_present ? ", already present" : "", s);
            st = Status::Ok();
            break;
          }
          st = report.status();
          if (st.code() != StatusCode::kUnavailable || attempt >= 5) break;
          std::this_thread::sleep_for(milliseconds(200 * (attempt + 1)));
        }
      }
    }
    if (st.ok()) {
      rep.set_checkpoint_replica(true);
      QueuePrune((fs::path(root) / r.job_id()).string(), r.checkpoint_keep());
    } else {
      logger->error("replication of {} step {} from {} failed: {}", r.job_id(), r.step(),
                    r.source_node(), st.ToString());
      rep.set_replicate_error(st.ToString());
    }
    return rep;
  }

  // Records the live ranks (pid, start time, group) so a restarted agent can stop ranks that
  // outlived a kill -9 of this one.
  void SaveRanks() {
    fs::path path = options.work_dir / "ranks.pids";
    std::ofstream out(path.string() + ".tmp", std::ios::trunc);
    for (const auto& c : supervisor->List()) {
      if (!c.running) continue;
      out << c.pid << " " << ProcessStartTime(c.pid) << " " << c.group << "\n";
    }
    out.close();
    std::error_code ec;
    fs::rename(path.string() + ".tmp", path, ec);
  }

  // The watchdog found the lease running out and signalled the ranks' groups itself; here,
  // when the reactor runs at all, the assignments learn that their exits are the agent's doing.
  void OnLeaseExpired(milliseconds silent) {
    bool any = false;
    for (auto& [g, a] : assignments) {
      if (a.live.empty()) continue;
      any = true;
      a.stopping = true;
      supervisor->StopGroup(g, options.stop_grace);
    }
    if (any) {
      logger->error(
          "lease running out: no heartbeat answered by the coordinator for {} ms; stopping every "
          "rank on this node so a requeued attempt elsewhere is the only one running",
          silent.count());
    }
  }

  // Applies checkpoint.keep to a job's directory on the prune thread.
  void QueuePrune(const std::string& job_dir, int keep) {
    if (keep <= 0) return;
    {
      std::lock_guard<std::mutex> l(mu);
      prune_queue[job_dir] = keep;
    }
    cv.notify_all();
  }

  void PruneLoop() {
    for (;;) {
      std::string dir;
      int keep = 0;
      {
        std::unique_lock<std::mutex> l(mu);
        cv.wait(l, [&] { return stop || !prune_queue.empty(); });
        if (prune_queue.empty()) return;  // stop
        dir = prune_queue.begin()->first;
        keep = prune_queue.begin()->second;
        prune_queue.erase(prune_queue.begin());
      }
      auto removed = PruneSteps(dir, keep);
      if (!removed.ok()) {
        logger->warn("checkpoint.keep {} on {}: {}", keep, dir, removed.status().ToString());
      } else if (!removed->empty()) {
        logger->info("checkpoint.keep {} on {}: removed step(s) {}", keep, dir,
                     fmt::join(*removed, ","));
      }
    }
  }

  void HandleNotice(const PreemptionNotice& n) {
    if (notice) return;
    notice = n;
    int64_t deadline = ToUnixMs(n.deadline);
    logger->warn("preemption notice from {} ({}): {} ms left", n.source, n.detail,
                 deadline - UnixMs());
    for (auto& [g, a] : assignments) {
      if (a.live.empty()) continue;
      AskCheckpoint(a, deadline, "preemption notice from " + n.source);
      // Whatever the coordinator says, the node goes away at the deadline.
      ArmDeadline(a, deadline, milliseconds(1000));
    }
    proto::AgentReport r;
    r.set_notice_deadline_ms(deadline);
    r.set_notice_source(n.source + (n.detail.empty() ? "" : ": " + n.detail));
    QueueReport(std::move(r));
  }
};

Agent::Agent(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusOr<std::unique_ptr<Agent>> Agent::Start(AgentOptions options) {
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.options = options;
  m.labels = options.labels;
  if (m.labels.name().empty()) {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    m.labels.set_name(host);
  }
  if (m.labels.provider().empty()) return InvalidArgumentError("--provider is required");
  if (options.work_dir.empty()) return InvalidArgumentError("no work directory");
  std::error_code ec;
  fs::create_directories(options.work_dir / "logs", ec);
  if (ec) return ErrnoStatus(ec.value(), "work directory " + options.work_dir.string());
  KillLeftovers(options.work_dir / "ranks.pids", m.logger);
  for (const auto& v : m.labels.volumes()) {
    if (!fs::is_directory(v.path(), ec)) {
      return InvalidArgumentError("volume " + v.name() + ": " + v.path() + " is not a directory");
    }
  }
  coordinator::ClientOptions co;
  co.endpoint = options.coordinator;
  co.keys_dir = options.keys_dir;
  co.key_file = !options.key_file.empty()
                    ? options.key_file
                    : KeysDir::Resolve(options.keys_dir).agent_key_or_client_key().string();
  co.insecure = options.insecure;
  co.timeout = options.call_timeout;
  MUSTER_ASSIGN_OR_RETURN(m.ctl, coordinator::CoordinatorClient::Connect(co));
  MUSTER_ASSIGN_OR_RETURN(m.poll, coordinator::CoordinatorClient::Connect(co));
  if (m.labels.address().empty()) m.labels.set_address(LocalAddressFor(m.ctl->endpoint()));

  m.reactor = std::make_unique<Reactor>("agent");
  if (!options.insecure) {
    MUSTER_ASSIGN_OR_RETURN(m.zap, ZapAuthenticator::Create(*m.reactor));
  }
  Impl* p = impl.get();
  Supervisor::Callbacks cb;
  cb.on_line = [p](ChildId id, const std::string&, OutputStream, std::string_view line) {
    p->OnLine(id, line);
  };
  cb.on_exit = [p](ChildId id, const std::string&, const ExitInfo& info) { p->OnExit(id, info); };
  cb.on_closed = [p](ChildId id, const std::string&) { p->OnClosed(id); };
  Supervisor::Options so;
  so.log_max_bytes = options.rank_log_max_bytes;
  so.log_keep = options.rank_log_keep;
  m.supervisor = std::make_unique<Supervisor>(*m.reactor, cb, so);
  if (m.labels.volumes_size() > 0) {
    std::map<std::string, std::string> roots;
    for (const auto& v : m.labels.volumes()) roots[v.name()] = v.path();
    auto vs = VolumeServer::Create(*m.reactor, m.zap.get(), options.insecure,
                                   "tcp://" + m.labels.address() + ":*", std::move(roots));
    if (!vs.ok()) return vs.status().WithContext("volume server");
    m.volume_server = std::move(*vs);
    m.labels.set_transfer_endpoint(m.volume_server->endpoint());
    m.labels.set_transfer_key(m.volume_server->public_key());
  }
  m.watchdog = std::make_unique<LeaseWatchdog>(options.stop_grace, [p](milliseconds silent) {
    p->reactor->Post("agent.lease_expired", [p, silent] { p->OnLeaseExpired(silent); });
  });
  m.reactor->Start();
  m.prune_thread = std::thread([p] { p->PruneLoop(); });

  std::vector<std::unique_ptr<NoticeSource>> sources;
  if (!options.preempt_file.empty()) {
    sources.push_back(NewNoticeFileSource(options.preempt_file, options.default_notice));
  }
  if (!options.aws_metadata.empty()) {
    sources.push_back(NewAwsSpotSource(options.aws_metadata, milliseconds(1000)));
  }
  if (!options.gcp_metadata.empty()) {
    sources.push_back(NewGcpPreemptedSource(options.gcp_metadata, milliseconds(1000)));
  }
  if (!sources.empty()) {
    m.watcher = std::make_unique<NoticeWatcher>(
        std::move(sources), options.notice_interval, [p](const PreemptionNotice& n) {
          p->reactor->Post("agent.notice", [p, n] { p->HandleNotice(n); });
        });
    m.watcher->Start();
  }
  m.control_thread = std::thread([p] { p->ControlLoop(); });
  m.poll_thread = std::thread([p] { p->PollLoop(); });
  m.logger->info("agent {} (provider {}, address {}) connecting to {}", m.labels.name(),
                 m.labels.provider(), m.labels.address(), m.ctl->endpoint());
  return std::unique_ptr<Agent>(new Agent(std::move(impl)));
}

void Agent::Notice(const PreemptionNotice& notice) {
  Impl* p = impl_.get();
  p->reactor->Post("agent.notice", [p, notice] { p->HandleNotice(notice); });
}

bool Agent::WaitIdle(std::chrono::milliseconds timeout) {
  auto until = Clock::now() + timeout;
  for (;;) {
    bool idle = impl_->reactor->Call("agent.idle", [this] {
      for (auto& [g, a] : impl_->assignments) {
        if (!a.live.empty()) return false;
      }
      return true;
    });
    if (idle) {
      // Let the control thread send the exits.
      std::unique_lock<std::mutex> l(impl_->mu);
      impl_->cv.wait_until(l, std::min(until, Clock::now() + milliseconds(2000)),
                           [&] { return impl_->outbox.empty(); });
      return true;
    }
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(milliseconds(50));
  }
}

void Agent::Shutdown(std::chrono::milliseconds grace) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (m.stop) return;
  }
  if (m.watcher) m.watcher->Stop();
  m.reactor->Call("agent.shutdown", [&] {
    for (auto& [g, a] : m.assignments) {
      if (a.live.empty()) continue;
      a.stopping = true;
      m.supervisor->StopGroup(g, grace);
    }
  });
  WaitIdle(grace + milliseconds(3000));
  {
    std::lock_guard<std::mutex> l(m.mu);
    m.stop = true;
  }
  m.cv.notify_all();
  // Replace the outstanding long poll with an immediate one so the poll thread returns now.
  if (std::string sid = m.Session(); !sid.empty()) {
    proto::Envelope req;
    req.mutable_agent_poll()->set_node(m.labels.name());
    req.mutable_agent_poll()->set_session_id(sid);
    req.mutable_agent_poll()->set_wait_ms(0);
    (void)m.ctl->Call(std::move(req), milliseconds(500));
  }
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>> copiers;
  {
    std::lock_guard<std::mutex> l(m.mu);
    copiers.swap(m.copiers);
  }
  for (auto& [t, finished] : copiers) t.join();
  if (m.prune_thread.joinable()) m.prune_thread.join();
  if (m.control_thread.joinable()) m.control_thread.join();
  if (m.poll_thread.joinable()) m.poll_thread.join();
  m.reactor->Call("agent.teardown", [&] {
    m.supervisor.reset();
    m.assignments.clear();
    m.volume_server.reset();
  });
  m.watchdog.reset();
  m.reactor->Stop();
  m.zap.reset();
  m.logger->info("agent {} stopped", m.labels.name());
}

Agent::~Agent() { Shutdown(impl_->options.stop_grace); }

const proto::NodeLabels& Agent::labels() const { return impl_->labels; }

void Agent::RunOnReactorForTesting(std::function<void()> f) {
  impl_->reactor->Post("agent.test", std::move(f));
}

bool Agent::registered() const { return !impl_->Session().empty(); }

}  // namespace muster::node_agent
