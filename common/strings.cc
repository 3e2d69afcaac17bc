#include "common/strings.h"

#include <charconv>
#include <cstdlib>

namespace muster {

std::string_view Trim(std::string_view s, std::string_view blanks) {
  size_t b = s.find_first_not_of(blanks);
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(blanks);
  return s.substr(b, e - b + 1);
}

std::string_view TrimLeft(std::string_view s, std::string_view blanks) {
  size_t b = s.find_first_not_of(blanks);
  return b == std::string_view::npos ? std::string_view() : s.substr(b);
}

std::string_view TrimRight(std::string_view s, std::string_view blanks) {
  size_t e = s.find_last_not_of(blanks);
  return e == std::string_view::npos ? std::string_view() : s.substr(0, e + 1);
}

std::string TrimCopy(std::string_view s, std::string_view blanks) {
  return std::string(Trim(s, blanks));
}

std::optional<int64_t> ParseInt64(std::string_view s) {
  int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v, 10);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

std::optional<std::string> EnvValue(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

}  // namespace muster
