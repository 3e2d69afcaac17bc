#include "node_agent/rank_lines.h"

#include <cmath>
#include <string>

#include "common/strings.h"

namespace muster::node_agent {

namespace {

bool ParseDouble(std::string_view v, double* out) {
  try {
    size_t used = 0;
    *out = std::stod(std::string(v), &used);
    return used == v.size();
  } catch (...) {
    return false;
  }
}

// Blanks and a CR at the end (a line written with CRLF), blanks at the start.
std::string_view Trim(std::string_view s) { return TrimLeft(TrimRight(s, " \t\r"), " \t"); }

}  // namespace

std::optional<proto::Progress> ParseProgressLine(std::string_view line) {
  line = Trim(line);
  constexpr std::string_view kTag = "MUSTER_PROGRESS";
  if (line.substr(0, kTag.size()) != kTag) return std::nullopt;
  line.remove_prefix(kTag.size());
  if (!line.empty() && line.front() != ' ' && line.front() != '\t') return std::nullopt;
  proto::Progress p;
  bool have_step = false;
  while (!line.empty()) {
    line = Trim(line);
    size_t end = line.find_first_of(" \t");
    std::string_view tok = line.substr(0, end);
    line = end == std::string_view::npos ? std::string_view() : line.substr(end);
    size_t eq = tok.find('=');
    if (eq == std::string_view::npos) continue;
    std::string_view k = tok.substr(0, eq), v = tok.substr(eq + 1);
    std::optional<int64_t> i = ParseInt64(v);
    double d = 0;
    if (k == "step" && i && *i >= 0) {
      p.set_step(*i);
      have_step = true;
    } else if (k == "total" && i && *i >= 0) {
      p.set_total_steps(*i);
    } else if (k == "loss" && ParseDouble(v, &d)) {
      p.set_loss(d);
    } else if (k == "throughput" && ParseDouble(v, &d)) {
      p.set_throughput(d);
    } else if (k == "unit") {
      p.set_throughput_unit(std::string(v));
    } else if (k.size() > 6 && k.substr(k.size() - 6) == "_per_s" && ParseDouble(v, &d) &&
               p.throughput_unit().empty()) {
      p.set_throughput(d);
      p.set_throughput_unit(std::string(k.substr(0, k.size() - 6)) + "/s");
    }
  }
  if (!have_step) return std::nullopt;
  return p;
}

std::optional<int64_t> ParseCheckpointLine(std::string_view line) {
  line = Trim(line);
  constexpr std::string_view kTag = "MUSTER_CHECKPOINT step=";
  if (line.substr(0, kTag.size()) != kTag) return std::nullopt;
  line.remove_prefix(kTag.size());
  size_t end = line.find_first_of(" \t");
  std::optional<int64_t> step = ParseInt64(line.substr(0, end));
  if (!step || *step <= 0) return std::nullopt;
  return step;
}

std::optional<CheckpointCommitLine> ParseCheckpointCommitLine(std::string_view line) {
  std::optional<int64_t> step = ParseCheckpointLine(line);
  if (!step) return std::nullopt;
  CheckpointCommitLine c;
  c.step = *step;
  line = Trim(line);
  size_t end = line.find_first_of(" \t");
  line = end == std::string_view::npos ? std::string_view() : line.substr(end);
  while (!line.empty()) {
    line = Trim(line);
    end = line.find_first_of(" \t");
    std::string_view tok = line.substr(0, end);
    line = end == std::string_view::npos ? std::string_view() : line.substr(end);
    constexpr std::string_view kSeconds = "seconds=";
    double d = 0;
    if (tok.substr(0, kSeconds.size()) == kSeconds &&
        ParseDouble(tok.substr(kSeconds.size()), &d) && std::isfinite(d) && d >= 0) {
      c.seconds = d;
    }
  }
  return c;
}

}  // namespace muster::node_agent
