#include "common/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>

namespace muster {

std::string FormatProgressLine(const ProgressReport& r) {
  std::string line = fmt::format("MUSTER_PROGRESS step={}", r.step);
  if (r.total > 0) line += fmt::format(" total={}", r.total);
  if (r.has_loss) line += fmt::format(" loss={:.6g}", r.loss);
  if (r.throughput > 0) {
    line += fmt::format(" throughput={:.6g}", r.throughput);
    if (!r.unit.empty() && r.unit.find_first_of(" \t\n") == std::string::npos) {
      line += " unit=" + r.unit;
    }
  }
  return line;
}

void ReportProgress(const ProgressReport& report, int fd) {
  std::string line = FormatProgressLine(report) + "\n";
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace muster
