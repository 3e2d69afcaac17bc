#include "coordinator/http/fleet_recorder.h"

#include <algorithm>
#include <cstdio>

#include "common/logging.h"

namespace muster::coordinator::http {

namespace {

auto Logger() {
  static auto l = log::Get("coord.http");
  return l;
}

constexpr int kEventsPerRead = 1000;
constexpr int kEventReadsPerPublish = 4;
constexpr int kFinishedJobsShown = 50;
constexpr int64_t kMaxUnchangedMs = 2000;

// The volume name and provider of a catalog volume key ("ckpt@aws"; Coordinator::VolumeKey).
void SplitVolumeKey(const std::string& key, std::string* volume, std::string* provider) {
  auto at = key.rfind('@');
  if (at == std::string::npos) {
    *volume = key;
    provider->clear();
  } else {
    *volume = key.substr(0, at);
    *provider = key.substr(at + 1);
  }
}

std::string CauseOf(const std::string& outcome) {
  if (outcome == "preempted") return "preemption";
  if (outcome == "node_lost") return "node_lost";
  if (outcome == "failed") return "failure";
  return outcome;  // cancelled, start_retry; "" and succeeded are not counted
}

// Keeps at most AttemptView::kMaxPoints by dropping every other point of the older half.
void Thin(std::vector<ProgressPoint>& points) {
  if (points.size() < AttemptView::kMaxPoints) return;
  size_t half = points.size() / 2;
  std::vector<ProgressPoint> out;
  out.reserve(points.size());
  for (size_t i = 0; i < half; i += 2) out.push_back(points[i]);
  out.insert(out.end(), points.begin() + half, points.end());
  points.swap(out);
}

}  // namespace

FleetRecorder::FleetRecorder(Coordinator& coord, SnapshotHub& hub, int64_t min_interval_ms)
    : coord_(coord), hub_(hub), min_interval_ms_(min_interval_ms) {
  coord_.set_observer(this);
}

FleetRecorder::~FleetRecorder() { coord_.set_observer(nullptr); }

void FleetRecorder::OnSchedulerPass(std::chrono::nanoseconds took) {
  passes_.Add(std::chrono::duration<double>(took).count());
}

void FleetRecorder::OnCheckpoint(const proto::AgentReport& r, const std::string&) {
  // The counters are read back from the database (they survive restarts there).
  jobs_[r.job_id()].dirty = true;
  changed_ = true;
}

void FleetRecorder::OnProgress(const std::string& job_id, int attempt, const proto::Progress& p) {
  auto& pts = jobs_[job_id].by_attempt[attempt].points;
  // Heartbeats repeat the newest report until a new one comes: one point per step.
  if (!pts.empty() && pts.back().step == p.step() && pts.back().time_ms == p.time_ms()) return;
  pts.push_back({p.step(), p.loss(), p.throughput(), p.time_ms()});
  changed_ = true;
  Thin(pts);
}

size_t FleetRecorder::ReadEvents() {
  size_t read = 0;
  for (int i = 0; i < kEventReadsPerPublish; ++i) {
    auto batch = coord_.store().Events("", event_cursor_, kEventsPerRead);
    if (!batch.ok()) {
      Logger()->warn("dashboard: events not read: {}", batch.status().ToString());
      return read;
    }
    read += batch->size();
    for (auto& e : *batch) {
      event_cursor_ = std::max(event_cursor_, e.id());
      if (!e.job_id().empty()) {
        auto& jc = jobs_[e.job_id()];
        jc.dirty = true;
        int attempt = 0;
        long long step = 0;
        char provider[128] = {0};
        // "attempt N on provider P: nodes" and "attempt N resumes from step S on volume V
        // (provider P)" (Coordinator::Start).
        if (e.kind() == "scheduled" &&
            std::sscanf(e.message().c_str(), "attempt %d on provider %127[^:]", &attempt,
                        provider) == 2) {
          jc.by_attempt[attempt].provider = provider;
        } else if (e.kind() == "resumed" &&
                   std::sscanf(e.message().c_str(), "attempt %d resumes from step %lld", &attempt,
                               &step) == 2) {
          jc.by_attempt[attempt].resume_step = step;
        }
      }
      events_.push_back(std::move(e));
      if (events_.size() > FleetSnapshot::kMaxEvents) events_.pop_front();
    }
    if (static_cast<int>(batch->size()) < kEventsPerRead) return read;
  }
  return read;
}

JobView FleetRecorder::BuildJob(const proto::JobStatus& status, JobCache& jc,
                                const std::map<std::string, std::string>& node_provider,
                                int64_t now_ms) {
  const std::string& id = status.job_id();
  if (status.attempt() > 0) {
    auto& cur = jc.by_attempt[status.attempt()];
    cur.resume_step = status.resume_step();
    if (!status.provider().empty()) cur.provider = status.provider();
  }
  if (jc.dirty || jc.attempt_seen != status.attempt()) {
    auto a = coord_.store().LoadAttempts(id);
    auto c = coord_.store().Checkpoints(id);
    auto n = coord_.store().CheckpointCounters(id);
    if (a.ok()) jc.attempts = std::move(*a);
    if (c.ok()) jc.catalog = std::move(*c);
    if (n.ok()) jc.counters = std::move(*n);
    if (!n.ok())
      Logger()->warn("dashboard: checkpoint counters of {}: {}", id, n.status().ToString());
    jc.dirty = !a.ok() || !c.ok() || !n.ok();
    jc.attempt_seen = status.attempt();
  }
  JobView v;
  v.status = status;
  for (const auto& rec : jc.attempts) {
    AttemptView av;
    av.record = rec;
    auto it = jc.by_attempt.find(rec.attempt);
    if (it != jc.by_attempt.end()) {
      av.provider = it->second.provider;
      av.resume_step = it->second.resume_step;
      av.points = it->second.points;
    }
    if (av.provider.empty() && !rec.nodes.empty()) {
      auto n = node_provider.find(rec.nodes[0]);
      if (n != node_provider.end()) av.provider = n->second;
    }
    if (!av.points.empty()) av.end_step = av.points.back().step;
    if (rec.ended_ms > 0) {
      std::string cause = CauseOf(rec.outcome);
      if (!cause.empty() && cause != "succeeded") v.ended_by_cause[cause]++;
    }
    v.attempts.push_back(std::move(av));
  }
  // The catalog by provider, and how far each provider trails the newest step anywhere.
  std::map<std::string, std::pair<int64_t, int64_t>> newest;  // provider -> (step, time)
  int64_t newest_step = 0, newest_time = 0;
  for (const auto& r : jc.catalog) {
    if (!r.committed) continue;
    CatalogEntry e;
    SplitVolumeKey(r.volume, &e.volume, &e.provider);
    e.step = r.step;
    e.time_ms = r.time_ms;
    auto& n = newest[e.provider];
    if (e.step > n.first) n = {e.step, e.time_ms};
    if (e.step > newest_step || (e.step == newest_step && e.time_ms < newest_time)) {
      newest_step = e.step;
      newest_time = e.time_ms;
    }
    v.catalog.push_back(std::move(e));
  }
  std::sort(v.catalog.begin(), v.catalog.end(), [](const auto& a, const auto& b) {
    return std::tie(a.provider, a.step) < std::tie(b.provider, b.step);
  });
  for (const auto& [provider, n] : newest) {
    ReplicationLag l;
    l.provider = provider;
    l.newest_step = n.first;
    l.lag_steps = newest_step - n.first;
    l.lag_seconds = l.lag_steps > 0 ? std::max<int64_t>(0, now_ms - newest_time) / 1000.0 : 0;
    v.lag.push_back(l);
  }
  // ETA from the current attempt's recent rate.
  const auto& p = status.progress();
  if (status.state() == proto::JOB_RUNNING && p.total_steps() > p.step() && !v.attempts.empty() &&
      v.attempts.back().record.attempt == status.attempt()) {
    const auto& pts = v.attempts.back().points;
    if (pts.size() >= 2) {
      const auto& a = pts[pts.size() > 20 ? pts.size() - 20 : 0];
      const auto& b = pts.back();
      if (b.step > a.step && b.time_ms > a.time_ms) {
        double rate = (b.step - a.step) * 1000.0 / (b.time_ms - a.time_ms);
        v.eta_seconds = (p.total_steps() - p.step()) / rate;
      }
    }
  }
  return v;
}

bool FleetRecorder::MaybePublish(int64_t now_ms, bool force) {
  if (!force && version_ > 0 && now_ms - last_publish_ms_ < min_interval_ms_) return false;
  // Every change of a job or node is an event, and progress comes through OnProgress: without
  // either, the snapshot is retaken only to age heartbeats and pass times.
  changed_ |= ReadEvents() > 0;
  if (!force && version_ > 0 && !changed_ && now_ms - last_publish_ms_ < kMaxUnchangedMs) {
    return false;
  }
  changed_ = false;
  last_publish_ms_ = now_ms;
  auto snap = std::make_shared<FleetSnapshot>();
  snap->time_ms = now_ms;
  snap->version = ++version_;
  // Jobs and nodes as the CLI sees them, through the coordinator's own handler (synchronous
  // for these requests).
  proto::Envelope req;
  req.mutable_status_request()->set_finished_limit(kFinishedJobsShown);
  proto::StatusReply status;
  coord_.Handle("dashboard", std::move(req), [&](proto::Envelope e) {
    if (e.has_status_reply()) status = std::move(*e.mutable_status_reply());
  });
  proto::Envelope nreq;
  nreq.mutable_nodes_request();
  coord_.Handle("dashboard", std::move(nreq), [&](proto::Envelope e) {
    if (e.has_nodes_reply()) {
      for (auto& n : *e.mutable_nodes_reply()->mutable_nodes()) snap->nodes.push_back(n);
    }
  });
  std::map<std::string, std::string> node_provider;
  for (const auto& n : snap->nodes) node_provider[n.labels().name()] = n.labels().provider();
  std::map<std::string, JobCache> kept;
  for (const auto& s : status.jobs()) {
    auto& jc = jobs_[s.job_id()];
    snap->jobs.push_back(BuildJob(s, jc, node_provider, now_ms));
    for (const auto& [provider, c] : jc.counters) snap->checkpoints[{s.job_id(), provider}] = c;
    kept[s.job_id()] = std::move(jc);
  }
  jobs_.swap(kept);  // forget jobs no longer listed
  snap->events.assign(events_.begin(), events_.end());
  snap->passes = passes_;
  snap->durability = coord_.store().GetDurability();
  hub_.Publish(std::move(snap));
  return true;
}

}  // namespace muster::coordinator::http
