#include "common/control_channel.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>

namespace muster {

std::string CheckpointLine(int64_t step, double seconds) {
  std::string line = "MUSTER_CHECKPOINT step=" + std::to_string(step);
  if (seconds >= 0 && std::isfinite(seconds)) {
    char buf[48];
    std::snprintf(buf, sizeof(buf), " seconds=%.3f", seconds);
    line += buf;
  }
  return line;
}

StatusOr<std::string> ProgressLine(int64_t step, int64_t total, double loss,
                                   const std::vector<std::pair<std::string, double>>& metrics) {
  if (step < 0) return InvalidArgumentError("progress: step " + std::to_string(step) + " < 0");
  std::string line = "MUSTER_PROGRESS step=" + std::to_string(step);
  if (total >= 0) line += " total=" + std::to_string(total);
  char buf[64];
  if (!std::isnan(loss)) {
    std::snprintf(buf, sizeof(buf), " loss=%.6g", loss);
    line += buf;
  }
  for (const auto& [name, value] : metrics) {
    if (name.empty() || name.find_first_of(" \t\r\n=") != std::string::npos) {
      return InvalidArgumentError("progress: metric name '" + name +
                                  "' is empty or holds whitespace or '='");
    }
    std::snprintf(buf, sizeof(buf), "=%g", value);
    line += " " + name + buf;
  }
  return line;
}

Status SendControlLine(int fd, std::string_view line) {
  if (line.find('\n') != std::string_view::npos) {
    return InvalidArgumentError("control line holds a newline");
  }
  if (line.size() > kMaxControlLineBytes) {
    return InvalidArgumentError("control line of " + std::to_string(line.size()) +
                                " bytes is over " + std::to_string(kMaxControlLineBytes));
  }
  std::string l(line);
  l.push_back('\n');
  // One send per line; the mutex keeps this process's threads from splitting each other's
  // lines should a send ever come back short.
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::string_view rest(l);
  while (!rest.empty()) {
    ssize_t n = ::send(fd, rest.data(), rest.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == ENOTSOCK) n = ::write(fd, rest.data(), rest.size());  // a pipe
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      if (err == EPIPE || err == ECONNRESET) {
        return UnavailableError("control channel (fd " + std::to_string(fd) +
                                "): the reader is gone");
      }
      return ErrnoStatus(err, "control channel (fd " + std::to_string(fd) + ")");
    }
    rest.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

}  // namespace muster
