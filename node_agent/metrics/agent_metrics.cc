#include "node_agent/metrics/agent_metrics.h"

#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <sstream>

#include "common/metric_families.h"

namespace muster::node_agent {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;
using Labels = std::vector<ClientMetric::Label>;

using metrics::Add;

MetricFamily Family(std::string name, std::string help, MetricType type) {
  return metrics::Family("muster_agent_", std::move(name), std::move(help), type);
}

double AgeSeconds(int64_t now_ms, int64_t then_ms) {
  return std::max<int64_t>(0, now_ms - then_ms) / 1000.0;
}

}  // namespace

std::string RenderAgentMetrics(const AgentMetricsSnapshot& s) {
  std::vector<MetricFamily> fams;
  const Labels node = {{"node", s.node}, {"provider", s.provider}};
  auto with = [&](Labels more) {
    Labels l = node;
    l.insert(l.end(), more.begin(), more.end());
    return l;
  };

  auto info =
      Family("rank_info", "A rank process of an attempt on this node (value 1)", MetricType::Gauge);
  auto ranks = Family("ranks", "Rank processes on this node by state (running, stopping, exited)",
                      MetricType::Gauge);
  auto out_age = Family("rank_last_output_age_seconds",
                        "Seconds since the rank's newest line of output (since it started, when "
                        "it has printed nothing)",
                        MetricType::Gauge);
  auto prog_age = Family("rank_last_progress_age_seconds",
                         "Seconds since the rank's newest MUSTER_PROGRESS line (absent before "
                         "the first)",
                         MetricType::Gauge);
  std::map<std::string, int> by_state = {{"running", 0}, {"stopping", 0}, {"exited", 0}};
  for (const auto& r : s.ranks) {
    Labels id = {{"job_id", r.job_id},
                 {"attempt", std::to_string(r.attempt)},
                 {"rank", std::to_string(r.rank)}};
    Labels full = id;
    full.push_back({"pid", std::to_string(r.pid)});
    full.push_back({"state", r.state});
    Add(info, with(full), 1);
    by_state[r.state]++;
    if (r.state == "exited") continue;  // ages of a process that is gone say nothing
    Add(out_age, with(id),
        AgeSeconds(s.time_ms, r.last_output_ms > 0 ? r.last_output_ms : r.started_ms));
    if (r.last_progress_ms > 0) Add(prog_age, with(id), AgeSeconds(s.time_ms, r.last_progress_ms));
  }
  for (const auto& [st, n] : by_state) Add(ranks, with({{"state", st}}), n);
  fams.push_back(std::move(info));
  fams.push_back(std::move(ranks));
  fams.push_back(std::move(out_age));
  fams.push_back(std::move(prog_age));

  auto copies =
      Family("replication_copies_in_flight",
             "Checkpoint copies from other nodes' volumes running on this node", MetricType::Gauge);
  auto copy_bytes =
      Family("replication_copy_bytes",
             "Bytes a running copy has written into the local volume so far", MetricType::Gauge);
  auto copy_rate =
      Family("replication_copy_rate_bytes_per_second",
             "A running copy's bytes over the seconds since it started", MetricType::Gauge);
  Add(copies, node, static_cast<double>(s.copies.size()));
  for (const auto& c : s.copies) {
    Labels l = with({{"job_id", c.job_id},
                     {"volume", c.volume},
                     {"step", std::to_string(c.step)},
                     {"source_node", c.source_node}});
    Add(copy_bytes, l, static_cast<double>(c.bytes));
    Add(copy_rate, l, c.seconds > 0 ? c.bytes / c.seconds : 0.0);
  }
  fams.push_back(std::move(copies));
  fams.push_back(std::move(copy_bytes));
  fams.push_back(std::move(copy_rate));

  auto notices = Family("notices_total", "Preemption notices this agent received, by source",
                        MetricType::Counter);
  for (const auto& [src, n] : s.notices) Add(notices, with({{"source", src}}), n);
  fams.push_back(std::move(notices));

  if (s.snapshots) {
    auto used = Family("snapshot_memory_used_bytes", "Bytes held by in-memory snapshots",
                       MetricType::Gauge);
    auto reserved = Family("snapshot_memory_reserved_bytes",
                           "Bytes reserved for the jobs' in-memory snapshots", MetricType::Gauge);
    auto limit = Family("snapshot_memory_limit_bytes",
                        "The in-memory snapshots' limit (--snapshot-memory-mb)", MetricType::Gauge);
    Add(used, node, static_cast<double>(s.snapshot_used));
    Add(reserved, node, static_cast<double>(s.snapshot_reserved));
    Add(limit, node, static_cast<double>(s.snapshot_limit));
    fams.push_back(std::move(used));
    fams.push_back(std::move(reserved));
    fams.push_back(std::move(limit));
    auto offered = Family("snapshot_peer_offered_bytes_total",
                          "Payload bytes of the snapshot frames offered to peer agents (sent "
                          "deduplicated: only the chunks a peer does not hold)",
                          MetricType::Counter);
    auto offered_sent = Family("snapshot_peer_offered_sent_bytes_total",
                               "Bytes of the offered snapshot frames that peers asked for and "
                               "were sent",
                               MetricType::Counter);
    Add(offered, node, static_cast<double>(s.snapshot_offered));
    Add(offered_sent, node, static_cast<double>(s.snapshot_offered_sent));
    fams.push_back(std::move(offered));
    fams.push_back(std::move(offered_sent));
  }

  auto ts = Family("snapshot_timestamp_seconds", "When the data served was taken (unix seconds)",
                   MetricType::Gauge);
  Add(ts, node, s.time_ms / 1000.0);
  fams.push_back(std::move(ts));

  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, fams);
  return out.str();
}

}  // namespace muster::node_agent
