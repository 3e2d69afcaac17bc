#include "coordinator/config_errors.h"

#include <fmt/format.h>

#include <algorithm>

namespace muster::coordinator::config {

void Errors::Add(const YAML::Node& at, std::string_view field, std::string message) {
  int line = at.IsDefined() && at.Mark().line >= 0 ? at.Mark().line + 1 : 0;
  Add(line, field, std::move(message));
}

void Errors::Add(int line, std::string_view field, std::string message) {
  ++total_;
  if (lines_.size() >= kMaxListed) return;
  if (line > 0) {
    lines_.emplace_back(line, fmt::format("{}:{}: {}: {}", file_, line, field, message));
  } else {
    lines_.emplace_back(0, fmt::format("{}: {}: {}", file_, field, message));
  }
}

Status Errors::ToStatus() const {
  std::string msg = fmt::format("invalid {} ({} error{}):", what_, total_, total_ == 1 ? "" : "s");
  auto sorted = lines_;
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& l : sorted) msg += "\n  " + l.second;
  if (total_ > lines_.size()) msg += fmt::format("\n  ... and {} more", total_ - lines_.size());
  return InvalidArgumentError(msg);
}

std::string Clip(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMaxShownBytes; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMaxShownBytes) out += fmt::format("... ({} bytes)", s.size());
  return out;
}

std::string Quoted(std::string_view s) { return "\"" + Clip(s) + "\""; }

std::string Shown(const YAML::Node& n) {
  if (n.IsScalar()) return Quoted(n.Scalar());
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "null";
}

}  // namespace muster::coordinator::config
