#include "coordinator/http/render.h"

#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "common/metric_families.h"
#include "coordinator/client.h"
#include "coordinator/node_state.h"
#include "http/http_server.h"

namespace muster::coordinator::http {

namespace {

using json = nlohmann::json;
using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

using metrics::Add;
using metrics::HistogramMetric;

MetricFamily Family(std::string name, std::string help, MetricType type) {
  return metrics::Family("muster_", std::move(name), std::move(help), type);
}

// JSON strings must be valid UTF-8 for nlohmann's dump: replace what is not.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json ProgressJson(const proto::Progress& p) {
  return {{"step", p.step()},
          {"total", p.total_steps()},
          {"loss", p.loss()},
          {"throughput", p.throughput()},
          {"unit", p.throughput_unit()},
          {"time_ms", p.time_ms()}};
}

json EventJson(const proto::Event& e) {
  return {{"id", e.id()},     {"time_ms", e.time_ms()}, {"job", e.job_id()},
          {"node", e.node()}, {"kind", e.kind()},       {"message", e.message()}};
}

json JobSummaryJson(const JobView& j, int64_t now_ms) {
  const auto& s = j.status;
  json out = {{"id", s.job_id()},
              {"name", s.name()},
              {"state", JobStateName(s.state())},
              {"attempt", s.attempt()},
              {"restarts", s.restarts()},
              {"preemptions", s.preemptions()},
              {"provider", s.provider()},
              {"nodes", std::vector<std::string>(s.nodes().begin(), s.nodes().end())},
              {"pending_reason", s.pending_reason()},
              {"detail", s.detail()},
              {"submitted_ms", s.submitted_ms()},
              {"updated_ms", s.updated_ms()},
              {"resume_step", s.resume_step()},
              {"spares", std::vector<std::string>(s.spares().begin(), s.spares().end())},
              {"eta_s", j.eta_seconds},
              {"ended_by_cause", j.ended_by_cause}};
  if (s.has_progress()) {
    out["progress"] = ProgressJson(s.progress());
    out["progress_age_s"] = s.progress().time_ms() > 0
                                ? std::max<int64_t>(0, now_ms - s.progress().time_ms()) / 1000.0
                                : -1.0;
  } else {
    out["progress"] = nullptr;
  }
  return out;
}

json CatalogJson(const JobView& j) {
  json by_provider = json::object();
  for (const auto& c : j.catalog) {
    by_provider[c.provider].push_back(
        {{"volume", c.volume}, {"step", c.step}, {"time_ms", c.time_ms}});
  }
  json lag = json::array();
  for (const auto& l : j.lag) {
    lag.push_back({{"provider", l.provider},
                   {"newest_step", l.newest_step},
                   {"lag_steps", l.lag_steps},
                   {"lag_s", l.lag_seconds}});
  }
  return {{"job", j.status.job_id()}, {"providers", by_provider}, {"lag", lag}};
}

}  // namespace

std::string PendingReasonClass(const std::string& reason) {
  if (reason.empty()) return "none";
  size_t end = reason.find_first_of(":(");
  std::string c = reason.substr(0, std::min<size_t>(end, 40));
  while (!c.empty() && c.back() == ' ') c.pop_back();
  return c.empty() ? "other" : c;
}

std::string RenderMetrics(const FleetSnapshot& s) {
  std::vector<MetricFamily> fams;
  double now_s = s.time_ms / 1000.0;

  // Jobs by state, the queue and why it waits.
  auto jobs = Family("jobs", "Jobs the coordinator holds, by state (finished: the newest 50)",
                     MetricType::Gauge);
  auto queue =
      Family("queue_depth", "Jobs waiting to be placed (pending or requeued)", MetricType::Gauge);
  auto pending = Family("jobs_pending", "Pending jobs by the class of their pending reason",
                        MetricType::Gauge);
  std::map<std::string, int> by_state, by_reason;
  for (auto st :
       {proto::JOB_PENDING, proto::JOB_SCHEDULED, proto::JOB_RUNNING, proto::JOB_SUCCEEDED,
        proto::JOB_FAILED, proto::JOB_CANCELLED, proto::JOB_REQUEUED}) {
    by_state[JobStateName(st)] = 0;
  }
  int waiting = 0;
  for (const auto& j : s.jobs) {
    by_state[JobStateName(j.status.state())]++;
    if (j.status.state() == proto::JOB_PENDING || j.status.state() == proto::JOB_REQUEUED) {
      waiting++;
      by_reason[PendingReasonClass(j.status.pending_reason())]++;
    }
  }
  for (const auto& [st, n] : by_state) Add(jobs, {{"state", st}}, n);
  Add(queue, {}, waiting);
  for (const auto& [r, n] : by_reason) Add(pending, {{"reason", r}}, n);
  fams.push_back(std::move(jobs));
  fams.push_back(std::move(queue));
  fams.push_back(std::move(pending));

  // Attempts and restarts by cause.
  auto attempts = Family("job_attempts", "Attempts of each job so far", MetricType::Gauge);
  auto restarts = Family("restarts_total",
                         "Attempts that ended early, by cause (preemption, node_lost, failure, "
                         "cancelled, start_retry), over the jobs shown",
                         MetricType::Counter);
  auto job_restarts = Family("job_restarts_total", "Attempts of a job that ended early, by cause",
                             MetricType::Counter);
  std::map<std::string, int> causes = {{"preemption", 0}, {"node_lost", 0}, {"failure", 0}};
  for (const auto& j : s.jobs) {
    Add(attempts, {{"job_id", j.status.job_id()}}, j.status.attempt());
    for (const auto& [cause, n] : j.ended_by_cause) {
      causes[cause] += n;
      Add(job_restarts, {{"job_id", j.status.job_id()}, {"cause", cause}}, n);
    }
  }
  for (const auto& [cause, n] : causes) Add(restarts, {{"cause", cause}}, n);
  fams.push_back(std::move(attempts));
  fams.push_back(std::move(restarts));
  fams.push_back(std::move(job_restarts));

  // Nodes.
  auto nodes = Family("nodes", "Registered nodes by provider, island and state", MetricType::Gauge);
  auto hb = Family("node_heartbeat_age_seconds", "Seconds since the node's last heartbeat",
                   MetricType::Gauge);
  std::map<std::tuple<std::string, std::string, std::string>, int> node_count;
  for (const auto& n : s.nodes) {
    node_count[{n.labels().provider(), n.labels().island(), NodeStateText(n.state())}]++;
    double age = n.last_heartbeat_ms() > 0
                     ? std::max<int64_t>(0, s.time_ms - n.last_heartbeat_ms()) / 1000.0
                     : -1;
    Add(hb, {{"node", n.labels().name()}, {"provider", n.labels().provider()}}, age);
  }
  for (const auto& [k, n] : node_count) {
    Add(nodes,
        {{"provider", std::get<0>(k)}, {"island", std::get<1>(k)}, {"state", std::get<2>(k)}}, n);
  }
  fams.push_back(std::move(nodes));
  fams.push_back(std::move(hb));

  // Scheduler passes.
  {
    auto f =
        Family("scheduler_pass_seconds", "Wall time of one scheduling pass", MetricType::Histogram);
    f.metric.push_back(HistogramMetric(s.passes));
    fams.push_back(std::move(f));
  }

  // The state database's durability (coordinator/wal_flusher.h): only with its flusher (a store
  // that syncs every commit has nothing to trail).
  if (s.durability.flusher) {
    const auto& d = s.durability;
    auto lag = Family("state_db_commits_not_durable",
                      "Commits to the coordinator's state database not yet flushed durable "
                      "against power loss (the flusher's lag)",
                      MetricType::Gauge);
    Add(lag, {}, static_cast<double>(d.commits - std::min(d.durable, d.commits)));
    auto commits =
        Family("state_db_commits_total",
               "Commits to the state database since the coordinator started", MetricType::Counter);
    Add(commits, {}, static_cast<double>(d.commits));
    auto failed = Family("state_db_flush_failed",
                         "1 once a flush of the state database's log failed: every later change "
                         "is refused until a restart on a working disk",
                         MetricType::Gauge);
    Add(failed, {}, d.failed ? 1 : 0);
    auto ckpt = Family("state_db_checkpoint_errors_total",
                       "Checkpoints of the state database's log into its file whose writes failed "
                       "(retried at the next flush; nothing is lost, the log grows)",
                       MetricType::Counter);
    Add(ckpt, {}, static_cast<double>(d.checkpoint_errors));
    auto pages = Family("state_db_log_pages", "The state database's log (WAL) size, in pages",
                        MetricType::Gauge);
    Add(pages, {}, d.log_pages);
    auto flush = Family("state_db_flush_seconds",
                        "How long flushes of the state database took: the last, and the longest",
                        MetricType::Gauge);
    Add(flush, {{"which", "last"}}, d.last_flush_seconds);
    Add(flush, {{"which", "max"}}, d.max_flush_seconds);
    for (auto* f : {&lag, &commits, &failed, &ckpt, &pages, &flush}) fams.push_back(std::move(*f));
  }

  // Checkpoints and replication.
  auto commits = Family("checkpoint_commits_total",
                        "Checkpoint steps in the catalog on each provider's volume (commits and "
                        "verified replicas)",
                        MetricType::Counter);
  auto newest = Family("checkpoint_newest_step", "Newest step in the catalog per job and provider",
                       MetricType::Gauge);
  auto lag_steps =
      Family("replication_lag_steps",
             "Steps the provider's newest checkpoint trails the job's newest", MetricType::Gauge);
  auto lag_s = Family("replication_lag_seconds",
                      "Seconds since the job's newest checkpoint was committed, while the "
                      "provider does not hold it yet (0 when it does)",
                      MetricType::Gauge);
  for (const auto& j : s.jobs) {
    std::map<std::string, int> per_provider;
    for (const auto& c : j.catalog) per_provider[c.provider]++;
    for (const auto& [p, n] : per_provider) {
      Add(commits, {{"job_id", j.status.job_id()}, {"provider", p}}, n);
    }
    for (const auto& l : j.lag) {
      std::vector<ClientMetric::Label> lb = {{"job_id", j.status.job_id()},
                                             {"provider", l.provider}};
      Add(newest, lb, l.newest_step);
      Add(lag_steps, lb, l.lag_steps);
      Add(lag_s, lb, l.lag_seconds);
    }
  }
  fams.push_back(std::move(commits));
  fams.push_back(std::move(newest));

  // What the agents reported of commits and replicas: bytes, and the commits' latency.
  auto bytes = Family("checkpoint_bytes_total",
                      "Bytes of checkpoint steps committed (kind=commit) or replicated as a "
                      "verified copy (kind=replica) on the provider's volume, as the agents "
                      "reported them (kept across coordinator restarts)",
                      MetricType::Counter);
  auto reported = Family("checkpoint_reports_total",
                         "Checkpoint commits (kind=commit) and verified replicas (kind=replica) "
                         "the agents reported (kept across coordinator restarts)",
                         MetricType::Counter);
  auto latency = Family("checkpoint_commit_seconds",
                        "From the program's save to the step's commit, as the ranks' checkpointer "
                        "measured it (commits that gave no latency are not observed)",
                        MetricType::Histogram);
  for (const auto& [key, st] : s.checkpoints) {
    const auto& [job_id, provider] = key;
    Add(bytes, {{"job_id", job_id}, {"provider", provider}, {"kind", "commit"}}, st.commit_bytes);
    Add(bytes, {{"job_id", job_id}, {"provider", provider}, {"kind", "replica"}}, st.replica_bytes);
    Add(reported, {{"job_id", job_id}, {"provider", provider}, {"kind", "commit"}}, st.commits);
    Add(reported, {{"job_id", job_id}, {"provider", provider}, {"kind", "replica"}}, st.replicas);
    latency.metric.push_back(
        HistogramMetric(st.latency, {{"job_id", job_id}, {"provider", provider}}));
  }
  fams.push_back(std::move(bytes));
  fams.push_back(std::move(reported));
  fams.push_back(std::move(latency));
  fams.push_back(std::move(lag_steps));
  fams.push_back(std::move(lag_s));

  // Progress of running jobs.
  auto step = Family("job_step", "The running job's newest reported step", MetricType::Gauge);
  auto total =
      Family("job_total_steps", "The running job's total steps (0: unknown)", MetricType::Gauge);
  auto loss = Family("job_loss", "The running job's newest reported loss", MetricType::Gauge);
  auto tput =
      Family("job_throughput", "The running job's newest reported throughput", MetricType::Gauge);
  auto last = Family("job_last_progress_timestamp_seconds",
                     "When the running job's rank printed its newest progress (unix seconds)",
                     MetricType::Gauge);
  for (const auto& j : s.jobs) {
    if (j.status.state() != proto::JOB_RUNNING || !j.status.has_progress()) continue;
    const auto& p = j.status.progress();
    std::vector<ClientMetric::Label> lb = {{"job_id", j.status.job_id()}};
    Add(step, lb, p.step());
    Add(total, lb, p.total_steps());
    Add(loss, lb, p.loss());
    Add(tput, {{"job_id", j.status.job_id()}, {"unit", p.throughput_unit()}}, p.throughput());
    Add(last, lb, p.time_ms() / 1000.0);
  }
  fams.push_back(std::move(step));
  fams.push_back(std::move(total));
  fams.push_back(std::move(loss));
  fams.push_back(std::move(tput));
  fams.push_back(std::move(last));

  auto snap = Family("snapshot_timestamp_seconds", "When the data served was taken (unix seconds)",
                     MetricType::Gauge);
  Add(snap, {}, now_s);
  fams.push_back(std::move(snap));

  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, fams);
  return out.str();
}

std::string RenderJobsJson(const FleetSnapshot& s) {
  json jobs = json::array();
  for (const auto& j : s.jobs) jobs.push_back(JobSummaryJson(j, s.time_ms));
  return Dump({{"time_ms", s.time_ms}, {"version", s.version}, {"jobs", jobs}});
}

StatusOr<std::string> RenderJobJson(const FleetSnapshot& s, const std::string& job_id) {
  const JobView* j = s.FindJob(job_id);
  if (!j) return NotFoundError("no job '" + job_id + "' (finished jobs are shown for a while)");
  json out = JobSummaryJson(*j, s.time_ms);
  out["spec"] = {{"nodes", j->status.spec().nodes()},
                 {"ranks_per_node", j->status.spec().ranks_per_node()},
                 {"checkpoint_volume", j->status.spec().checkpoint_volume()},
                 {"providers", std::vector<std::string>(j->status.spec().providers().begin(),
                                                        j->status.spec().providers().end())}};
  json attempts = json::array();
  for (const auto& a : j->attempts) {
    json pts = json::array();
    for (const auto& p : a.points) pts.push_back({p.step, p.loss, p.throughput, p.time_ms});
    attempts.push_back({{"attempt", a.record.attempt},
                        {"provider", a.provider},
                        {"nodes", a.record.nodes},
                        {"started_ms", a.record.started_ms},
                        {"ended_ms", a.record.ended_ms},
                        {"outcome", a.record.outcome},
                        {"detail", a.record.detail},
                        {"resume_step", a.resume_step},
                        {"end_step", a.end_step},
                        {"points", pts}});
  }
  out["attempts"] = attempts;
  out["points_format"] = {"step", "loss", "throughput", "time_ms"};
  // The job's events, and those of its nodes while it was there (a preemption notice is the
  // node's event, and it is the start of the job's story).
  std::set<std::string> nodes;
  for (const auto& a : j->attempts) nodes.insert(a.record.nodes.begin(), a.record.nodes.end());
  json events = json::array();
  for (const auto& e : s.events) {
    bool mine = e.job_id() == job_id;
    bool its_node = e.job_id().empty() && nodes.count(e.node()) > 0 &&
                    e.time_ms() >= j->status.submitted_ms() &&
                    std::any_of(j->attempts.begin(), j->attempts.end(), [&](const auto& a) {
                      const auto& ns = a.record.nodes;
                      return std::find(ns.begin(), ns.end(), e.node()) != ns.end() &&
                             e.time_ms() >= a.record.started_ms &&
                             (a.record.ended_ms == 0 || e.time_ms() <= a.record.ended_ms);
                    });
    if (mine || its_node) events.push_back(EventJson(e));
  }
  out["events"] = events;
  out["checkpoints"] = CatalogJson(*j);
  return Dump(out);
}

std::string RenderNodesJson(const FleetSnapshot& s) {
  json nodes = json::array();
  for (const auto& n : s.nodes) {
    const auto& l = n.labels();
    std::vector<std::string> vols;
    for (const auto& v : l.volumes()) vols.push_back(v.name());
    nodes.push_back(
        {{"name", l.name()},
         {"provider", l.provider()},
         {"region", l.region()},
         {"island", l.island()},
         {"gpu_type", l.gpu_type()},
         {"gpus", l.gpus()},
         {"slots", l.slots()},
         {"volumes", vols},
         {"state", NodeStateText(n.state())},
         {"job", n.job_id()},
         {"spare", n.spare()},
         {"heartbeat_age_s", n.last_heartbeat_ms() > 0
                                 ? std::max<int64_t>(0, s.time_ms - n.last_heartbeat_ms()) / 1000.0
                                 : -1.0},
         {"quarantines", n.quarantines()},
         {"quarantined_until_ms", n.quarantined_until_ms()}});
  }
  return Dump({{"time_ms", s.time_ms}, {"nodes", nodes}});
}

std::string RenderEventsJson(const FleetSnapshot& s, int64_t after, const std::string& job_id,
                             int limit) {
  json events = json::array();
  int64_t next = after;
  bool truncated = !s.events.empty() && s.events.front().id() > after + 1 &&
                   s.events.size() >= FleetSnapshot::kMaxEvents;
  for (const auto& e : s.events) {
    if (e.id() <= after) continue;
    if (static_cast<int>(events.size()) >= limit) break;
    next = e.id();
    if (!job_id.empty() && e.job_id() != job_id) continue;
    events.push_back(EventJson(e));
  }
  return Dump({{"events", events}, {"next", next}, {"truncated", truncated}});
}

StatusOr<std::string> RenderCheckpointsJson(const FleetSnapshot& s, const std::string& job_id) {
  json jobs = json::array();
  for (const auto& j : s.jobs) {
    if (!job_id.empty() && j.status.job_id() != job_id) continue;
    jobs.push_back(CatalogJson(j));
  }
  if (!job_id.empty() && jobs.empty()) return NotFoundError("no job '" + job_id + "'");
  return Dump({{"jobs", jobs}});
}

std::string ErrorJson(const Status& status) { return ::muster::http::ErrorJson(status); }

}  // namespace muster::coordinator::http
