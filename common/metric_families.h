#pragma once

// Building prometheus-cpp metric families by hand, for the text the coordinator's /metrics and
// the agent's /metrics serialize: a family, a counter or gauge sample, a histogram sample.
// Header-only; include it only from targets that link prometheus-cpp::core.

#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/bucket_histogram.h"

namespace muster::metrics {

// A family named `prefix` + `name` (e.g. "muster_" + "scheduler_pass_seconds").
inline prometheus::MetricFamily Family(const std::string& prefix, std::string name,
                                       std::string help, prometheus::MetricType type) {
  prometheus::MetricFamily f;
  f.name = prefix + std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

// A sample of a counter or gauge family.
inline void Add(prometheus::MetricFamily& f, std::vector<prometheus::ClientMetric::Label> labels,
                double value) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  if (f.type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(std::move(m));
}

// A histogram sample (cumulative buckets, +Inf last) of `h`.
template <typename H>
prometheus::ClientMetric HistogramMetric(const H& h,
                                         std::vector<prometheus::ClientMetric::Label> labels = {}) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  uint64_t cum = 0;
  for (int i = 0; i < H::kBuckets; ++i) {
    cum += h.counts[i];
    m.histogram.bucket.push_back({cum, H::kBounds[i]});
  }
  m.histogram.bucket.push_back({h.count, std::numeric_limits<double>::infinity()});
  m.histogram.sample_count = h.count;
  m.histogram.sample_sum = h.sum;
  return m;
}

}  // namespace muster::metrics
