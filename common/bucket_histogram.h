#pragma once

// BucketHistogram: observations counted in fixed buckets, as a Prometheus histogram keeps them
// (the bucket of the first upper bound >= the value; count and sum of every observation, those
// above the last bound too). `kUpperBounds` is a constexpr array of increasing bounds, e.g.
//   inline constexpr double kPassBounds[] = {0.001, 0.01, 0.1, 1};
//   using PassHistogram = BucketHistogram<kPassBounds>;
// common/metric_families.h renders one as a prometheus::ClientMetric.
//
// Thread-safety: a plain value.

#include <cstdint>
#include <iterator>

namespace muster {

template <const auto& kUpperBounds>
struct BucketHistogram {
  static constexpr const auto& kBounds = kUpperBounds;
  static constexpr int kBuckets = static_cast<int>(std::size(kUpperBounds));
  uint64_t counts[kBuckets] = {};  // non-cumulative, per bound
  uint64_t count = 0;              // every observation
  double sum = 0;

  void Add(double value) {
    for (int i = 0; i < kBuckets; ++i) {
      if (value <= kBounds[i]) {
        counts[i]++;
        break;
      }
    }
    count++;
    sum += value;
  }
};

}  // namespace muster
