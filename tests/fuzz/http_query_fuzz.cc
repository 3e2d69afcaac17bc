// The dashboard's untrusted inputs (coordinator/http): a query string as civetweb hands it over
// (ParseQuery, IntParam), and strings from agents and specs rendered as JSON and as Prometheus
// label values (job ids, node names, event messages, throughput units with any bytes).

#include <cstddef>
#include <cstdint>
#include <string>

#include "coordinator/http/fleet_snapshot.h"
#include "coordinator/http/query.h"
#include "coordinator/http/render.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::string cstr = text.substr(0, text.find('\0'));
  auto q = muster::coordinator::http::ParseQuery(cstr.c_str(), {"after", "job", "limit", "rank"});
  if (q.ok()) {
    for (const char* name : {"after", "limit", "rank"}) {
      (void)muster::coordinator::http::IntParam(*q, name, 0, 0, INT64_MAX);
    }
  }
  namespace h = muster::coordinator::http;
  h::FleetSnapshot s;
  s.time_ms = 1;
  h::JobView j;
  j.status.set_job_id(text);
  j.status.set_state(muster::proto::JOB_RUNNING);
  j.status.set_pending_reason(text);
  j.status.mutable_progress()->set_throughput_unit(text);
  j.catalog.push_back({text, text, 1, 1});
  j.lag.push_back({text, 1, 0, 0});
  s.jobs.push_back(j);
  muster::proto::NodeStatus n;
  n.mutable_labels()->set_name(text);
  n.mutable_labels()->set_provider(text);
  s.nodes.push_back(n);
  muster::proto::Event e;
  e.set_id(1);
  e.set_job_id(text);
  e.set_message(text);
  s.events.push_back(e);
  h::RenderMetrics(s);
  h::RenderJobsJson(s);
  (void)h::RenderJobJson(s, text);
  h::RenderNodesJson(s);
  h::RenderEventsJson(s, 0, text, 10);
  (void)h::RenderCheckpointsJson(s, "");
  h::PendingReasonClass(text);
  return 0;
}
