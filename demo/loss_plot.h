#pragma once

// A loss curve as a standalone SVG: one polyline per attempt, vertical markers for events
// (preemption notice, resume). No dependencies; the output opens in any browser.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace muster::demo {

struct LossSeries {
  std::string label;                               // "attempt 1 on aws"
  std::vector<std::pair<int64_t, double>> points;  // (step, loss), steps increasing
};

struct PlotMarker {
  int64_t step = 0;
  std::string label;  // "preemption notice (aws-1)"
};

// Renders the series (in order, each its own colour) and markers into an SVG document.
std::string RenderLossSvg(const std::string& title, const std::vector<LossSeries>& series,
                          const std::vector<PlotMarker>& markers);

}  // namespace muster::demo
