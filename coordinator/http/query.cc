#include "coordinator/http/query.h"

#include <civetweb.h>
#include <fmt/format.h>

#include <charconv>
#include <string_view>

namespace muster::coordinator::http {

// The query string as name -> value, percent-decoded. InvalidArgument for a name outside
// `allowed`, a name given twice, or a malformed pair.
StatusOr<std::map<std::string, std::string>> ParseQuery(
    const char* qs, std::initializer_list<const char*> allowed) {
  std::map<std::string, std::string> out;
  if (qs == nullptr || *qs == '\0') return out;
  std::string_view rest(qs);
  if (rest.size() > 4096) return InvalidArgumentError("query string longer than 4096 bytes");
  while (!rest.empty()) {
    auto amp = rest.find('&');
    std::string_view pair = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
    if (pair.empty()) continue;
    auto eq = pair.find('=');
    std::string name(pair.substr(0, eq));
    std::string raw(eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1));
    std::string value(raw.size() + 1, '\0');
    int n = mg_url_decode(raw.data(), static_cast<int>(raw.size()), value.data(),
                          static_cast<int>(value.size()), 1);
    if (n < 0) return InvalidArgumentError("query parameter '" + name + "' is not URL-encoded");
    value.resize(n);
    bool ok = false;
    for (const char* a : allowed) ok |= name == a;
    if (!ok) {
      std::string list;
      for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
      return InvalidArgumentError(fmt::format("unknown query parameter '{}' (this route takes: {})",
                                              name, list.empty() ? "none" : list));
    }
    if (!out.emplace(name, value).second) {
      return InvalidArgumentError("query parameter '" + name + "' given twice");
    }
  }
  return out;
}

// The integer parameter `name` in [lo, hi], or `def` if absent.
StatusOr<int64_t> IntParam(const std::map<std::string, std::string>& q, const std::string& name,
                           int64_t def, int64_t lo, int64_t hi) {
  auto it = q.find(name);
  if (it == q.end()) return def;
  int64_t v = 0;
  const auto& s = it->second;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) {
    return InvalidArgumentError(
        fmt::format("query parameter '{}' must be an integer, not '{}'", name, s.substr(0, 40)));
  }
  if (v < lo || v > hi) {
    return InvalidArgumentError(
        fmt::format("query parameter '{}' must be in [{}, {}], not {}", name, lo, hi, v));
  }
  return v;
}

}  // namespace muster::coordinator::http
