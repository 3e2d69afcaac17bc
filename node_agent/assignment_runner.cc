#include "node_agent/assignment_runner.h"

#include <fmt/format.h>
#include <signal.h>

#include <algorithm>
#include <fstream>

#include "collectives/rendezvous_client.h"
#include "common/net_address.h"
#include "common/path_name.h"
#include "common/python_path.h"
#include "common/rank_env.h"
#include "coordinator/job_spec.h"
#include "node_agent/checkpoint_steps.h"
#include "node_agent/lease_watchdog.h"  // ProcessStartTime
#include "node_agent/log_reader.h"
#include "node_agent/rank_lines.h"
#include "node_agent/rank_relay.h"

namespace muster::node_agent {

namespace fs = std::filesystem;
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

}  // namespace

// Ranks a previous incarnation of this agent started (it was killed -9): their attempt has been
// declared lost and requeued, so they must not run on. Each rank leads its process group. The
// rank itself died with its agent (the supervisor's PR_SET_PDEATHSIG), but processes it
// started may live on in its group. While any member of a group lives the kernel does not
// hand its number out again, so a group whose leader is gone is still this rank's; a leader
// that exists with another start time is an unrelated process that reused the number.
void KillLeftoverRanks(const fs::path& pids_file, const std::shared_ptr<spdlog::logger>& logger) {
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

StatusOr<std::unique_ptr<AssignmentRunner>> AssignmentRunner::Create(Reactor& reactor,
                                                                     ZapAuthenticator* zap,
                                                                     proto::NodeLabels labels,
                                                                     Options options,
                                                                     Outputs outputs) {
  std::unique_ptr<AssignmentRunner> r(new AssignmentRunner(reactor, zap, std::move(labels),
                                                           std::move(options), std::move(outputs)));
  if (r->labels_.volumes_size() > 0) {
    std::map<std::string, std::string> roots;
    for (const auto& v : r->labels_.volumes()) roots[v.name()] = v.path();
    auto vs = VolumeServer::Create(reactor, zap, r->options_.insecure,
                                   "tcp://" + r->labels_.address() + ":*", std::move(roots));
    if (!vs.ok()) return vs.status().WithContext("volume server");
    r->volume_server_ = std::move(*vs);
    r->labels_.set_transfer_endpoint(r->volume_server_->endpoint());
    r->labels_.set_transfer_key(r->volume_server_->public_key());
  }
  if (r->options_.snapshot_memory > 0) {
    r->snapshots_ = std::make_unique<SnapshotStore>(
        SnapshotStoreOptions{.memory_limit = r->options_.snapshot_memory});
    // Every frame a rank hands over is also copied to the job's peer agent, off the rank's path.
    r->forwarder_ = std::make_unique<SnapshotForwarder>(SnapshotForwarder::Options{
        .insecure = r->options_.insecure, .cpu = r->options_.snapshot_cpu});
    const std::string host =
        r->labels_.address().empty() ? std::string("127.0.0.1") : r->labels_.address();
    auto ps = SnapshotPeerServer::Create({.endpoint = "tcp://" + host + ":*",
                                          .insecure = r->options_.insecure,
                                          .store = r->snapshots_.get(),
                                          .cpu = r->options_.snapshot_cpu});
    if (!ps.ok()) return ps.status().WithContext("snapshot peer server");
    r->peer_server_ = std::move(*ps);
    r->labels_.set_snapshot_endpoint(r->peer_server_->endpoint());
    r->labels_.set_snapshot_key(r->peer_server_->public_key());
    SnapshotForwarder* fwd = r->forwarder_.get();
    auto ss = SnapshotServer::Start(
        (r->options_.work_dir / "snapshots" / "s.sock").string(), r->snapshots_.get(),
        [fwd](std::shared_ptr<const checkpoint::SnapshotFrame> f) { fwd->Offer(std::move(f)); },
        kSnapshotFrameTimeout,
        [trust = r->rank_trust_](pid_t pid, const checkpoint::SnapshotKey& key) {
          return trust->Check(pid, key);
        },
        r->options_.snapshot_cpu);
    if (!ss.ok()) return ss.status().WithContext("snapshot server");
    r->snapshot_server_ = std::move(*ss);
  }
  return r;
}

AssignmentRunner::AssignmentRunner(Reactor& reactor, ZapAuthenticator* zap,
                                   proto::NodeLabels labels, Options options, Outputs outputs)
    : reactor_(reactor),
      zap_(zap),
      options_(std::move(options)),
      out_(std::move(outputs)),
      labels_(std::move(labels)) {
  Supervisor::Callbacks cb;
  cb.on_line = [this](ChildId id, const std::string&, OutputStream, std::string_view line) {
    OnLine(id, line);
  };
  cb.on_exit = [this](ChildId id, const std::string&, const ExitInfo& info) { OnExit(id, info); };
  cb.on_closed = [this](ChildId id, const std::string&) { OnClosed(id); };
  Supervisor::Options so;
  so.log_max_bytes = options_.rank_log_max_bytes;
  so.log_keep = options_.rank_log_keep;
  supervisor_ = std::make_unique<Supervisor>(reactor_, cb, so);
}

AssignmentRunner::~AssignmentRunner() {
  // The order the agent always tore down in: the ranks' supervisor, then the attempts (and
  // their stores), then the volume server.
  supervisor_.reset();
  assignments_.clear();
  volume_server_.reset();
  for (auto& [g, f] : fetches_) {
    f.cancel->store(true);
    finished_fetches_.push_back(std::move(f.thread));
  }
  for (auto& t : finished_fetches_) {
    if (t.joinable()) t.join();
  }
  snapshot_server_.reset();  // no more frames to forward
  forwarder_.reset();
  peer_server_.reset();
  snapshots_.reset();
}

std::optional<std::vector<proto::SnapshotHeld>> AssignmentRunner::SnapshotsHeld() const {
  if (!snapshots_) return std::nullopt;
  std::vector<proto::SnapshotHeld> out;
  for (const std::string& job : snapshots_->Jobs()) {
    for (const HeldSnapshot& h : snapshots_->Held(job)) {
      proto::SnapshotHeld p;
      p.set_job_id(job);
      p.set_rank(h.rank);
      p.set_world_size(h.world_size);
      p.set_attempt(h.attempt);
      p.set_step(h.step);
      p.set_pinned(h.pinned);
      out.push_back(std::move(p));
    }
  }
  return out;
}

void AssignmentRunner::AddSnapshotsHeld(const std::string& job, proto::AgentReport& r) const {
  if (!snapshots_) return;
  r.set_snapshots_reported(true);
  for (const HeldSnapshot& h : snapshots_->Held(job)) {
    auto* p = r.add_snapshots_held();
    p->set_job_id(job);
    p->set_rank(h.rank);
    p->set_world_size(h.world_size);
    p->set_attempt(h.attempt);
    p->set_step(h.step);
    p->set_pinned(h.pinned);
  }
}

void AssignmentRunner::DropSnapshots(const std::string& job) {
  if (!snapshots_) return;
  for (const auto& [g, a] : assignments_) {
    if (a.spec.job_id() == job && !a.live.empty()) return;  // its ranks run here: still needed
  }
  for (const auto& [g, f] : fetches_) {
    if (f.a.spec.job_id() == job) return;
  }
  for (const auto& [g, p] : preflights_) {
    if (p.a.spec.job_id() == job) return;
  }
  const auto jobs = snapshots_->Jobs();
  if (std::find(jobs.begin(), jobs.end(), job) == jobs.end()) return;  // nothing held
  logger_->info("job {}: in-memory snapshots dropped (the job ended or runs elsewhere)", job);
  snapshots_->DropJob(job);
  forwarder_->ClearJob(job);
  peer_server_->Revoke(job);
}

std::map<std::string, proto::Progress> AssignmentRunner::TakeProgress() {
  auto p = std::move(progress_);
  progress_.clear();
  return p;
}

void AssignmentRunner::ReturnProgress(std::map<std::string, proto::Progress> progress) {
  for (auto& [job, p] : progress) progress_.try_emplace(job, p);
}

bool AssignmentRunner::Idle() const {
  for (const auto& [g, a] : assignments_) {
    if (!a.live.empty()) return false;
  }
  return true;
}

void AssignmentRunner::StopAll(milliseconds grace) {
  for (auto& [g, a] : assignments_) {
    if (a.live.empty()) continue;
    a.stopping = true;
    supervisor_->StopGroup(g, grace);
  }
}

std::vector<proto::RunningAssignment> AssignmentRunner::Running() const {
  std::vector<proto::RunningAssignment> out;
  for (auto& [g, a] : assignments_) {
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

void AssignmentRunner::OnAction(const proto::AgentAction& a) {
  switch (a.action_case()) {
    case proto::AgentAction::kStart:
      return StartAssignment(a.start());
    case proto::AgentAction::kStop:
      return StopAssignment(a.stop());
    case proto::AgentAction::kFetchLog:
      return FetchLog(a.fetch_log());
    case proto::AgentAction::kAllowTransfer:
      if (volume_server_) {
        Status st = volume_server_->Allow(a.allow_transfer().job_id(),
                                          a.allow_transfer().client_public_key(),
                                          a.allow_transfer().expires_ms());
        if (!st.ok()) logger_->warn("transfer grant refused: {}", st.ToString());
      }
      return;
    case proto::AgentAction::kRevokeTransfer:
      if (volume_server_) {
        volume_server_->Revoke(a.revoke_transfer().job_id(),
                               a.revoke_transfer().client_public_key());
      }
      return;
    case proto::AgentAction::kReplicate:
      return out_.replicate(a.replicate());
    case proto::AgentAction::kDropSnapshots:
      return DropSnapshots(a.drop_snapshots().job_id());
    case proto::AgentAction::kSnapshotPins:
      if (snapshots_) {
        const auto& p = a.snapshot_pins();
        const bool held = snapshots_->SetPins(p.job_id(), {p.kept_attempt(), p.kept_step()},
                                              {p.candidate_attempt(), p.candidate_step()});
        logger_->debug("job {}: snapshot pins kept {}/{} candidate {}/{}{}", p.job_id(),
                       p.kept_attempt(), p.kept_step(), p.candidate_attempt(), p.candidate_step(),
                       held ? "" : " (nothing of the job held here: ignored)");
      }
      return;
    default:
      logger_->warn("ignoring an action this agent does not know (case {})",
                    static_cast<int>(a.action_case()));
  }
}

// rank-R.log holds both streams; rank-R.stdout and rank-R.stderr one each (split_streams).
fs::path AssignmentRunner::LogPath(const std::string& job, int attempt, int rank,
                                   proto::LogStream stream) const {
  const char* ext = stream == proto::LOG_STDOUT   ? ".stdout"
                    : stream == proto::LOG_STDERR ? ".stderr"
                                                  : ".log";
  return options_.work_dir / "logs" / job / ("attempt-" + std::to_string(attempt)) /
         ("rank-" + std::to_string(rank) + ext);
}

// `retryable`: neither the job's fault nor the node's (a port in use); retried elsewhere.
void AssignmentRunner::StartError(const proto::StartAssignment& s, const std::string& why,
                                  bool retryable) {
  logger_->error("job {} attempt {}: cannot start: {}", s.job_id(), s.attempt(), why);
  proto::AgentReport r;
  r.set_job_id(s.job_id());
  r.set_attempt(s.attempt());
  r.set_start_error(why);
  r.set_start_retryable(retryable);
  r.set_all_exited(true);
  out_.report(std::move(r));
}

void AssignmentRunner::StartAssignment(const proto::StartAssignment& given) {
  proto::StartAssignment s = given;  // the resume step may be corrected below
  // The job id names directories on volumes and under the work directory.
  if (Status st = ValidatePathName(s.job_id(), "job id"); !st.ok()) {
    return StartError(s, st.message());
  }
  std::string group = GroupOf(s.job_id(), s.attempt());
  if (assignments_.count(group) || preflights_.count(group) || fetches_.count(group)) {
    return;  // delivered twice
  }
  if (notice_) return StartError(s, "node has a preemption notice (" + notice_->source + ")");
  if (s.command_size() == 0 || s.ranks_per_node() <= 0 || s.nnodes() <= 0) {
    return StartError(s, "empty command or no ranks");
  }
  Assignment a;
  a.spec = s;
  a.group = group;
  if (!s.checkpoint_volume().empty()) {
    for (const auto& v : labels_.volumes()) {
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
      resume_fallback = fmt::format(
          "resume step {} is not a good checkpoint on volume {} of {} ({}): {}", s.resume_step(),
          s.checkpoint_volume(), labels_.name(), choice.problem,
          choice.step >= 0
              ? "resuming from step " + std::to_string(choice.step) + ", the newest good one there"
              : std::string("no good step there, starting fresh"));
      logger_->warn("job {} attempt {}: {}", s.job_id(), s.attempt(), resume_fallback);
      s.set_resume_step(choice.step);
      (*s.mutable_env())["MUSTER_RESUME_STEP"] =
          choice.step >= 0 ? std::to_string(choice.step) : "";
      a.spec = s;
    }
  }
  // Rendezvous credentials: every node derives the same from the coordinator's key.
  std::string creds = "insecure";
  std::optional<RdzvKeys> keys;
  if (!options_.insecure) {
    auto k = ParseRdzvKey(s.rendezvous_key());
    if (!k.ok()) return StartError(s, "rendezvous key: " + k.status().message());
    keys = *k;
    creds = "v1," + k->server.public_key + "," + k->client.public_key + "," + k->client.secret_key;
  }
  if (s.host_rendezvous()) {
    // The ports this attempt was given must be free here: the store's, and MASTER_PORT that
    // rank 0's program binds (torch's TCPStore). A port some other program holds is not the
    // job's fault: the coordinator retries on other ports.
    const std::string bind_address =
        labels_.address().empty() ? std::string("0.0.0.0") : labels_.address();
    std::vector<int> ports = {s.rendezvous_port()};
    if (s.master_port() > 0) ports.push_back(s.master_port());
    for (int port : ports) {
      if (TcpPortInUse(bind_address, port)) {
        return StartError(s, "port " + std::to_string(port) + " is in use on this node", true);
      }
    }
    collectives::RendezvousServer::Options so;
    so.endpoint = "tcp://" + bind_address + ":" + std::to_string(s.rendezvous_port());
    so.insecure = options_.insecure;
    if (keys) so.server_key = keys->server;
    auto store = collectives::RendezvousServer::Create(reactor_, zap_, so);
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
  if (s.snapshot_every_steps() > 0 && peer_server_) {
    // The gang's agents (and only they) hold the attempt's client key: they may copy this
    // job's frames here and fetch them back.
    if (keys) {
      if (Status st = peer_server_->Allow(s.job_id(), keys->client.public_key); !st.ok()) {
        logger_->warn("job {}: snapshot peers not admitted: {}", s.job_id(), st.ToString());
      }
    }
    if (!s.snapshot_peer_endpoint().empty()) {
      SnapshotPeerTarget t;
      t.attempt = s.attempt();
      t.node = "node rank " + std::to_string((s.node_rank() + 1) % std::max(1, s.nnodes()));
      t.endpoint = s.snapshot_peer_endpoint();
      t.server_key = s.snapshot_peer_key();
      if (keys) t.client_key = keys->client;
      forwarder_->SetTarget(s.job_id(), std::move(t));
    }
  }
  if (s.snapshot_sources_size() > 0) {
    return BeginSnapshotFetch(std::move(a), creds, resume_fallback);
  }
  Proceed(std::move(a), creds, resume_fallback);
}

void AssignmentRunner::Proceed(Assignment a, const std::string& creds,
                               const std::string& resume_fallback) {
  if (a.spec.nnodes() > 1) return BeginPreflight(std::move(a), creds, resume_fallback);
  LaunchRanks(std::move(a), creds, resume_fallback, "");
}

// The frames of this node's ranks for the snapshot resume that the store lacks come from their
// holders first (a rank that moved to this node). A node that cannot get them fails the start:
// its ranks must not resume from another step than the rest of the gang.
void AssignmentRunner::BeginSnapshotFetch(Assignment a, const std::string& creds,
                                          const std::string& fallback) {
  const proto::StartAssignment& s = a.spec;
  if (!snapshots_) {
    return StartError(s,
                      "the attempt resumes from in-memory snapshots, but this agent has no "
                      "snapshot memory (--snapshot-memory-mb 0)");
  }
  struct Want {
    checkpoint::SnapshotKey key;
    std::vector<proto::SnapshotSource> from;
  };
  std::vector<Want> wants;
  const int world = s.nnodes() * s.ranks_per_node();
  for (int local = 0; local < s.ranks_per_node(); ++local) {
    const int rank = s.node_rank() * s.ranks_per_node() + local;
    checkpoint::SnapshotKey key{.job = s.job_id(),
                                .attempt = s.snapshot_resume_attempt(),
                                .rank = rank,
                                .world_size = world,
                                .step = s.snapshot_resume_step()};
    auto held = snapshots_->Get(s.job_id(), rank, key.step);
    if (held.ok() && (*held)->key == key) continue;
    Want w{key, {}};
    for (const auto& src : s.snapshot_sources()) {
      if (src.rank() == rank && src.node() != labels_.name()) w.from.push_back(src);
    }
    if (w.from.empty()) {
      return StartError(s, fmt::format("snapshot of rank {} step {} (attempt {}) is neither held "
                                       "here nor offered by a peer",
                                       rank, key.step, key.attempt));
    }
    wants.push_back(std::move(w));
  }
  if (wants.empty()) {
    logger_->info("job {} attempt {}: resumes from in-memory snapshots of step {} held here",
                  s.job_id(), s.attempt(), s.snapshot_resume_step());
    return Proceed(std::move(a), creds, fallback);
  }
  KeyPair client;
  if (!options_.insecure) {
    auto k = ParseRdzvKey(s.rendezvous_key());
    if (!k.ok()) return StartError(s, "rendezvous key: " + k.status().message());
    client = k->client;
  }
  const std::string group = a.group;
  Fetching& f = fetches_[group];
  f.a = std::move(a);
  f.creds = creds;
  f.resume_fallback = fallback;
  f.cancel = std::make_shared<std::atomic<bool>>(false);
  std::weak_ptr<int> life = life_;
  SnapshotStore* store = snapshots_.get();
  const bool insecure = options_.insecure;
  f.thread = std::thread([this, life, group, wants, client, store, insecure, cancel = f.cancel] {
    Status result;
    for (const Want& w : wants) {
      Status last = NotFoundError("no holder");
      bool got = false;
      for (const auto& src : w.from) {
        auto frame =
            FetchSnapshotFromPeer(src.endpoint(), src.key(), client, insecure, w.key,
                                  store->memory_limit(), milliseconds(20000), cancel.get());
        if (!frame.ok()) {
          last = frame.status().WithContext("from " + src.node());
          continue;
        }
        last = store->Put(std::move(*frame));
        if (last.ok()) {
          got = true;
          break;
        }
        last = last.WithContext("keeping the frame from " + src.node());
      }
      if (!got) {
        result = last.WithContext(fmt::format("snapshot of rank {} step {} (attempt {})",
                                              w.key.rank, w.key.step, w.key.attempt));
        break;
      }
    }
    if (cancel->load()) return;
    reactor_.Post("agent.snapshot_fetch", [this, life, group, result] {
      if (life.lock()) EndSnapshotFetch(group, result);
    });
  });
  logger_->info("job {} attempt {}: fetching {} snapshot frame(s) of step {} from peers",
                f.a.spec.job_id(), f.a.spec.attempt(), wants.size(),
                f.a.spec.snapshot_resume_step());
}

void AssignmentRunner::EndSnapshotFetch(const std::string& group, const Status& st) {
  auto it = fetches_.find(group);
  if (it == fetches_.end()) return;  // stopped meanwhile
  Fetching f = std::move(it->second);
  fetches_.erase(it);
  if (f.thread.joinable()) f.thread.join();  // it posted this and returned
  if (!st.ok()) return StartError(f.a.spec, "snapshot resume: " + st.message());
  logger_->info("job {} attempt {}: snapshot frames of step {} fetched from peers",
                f.a.spec.job_id(), f.a.spec.attempt(), f.a.spec.snapshot_resume_step());
  Proceed(std::move(f.a), f.creds, f.resume_fallback);
}

void AssignmentRunner::LaunchRanks(Assignment a, const std::string& creds,
                                   const std::string& resume_fallback, const std::string& ifname) {
  const proto::StartAssignment s = a.spec;  // a copy: `a` is moved into assignments_
  const std::string group = a.group;
  std::error_code ec;
  fs::create_directories(options_.work_dir / "notice", ec);
  a.notice_path =
      options_.work_dir / "notice" / (s.job_id() + ".attempt-" + std::to_string(s.attempt()));
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
  if (!WantsDirectRendezvous(s)) {
    auto relay = StartRankRelay(reactor_, s, creds, options_.work_dir, [this, group] {
      std::vector<pid_t> groups;
      if (auto it = assignments_.find(group); it != assignments_.end()) {
        for (const auto& [child, pid] : it->second.pid_of) groups.push_back(pid);
      }
      return groups;
    });
    if (relay.ok()) {
      a.relay = std::move(*relay);
      contract.rdzv_endpoint = a.relay->endpoint();
    } else {
      logger_->warn("job {} attempt {}: no rendezvous relay ({}); ranks connect to the store",
                    s.job_id(), s.attempt(), relay.status().message());
    }
  }
  contract.checkpoint_dir =
      a.volume_path.empty() ? "" : (fs::path(a.volume_path) / s.job_id()).string();
  if (s.resume_step() >= 0) contract.resume_step = s.resume_step();
  if (s.checkpoint_every_steps() > 0) contract.checkpoint_every = s.checkpoint_every_steps();
  if (s.checkpoint_every_s() > 0) contract.checkpoint_every_s = s.checkpoint_every_s();
  contract.preempt_file = a.notice_path.string();
  contract.node = labels_.name();
  contract.provider = labels_.provider();
  contract.control_fd = Supervisor::kControlFd;
  contract.socket_ifname = ifname;
  if (s.snapshot_sources_size() > 0 && snapshot_server_) {
    contract.snapshot_socket = snapshot_server_->socket_path();
    contract.resume_snapshot_step = s.snapshot_resume_step();
    contract.resume_snapshot_attempt = s.snapshot_resume_attempt();
  }
  if (s.snapshot_every_steps() > 0) {
    if (snapshot_server_) {
      contract.snapshot_every = s.snapshot_every_steps();
      contract.snapshot_socket = snapshot_server_->socket_path();
    } else {
      logger_->warn(
          "job {}: asks for in-memory snapshots, but this agent has no snapshot memory "
          "(--snapshot-memory-mb 0); its ranks checkpoint to the volume only",
          s.job_id());
    }
  }
  if (Status st = contract.Validate(); !st.ok()) return StartError(s, st.message());
  std::map<std::string, std::string> job_env(s.env().begin(), s.env().end());
  const std::vector<std::string> inherited = ProcessEnviron();
  AddMusterPythonPath(inherited, job_env);  // `import muster` works in every rank
  int rpn = s.ranks_per_node();
  int world = contract.world_size;
  for (int local = 0; local < rpn; ++local) {
    int rank = s.node_rank() * rpn + local;
    contract.rank = rank;
    contract.local_rank = local;
    contract.cuda_visible_devices =
        labels_.gpus() > 0 ? std::to_string(local % labels_.gpus()) : std::string();
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
    auto id = supervisor_->Spawn(spec);
    if (!id.ok()) {
      supervisor_->StopGroup(group, milliseconds(0));
      for (auto& [cid, r] : a.rank_of) group_of_[cid] = group;
      a.stopping = true;
      a.all_exited_sent = true;  // the start error below says it all
      a.open = a.rank_of.size();
      std::string why = "rank " + std::to_string(rank) + ": " + id.status().message();
      if (a.open > 0) assignments_.emplace(group, std::move(a));
      return StartError(s, why);
    }
    a.rank_of[*id] = rank;
    a.live.insert(rank);
    group_of_[*id] = group;
    for (const auto& c : supervisor_->List()) {
      if (c.id != *id) continue;
      a.pid_of[*id] = c.pid;
      out_.guard(c.pid, group + " rank " + std::to_string(rank));
      rank_trust_->Add(c.pid, s.job_id(), rank);
    }
  }
  a.open = a.rank_of.size();
  a.started_ms = UnixMs();
  SaveRanks();
  logger_->info("job {} attempt {}: started ranks {}..{} of {} (node rank {} of {}){}", s.job_id(),
                s.attempt(), s.node_rank() * rpn, s.node_rank() * rpn + rpn - 1, world,
                s.node_rank(), s.nnodes(),
                a.store ? ", serving the rendezvous store on " + a.store->endpoint() : "");
  assignments_.emplace(group, std::move(a));
  proto::AgentReport r;
  r.set_job_id(s.job_id());
  r.set_attempt(s.attempt());
  r.set_started(true);
  if (!resume_fallback.empty() && s.node_rank() == 0) {
    r.set_resume_fallback(resume_fallback);
    r.set_resume_fallback_step(s.resume_step());
  }
  out_.report(std::move(r));
}

// Runs the launch preflight (node_agent/preflight.h) off the reactor; the ranks start when it
// passes. The master's store already serves: it is the preflight's meeting point.
void AssignmentRunner::BeginPreflight(Assignment a, const std::string& creds,
                                      const std::string& fallback) {
  const proto::StartAssignment& s = a.spec;
  PreflightOptions o;
  o.node = labels_.name();
  o.node_rank = s.node_rank();
  o.nnodes = s.nnodes();
  o.master_addr = s.master_addr();
  o.store_port = s.rendezvous_port();
  o.timeout = options_.preflight_timeout;
  o.probe_timeout = options_.preflight_probe_timeout;
  collectives::RendezvousClient::Options so;
  so.endpoint = "tcp://" + s.master_addr() + ":" + std::to_string(s.rendezvous_port());
  so.job = s.job_id();
  so.attempt = s.attempt();
  auto cred = collectives::RdzvCredentials::Parse(creds);
  if (!cred.ok()) return StartError(s, "rendezvous key: " + cred.status().message());
  so.credentials = *cred;
  auto connect = [so]() -> StatusOr<std::unique_ptr<collectives::RendezvousStore>> {
    MUSTER_ASSIGN_OR_RETURN(auto c, collectives::RendezvousClient::Connect(so));
    return std::unique_ptr<collectives::RendezvousStore>(std::move(c));
  };
  const std::string group = a.group;
  logger_->info("job {} attempt {}: launch preflight with {} nodes (master {})", s.job_id(),
                s.attempt(), s.nnodes(), s.master_addr());
  Pending& p = preflights_[group];
  p.a = std::move(a);
  p.creds = creds;
  p.resume_fallback = fallback;
  std::weak_ptr<int> life = life_;
  p.run = Preflight::Start(o, connect, [this, life, group](PreflightResult r) {
    reactor_.Post("agent.preflight", [this, life, group, r] {
      if (life.lock()) EndPreflight(group, r);
    });
  });
}

void AssignmentRunner::EndPreflight(const std::string& group, const PreflightResult& r) {
  auto it = preflights_.find(group);
  if (it == preflights_.end()) return;  // stopped meanwhile
  Pending p = std::move(it->second);
  preflights_.erase(it);
  if (r.ok && notice_) {
    return StartError(p.a.spec, "node has a preemption notice (" + notice_->source + ")");
  }
  if (r.ok) return LaunchRanks(std::move(p.a), p.creds, p.resume_fallback, r.route.interface);
  logger_->error("job {} attempt {}: launch preflight failed: {}", p.a.spec.job_id(),
                 p.a.spec.attempt(), r.message);
  proto::AgentReport rep;
  rep.set_job_id(p.a.spec.job_id());
  rep.set_attempt(p.a.spec.attempt());
  rep.set_start_error(r.message);
  rep.set_preflight_failed(true);
  rep.set_preflight_blamed_rank(r.blamed_rank);
  rep.set_all_exited(true);
  out_.report(std::move(rep));
}

bool AssignmentRunner::StopPreflight(const std::string& group) {
  if (auto f = fetches_.find(group); f != fetches_.end()) {
    f->second.cancel->store(true);
    finished_fetches_.push_back(std::move(f->second.thread));
    proto::AgentReport rep;
    rep.set_job_id(f->second.a.spec.job_id());
    rep.set_attempt(f->second.a.spec.attempt());
    rep.set_all_exited(true);
    fetches_.erase(f);
    out_.report(std::move(rep));
    return true;
  }
  auto it = preflights_.find(group);
  if (it == preflights_.end()) return false;
  proto::AgentReport rep;
  rep.set_job_id(it->second.a.spec.job_id());
  rep.set_attempt(it->second.a.spec.attempt());
  rep.set_all_exited(true);
  preflights_.erase(it);  // cancels it; the master's store closes
  out_.report(std::move(rep));
  return true;
}

// Asks the assignment's ranks to checkpoint and stop: the store key `muster/preempt` (on the
// node that hosts the store) and the notice file (every node). Value: the deadline, unix ms.
void AssignmentRunner::AskCheckpoint(Assignment& a, int64_t deadline_ms, const std::string& why) {
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
  logger_->warn("job {} attempt {}: asked ranks to checkpoint and stop within {} ms ({})",
                a.spec.job_id(), a.spec.attempt(), deadline_ms - UnixMs(), why);
}

// The job spec's opt-in `notice_signal`: the notice also reaches the ranks as a signal.
void AssignmentRunner::SendNoticeSignal(Assignment& a) {
  auto it = a.spec.env().find(std::string(coordinator::kNoticeSignalEnv));
  if (it == a.spec.env().end()) return;
  static const std::map<std::string, int> kSignals = {{"SIGTERM", SIGTERM}, {"SIGINT", SIGINT},
                                                      {"SIGHUP", SIGHUP},   {"SIGUSR1", SIGUSR1},
                                                      {"SIGUSR2", SIGUSR2}, {"SIGQUIT", SIGQUIT}};
  auto sig = kSignals.find(it->second);
  if (sig == kSignals.end()) {
    logger_->warn("job {}: notice signal '{}' is not one muster sends", a.spec.job_id(),
                  it->second);
    return;
  }
  for (const auto& [child, rank] : a.rank_of) {
    if (a.live.count(rank)) supervisor_->Signal(child, sig->second).IgnoreError();
  }
}

void AssignmentRunner::ArmDeadline(Assignment& a, int64_t deadline_ms, milliseconds grace) {
  if (a.deadline_timer != 0) reactor_.CancelTimer(a.deadline_timer);
  auto delay = milliseconds(std::max<int64_t>(0, deadline_ms - UnixMs()));
  std::string group = a.group;
  a.deadline_timer = reactor_.PostAfter(delay, "agent.deadline", [this, group, grace] {
    auto it = assignments_.find(group);
    if (it == assignments_.end() || it->second.live.empty()) return;
    it->second.deadline_timer = 0;
    logger_->warn("job {}: checkpoint deadline reached; stopping its ranks", group);
    supervisor_->StopGroup(group, grace);
  });
}

void AssignmentRunner::StopAssignment(const proto::StopAssignment& s) {
  if (StopPreflight(GroupOf(s.job_id(), s.attempt()))) return;
  auto it = assignments_.find(GroupOf(s.job_id(), s.attempt()));
  if (it == assignments_.end() || it->second.live.empty()) return;  // already stopped
  Assignment& a = it->second;
  a.stopping = true;
  a.job_over |= s.reason() == proto::STOP_CANCELLED || s.reason() == proto::STOP_TIME_LIMIT;
  milliseconds grace(std::max<int64_t>(0, s.grace_ms()));
  if (s.checkpoint_first() && s.checkpoint_deadline_ms() > UnixMs()) {
    AskCheckpoint(a, s.checkpoint_deadline_ms(),
                  "coordinator: reason " + proto::StopReason_Name(s.reason()));
    ArmDeadline(a, s.checkpoint_deadline_ms(), grace);
    return;
  }
  logger_->info("job {} attempt {}: stopping ranks ({}, grace {} ms)", s.job_id(), s.attempt(),
                proto::StopReason_Name(s.reason()), grace.count());
  supervisor_->StopGroup(a.group, grace);
}

void AssignmentRunner::FetchLog(const proto::FetchLog& f) {
  proto::Envelope e;
  auto* c = e.mutable_agent_log_chunk();
  c->set_node(labels_.name());
  c->set_fetch_id(f.fetch_id());
  if (Status st = ValidatePathName(f.job_id(), "job id"); !st.ok()) {
    c->set_error(st.message());
    c->set_error_code(static_cast<int>(st.code()));
    c->set_eof(true);
    return out_.send(std::move(e));
  }
  fs::path path = LogPath(f.job_id(), f.attempt(), f.rank(), f.stream());
  int64_t max = f.max_bytes() > 0 ? std::min(f.max_bytes(), 1 << 20) : 64 << 10;
  // node_agent/log_reader.h: the cursor follows the log across rotation.
  auto read = ReadLog(path, LogCursor{f.generation(), f.offset()}, max);
  if (!read.ok()) c->set_error_code(static_cast<int>(read.status().code()));
  if (!read.ok() && read.status().code() != StatusCode::kNotFound) {
    c->set_error(read.status().message() + " (rank " + std::to_string(f.rank()) + " of " +
                 f.job_id() + " attempt " + std::to_string(f.attempt()) + " on " + labels_.name() +
                 ")");
    return out_.send(std::move(e));
  }
  if (!read.ok()) {
    c->set_error(std::string("no ") +
                 (f.stream() == proto::LOG_STDOUT   ? "stdout log"
                  : f.stream() == proto::LOG_STDERR ? "stderr log"
                                                    : "log") +
                 " for rank " + std::to_string(f.rank()) + " of " + f.job_id() + " attempt " +
                 std::to_string(f.attempt()) + " on " + labels_.name());
    return out_.send(std::move(e));
  }
  c->set_data(std::move(read->data));
  c->set_next_offset(read->next.offset);
  c->set_generation(read->next.generation);
  c->set_skipped(read->skipped);
  bool live = false;
  if (auto it = assignments_.find(GroupOf(f.job_id(), f.attempt())); it != assignments_.end()) {
    live = it->second.live.count(f.rank()) > 0 || it->second.open > 0;
  }
  c->set_eof(!live && read->at_live_end);
  out_.send(std::move(e));
}

// The assignment a child belongs to, and the child's global rank; null once forgotten.
AssignmentRunner::Assignment* AssignmentRunner::AssignmentOf(ChildId id, int* rank) {
  auto g = group_of_.find(id);
  if (g == group_of_.end()) return nullptr;
  auto it = assignments_.find(g->second);
  if (it == assignments_.end()) return nullptr;
  *rank = it->second.rank_of[id];
  return &it->second;
}

std::vector<RankMetrics> AssignmentRunner::RankMetricsNow() const {
  std::vector<RankMetrics> out;
  for (const auto& [g, a] : assignments_) {
    for (const auto& [id, rank] : a.rank_of) {
      RankMetrics m;
      m.job_id = a.spec.job_id();
      m.attempt = a.spec.attempt();
      m.rank = rank;
      auto pid = a.pid_of.find(id);
      m.pid = pid == a.pid_of.end() ? 0 : pid->second;
      m.state = a.live.count(rank) == 0 ? "exited" : a.stopping ? "stopping" : "running";
      m.started_ms = a.started_ms;
      if (auto it = a.last_line_ms.find(rank); it != a.last_line_ms.end()) {
        m.last_output_ms = it->second.first;
        m.last_progress_ms = it->second.second;
      }
      out.push_back(std::move(m));
    }
  }
  return out;
}

// A line of a rank's stdout, stderr or control channel: all are parsed alike.
void AssignmentRunner::OnLine(ChildId id, std::string_view line) {
  int rank = 0;
  Assignment* found = AssignmentOf(id, &rank);
  if (found == nullptr) return;
  Assignment& a = *found;
  auto& seen = a.last_line_ms[rank];
  seen.first = UnixMs();
  if (auto p = ParseProgressLine(line)) {
    seen.second = seen.first;
    // The lowest rank reporting since the last heartbeat wins (rank 0 preferred).
    auto& cur = progress_[a.spec.job_id()];
    if (!cur.job_id().empty() && rank > cur.rank()) return;
    p->set_rank(rank);
    p->set_job_id(a.spec.job_id());
    p->set_time_ms(UnixMs());
    cur = *p;
    return;
  }
  if (rank == 0 && !a.volume_path.empty()) {
    if (auto c = ParseCheckpointCommitLine(line)) OnCommitLine(a, c->step, c->seconds);
  }
}

// Rank 0 printed `MUSTER_CHECKPOINT step=N`: reported only once the step is good on the
// volume (the catalog records only steps that exist), then checkpoint.keep is applied. Done
// here on the reactor, before the rank's exit is queued, so a commit is always reported
// before the exit that follows it; the check opens only regular files (checkpoint_steps.h).
void AssignmentRunner::OnCommitLine(Assignment& a, int64_t step, double seconds) {
  if (step <= a.last_commit) return;  // printed again
  std::string job_dir = (fs::path(a.volume_path) / a.spec.job_id()).string();
  auto bytes = GoodStepBytes(job_dir, step);
  if (Status st = bytes.status(); !st.ok()) {
    logger_->error(
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
  r.set_checkpoint_bytes(*bytes);
  if (seconds > 0) r.set_checkpoint_commit_seconds(seconds);
  out_.report(std::move(r));
  out_.prune(job_dir, a.spec.checkpoint_keep());
}

void AssignmentRunner::OnExit(ChildId id, const ExitInfo& info) {
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
  a.rank_failed |= !info.success() && !a.stopping && !info.stopped;
  if (info.success() || a.stopping) {
    logger_->info("job {} rank {} {}", a.group, rank, info.Describe());
  } else {
    logger_->warn("job {} rank {} {}", a.group, rank, info.Describe());
  }
  if (a.live.empty()) {
    r.set_all_exited(true);
    a.all_exited_sent = true;
    if (a.deadline_timer != 0) reactor_.CancelTimer(a.deadline_timer);
    a.deadline_timer = 0;
    a.relay.reset();
    if (a.store) {
      a.store->RemoveScope(a.spec.job_id(), a.spec.attempt());
      a.store.reset();
    }
    std::error_code ec;
    fs::remove(a.notice_path, ec);
    // Kept while the job may resume from them (a failure, a lost peer, a notice).
    if (snapshots_ && (a.job_over || (!a.rank_failed && !a.stopping))) {
      snapshots_->DropJob(a.spec.job_id());
      forwarder_->ClearJob(a.spec.job_id());
      peer_server_->Revoke(a.spec.job_id());
    } else if (snapshots_) {
      AddSnapshotsHeld(a.spec.job_id(), r);  // what a resume may use: the ranks are gone
    }
  }
  if (!a.all_exited_sent || a.live.empty()) out_.report(std::move(r));
  SaveRanks();
}

void AssignmentRunner::OnClosed(ChildId id) {
  auto g = group_of_.find(id);
  if (g == group_of_.end()) return;
  std::string group = g->second;
  group_of_.erase(g);
  auto it = assignments_.find(group);
  if (it == assignments_.end()) return;
  if (auto p = it->second.pid_of.find(id); p != it->second.pid_of.end()) {
    out_.unguard(p->second);
    rank_trust_->Remove(p->second);
  }
  if (--it->second.open == 0 && it->second.live.empty()) assignments_.erase(it);
}

// Records the live ranks (pid, start time, group) so a restarted agent can stop ranks that
// outlived a kill -9 of this one.
void AssignmentRunner::SaveRanks() {
  fs::path path = options_.work_dir / "ranks.pids";
  std::ofstream out(path.string() + ".tmp", std::ios::trunc);
  for (const auto& c : supervisor_->List()) {
    if (!c.running) continue;
    out << c.pid << " " << ProcessStartTime(c.pid) << " " << c.group << "\n";
  }
  out.close();
  std::error_code ec;
  fs::rename(path.string() + ".tmp", path, ec);
}

// The watchdog found the lease running out and signalled the ranks' groups itself; here,
// when the reactor runs at all, the assignments learn that their exits are the agent's doing.
void AssignmentRunner::OnLeaseExpired(milliseconds silent) {
  bool any = !preflights_.empty();
  preflights_.clear();  // no rank may start without a lease
  for (auto& [g, a] : assignments_) {
    if (a.live.empty()) continue;
    any = true;
    a.stopping = true;
    supervisor_->StopGroup(g, options_.stop_grace);
  }
  if (any) {
    logger_->error(
        "lease running out: no heartbeat answered by the coordinator for {} ms; stopping every "
        "rank on this node so a requeued attempt elsewhere is the only one running",
        silent.count());
  }
}

void AssignmentRunner::OnNotice(const PreemptionNotice& n) {
  if (notice_) return;
  notice_ = n;
  int64_t deadline = ToUnixMs(n.deadline);
  logger_->warn("preemption notice from {} ({}): {} ms left", n.source, n.detail,
                deadline - UnixMs());
  for (auto& [g, a] : assignments_) {
    if (a.live.empty()) continue;
    AskCheckpoint(a, deadline, "preemption notice from " + n.source);
    // Whatever the coordinator says, the node goes away at the deadline.
    ArmDeadline(a, deadline, milliseconds(1000));
  }
  proto::AgentReport r;
  r.set_notice_deadline_ms(deadline);
  r.set_notice_source(n.source + (n.detail.empty() ? "" : ": " + n.detail));
  out_.report(std::move(r));
}

}  // namespace muster::node_agent
