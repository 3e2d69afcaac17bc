#pragma once

// Progress reporting from a rank: the small C++ call beside the plain-text line
// (docs/protocol.md, Progress). The node agent reads the line from the rank's output and
// forwards it to the coordinator, where `muster status` and `submit --follow` show it.
//
//   muster::ReportProgress({.step = 120, .total = 1000, .loss = 1.93,
//                           .throughput = 812.5, .unit = "samples/s"});
//
// Thread-safety: thread-safe; each report is one write(2), so lines never mix.

#include <cstdint>
#include <string>

namespace muster {

struct ProgressReport {
  int64_t step = 0;
  int64_t total = 0;  // 0: unknown
  double loss = 0;
  bool has_loss = true;
  double throughput = 0;  // 0: not reported
  std::string unit;       // e.g. "samples/s", "tokens/s"
};

// "MUSTER_PROGRESS step=120 total=1000 loss=1.93 throughput=812.5 unit=samples/s"
std::string FormatProgressLine(const ProgressReport& report);

// Writes FormatProgressLine + '\n' to `fd` (stdout by default) in one write.
void ReportProgress(const ProgressReport& report, int fd = 1);

}  // namespace muster
