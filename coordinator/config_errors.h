#pragma once

// Errors: the errors of one YAML config file (a job spec, the providers config), collected
// so a user sees all of them at once, each as "file:line: field: message", sorted by line. Also
// how a bad value is shown in such an error: clipped, control bytes escaped, so a hostile file
// cannot make a huge or terminal-corrupting reply.
//
// Thread-safety: an Errors is used by one thread; the functions are pure.

#include <yaml-cpp/yaml.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace muster::coordinator::config {

class Errors {
 public:
  // More errors than this are counted, not listed.
  static constexpr size_t kMaxListed = 100;

  // `file` prefixes every line; `what` names the kind of file in the summary ("job spec").
  Errors(std::string_view file, std::string_view what) : file_(file), what_(what) {}

  // At the line of `at` (none when `at` is undefined or has no mark).
  void Add(const YAML::Node& at, std::string_view field, std::string message);
  // At `line` (1-based; 0: none).
  void Add(int line, std::string_view field, std::string message);

  bool empty() const { return total_ == 0; }
  // InvalidArgument "invalid <what> (N errors):" and the lines, sorted by line, then
  // "... and K more" past kMaxListed. REQUIRES: !empty().
  Status ToStatus() const;

 private:
  std::string file_, what_;
  std::vector<std::pair<int, std::string>> lines_;  // (line, text)
  size_t total_ = 0;
};

// Bytes of a bad value shown in an error.
inline constexpr size_t kMaxShownBytes = 48;

// `s` for an error message: at most kMaxShownBytes, control bytes, '"' and '\' escaped as \xNN,
// the size named when cut.
std::string Clip(std::string_view s);
// Clip(s) in double quotes.
std::string Quoted(std::string_view s);
// A YAML value for an error message: a quoted scalar, "a list", "a mapping" or "null".
std::string Shown(const YAML::Node& n);

}  // namespace muster::coordinator::config
