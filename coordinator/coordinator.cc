#include "coordinator/coordinator.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "common/curve.h"
#include "common/logging.h"
#include "common/path_name.h"
#include "common/wire.h"
#include "coordinator/job_lifecycle.h"
#include "coordinator/job_spec.h"
#include "coordinator/node_state.h"
#include "coordinator/pool_capacity.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {

namespace {

constexpr int kFinishedKept = 200;  // terminal jobs kept in memory for status

auto Logger() {
  static auto l = log::Get("coord");
  return l;
}

bool Terminal(proto::JobState s) {
  return s == proto::JOB_SUCCEEDED || s == proto::JOB_FAILED || s == proto::JOB_CANCELLED;
}

NodeSpec ToNodeSpec(const proto::NodeLabels& l) {
  NodeSpec s;
  s.name = l.name();
  s.provider = l.provider();
  s.region = l.region();
  s.island = l.island();
  s.gpu_type = l.gpu_type();
  s.gpus = l.gpus();
  s.slots = l.slots();
  for (const auto& v : l.volumes()) s.volumes.push_back(v.name());
  return s;
}

proto::Envelope Wrap(auto setter) {
  proto::Envelope e;
  setter(e);
  return e;
}

}  // namespace

struct Coordinator::JobRt {
  JobRecord rec;
  // What the database holds for the job: rec as last written. A write that fails puts rec
  // back to it, so nothing in memory claims what the store does not have.
  JobRecord durable;
  JobRequest req;
  std::optional<proto::Progress> progress;
  AttemptState attempt;  // the current attempt's facts (job_lifecycle.h); fresh at each Start
  bool in_scheduler = false;
  // Retryable start errors in a row (job_lifecycle.h): a port in use on the master node.
  int start_retries = 0;
  int lease_requeues = 0;  // attempts in a row stopped by their agents' leases (job_lifecycle.h)
  // Replications in flight: provider -> give up waiting at (ms). A requeued job waits for them,
  // so it resumes on another provider from the newest step.
  struct Copy {
    int64_t step = 0;        // the newest step asked for
    int64_t give_up_ms = 0;  // stop waiting for it then
  };
  std::map<std::string, Copy> replicating;
  // Interactive jobs (`muster run` through the coordinator) end when their client stops asking
  // about them: the last status or logs request for the job.
  int64_t client_seen_ms = 0;
  // Hot spares (spares.cc), per attempt: 1 = every lost node of the gang was replaced by a
  // spare, so the next attempt starts on the survivors and spares once the lease fence passes,
  // without a scheduling pass; -1 = a lost node found none (placed again the usual way); 0 = no
  // node lost.
  int spare_restart = 0;
  // In-memory snapshots (snapshot_plan.h): where the current attempt resumed from, and, when
  // the previous snapshot resume failed, why the next attempt must not resume from snapshots.
  ResumeChoice snapshot_resumed;
  std::string snapshot_fallback;
  // Why a pending job waits for rec.not_before_ms, for its pending reason: a lost node's lease
  // fence (the last attempt ended node_lost), else the restart backoff.
  bool lease_fence = false;
};

constexpr int64_t kInteractiveClientTimeoutMs = 15000;

// Checkpoint copies (CopyRt): tries before a copy fails for good, the backoff between them
// (doubling from the first, capped), and how long a copy waits for its source node to come back.
constexpr int kMaxCopyTries = 8;
constexpr int64_t kCopyBackoffMs = 1000;
constexpr int64_t kCopyBackoffMaxMs = 30000;
constexpr int64_t kCopySourceWaitMs = 10 * 60 * 1000;

Coordinator::Coordinator(std::unique_ptr<CoordinatorDb> store, CoordinatorOptions options)
    : store_(std::move(store)),
      options_(std::move(options)),
      sched_(std::make_unique<Scheduler>(options_.quarantine)) {}

Coordinator::~Coordinator() {
  // First, while the database and the write latch are there: providers write their ledgers.
  providers_.reset();
  stopping_ = true;  // a kept-log copy cut short here is dropped (log_keeper.h: .part files)
  for (auto& [id, f] : fetches_) f.reply(ErrorEnvelope(0, UnavailableError("shutting down")));
  // The registry answers the parked polls.
}

StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(std::unique_ptr<CoordinatorDb> store,
                                                           CoordinatorOptions options) {
  if (!store) return InvalidArgumentError("no coordinator database");
  std::unique_ptr<Coordinator> c(new Coordinator(std::move(store), std::move(options)));
  if (!c->options_.log_keep_dir.empty()) {
    MUSTER_ASSIGN_OR_RETURN(c->log_keeper_,
                            LogKeeper::Open(c->options_.log_keep_dir, c->options_.log_keep));
  }
  MUSTER_RETURN_IF_ERROR(c->Restore());
  return c;
}

int64_t Coordinator::NowMs() const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(options_.clock().time_since_epoch())
      .count();
}

Status Coordinator::Restore() {
  int64_t now = NowMs();
  MUSTER_ASSIGN_OR_RETURN(auto keys, store_->LoadNodeKeys());
  MUSTER_ASSIGN_OR_RETURN(auto nodes, store_->LoadNodes());
  // Every agent gets a full heartbeat timeout to come back.
  nodes_.Restore(std::move(nodes), std::move(keys), now);
  for (auto& [name, n] : nodes_) {
    sched_->UpsertNode(ToNodeSpec(n->rec.labels));
    // Down until its agent registers again; draining is remembered.
    sched_->SetNodeState(n->rec.labels.name(), NodeState::kDown).IgnoreError();
    if (n->rec.quarantined_until_ms > now) {
      sched_->RestoreQuarantine(n->rec.labels.name(), n->rec.quarantines,
                                TimePoint(std::chrono::milliseconds(n->rec.quarantined_until_ms)));
    }
  }
  MUSTER_ASSIGN_OR_RETURN(auto jobs, store_->LoadJobs());
  MUSTER_ASSIGN_OR_RETURN(auto exclusions, store_->LoadExclusions());
  int restored = 0;
  for (auto& rec : jobs) {
    if (Terminal(rec.state)) continue;
    auto j = std::make_unique<JobRt>();
    j->rec = std::move(rec);
    j->durable = j->rec;
    auto spec = JobSpecFromProto(j->rec.spec);
    if (!spec.ok()) {
      j->rec.state = proto::JOB_FAILED;
      j->rec.detail = "stored spec no longer valid: " + spec.status().message();
      MUSTER_RETURN_IF_ERROR(store_->UpdateJob(j->rec));
      continue;
    }
    j->req = ToJobRequest(*spec, j->rec.id, j->rec.seq);
    if (auto ex = exclusions.find(j->rec.id); ex != exclusions.end())
      j->req.excluded_nodes = ex->second;
    if ((j->rec.state == proto::JOB_SCHEDULED || j->rec.state == proto::JOB_RUNNING) &&
        !j->rec.nodes.empty()) {
      Status st = sched_->RestoreRunning(j->req, j->rec.nodes);
      if (st.ok()) {
        j->in_scheduler = true;
        // Its nodes confirm the assignment when they re-register (reconciliation).
      }
    }
    if (!j->in_scheduler) {
      j->rec.state = proto::JOB_PENDING;
      j->rec.nodes.clear();
      // Before any request: a store that cannot take this write fails the start.
      MUSTER_RETURN_IF_ERROR(Persist(*j));
      // A restart backoff or a lost node's lease fence (not_before, wall-clock time) still holds:
      // Tick submits the job once it has passed, as it would have without the restart.
      if (j->rec.not_before_ms <= now) {
        sched_->Submit(j->req).IgnoreError();
        j->in_scheduler = true;
      } else if (auto attempts = store_->LoadAttempts(j->rec.id);
                 attempts.ok() && !attempts->empty()) {
        j->lease_fence = attempts->back().outcome == "node_lost";
      }
    }
    ++restored;
    jobs_.emplace(j->rec.id, std::move(j));
  }
  RestoreCopies();
  RestoreSpares();
  RestoreLogCopies(now);
  // A snapshot resume that failed before a kill -9 still sends the next attempt to the volume.
  if (auto fb = store_->LoadSnapshotFallbacks(); fb.ok()) {
    for (const auto& [id, why] : *fb) {
      if (auto it = jobs_.find(id); it != jobs_.end()) it->second->snapshot_fallback = why;
    }
  } else {
    Logger()->error("snapshot fallbacks not restored: {}", fb.status().ToString());
  }
  Logger()->info("restored {} node(s) and {} unfinished job(s) from {}", nodes_.size(), restored,
                 store_->path().string());
  return Status::Ok();
}

void Coordinator::Event(const std::string& job, const std::string& node, const std::string& kind,
                        const std::string& message) {
  proto::Event e;
  e.set_time_ms(NowMs());
  e.set_job_id(job);
  e.set_node(node);
  e.set_kind(kind);
  e.set_message(message);
  // Logged either way; a failed append latches (not stored after that).
  Write("event " + kind, [&] { return store_->AppendEvent(e).status(); }).IgnoreError();
  Logger()->info("{}{}{}: {}", job.empty() ? "" : "job " + job + " ",
                 node.empty() ? "" : "node " + node + " ", kind, message);
}

void Coordinator::SaveSnapshotFallback(JobRt& job, const std::string& why) {
  // Latched on failure like every write; memory follows either way (this attempt's choice).
  Write("snapshot fallback of job " + job.rec.id, [&] {
    return store_->PutSnapshotFallback(job.rec.id, why, NowMs());
  }).IgnoreError();
  job.snapshot_fallback = why;
}

Status Coordinator::Persist(JobRt& job) {
  job.rec.updated_ms = NowMs();
  Status st = Write("job " + job.rec.id, [&] { return store_->UpdateJob(job.rec); });
  if (st.ok()) {
    job.durable = job.rec;
  } else {
    job.rec = job.durable;  // what the store has
  }
  return st;
}

Status Coordinator::Write(const std::string& what, const std::function<Status()>& write) {
  if (!write_error_.ok()) return Refusal();
  Status st = write();
  if (st.ok()) return st;
  // LevelDB's background error: the first failure is kept and every later change refused, so
  // the coordinator never acts on (or reports) state the store does not have.
  write_error_ = Status(st.code(), fmt::format("writing {} to {} failed: {}", what,
                                               store_->path().string(), st.message()));
  Logger()->critical(
      "{}; refusing every change from now on (reads still work): fix the database and restart "
      "the coordinator",
      write_error_.message());
  return Refusal();
}

Status Coordinator::Refusal() const {
  return UnavailableError(fmt::format(
      "the coordinator refuses changes since a durable write failed ({}); reads still work; "
      "fix the database and restart the coordinator",
      write_error_.message()));
}

void Coordinator::Enqueue(const std::string& node, proto::AgentAction action) {
  nodes_.Enqueue(node, std::move(action));
}

// ---------------------------------------------------------------------------------------------
// Scheduling and the lifecycle

void Coordinator::Pass() {
  pass_needed_ = false;
  auto pass_start = std::chrono::steady_clock::now();
  Decisions d = sched_->Schedule(options_.clock());
  if (observer_) observer_->OnSchedulerPass(std::chrono::steady_clock::now() - pass_start);
  for (auto& p : d.placements) {
    auto it = jobs_.find(p.job);
    if (it == jobs_.end()) {
      sched_->Release(p.job).IgnoreError();
      continue;
    }
    // Not started (the store did not take it): back in the queue, as the store has it.
    if (!Start(*it->second, p.nodes)) sched_->Requeue(p.job).IgnoreError();
  }
  for (auto& pr : d.preemptions) {
    auto it = jobs_.find(pr.victim);
    if (it == jobs_.end()) continue;
    Event(pr.victim, "", "preempted",
          fmt::format("stopping for higher-priority job {}", pr.for_job));
    it->second->spare_restart = -1;  // its nodes go to the preemptor
    StopGang(*it->second, proto::STOP_PREEMPTED, "", NowMs() + options_.stop_grace.count());
  }
  SpareEvents(d);
  SaveSpares();
}

std::vector<JobRequest> Coordinator::PendingRequests() const {
  std::vector<JobRequest> pending;
  for (const auto& [id, j] : jobs_) {
    if (j->in_scheduler && sched_->IsPending(id)) pending.push_back(j->req);
  }
  return pending;
}

bool Coordinator::Start(JobRt& job, const std::vector<std::string>& nodes) {
  if (!write_error_.ok()) return false;  // refusing changes: no attempt starts
  auto& r = job.rec;
  r.attempt++;
  r.nodes = nodes;
  r.state = proto::JOB_SCHEDULED;
  r.detail.clear();
  job.attempt = AttemptState{};
  job.spare_restart = 0;
  job.attempt.started_ms = NowMs();
  job.progress.reset();
  r.resume_step = -1;
  std::string provider;
  std::string master = nodes.empty() ? "" : nodes[0];
  if (const NodeRt* m = nodes_.Find(master)) {
    provider = m->rec.labels.provider();
    if (!m->rec.labels.address().empty()) master = m->rec.labels.address();
  }
  // Each provider mounts its own volume under the job's volume name: resume from the newest
  // step committed (or verified as a replica) on this provider's.
  if (!r.spec.checkpoint_volume().empty()) {
    auto step = store_->LatestCommittedStep(r.id, VolumeKey(r.spec.checkpoint_volume(), provider));
    if (step.ok() && step->has_value()) r.resume_step = **step;
  }
  // Nothing starts unless the store has the attempt.
  if (!Persist(job).ok()) return false;
  if (!Write(fmt::format("attempt {} of job {}", r.attempt, r.id), [&] {
         return store_->PutAttempt({r.id, r.attempt, nodes, NowMs(), 0, "", ""});
       }).ok()) {
    return true;  // scheduled in the store; nothing sent (a restart reconciles it)
  }
  Event(r.id, "", "scheduled",
        fmt::format("attempt {} on provider {}: {}", r.attempt, provider, fmt::join(nodes, ",")));
  std::vector<proto::AgentAction> starts(nodes.size());
  ResumeChoice snapshot_choice;
  if (r.spec.snapshot_every_steps() > 0) {
    std::vector<SnapshotNode> sn;
    for (const auto& name : nodes) {
      const NodeRt* n = nodes_.Find(name);
      sn.push_back({name, n ? n->rec.labels.snapshot_endpoint() : "",
                    n ? n->rec.labels.snapshot_key() : ""});
    }
    snapshot_choice =
        PlanSnapshots(sn, r.spec.ranks_per_node(), snapshot_book_.Of(r.id),
                      r.resume_step >= 0 ? std::optional<int64_t>(r.resume_step) : std::nullopt,
                      starts, job.snapshot_fallback);
  }
  job.snapshot_resumed = snapshot_choice;
  if (!job.snapshot_fallback.empty()) SaveSnapshotFallback(job, "");  // planned: used up
  // Frames held outside this attempt's nodes cannot be used by it: freed there.
  for (const auto& n : snapshot_book_.TakeHoldersExcept(r.id, nodes)) {
    proto::AgentAction drop;
    drop.mutable_drop_snapshots()->set_job_id(r.id);
    Enqueue(n, std::move(drop));
  }
  if (snapshot_choice.source == ResumeChoice::Source::kSnapshot) {
    Event(r.id, "", "resumed",
          SnapshotResumeEvent(
              r.attempt, snapshot_choice,
              r.resume_step >= 0 ? std::optional<int64_t>(r.resume_step) : std::nullopt));
  } else if (r.resume_step >= 0) {
    // With snapshots on, the event says why they were not used.
    Event(r.id, "", "resumed",
          fmt::format("attempt {} resumes from step {} on volume {} (provider {}){}", r.attempt,
                      r.resume_step, r.spec.checkpoint_volume(), provider,
                      snapshot_choice.reason.empty() ? "" : ": " + snapshot_choice.reason));
  }
  // MASTER_PORT is left to the program (torch's TCPStore binds it on rank 0's host); the
  // rendezvous store listens 500 ports above it. A retry moves to other ports, so a port some
  // other program holds costs one attempt, not all of them.
  int port = options_.rendezvous_port_base + static_cast<int>((r.seq * 7 + r.attempt) % 500);
  int store_port = port + 500;
  // The attempt's store keys: "<server secret>,<client secret>"; every agent derives the same
  // credentials from them, the node-rank-0 agent serves with the server key.
  auto rdzv_server = GenerateKeyPair();
  auto rdzv_client = GenerateKeyPair();
  std::string rdzv_key;
  if (rdzv_server.ok() && rdzv_client.ok()) {
    rdzv_key = rdzv_server->secret_key + "," + rdzv_client->secret_key;
  }
  int nn = static_cast<int>(nodes.size());
  int rpn = r.spec.ranks_per_node();
  for (int i = 0; i < nn; ++i) {
    proto::AgentAction& a = starts[i];  // snapshot fields already set
    auto* s = a.mutable_start();
    s->set_job_id(r.id);
    s->set_attempt(r.attempt);
    s->set_node_rank(i);
    s->set_nnodes(nn);
    s->set_ranks_per_node(rpn);
    for (const auto& c : r.spec.command()) s->add_command(c);
    // The job's own env; the agent adds the contract from the fields (common/rank_env.h).
    for (const auto& [k, v] : r.spec.env()) (*s->mutable_env())[k] = v;
    s->set_master_addr(master);
    s->set_master_port(port);
    s->set_rendezvous_port(store_port);
    s->set_checkpoint_every_steps(r.spec.checkpoint_every_steps());
    s->set_checkpoint_every_s(r.spec.checkpoint_every_s());
    s->set_host_rendezvous(i == 0);
    s->set_rendezvous_key(rdzv_key);
    s->set_checkpoint_volume(r.spec.checkpoint_volume());
    s->set_resume_step(r.resume_step);
    s->set_checkpoint_keep(r.spec.checkpoint_keep());
    s->set_snapshot_every_steps(r.spec.snapshot_every_steps());
    s->set_time_limit_ms(r.spec.time_limit_s() * 1000);
    s->set_split_streams(r.spec.interactive());  // `muster run` keeps stdout and stderr apart
    Enqueue(nodes[i], std::move(a));
  }
  return true;
}

// A copy of `step` to `provider` ended (copied or failed): the job stops waiting for that
// provider unless it waits for a newer step (an older copy that was already running).
void Coordinator::Replicated(JobRt& job, const std::string& provider, int64_t step) {
  auto it = job.replicating.find(provider);
  if (it != job.replicating.end() && step >= it->second.step) job.replicating.erase(it);
}

std::string Coordinator::VolumeKey(const std::string& volume, const std::string& provider) const {
  return provider.empty() ? volume : volume + "@" + provider;
}

void Coordinator::Replicate(JobRt* job, const std::string& job_id, int64_t step,
                            const std::string& volume, const NodeRt& source) {
  const auto& src = source.rec.labels;
  if (src.transfer_endpoint().empty() || !write_error_.ok()) return;
  // Both become directories on the target's volume (<root>/<job>): names only, never paths.
  for (const Status& st :
       {ValidatePathName(job_id, "job id"), ValidatePathName(volume, "volume name")}) {
    if (!st.ok()) {
      Logger()->warn("not replicating a checkpoint reported by {}: {}", src.name(), st.message());
      return;
    }
  }
  int keep = job ? job->rec.spec.checkpoint_keep() : 0;
  std::set<std::string> providers;
  for (const auto& [name, n] : nodes_) {
    const auto& l = n->rec.labels;
    if (n->session.empty() || l.provider() == src.provider()) continue;
    // Only an agent (registered with an agent key) that is up receives another job's bytes.
    if (n->role != KeyRole::kAgent && n->role != KeyRole::kLegacy) continue;
    auto view = sched_->GetNode(name, options_.clock());
    if (!view.ok() || view->state != NodeState::kUp) continue;
    bool mounts = std::any_of(l.volumes().begin(), l.volumes().end(),
                              [&](const proto::Volume& v) { return v.name() == volume; });
    if (mounts) providers.insert(l.provider());
  }
  for (const auto& provider : providers) {
    CopyRt& c = copies_[{job_id, provider}];
    if (c.step >= step) continue;  // this step or a newer one is copied (or was) already
    // An older copy not done yet is no longer followed (nor retried); if it still runs on the
    // target it ends as a replica or, when the target drops it, as replicate_superseded.
    c = CopyRt{};
    c.job_id = job_id;
    c.provider = provider;
    c.volume = volume;
    c.step = step;
    c.source = src.name();
    if (!IssueCopy(c, keep)) continue;
    if (job) job->replicating[provider] = {step, NowMs() + 60 * 1000};
    SaveCopies();
    Event(job_id, c.target, "replicating",
          fmt::format("step {} from {} (provider {}) to volume {} of provider {}", step, src.name(),
                      src.provider(), volume, provider));
  }
}

bool Coordinator::IssueCopy(CopyRt& c, int keep) {
  const NodeRt* src = nodes_.Find(c.source);
  if (src == nullptr || !src->connected() || src->rec.labels.transfer_endpoint().empty()) {
    return false;
  }
  const NodeRt* target = nullptr;
  for (const auto& [name, n] : nodes_) {
    const auto& l = n->rec.labels;
    if (n->session.empty() || l.provider() != c.provider) continue;
    // Only an agent (registered with an agent key) that is up receives another job's bytes.
    if (n->role != KeyRole::kAgent && n->role != KeyRole::kLegacy) continue;
    auto view = sched_->GetNode(name, options_.clock());
    if (!view.ok() || view->state != NodeState::kUp) continue;
    if (std::none_of(l.volumes().begin(), l.volumes().end(),
                     [&](const proto::Volume& v) { return v.name() == c.volume; })) {
      continue;
    }
    if (name == c.target) {  // the same node as before, where it is back
      target = n.get();
      break;
    }
    if (target == nullptr) target = n.get();
  }
  if (target == nullptr) return false;
  auto key = GenerateKeyPair();
  if (!key.ok()) return false;
  const auto& sl = src->rec.labels;
  proto::AgentAction allow;
  allow.mutable_allow_transfer()->set_job_id(c.job_id);
  allow.mutable_allow_transfer()->set_client_public_key(key->public_key);
  // The source checks the key's expiry on every request of the copy, which may wait behind
  // another copy of the job and then run for hours (hundreds of GB across providers): a day.
  // The key reads only this job's directories, read-only, and only the target knows it.
  allow.mutable_allow_transfer()->set_expires_ms(NowMs() + 24 * 3600 * 1000LL);
  grants_.push_back({c.job_id, sl.name(), target->rec.labels.name(), key->public_key,
                     allow.allow_transfer().expires_ms()});
  Enqueue(sl.name(), std::move(allow));
  proto::AgentAction copy;
  auto* r = copy.mutable_replicate();
  r->set_job_id(c.job_id);
  r->set_step(c.step);
  r->set_volume(c.volume);
  r->set_source_node(sl.name());
  r->set_source_endpoint(sl.transfer_endpoint());
  r->set_source_key(sl.transfer_key());
  r->set_client_secret(key->secret_key);
  r->set_checkpoint_keep(keep);
  c.target = target->rec.labels.name();
  c.target_session = target->session;
  c.retry_at_ms = 0;
  c.waiting_since_ms = 0;
  Enqueue(c.target, std::move(copy));
  return true;
}

void Coordinator::RetryCopy(CopyRt& c, const std::string& why) {
  if (++c.tries >= kMaxCopyTries) {
    c.done = true;
    Event(c.job_id, c.target, "replicate_failed",
          fmt::format("step {} to volume {} of provider {}: {}; gave up after {} tries", c.step,
                      c.volume, c.provider, why, c.tries));
    return;
  }
  int64_t delay = std::min(kCopyBackoffMaxMs, kCopyBackoffMs << std::min(c.tries - 1, 16));
  c.retry_at_ms = NowMs() + delay;
  Event(c.job_id, c.target, "replicate_retry",
        fmt::format("step {} to volume {} of provider {}: {}; try {} of {} in {} ms", c.step,
                    c.volume, c.provider, why, c.tries + 1, kMaxCopyTries, delay));
}

void Coordinator::TickCopies(int64_t now) {
  for (auto it = copies_.begin(); it != copies_.end();) {
    CopyRt& c = it->second;
    auto job = jobs_.find(c.job_id);
    if (c.done || job == jobs_.end()) {
      // Kept (with its step) while the job is, so an older step is never copied after it.
      it = job == jobs_.end() ? copies_.erase(it) : std::next(it);
      continue;
    }
    if (Terminal(job->second->rec.state)) {
      // No attempt will resume from it, and the job's transfer keys are revoked as it ends.
      c.done = true;
      if (c.tries > 0 || c.retry_at_ms > 0) {
        Event(c.job_id, c.target, "replicate_abandoned",
              fmt::format("step {} to volume {} of provider {}: not retried, the job ended", c.step,
                          c.volume, c.provider));
      }
      ++it;
      continue;
    }
    if (c.retry_at_ms == 0) {
      const NodeRt* t = nodes_.Find(c.target);
      if (t == nullptr || t->session != c.target_session) {
        // The try died with its target: the key it was given reads nothing more at the source.
        for (auto g = grants_.begin(); g != grants_.end();) {
          if (g->job_id == c.job_id && g->target == c.target) {
            RevokeTransfer(*g, "its target restarted or was lost");
            g = grants_.erase(g);
          } else {
            ++g;
          }
        }
        RetryCopy(c, t != nullptr && t->connected()
                         ? "target " + c.target + " restarted during the copy"
                         : "target " + c.target + " was lost during the copy");
      }
    } else if (c.retry_at_ms <= now) {
      if (IssueCopy(c, job->second->rec.spec.checkpoint_keep())) {
        c.waiting_since_ms = 0;
      } else {
        if (c.waiting_since_ms == 0) c.waiting_since_ms = now;
        if (now - c.waiting_since_ms > kCopySourceWaitMs) {
          c.done = true;
          Event(c.job_id, c.target, "replicate_failed",
                fmt::format("step {} to volume {} of provider {}: source {} or a target on {} "
                            "not connected for {} s; gave up",
                            c.step, c.volume, c.provider, c.source, c.provider,
                            kCopySourceWaitMs / 1000));
        } else {
          c.retry_at_ms = now + kCopyBackoffMs;  // look again soon
        }
      }
    }
    ++it;
  }
}

void Coordinator::OnCopyReport(const NodeRt& target, const proto::AgentReport& req) {
  const std::string& node = target.rec.labels.name();
  const std::string& provider = target.rec.labels.provider();
  auto it = copies_.find({req.job_id(), provider});
  CopyRt* c = it == copies_.end() ? nullptr : &it->second;
  bool current = c != nullptr && !c->done && c->step == req.checkpoint_step();
  if (req.replicate_superseded_by() > 0) {
    // The target dropped a waiting request that a newer step's copy replaced.
    if (current) c->done = true;
    Event(req.job_id(), node, "replicate_superseded",
          fmt::format("step {} to volume {} of provider {}: step {} is copied instead",
                      req.checkpoint_step(), req.checkpoint_volume(), provider,
                      req.replicate_superseded_by()));
    return;
  }
  if (!req.replicate_error().empty()) {
    if (current && c->retry_at_ms == 0) {
      RetryCopy(*c, "failed on " + node + ": " + req.replicate_error());
    } else if (!current) {
      Event(req.job_id(), node, "replicate_superseded",
            fmt::format("step {} to volume {} of provider {} failed ({}); not retried: step {} is "
                        "copied instead",
                        req.checkpoint_step(), req.checkpoint_volume(), provider,
                        req.replicate_error(), c ? c->step : 0));
    }
    return;
  }
  if (req.checkpoint_replica() && c != nullptr && !c->done && c->step <= req.checkpoint_step()) {
    c->done = true;
  }
}

void Coordinator::RevokeTransfer(const TransferGrant& g, const std::string& why) {
  Logger()->info("revoking the transfer key of {} on {} (copy to {}): {}", g.job_id, g.source,
                 g.target, why);
  proto::AgentAction a;
  a.mutable_revoke_transfer()->set_job_id(g.job_id);
  a.mutable_revoke_transfer()->set_client_public_key(g.public_key);
  Enqueue(g.source, std::move(a));
}

void Coordinator::StopGang(JobRt& job, proto::StopReason reason, const std::string& except,
                           int64_t checkpoint_deadline_ms) {
  // Refusing changes: the ranks run on as the store says, unless it says they stop already.
  if (!write_error_.ok() && !Terminal(job.durable.state) &&
      job.durable.state != proto::JOB_REQUEUED) {
    return;
  }
  bool requeues = job.attempt.RecordStop(reason, checkpoint_deadline_ms,
                                         !job.rec.spec.checkpoint_volume().empty());
  if (requeues && (job.rec.state == proto::JOB_SCHEDULED || job.rec.state == proto::JOB_RUNNING)) {
    job.rec.state = proto::JOB_REQUEUED;
    if (!Persist(job).ok()) return;
  }
  for (const auto& n : job.rec.nodes) {
    if (n == except || job.attempt.done.count(n)) continue;
    proto::AgentAction a;
    auto* s = a.mutable_stop();
    s->set_job_id(job.rec.id);
    s->set_attempt(job.rec.attempt);
    s->set_reason(reason);
    s->set_grace_ms(reason == proto::STOP_PEER_FAILED
                        ? std::min(options_.stop_grace, options_.peer_failed_grace).count()
                        : options_.stop_grace.count());
    if (job.attempt.checkpoint_deadline_ms > 0) {
      s->set_checkpoint_first(true);
      s->set_checkpoint_deadline_ms(job.attempt.checkpoint_deadline_ms);
    }
    Enqueue(n, std::move(a));
  }
}

void Coordinator::NodeDone(JobRt& job, const std::string& node) {
  job.attempt.done.insert(node);
  KeepLogs(job.rec, node);
  if (job.attempt.done.size() < job.rec.nodes.size()) return;
  Finish(job);
}

// Every node of the attempt has stopped: decide what becomes of the job (job_lifecycle.h) and
// apply the decision.
void Coordinator::Finish(JobRt& job) {
  if (!write_error_.ok()) return;  // refusing changes: the job stays as the store has it
  auto& r = job.rec;
  int64_t now = NowMs();
  // An attempt that reported a step past the one it resumed from ends a run of lease stops.
  const bool progressed = job.progress && job.progress->step() > r.resume_step;
  AttemptEndDecision d = DecideAttemptEnd(
      job.attempt, r, job.start_retries, !job.replicating.empty(), now,
      {AgentLeaseMs(), options_.heartbeat_timeout.count()}, progressed ? 0 : job.lease_requeues);
  if (!d.blame_node.empty()) {
    if (auto until = sched_->RecordNodeFailure(d.blame_node, options_.clock())) {
      NodeRt* n = nodes_.Find(d.blame_node);
      MUSTER_CHECK(n != nullptr) << "blamed node " << d.blame_node << " is not registered";
      NodeRecord next = n->rec;
      next.quarantines++;
      next.quarantined_until_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(until->time_since_epoch()).count();
      if (Write("node " + d.blame_node, [&] { return store_->PutNode(next); }).ok()) {
        n->rec = next;
        Event("", d.blame_node, "node_quarantined",
              fmt::format("failed repeatedly; quarantined until {} ms", next.quarantined_until_ms));
      }
    }
  }
  // The agents stopping the ranks says nothing about the snapshots it resumed from.
  if (d.kind == AttemptEndDecision::Kind::kRestart && !d.stopped_by_agents) {
    auto why = FailedSnapshotResume(
        r.attempt, job.snapshot_resumed,
        job.progress ? std::optional<int64_t>(job.progress->step()) : std::nullopt,
        job.attempt.failure);
    if (why) {
      // Those frames are not tried again: freed, and the next attempt resumes from the volume.
      SaveSnapshotFallback(job, *why);
      Event(r.id, "", "snapshot_resume_failed", *why);
      for (const auto& n : snapshot_book_.TakeHoldersExcept(r.id, {})) {
        proto::AgentAction drop;
        drop.mutable_drop_snapshots()->set_job_id(r.id);
        Enqueue(n, std::move(drop));
      }
    }
  }
  r.state = d.state;
  if (Terminal(r.state)) {
    // The job is over: every agent that holds snapshots of it frees them.
    snapshot_pinner_.Forget(r.id);
    if (!job.snapshot_fallback.empty()) SaveSnapshotFallback(job, "");
    for (const auto& n : snapshot_book_.TakeHoldersExcept(r.id, {})) {
      proto::AgentAction drop;
      drop.mutable_drop_snapshots()->set_job_id(r.id);
      Enqueue(n, std::move(drop));
    }
  }
  if (d.set_detail) r.detail = d.detail;
  r.restarts = d.restarts;
  r.preemptions = d.preemptions;
  r.not_before_ms = d.not_before_ms;
  job.lease_fence = d.kind == AttemptEndDecision::Kind::kNodeLost;
  job.start_retries = d.start_retries;
  job.lease_requeues = d.lease_requeues;
  for (const auto& e : d.events) Event(r.id, "", e.kind, e.message);
  Write(fmt::format("attempt {} of job {}", r.attempt, r.id), [&] {
    return store_->PutAttempt(
        {r.id, r.attempt, r.nodes, job.attempt.started_ms, now, d.outcome, d.attempt_detail});
  }).IgnoreError();  // latched if it failed; the job record below is then not written either
  const std::vector<std::string> attempt_nodes = r.nodes;
  if (r.state == proto::JOB_PENDING) r.nodes.clear();
  // On failure the record goes back to what the store has, and the scheduler keeps the job.
  if (!Persist(job).ok()) return;
  if (d.credit_nodes) {
    for (const auto& n : attempt_nodes) sched_->RecordNodeSuccess(n);
  }
  if (job.spare_restart == 1 && d.kind == AttemptEndDecision::Kind::kNodeLost &&
      sched_->IsRunning(r.id)) {
    // Survivors and spares stay the job's; Tick starts them once the lease fence has passed.
  } else if (d.queue == AttemptEndDecision::Queue::kRequeue) {
    job.spare_restart = 0;
    sched_->Requeue(r.id).IgnoreError();
  } else {
    job.spare_restart = 0;
    sched_->Release(r.id).IgnoreError();
    job.in_scheduler = false;
  }
  pass_needed_ = true;
}

bool Coordinator::IsAgentSession(const Caller& caller, const std::string& node,
                                 const std::string& session) {
  NodeRt* n = nodes_.Find(node);
  return n != nullptr && !session.empty() && n->session == session &&
         nodes_.MaySpeakFor(node, caller.public_key);
}

void Coordinator::AgentGone(const std::string& node, const std::string& session,
                            const std::string& why) {
  NodeRt* n = nodes_.Find(node);
  if (n == nullptr || session.empty() || n->session != session) return;
  // Refusing changes: as in Tick, nobody is declared lost.
  if (!write_error_.ok()) return;
  LoseNode(*n, why, /*agent_gone=*/true);
}

void Coordinator::LoseNode(NodeRt& node, const std::string& why, bool agent_gone) {
  const std::string& name = node.rec.labels.name();
  snapshot_book_.ForgetNode(name);  // its memory is gone with it
  nodes_.Disconnect(node);
  sched_->SetNodeState(name, NodeState::kDown).IgnoreError();
  Event("", name, "node_lost", why);
  DropLostSpare(name);
  for (auto& [id, j] : jobs_) {
    if (j->spare_restart == 1 && j->rec.state == proto::JOB_PENDING) {
      // Waiting out the fence to restart on survivors and spares: one of those is lost now.
      auto held = sched_->AllocationOf(id);
      if (std::find(held.begin(), held.end(), name) != held.end() && !ReplaceWithSpare(id, name)) {
        j->spare_restart = 0;
        sched_->Release(id).IgnoreError();
        j->in_scheduler = false;  // submitted again once its not_before has passed
      }
      continue;
    }
    if (Terminal(j->rec.state) && j->attempt.done.size() == j->rec.nodes.size()) continue;
    if (std::find(j->rec.nodes.begin(), j->rec.nodes.end(), name) == j->rec.nodes.end()) continue;
    if (j->attempt.done.count(name)) continue;
    if (!Terminal(j->rec.state)) {
      j->attempt.RecordNodeLost(fmt::format("node {} lost ({})", name, why), false, agent_gone);
      Event(id, name, "node_lost", fmt::format("attempt {}: {}", j->rec.attempt, why));
      // Only a gang stopping for its own lost nodes restarts on spares (not a preempted or
      // time-limited one).
      bool own_loss = j->attempt.stop == proto::STOP_REASON_UNSPECIFIED ||
                      j->attempt.stop == proto::STOP_PEER_FAILED;
      if (j->req.spares > 0 && j->spare_restart >= 0) {
        j->spare_restart = own_loss && ReplaceWithSpare(id, name) ? 1 : -1;
      }
      StopGang(*j, proto::STOP_PEER_FAILED, name);
    }
    NodeDone(*j, name);
  }
}

void Coordinator::Tick() {
  int64_t now = NowMs();
  nodes_.ExpirePolls(now);
  // A flush of the store that failed off this thread (coordinator_db.h) latches as a failed
  // write does, at the next tick rather than at the next change.
  if (write_error_.ok()) {
    if (Status flush = store_->FlushError(); !flush.ok()) {
      Write("the state database's log", [&] { return flush; }).IgnoreError();
    }
  }
  if (!write_error_.ok()) {
    // Refusing changes: no node is declared lost, no job stopped, started or requeued. Agents
    // that keep heartbeating keep their leases, so running ranks go on until a restarted
    // coordinator (on a store that works) reconciles them.
    ExpireFetches(now);
    return;
  }
  for (auto& [name, n] : nodes_) {
    bool expected = !n->session.empty();
    bool runs_ranks = false;  // restored with an attempt's ranks on it
    if (!expected) {
      // Restored after a restart: a node whose jobs are still assigned must come back in time.
      for (auto& [id, j] : jobs_) {
        if (!Terminal(j->rec.state) && !j->attempt.done.count(name) &&
            std::find(j->rec.nodes.begin(), j->rec.nodes.end(), name) != j->rec.nodes.end())
          runs_ranks = true;
      }
      expected = runs_ranks;
      // A restored spare that never comes back is dropped (and replaced), not held forever.
      if (auto v = sched_->GetNode(name, options_.clock()); v.ok() && v->spare) expected = true;
    }
    if (!expected) continue;
    if (runs_ranks) {
      // Its agent has had no reply from this coordinator (a reply would have given it a
      // session), so it keeps its ranks running until its lease, renewed last before the
      // restart, runs out: waiting that long for it to register again costs nothing, and a
      // restart on a loaded host (agents reconnecting slower than a heartbeat timeout) stops no
      // gang. If it does not come back by then, its lease has run out and its ranks are stopped:
      // lost without a fence to wait out, so the job restarts when it would have after a loss
      // at the heartbeat timeout plus the fence.
      const int64_t allowed = std::max(options_.heartbeat_timeout.count(), AgentLeaseMs()) + 500;
      if (n->last_hb_ms + allowed < now) {
        LoseNode(*n,
                 fmt::format("not back {} ms after the coordinator restarted (its lease has run "
                             "out)",
                             now - n->last_hb_ms),
                 /*agent_gone=*/true);
        n->last_hb_ms = now;  // report once
      }
      continue;
    }
    if (n->last_hb_ms + options_.heartbeat_timeout.count() < now) {
      LoseNode(*n, fmt::format("no heartbeat for {} ms", now - n->last_hb_ms));
      n->last_hb_ms = now;  // report once
    }
  }
  ExpireFetches(now);
  TickLogCopies(now);
  TickCopies(now);
  SaveCopies();
  // Transfer keys of jobs that ended are revoked; expired ones the source dropped itself.
  for (auto g = grants_.begin(); g != grants_.end();) {
    auto j = jobs_.find(g->job_id);
    if (g->expires_ms <= now) {
      g = grants_.erase(g);
    } else if (j == jobs_.end() || Terminal(j->second->rec.state)) {
      RevokeTransfer(*g, "the job ended");
      g = grants_.erase(g);
    } else {
      ++g;
    }
  }
  std::vector<std::string> forget;
  for (auto& [id, j] : jobs_) {
    auto& r = j->rec;
    for (auto rit = j->replicating.begin(); rit != j->replicating.end();) {
      rit = rit->second.give_up_ms <= now ? j->replicating.erase(rit) : std::next(rit);
    }
    if (j->spare_restart == 1 && r.state == proto::JOB_PENDING && r.not_before_ms <= now) {
      // The lost node's lease fence has passed: the survivors and spares start at once.
      auto nodes = sched_->AllocationOf(id);
      if (nodes.empty()) {  // not held any more: placed the usual way
        j->spare_restart = 0;
        j->in_scheduler = sched_->IsPending(id);
        continue;
      }
      Event(id, "", "restarting_on_spares",
            fmt::format("attempt {} on {} without a scheduling pass", r.attempt + 1,
                        fmt::join(nodes, ",")));
      if (!Start(*j, nodes)) sched_->Requeue(id).IgnoreError();
      continue;
    }
    if (r.state == proto::JOB_PENDING && !j->in_scheduler && r.not_before_ms <= now &&
        j->replicating.empty()) {
      if (sched_->Submit(j->req).ok()) j->in_scheduler = true;
      pass_needed_ = true;
    }
    if (r.spec.interactive() && !Terminal(r.state)) {
      if (j->client_seen_ms == 0) j->client_seen_ms = now;  // new, or restored after a restart
      if (now - j->client_seen_ms > kInteractiveClientTimeoutMs) {
        proto::CancelRequest cancel;
        cancel.set_job_id(id);
        (void)OnCancel(Caller{"coordinator", "", KeyRole::kAdmin, ""}, cancel);
        r.detail = "interactive client went away";
        Persist(*j).IgnoreError();
        Event(
            id, "", "cancelled",
            fmt::format("no word from its `muster run` client for {} ms", now - j->client_seen_ms));
        continue;
      }
    }
    if ((r.state == proto::JOB_RUNNING || r.state == proto::JOB_SCHEDULED) &&
        r.spec.time_limit_s() > 0 && j->attempt.started_ms + r.spec.time_limit_s() * 1000 <= now &&
        j->attempt.stop == proto::STOP_REASON_UNSPECIFIED) {
      Event(id, "", "time_limit", fmt::format("{} s reached; stopping", r.spec.time_limit_s()));
      StopGang(*j, proto::STOP_TIME_LIMIT, "");
    }
  }
  // Keep the newest finished jobs in memory; the store has them all.
  int finished = 0;
  for (auto it = jobs_.rbegin(); it != jobs_.rend(); ++it) {
    const auto& j = *it->second;
    if (Terminal(j.rec.state) && j.attempt.done.size() >= j.rec.nodes.size() &&
        ++finished > kFinishedKept)
      forget.push_back(it->first);
  }
  for (const auto& id : forget) jobs_.erase(id);
  Pass();  // every tick: quarantines expire and backoffs end with time, not only on events
  // What is still pending may get nodes from a provider; idle on-demand nodes go back.
  ProvidersPass();
}

void Coordinator::ExpireFetches(int64_t now) {
  for (auto it = fetches_.begin(); it != fetches_.end();) {
    if (it->second.deadline_ms <= now) {
      it->second.reply(ErrorEnvelope(
          0, DeadlineExceededError("node " + it->second.node + " did not send the log in time")));
      it = fetches_.erase(it);
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Requests

std::string Caller::ToString() const {
  return fmt::format("key '{}' ({}, role {}){}", name,
                     public_key.empty() ? "no key" : public_key.substr(0, 8) + "...",
                     KeyRoleName(role), address.empty() ? "" : " from " + address);
}

namespace {

enum class Right { kAny, kClient, kAdmin, kAgent };

struct RequestKind {
  const char* name;
  Right right;
  // Changes durable state: refused once a durable write has failed. Heartbeats, polls and log
  // chunks change none (an agent that heartbeats keeps its lease and its ranks).
  bool mutates = false;
};

RequestKind KindOf(proto::Envelope::PayloadCase c) {
  switch (c) {
    case proto::Envelope::kSubmitRequest:
      return {"submit", Right::kClient, true};
    case proto::Envelope::kStatusRequest:
      return {"status", Right::kClient};
    case proto::Envelope::kCancelRequest:
      return {"cancel", Right::kClient, true};
    case proto::Envelope::kNodesRequest:
      return {"nodes", Right::kClient};  // clients see no addresses nor endpoints
    case proto::Envelope::kEventsRequest:
      return {"events", Right::kClient};
    case proto::Envelope::kLogsRequest:
      return {"logs", Right::kClient};
    case proto::Envelope::kDrainRequest:
      return {"drain", Right::kAdmin, true};
    case proto::Envelope::kPreemptNodeRequest:
      return {"node preempt", Right::kAdmin, true};
    case proto::Envelope::kForgetNodeRequest:
      return {"node forget", Right::kAdmin, true};
    case proto::Envelope::kAgentRegister:
      return {"agent register", Right::kAgent, true};
    case proto::Envelope::kAgentHeartbeat:
      return {"agent heartbeat", Right::kAgent};
    case proto::Envelope::kAgentPoll:
      return {"agent poll", Right::kAgent};
    case proto::Envelope::kAgentReport:
      return {"agent report", Right::kAgent, true};
    case proto::Envelope::kAgentLogChunk:
      return {"agent log chunk", Right::kAgent};
    case proto::Envelope::kPing:
      return {"ping", Right::kAny};
    default:
      return {"request", Right::kAny};  // answered InvalidArgument below
  }
}

bool HasRight(KeyRole role, Right right) {
  switch (right) {
    case Right::kAny:
      return true;
    case Right::kClient:
      return role == KeyRole::kClient || role == KeyRole::kAdmin || role == KeyRole::kLegacy;
    case Right::kAdmin:
      return role == KeyRole::kAdmin || role == KeyRole::kLegacy;
    case Right::kAgent:
      return role == KeyRole::kAgent || role == KeyRole::kLegacy;
  }
  return false;
}

std::string_view RightName(Right right) {
  switch (right) {
    case Right::kClient:
      return "a client or admin key";
    case Right::kAdmin:
      return "an admin key";
    case Right::kAgent:
      return "an agent key";
    case Right::kAny:
      break;
  }
  return "any key";
}

}  // namespace

Status Coordinator::Deny(const Caller& caller, const std::string& request, const std::string& why) {
  if (auto held = deny_log_.Admit(caller.name + "\n" + request, LogThrottle::Clock::now())) {
    if (*held > 0) {
      Logger()->warn("permission denied: {} may not {}: {} ({} more like it not logged)",
                     caller.ToString(), request, why, *held);
    } else {
      Logger()->warn("permission denied: {} may not {}: {}", caller.ToString(), request, why);
    }
  }
  return FailedPreconditionError(fmt::format("permission denied: key '{}' (role {}) may not {}: {}",
                                             caller.name, KeyRoleName(caller.role), request, why));
}

bool Coordinator::Owns(const Caller& caller, const JobRecord& job) const {
  if (caller.role == KeyRole::kAdmin || caller.role == KeyRole::kLegacy) return true;
  return caller.role == KeyRole::kClient && !job.submitter.empty() &&
         job.submitter == caller.public_key;
}

void Coordinator::Handle(const std::string& peer, proto::Envelope&& req, Reply reply) {
  Caller caller;
  caller.name = peer;
  caller.role = KeyRole::kLegacy;
  Handle(caller, std::move(req), std::move(reply));
}

void Coordinator::Handle(const Caller& caller, proto::Envelope&& req, Reply reply) {
  uint64_t id = req.request_id();
  const bool latched_before = !write_error_.ok();
  auto answer = [&](StatusOr<proto::Envelope> r) {
    // A request during which a durable write failed gets that failure, whatever it did before.
    if (!latched_before && !write_error_.ok() && r.ok()) r = Refusal();
    if (!r.ok()) {
      reply(ErrorEnvelope(id, r.status()));
      return;
    }
    r->set_request_id(id);
    reply(std::move(*r));
  };
  RequestKind kind = KindOf(req.payload_case());
  if (!HasRight(caller.role, kind.right)) {
    return answer(Deny(caller, kind.name, fmt::format("it needs {}", RightName(kind.right))));
  }
  if (kind.mutates && !write_error_.ok()) {
    Logger()->debug("refused {} from {}: {}", kind.name, caller.ToString(), write_error_.message());
    return answer(Refusal());
  }
  switch (req.payload_case()) {
    case proto::Envelope::kSubmitRequest:
      return answer(OnSubmit(caller, req.submit_request()));
    case proto::Envelope::kStatusRequest:
      return answer(OnStatus(caller, req.status_request()));
    case proto::Envelope::kCancelRequest:
      return answer(OnCancel(caller, req.cancel_request()));
    case proto::Envelope::kNodesRequest:
      return answer(OnNodes(caller));
    case proto::Envelope::kEventsRequest:
      return answer(OnEvents(caller, req.events_request()));
    case proto::Envelope::kDrainRequest:
      return answer(OnDrain(req.drain_request()));
    case proto::Envelope::kPreemptNodeRequest:
      return answer(OnPreemptNode(req.preempt_node_request()));
    case proto::Envelope::kForgetNodeRequest:
      return answer(OnForgetNode(caller, req.forget_node_request()));
    case proto::Envelope::kLogsRequest:
      return OnLogs(caller, req.logs_request(), [id, reply](proto::Envelope e) {
        e.set_request_id(id);
        reply(std::move(e));
      });
    case proto::Envelope::kAgentRegister:
      return answer(OnRegister(caller, req.agent_register()));
    case proto::Envelope::kAgentHeartbeat:
      return answer(OnHeartbeat(caller, req.agent_heartbeat()));
    case proto::Envelope::kAgentPoll:
      return OnPoll(caller, req.agent_poll(), [id, reply](proto::Envelope e) {
        e.set_request_id(id);
        reply(std::move(e));
      });
    case proto::Envelope::kAgentReport:
      return answer(OnReport(caller, req.agent_report()));
    case proto::Envelope::kAgentLogChunk:
      return answer(OnLogChunk(caller, req.agent_log_chunk()));
    case proto::Envelope::kPing:
      return answer(Wrap([&](auto& e) { e.mutable_pong()->set_data(req.ping().data()); }));
    default:
      Logger()->warn("from {}: unexpected payload {}", caller.ToString(),
                     static_cast<int>(req.payload_case()));
      return answer(InvalidArgumentError(fmt::format("the coordinator does not serve payload {}",
                                                     static_cast<int>(req.payload_case()))));
  }
}

StatusOr<proto::Envelope> Coordinator::OnSubmit(const Caller& caller,
                                                const proto::SubmitRequest& req) {
  JobSpec spec;
  if (!req.yaml().empty()) {
    if (req.yaml().size() > (1 << 20)) return InvalidArgumentError("job spec over 1 MiB");
    MUSTER_ASSIGN_OR_RETURN(
        spec, ParseJobSpec(req.yaml(), req.filename().empty() ? "job.yaml" : req.filename()));
  } else if (req.has_spec()) {
    MUSTER_ASSIGN_OR_RETURN(spec, JobSpecFromProto(req.spec()));
  } else {
    return InvalidArgumentError("submit needs a yaml job spec or a spec");
  }
  if (!req.spec().hosts().empty() && spec.hosts.empty()) {
    spec.hosts.assign(req.spec().hosts().begin(), req.spec().hosts().end());
    MUSTER_RETURN_IF_ERROR(ValidateJobSpec(spec));
  }
  // With on-demand providers, what each can ever hold counts (max_nodes, pool_capacity.h).
  JobRequest check = ToJobRequest(spec, "feasibility-check", 0);
  Status feasible = sched_->Feasible(check);
  if (providers_ && check.hosts.empty() && feasible.code() != StatusCode::kInvalidArgument)
    feasible = PoolCanEverHold(check, sched_->Nodes(options_.clock()), providers_->config());
  MUSTER_RETURN_IF_ERROR(feasible);
  auto j = std::make_unique<JobRt>();
  j->rec.spec = JobSpecToProto(spec);
  j->rec.state = proto::JOB_PENDING;
  j->rec.submitted_ms = j->rec.updated_ms = NowMs();
  j->rec.submitter = caller.public_key;
  MUSTER_RETURN_IF_ERROR(Write("new job " + spec.name, [&] { return store_->InsertJob(&j->rec); }));
  j->durable = j->rec;
  j->req = ToJobRequest(spec, j->rec.id, j->rec.seq);
  MUSTER_RETURN_IF_ERROR(sched_->Submit(j->req));
  j->in_scheduler = true;
  std::string id = j->rec.id;
  Event(id, "", "submitted",
        fmt::format("{} node(s) x {} rank(s), priority {}, by key '{}'", spec.nodes,
                    spec.ranks_per_node, spec.priority, caller.name));
  jobs_.emplace(id, std::move(j));
  Pass();
  return Wrap([&](auto& e) { e.mutable_submit_reply()->set_job_id(id); });
}

proto::JobStatus Coordinator::StatusOf(const JobRt& j) {
  proto::JobStatus s;
  const auto& r = j.rec;
  s.set_job_id(r.id);
  s.set_name(r.spec.name());
  s.set_state(r.state);
  s.set_attempt(r.attempt);
  s.set_restarts(r.restarts);
  s.set_preemptions(r.preemptions);
  for (const auto& n : r.nodes) s.add_nodes(n);
  if (!r.nodes.empty()) {
    if (const NodeRt* n = nodes_.Find(r.nodes[0])) s.set_provider(n->rec.labels.provider());
  }
  for (const auto& n : sched_->SparesOf(r.id)) s.add_spares(n);
  if (r.state == proto::JOB_PENDING) {
    if (j.spare_restart == 1) {
      s.set_pending_reason(fmt::format(
          "waiting: {} s for the lost node's lease, then restarting on the survivors and spares",
          std::max<int64_t>(0, (r.not_before_ms - NowMs() + 999) / 1000)));
    } else if (!j.in_scheduler && r.not_before_ms > NowMs()) {
      s.set_pending_reason(fmt::format(
          "waiting: {}, {} s left",
          j.lease_fence ? "the lost node's lease (it may still run its ranks)" : "restart backoff",
          (r.not_before_ms - NowMs() + 999) / 1000));
    } else {
      std::string from_provider = ProviderReason(r.id);
      s.set_pending_reason(from_provider.empty() ? sched_->PendingReason(r.id) : from_provider);
    }
  }
  if (j.progress) *s.mutable_progress() = *j.progress;
  s.set_submitted_ms(r.submitted_ms);
  s.set_updated_ms(r.updated_ms);
  s.set_detail(r.detail);
  *s.mutable_spec() = r.spec;
  s.set_resume_step(r.resume_step);
  return s;
}

StatusOr<proto::Envelope> Coordinator::OnStatus(const Caller& caller,
                                                const proto::StatusRequest& req) {
  proto::Envelope e;
  auto* out = e.mutable_status_reply();
  if (!write_error_.ok()) out->set_write_error(write_error_.message());
  if (!req.job_id().empty()) {
    auto it = jobs_.find(req.job_id());
    if (it != jobs_.end()) {
      if (!Owns(caller, it->second->rec)) {
        return Deny(caller, "see job " + req.job_id(), "another key submitted it");
      }
      it->second->client_seen_ms = NowMs();
      *out->add_jobs() = StatusOf(*it->second);
      return e;
    }
    MUSTER_ASSIGN_OR_RETURN(auto rec, store_->GetJob(req.job_id()));
    if (!Owns(caller, rec))
      return Deny(caller, "see job " + req.job_id(), "another key submitted it");
    JobRt tmp;
    tmp.rec = std::move(rec);
    *out->add_jobs() = StatusOf(tmp);
    return e;
  }
  int limit = req.finished_limit() > 0 ? req.finished_limit() : 50;
  int finished = 0;
  for (auto it = jobs_.rbegin(); it != jobs_.rend(); ++it) {
    if (!Owns(caller, it->second->rec)) continue;  // a client lists only its own jobs
    if (Terminal(it->second->rec.state) && ++finished > limit) continue;
    *out->add_jobs() = StatusOf(*it->second);
  }
  std::sort(out->mutable_jobs()->begin(), out->mutable_jobs()->end(),
            [](const auto& a, const auto& b) { return a.submitted_ms() < b.submitted_ms(); });
  return e;
}

StatusOr<proto::Envelope> Coordinator::OnCancel(const Caller& caller,
                                                const proto::CancelRequest& req) {
  auto it = jobs_.find(req.job_id());
  if (it == jobs_.end()) {
    MUSTER_ASSIGN_OR_RETURN(auto rec, store_->GetJob(req.job_id()));
    if (!Owns(caller, rec)) {
      return Deny(caller, "cancel job " + req.job_id(), "another key submitted it");
    }
    return Wrap([&](auto& e) { e.mutable_cancel_reply()->set_state(rec.state); });
  }
  JobRt& j = *it->second;
  if (!Owns(caller, j.rec)) {
    return Deny(caller, "cancel job " + req.job_id(), "another key submitted it");
  }
  if (!Terminal(j.rec.state)) {
    bool pending = sched_->IsPending(j.rec.id) || !j.in_scheduler ||
                   (j.spare_restart == 1 && j.rec.state == proto::JOB_PENDING);
    if (pending && j.rec.nodes.empty()) {
      j.rec.state = proto::JOB_CANCELLED;
      j.rec.detail = "cancelled while pending";
      MUSTER_RETURN_IF_ERROR(Persist(j));  // still pending (and queued) if it failed
      // A job waiting to restart on its spares still holds them: released.
      if (j.in_scheduler && !sched_->CancelPending(j.rec.id).ok()) {
        sched_->Release(j.rec.id).IgnoreError();
      }
      j.spare_restart = 0;
      j.in_scheduler = false;
      Event(j.rec.id, "", "cancelled", "while pending");
    } else {
      j.rec.state = proto::JOB_CANCELLED;
      j.rec.detail = "cancelled";
      MUSTER_RETURN_IF_ERROR(Persist(j));  // still running if it failed
      Event(j.rec.id, "", "cancelled", fmt::format("stopping attempt {}", j.rec.attempt));
      StopGang(j, proto::STOP_CANCELLED, "");
    }
    pass_needed_ = true;
  }
  return Wrap([&](auto& e) { e.mutable_cancel_reply()->set_state(j.rec.state); });
}

proto::NodeStatus Coordinator::NodeStatusOf(const NodeRt& n) {
  proto::NodeStatus s;
  *s.mutable_labels() = n.rec.labels;
  auto view = sched_->GetNode(n.rec.labels.name(), options_.clock());
  if (view.ok()) {
    s.set_state(NodeStateToProto(view->state));
    s.set_job_id(view->job);
    s.set_spare(view->spare);
  }
  s.set_last_heartbeat_ms(n.last_hb_ms);
  s.set_quarantines(n.rec.quarantines);
  s.set_quarantined_until_ms(n.rec.quarantined_until_ms);
  return s;
}

StatusOr<proto::Envelope> Coordinator::OnNodes(const Caller& caller) {
  proto::Envelope e;
  auto* out = e.mutable_nodes_reply();
  bool admin = caller.role == KeyRole::kAdmin || caller.role == KeyRole::kLegacy;
  for (auto& [name, n] : nodes_) {
    auto* s = out->add_nodes();
    *s = NodeStatusOf(*n);
    if (!admin) {
      // Where nodes are and how to reach their volumes is for admins only.
      auto* l = s->mutable_labels();
      l->clear_address();
      l->clear_transfer_endpoint();
      l->clear_transfer_key();
      for (auto& v : *l->mutable_volumes()) v.clear_path();
    }
  }
  return e;
}

StatusOr<proto::Envelope> Coordinator::OnEvents(const Caller& caller,
                                                const proto::EventsRequest& req) {
  int limit = req.limit() > 0 ? std::min(req.limit(), 10000) : 1000;
  // Does the caller own job `id`? Cached for this request.
  std::map<std::string, bool> owned;
  auto owns = [&](const std::string& id) -> StatusOr<bool> {
    if (auto o = owned.find(id); o != owned.end()) return o->second;
    bool mine;
    if (auto it = jobs_.find(id); it != jobs_.end()) {
      mine = Owns(caller, it->second->rec);
    } else {
      MUSTER_ASSIGN_OR_RETURN(auto rec, store_->GetJob(id));
      mine = Owns(caller, rec);
    }
    owned[id] = mine;
    return mine;
  };
  if (!req.job_id().empty()) {
    MUSTER_ASSIGN_OR_RETURN(bool mine, owns(req.job_id()));
    if (!mine)
      return Deny(caller, "see the events of job " + req.job_id(), "another key submitted it");
  }
  MUSTER_ASSIGN_OR_RETURN(auto events, store_->Events(req.job_id(), req.after_id(), limit));
  bool admin = caller.role == KeyRole::kAdmin || caller.role == KeyRole::kLegacy;
  proto::Envelope e;
  auto* out = e.mutable_events_reply();
  for (auto& ev : events) {
    if (!admin) {
      // A client sees the events of its own jobs only; node events are for admins.
      if (ev.job_id().empty()) continue;
      auto mine = owns(ev.job_id());
      if (!mine.ok() || !*mine) continue;
    }
    *out->add_events() = std::move(ev);
  }
  return e;
}

StatusOr<proto::Envelope> Coordinator::OnDrain(const proto::DrainRequest& req) {
  NodeRt* found = nodes_.Find(req.node());
  if (found == nullptr) return NotFoundError("unknown node " + req.node());
  NodeRt& n = *found;
  NodeRecord next = n.rec;
  next.state = req.drain() ? proto::NODE_DRAINING : proto::NODE_UP;
  MUSTER_RETURN_IF_ERROR(Write("node " + req.node(), [&] { return store_->PutNode(next); }));
  n.rec = next;
  if (!n.session.empty() || !req.drain()) {
    NodeState s = req.drain() ? NodeState::kDraining
                              : (n.session.empty() ? NodeState::kDown : NodeState::kUp);
    sched_->SetNodeState(req.node(), s).IgnoreError();
  }
  Event("", req.node(), req.drain() ? "node_drained" : "node_undrained",
        req.drain() ? "no new work; running jobs continue" : "accepting work");
  pass_needed_ = true;
  auto st = NodeStatusOf(n);
  return Wrap([&](auto& e) { e.mutable_drain_reply()->set_state(st.state()); });
}

std::vector<std::string> Coordinator::JobsNeedingNode(const std::string& node) const {
  std::vector<std::string> out;
  for (const auto& [id, j] : jobs_) {
    if (Terminal(j->rec.state) && j->attempt.done.size() >= j->rec.nodes.size()) continue;
    if (std::find(j->rec.nodes.begin(), j->rec.nodes.end(), node) == j->rec.nodes.end()) continue;
    if (j->attempt.done.count(node)) continue;
    out.push_back(fmt::format("it is in attempt {} of job {}", j->rec.attempt, id));
  }
  for (const auto& id : snapshot_book_.JobsOf(node)) {
    auto j = jobs_.find(id);
    if (j != jobs_.end() && !Terminal(j->second->rec.state))
      out.push_back(fmt::format("it holds in-memory snapshots of job {}", id));
  }
  return out;
}

StatusOr<proto::Envelope> Coordinator::OnPreemptNode(const proto::PreemptNodeRequest& req) {
  if (nodes_.Find(req.node()) == nullptr) return NotFoundError("unknown node " + req.node());
  proto::Envelope e;
  auto* out = e.mutable_preempt_node_reply();
  Event("", req.node(), "notice", fmt::format("preemption notice, {} ms", req.notice_ms()));
  MUSTER_RETURN_IF_ERROR(write_error_.ok() ? Status::Ok() : Refusal());
  MUSTER_RETURN_IF_ERROR(DrainOnNotice(req.node()));  // durable before the jobs stop
  for (auto& [id, j] : jobs_) {
    if (Terminal(j->rec.state)) continue;
    if (std::find(j->rec.nodes.begin(), j->rec.nodes.end(), req.node()) == j->rec.nodes.end())
      continue;
    out->add_jobs(id);
    StopGang(*j, proto::STOP_NODE_PREEMPTED, "",
             NowMs() + std::max<int64_t>(req.notice_ms(), 1000));
  }
  MUSTER_RETURN_IF_ERROR(write_error_.ok() ? Status::Ok() : Refusal());  // jobs not stopped
  return e;
}

void Coordinator::OnLogs(const Caller& caller, const proto::LogsRequest& req, Reply reply) {
  auto fail = [&](Status st) { reply(ErrorEnvelope(0, st)); };
  auto it = jobs_.find(req.job_id());
  JobRecord rec;
  if (it != jobs_.end()) {
    if (!Owns(caller, it->second->rec)) {
      return fail(Deny(caller, "read the logs of job " + req.job_id(), "another key submitted it"));
    }
    it->second->client_seen_ms = NowMs();
    rec = it->second->rec;
  } else {
    auto r = store_->GetJob(req.job_id());
    if (!r.ok()) return fail(r.status());
    if (!Owns(caller, *r)) {
      return fail(Deny(caller, "read the logs of job " + req.job_id(), "another key submitted it"));
    }
    rec = std::move(*r);
  }
  int attempt = req.attempt() > 0 ? req.attempt() : rec.attempt;
  std::vector<std::string> nodes = rec.nodes;
  if (attempt != rec.attempt || nodes.empty()) {
    auto attempts = store_->LoadAttempts(rec.id);
    if (attempts.ok()) {
      for (auto& a : *attempts)
        if (a.attempt == attempt) nodes = a.nodes;
    }
  }
  int rpn = std::max(1, rec.spec.ranks_per_node());
  if (req.rank() < 0 || req.rank() >= static_cast<int>(nodes.size()) * rpn) {
    return fail(NotFoundError(
        fmt::format("job {} attempt {} has no rank {}", rec.id, attempt, req.rank())));
  }
  const std::string& node = nodes[req.rank() / rpn];
  if (ServeKeptLog(req, rec, attempt, node, reply)) return;
  const NodeRt* target = nodes_.Find(node);
  if (target == nullptr || !target->connected()) {
    std::string kept = log_keeper_ && log_keeper_->Has(rec.id, attempt, req.rank())
                           ? " (the coordinator keeps this log: read it again from the start)"
                           : "";
    return fail(UnavailableError("the agent of node " + node + " is not connected" + kept));
  }
  uint64_t fetch = next_fetch_++;
  proto::AgentAction a;
  auto* f = a.mutable_fetch_log();
  f->set_fetch_id(fetch);
  f->set_job_id(rec.id);
  f->set_attempt(attempt);
  f->set_rank(req.rank());
  f->set_offset(req.offset());
  f->set_generation(req.generation());
  f->set_max_bytes(std::clamp(req.max_bytes() > 0 ? req.max_bytes() : 65536, 1, 1 << 20));
  f->set_stream(req.stream());
  fetches_.emplace(fetch, Fetch{std::move(reply), NowMs() + 10000, node});
  Enqueue(node, std::move(a));
}

StatusOr<Coordinator::NodeRt*> Coordinator::Session(const Caller& caller, const std::string& node,
                                                    const std::string& session) {
  // A session id is no secret: the key decides who speaks for a node.
  if (!nodes_.MaySpeakFor(node, caller.public_key)) {
    return Deny(caller, "speak for node " + node, "the node is bound to another key");
  }
  return nodes_.FindSession(node, session, NowMs());
}

StatusOr<proto::Envelope> Coordinator::OnRegister(const Caller& caller,
                                                  const proto::AgentRegister& req) {
  const auto& l = req.labels();
  if (l.name().empty() || l.name().size() > 253) {
    return InvalidArgumentError("agent register: node name must be 1-253 characters");
  }
  if (l.provider().empty()) return InvalidArgumentError("agent register: provider is required");
  if (l.gpus() < 0 || l.slots() < 0) return InvalidArgumentError("agent register: negative gpus");
  if (providers_ && providers_->Released(l.name()))
    return FailedPreconditionError("agent register: node " + l.name() + " was released");
  // An agent key registers only inside its scope, and no key moves a known node to another
  // provider or island (common/key_scope.h).
  if (options_.current_scope) {
    if (auto why = OutsideKeyScope(options_.current_scope(caller.public_key), l))
      return Deny(caller, "register as node " + l.name(), *why);
  }
  if (const NodeRt* known = nodes_.Find(l.name())) {
    if (auto why = MovesNode(known->rec.labels, l))
      return Deny(caller, "register as node " + l.name(), *why);
  }
  // The first registration of a name binds it to the key; no other key may take it.
  std::optional<std::string> bound = nodes_.BoundKey(l.name());
  if (bound && *bound != caller.public_key) {
    KeyRole old = options_.current_role ? options_.current_role(*bound) : KeyRole::kAgent;
    if (old == KeyRole::kAgent || old == KeyRole::kLegacy) {
      return Deny(caller, "register as node " + l.name(),
                  fmt::format("the name is bound to agent key {}... (remove that key from "
                              "authorized_keys to move the node to another key)",
                              bound->substr(0, 8)));
    }
    Logger()->warn("node {} moves from key {}... (now role {}) to {}", l.name(),
                   bound->substr(0, 8), KeyRoleName(old), caller.ToString());
    nodes_.Unbind(l.name());
    bound.reset();
  }
  if (!bound) {
    MUSTER_RETURN_IF_ERROR(Write("the key of node " + l.name(), [&] {
      return store_->BindNodeKey(l.name(), caller.public_key, NowMs());
    }));
    nodes_.Bind(l.name(), caller.public_key);
    Logger()->info("node {} bound to {}", l.name(), caller.ToString());
  }
  // The record as Connect makes it, stored first.
  NodeRecord next;
  if (const NodeRt* known = nodes_.Find(l.name())) next = known->rec;
  next.labels = l;
  if (next.state == proto::NODE_DOWN || next.state == proto::NODE_STATE_UNSPECIFIED) {
    next.state = proto::NODE_UP;
  }
  MUSTER_RETURN_IF_ERROR(Write("node " + l.name(), [&] { return store_->PutNode(next); }));
  bool was_connected = false;
  NodeRt& n = nodes_.Connect(l, caller.role, NowMs(), &was_connected);
  snapshot_book_.ForgetNode(l.name());  // a restarted agent holds nothing; heartbeats say
  sched_->UpsertNode(ToNodeSpec(l));
  sched_
      ->SetNodeState(l.name(),
                     n.rec.state == proto::NODE_DRAINING ? NodeState::kDraining : NodeState::kUp)
      .IgnoreError();
  Event("", l.name(), "node_registered",
        fmt::format("{}provider {} island {} gpu {}x{} slots {}; {} running assignment(s)",
                    was_connected ? "re-registered; " : "", l.provider(), l.island(), l.gpus(),
                    l.gpu_type(), l.slots(), req.running_size()));

  proto::Envelope e;
  auto* out = e.mutable_agent_registered();
  out->set_session_id(n.session);
  out->set_heartbeat_interval_ms(options_.heartbeat_interval.count());
  out->set_heartbeat_timeout_ms(options_.heartbeat_timeout.count());
  out->set_lease_ms(options_.lease.count());
  // Reconcile what the agent runs with what we expect of it.
  std::set<std::string> reported;
  for (const auto& ra : req.running()) {
    auto it = jobs_.find(ra.job_id());
    bool wanted = it != jobs_.end() && !Terminal(it->second->rec.state) &&
                  it->second->rec.attempt == ra.attempt() &&
                  std::find(it->second->rec.nodes.begin(), it->second->rec.nodes.end(), l.name()) !=
                      it->second->rec.nodes.end() &&
                  !it->second->attempt.done.count(l.name());
    if (wanted) {
      reported.insert(ra.job_id());
      JobRt& j = *it->second;
      j.attempt.started.insert(l.name());
      if (j.attempt.stop != proto::STOP_REASON_UNSPECIFIED) {
        proto::AgentAction a;
        a.mutable_stop()->set_job_id(ra.job_id());
        a.mutable_stop()->set_attempt(ra.attempt());
        a.mutable_stop()->set_reason(j.attempt.stop);
        a.mutable_stop()->set_grace_ms(options_.stop_grace.count());
        if (j.attempt.checkpoint_deadline_ms > NowMs()) {
          a.mutable_stop()->set_checkpoint_first(true);
          a.mutable_stop()->set_checkpoint_deadline_ms(j.attempt.checkpoint_deadline_ms);
        }
        *out->add_actions() = std::move(a);
      } else if (j.rec.state == proto::JOB_SCHEDULED &&
                 j.attempt.started.size() == j.rec.nodes.size()) {
        j.rec.state = proto::JOB_RUNNING;
        MUSTER_RETURN_IF_ERROR(Persist(j));
      }
      continue;
    }
    proto::AgentAction a;
    a.mutable_stop()->set_job_id(ra.job_id());
    a.mutable_stop()->set_attempt(ra.attempt());
    a.mutable_stop()->set_reason(proto::STOP_RECONCILE);
    a.mutable_stop()->set_grace_ms(options_.stop_grace.count());
    *out->add_actions() = std::move(a);
    Event(ra.job_id(), l.name(), "reconcile",
          fmt::format("stopping attempt {}: not wanted any more", ra.attempt()));
  }
  // Assignments we expect that the agent does not run: never started -> send again; started ->
  // its ranks are gone (agent restarted): the node is lost for that attempt.
  for (auto& [id, j] : jobs_) {
    if (Terminal(j->rec.state) || reported.count(id) || j->attempt.done.count(l.name())) continue;
    auto pos = std::find(j->rec.nodes.begin(), j->rec.nodes.end(), l.name());
    if (pos == j->rec.nodes.end()) continue;
    if (j->attempt.started.count(l.name()) || j->rec.state == proto::JOB_RUNNING) {
      j->attempt.RecordNodeLost(fmt::format("node {} lost its ranks (agent restarted)", l.name()));
      Event(id, l.name(), "node_lost", "agent came back without the job's ranks");
      StopGang(*j, proto::STOP_PEER_FAILED, l.name());
      NodeDone(*j, l.name());
    } else if (j->attempt.stop == proto::STOP_REASON_UNSPECIFIED) {
      // Start it (again): rebuild the start action by re-running Start for this node only is
      // not possible without a new attempt, so the whole gang starts a new attempt.
      j->attempt.RecordNodeLost(fmt::format("node {} re-registered before starting", l.name()),
                                /*override_cause=*/true);
      StopGang(*j, proto::STOP_PEER_FAILED, l.name());
      NodeDone(*j, l.name());
    } else {
      NodeDone(*j, l.name());
    }
  }
  pass_needed_ = true;
  return e;
}

StatusOr<proto::Envelope> Coordinator::OnHeartbeat(const Caller& caller,
                                                   const proto::AgentHeartbeat& req) {
  MUSTER_ASSIGN_OR_RETURN(NodeRt * n, Session(caller, req.node(), req.session_id()));
  if (req.snapshots_reported()) snapshot_book_.ReplaceNode(req.node(), req.snapshots_held());
  for (const auto& p : req.progress()) {
    auto it = jobs_.find(p.job_id());
    // Only a node of the job's current attempt reports its progress, and only of that attempt:
    // a node of the last attempt and of this one may still send what the last one printed
    // (printed before this attempt began, and the node runs none of this attempt's ranks yet).
    auto of_current = [&](const proto::RunningAssignment& r) {
      return r.job_id() == p.job_id() && r.attempt() == it->second->rec.attempt;
    };
    if (it != jobs_.end() &&
        std::find(it->second->rec.nodes.begin(), it->second->rec.nodes.end(), req.node()) !=
            it->second->rec.nodes.end() &&
        (p.time_ms() >= it->second->attempt.started_ms ||
         std::any_of(req.running().begin(), req.running().end(), of_current))) {
      it->second->progress = p;
      if (observer_) observer_->OnProgress(p.job_id(), it->second->rec.attempt, p);
    }
  }
  proto::Envelope e;
  auto* out = e.mutable_agent_heartbeat_reply();
  for (auto& a : nodes_.TakeQueue(*n)) *out->add_actions() = std::move(a);
  // The snapshot steps this agent keeps for the gangs (snapshot_pin.h), while an attempt runs.
  for (const auto& job :
       req.snapshots_reported() ? snapshot_book_.JobsOf(req.node()) : std::vector<std::string>{}) {
    auto it = jobs_.find(job);
    if (it == jobs_.end() || Terminal(it->second->rec.state) || it->second->rec.nodes.empty()) {
      continue;
    }
    const JobRecord& r = it->second->rec;
    const int32_t world = static_cast<int32_t>(r.nodes.size()) * r.spec.ranks_per_node();
    if (auto pins = snapshot_pinner_.Decide(job, world, snapshot_book_.Of(job),
                                            snapshot_book_.Reported(), r.nodes)) {
      *out->add_actions() = std::move(*pins);
    }
  }
  return e;
}

void Coordinator::OnPoll(const Caller& caller, const proto::AgentPoll& req, Reply reply) {
  auto n = Session(caller, req.node(), req.session_id());
  if (!n.ok()) return reply(ErrorEnvelope(0, n.status()));
  nodes_.Park(**n, std::move(reply), NowMs() + std::clamp<int64_t>(req.wait_ms(), 0, 30000));
}

bool Coordinator::ReplicaReportAllowed(const NodeRt& node, const std::string& job_id, int64_t step,
                                       const std::string& volume) {
  const auto& l = node.rec.labels;
  bool mounts =
      !volume.empty() && std::any_of(l.volumes().begin(), l.volumes().end(),
                                     [&](const proto::Volume& v) { return v.name() == volume; });
  if (!mounts) return false;
  auto catalog = store_->Checkpoints(job_id);
  if (!catalog.ok()) return false;
  std::string own = VolumeKey(volume, l.provider());
  return std::any_of(catalog->begin(), catalog->end(), [&](const CheckpointRecord& c) {
    return c.step == step && c.committed && c.volume != own && c.volume.rfind(volume + "@", 0) == 0;
  });
}

StatusOr<proto::Envelope> Coordinator::OnReport(const Caller& caller,
                                                const proto::AgentReport& req) {
  MUSTER_ASSIGN_OR_RETURN(NodeRt * n, Session(caller, req.node(), req.session_id()));
  proto::Envelope ack;
  ack.mutable_agent_report_reply();
  const std::string& node = n->rec.labels.name();
  if (req.notice_deadline_ms() > 0) {
    Event("", node, "notice",
          fmt::format("preemption notice from {}, deadline {}", req.notice_source(),
                      req.notice_deadline_ms()));
    MUSTER_RETURN_IF_ERROR(DrainOnNotice(node));  // durable before the jobs stop
    for (auto& [id, j] : jobs_) {
      if (!Terminal(j->rec.state) &&
          std::find(j->rec.nodes.begin(), j->rec.nodes.end(), node) != j->rec.nodes.end()) {
        StopGang(*j, proto::STOP_NODE_PREEMPTED, "", req.notice_deadline_ms());
      }
    }
    // Not taken (the agent sends the notice again): its jobs were not stopped.
    MUSTER_RETURN_IF_ERROR(write_error_.ok() ? Status::Ok() : Refusal());
  }
  if (req.job_id().empty()) return ack;
  if (req.snapshots_reported()) {
    snapshot_book_.ReplaceJob(node, req.job_id(), req.snapshots_held());
  }
  auto it = jobs_.find(req.job_id());
  // Who may report what: the outcome of a copy comes from a node of another provider that
  // mounts the volume, for a step committed elsewhere; everything else about a job (commits,
  // starts, exits, progress) only from the nodes of its current attempt, for that attempt.
  bool replica_outcome = req.replicate_superseded_by() > 0 || !req.replicate_error().empty() ||
                         (req.checkpoint_replica() && req.checkpoint_step() > 0);
  bool in_attempt = it != jobs_.end() && it->second->rec.attempt == req.attempt() &&
                    std::find(it->second->rec.nodes.begin(), it->second->rec.nodes.end(), node) !=
                        it->second->rec.nodes.end();
  if (replica_outcome &&
      !ReplicaReportAllowed(*n, req.job_id(), req.checkpoint_step(), req.checkpoint_volume())) {
    return Deny(caller,
                fmt::format("report a copy of step {} of job {} to volume {} as node {}",
                            req.checkpoint_step(), req.job_id(), req.checkpoint_volume(), node),
                "the node does not mount that volume, or no other provider's volume has that "
                "step committed");
  }
  bool attempt_content = (!replica_outcome && req.checkpoint_step() > 0) || req.started() ||
                         req.exits_size() > 0 || req.all_exited() || !req.start_error().empty() ||
                         req.progress_size() > 0;
  if (!replica_outcome && attempt_content && !in_attempt) {
    // A late report of an earlier attempt this node ran is stale, not hostile: acknowledged
    // and dropped. A commit is never taken from anything but the current attempt.
    bool was_member = false;
    if (req.checkpoint_step() <= 0 && req.attempt() > 0 &&
        (it == jobs_.end() || req.attempt() < it->second->rec.attempt)) {
      auto attempts = store_->LoadAttempts(req.job_id());
      if (attempts.ok()) {
        for (const auto& a : *attempts) {
          if (a.attempt == req.attempt() &&
              std::find(a.nodes.begin(), a.nodes.end(), node) != a.nodes.end())
            was_member = true;
        }
      }
    }
    if (was_member) return ack;
    return Deny(caller,
                fmt::format("report for attempt {} of job {} as node {}", req.attempt(),
                            req.job_id(), node),
                it == jobs_.end()
                    ? "no such running job"
                    : fmt::format("the job's current attempt is {} on nodes {}",
                                  it->second->rec.attempt, fmt::join(it->second->rec.nodes, ",")));
  }
  if (!req.transfer_key().empty() && (req.checkpoint_replica() || !req.replicate_error().empty() ||
                                      req.replicate_superseded_by() > 0)) {
    // A copy ended: its key reads nothing more at the source.
    for (auto g = grants_.begin(); g != grants_.end();) {
      if (g->public_key != req.transfer_key() || g->target != node || g->job_id != req.job_id()) {
        ++g;
        continue;
      }
      RevokeTransfer(*g, req.checkpoint_replica()         ? "copied"
                         : !req.replicate_error().empty() ? "copy failed"
                                                          : "copy superseded");
      g = grants_.erase(g);
    }
  }
  if (req.replicate_superseded_by() > 0 || !req.replicate_error().empty() ||
      req.checkpoint_replica()) {
    OnCopyReport(*n, req);
  }
  if (req.replicate_superseded_by() > 0) return ack;  // not an outcome of the newer step's wait
  if (!req.replicate_error().empty()) {
    // The requeued job waiting for this provider's copy goes on now; the copy is retried.
    if (auto j = jobs_.find(req.job_id()); j != jobs_.end()) {
      Replicated(*j->second, n->rec.labels.provider(), req.checkpoint_step());
    }
  } else if (req.checkpoint_step() > 0 && !req.checkpoint_volume().empty()) {
    const std::string& provider = n->rec.labels.provider();
    // Not catalogued: refused, and the agent sends it again (to a coordinator that works).
    // Counted (/metrics) in the same transaction: the counters outlive a restart.
    CheckpointStats count;
    count.AddReport(req.checkpoint_replica(), req.checkpoint_bytes(),
                    req.checkpoint_commit_seconds());
    MUSTER_RETURN_IF_ERROR(Write(
        fmt::format("step {} of job {} to the catalog", req.checkpoint_step(), req.job_id()), [&] {
          return store_->RecordCheckpointCounted(
              {req.job_id(), req.checkpoint_step(), VolumeKey(req.checkpoint_volume(), provider),
               true, NowMs()},
              provider, count);
        }));
    Event(req.job_id(), node, "checkpoint_committed",
          fmt::format("step {} on volume {} of provider {}{}", req.checkpoint_step(),
                      req.checkpoint_volume(), provider,
                      req.checkpoint_replica() ? " (verified replica)" : ""));
    if (observer_) observer_->OnCheckpoint(req, provider);
  }
  if (req.replicate_error().empty() && req.checkpoint_step() > 0 &&
      !req.checkpoint_volume().empty()) {
    auto j = jobs_.find(req.job_id());
    JobRt* jr = j == jobs_.end() ? nullptr : j->second.get();
    if (req.checkpoint_replica()) {
      if (jr) Replicated(*jr, n->rec.labels.provider(), req.checkpoint_step());
    } else {
      Replicate(jr, req.job_id(), req.checkpoint_step(), req.checkpoint_volume(), *n);
    }
  }
  if (it == jobs_.end() || it->second->rec.attempt != req.attempt()) return ack;  // stale
  JobRt& j = *it->second;
  if (std::find(j.rec.nodes.begin(), j.rec.nodes.end(), node) == j.rec.nodes.end()) return ack;
  for (const auto& p : req.progress()) {
    j.progress = p;
    if (observer_) observer_->OnProgress(j.rec.id, j.rec.attempt, p);
  }
  if (!req.start_error().empty() && req.preflight_failed()) {
    PreflightFailed(j, node, req);
  } else if (!req.start_error().empty() &&
             j.attempt.RecordStartError(node, req.start_error(), req.start_retryable(),
                                        j.start_retries)) {
    Event(j.rec.id, node, "start_failed", req.start_error());
    StopGang(j, proto::STOP_PEER_FAILED, node);
  }
  if (!req.resume_fallback().empty()) {
    // The catalog's step is not good on the volume where the attempt started (the agent checked).
    j.rec.resume_step = req.resume_fallback_step();
    MUSTER_RETURN_IF_ERROR(Persist(j));
    Event(j.rec.id, node, "resume_fallback",
          fmt::format("attempt {}: {}", j.rec.attempt, req.resume_fallback()));
  }
  if (req.started() && !j.attempt.started.count(node)) {
    j.attempt.started.insert(node);
    if (j.rec.state == proto::JOB_SCHEDULED && j.attempt.started.size() == j.rec.nodes.size()) {
      j.rec.state = proto::JOB_RUNNING;
      MUSTER_RETURN_IF_ERROR(Persist(j));
      Event(j.rec.id, "", "started",
            fmt::format("attempt {}: all {} node(s) started their ranks", j.rec.attempt,
                        j.rec.nodes.size()));
    }
  }
  for (const auto& x : req.exits()) {
    ExitVerdict v = j.attempt.RecordExit(node, x);
    if (v.first_peer_failure) {
      Event(j.rec.id, node, "rank_peer_failed",
            fmt::format("attempt {}: {}", j.rec.attempt, j.attempt.peer_failure));
    }
    if (v.kind == ExitVerdict::Kind::kRankFailed) {
      Event(j.rec.id, node, "rank_failed",
            fmt::format("attempt {}: {}", j.rec.attempt, j.attempt.failure));
    }
    // This node's other ranks are stopped too, unless it reports them all gone already.
    if (v.stop_gang) StopGang(j, proto::STOP_PEER_FAILED, req.all_exited() ? node : "");
  }
  if (req.all_exited() && !j.attempt.done.count(node)) NodeDone(j, node);
  return ack;
}

// A launch preflight failed: the blamed node is kept off this job (quarantined for it alone)
// and the gang is placed again at once, not counted against max_restarts (job_lifecycle.h).
// Pinned hosts cannot go elsewhere: there it is an ordinary start failure.
void Coordinator::PreflightFailed(JobRt& j, const std::string& node,
                                  const proto::AgentReport& req) {
  int r = req.preflight_blamed_rank();
  std::string blamed = r >= 0 && r < static_cast<int>(j.rec.nodes.size()) ? j.rec.nodes[r] : node;
  bool retry = j.req.hosts.empty();
  if (!j.attempt.RecordStartError(blamed, "launch preflight: " + req.start_error(), retry,
                                  j.start_retries)) {
    return;  // a later report of the same verdict, or another cause came first
  }
  Event(j.rec.id, blamed, "preflight_failed",
        fmt::format("attempt {} (reported by {}): {}", j.rec.attempt, node, req.start_error()));
  if (j.attempt.cause == AttemptCause::kStartRetryable) {
    j.attempt.preflight = true;
    // A write that fails latches; the stop below is refused then too.
    if (ExcludeFromJob(j.req, blamed, req.start_error()).ok()) {
      Event(j.rec.id, blamed, "node_quarantined",
            fmt::format("kept off job {} for the rest of the job: it failed the launch preflight",
                        j.rec.id));
    }
  }
  StopGang(j, proto::STOP_PEER_FAILED, node);
}

StatusOr<proto::Envelope> Coordinator::OnLogChunk(const Caller& caller,
                                                  const proto::AgentLogChunk& req) {
  MUSTER_ASSIGN_OR_RETURN(NodeRt * n, Session(caller, req.node(), req.session_id()));
  auto it = fetches_.find(req.fetch_id());
  if (it != fetches_.end() && it->second.node != n->rec.labels.name()) {
    // Only the node the log was asked of answers it; the fetch stays open for that node.
    return Deny(caller,
                fmt::format("answer log fetch {} as node {}", req.fetch_id(), n->rec.labels.name()),
                "the fetch was asked of node " + it->second.node);
  }
  if (it != fetches_.end()) {
    Reply r = std::move(it->second.reply);
    fetches_.erase(it);
    if (!req.error().empty()) {
      // The agent's code decides what the reader does (log_collect.cc: give up or ask again).
      // 0: an agent that predates error_code (NOT_FOUND). Only the codes an agent's log read
      // gives (node_agent/log_reader.cc) are taken as they are; any other (DEADLINE_EXCEEDED,
      // which would have a kept copy asked again at once, and the rest) is INTERNAL.
      int code = req.error_code();
      proto::Error err;
      switch (code) {
        case 0:
          err.set_code(proto::NOT_FOUND);
          break;
        case proto::NOT_FOUND:
        case proto::INVALID_ARGUMENT:
        case proto::FAILED_PRECONDITION:
        case proto::DATA_LOSS:
        case proto::UNAVAILABLE:
          err.set_code(static_cast<proto::Code>(code));
          break;
        default:
          err.set_code(proto::INTERNAL);
      }
      err.set_message(req.error());
      r(ErrorEnvelope(0, ErrorToStatus(err)));
    } else {
      proto::Envelope e;
      auto* out = e.mutable_logs_reply();
      out->set_data(req.data());
      out->set_next_offset(req.next_offset());
      out->set_eof(req.eof());
      out->set_generation(req.generation());
      out->set_skipped(req.skipped());
      r(std::move(e));
    }
  }
  return Wrap([](auto& e) { e.mutable_agent_report_reply(); });
}

}  // namespace muster::coordinator
