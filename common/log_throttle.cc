#include "common/log_throttle.h"

#include <algorithm>

namespace muster {

LogThrottle::LogThrottle(std::chrono::milliseconds interval, size_t max_keys)
    : interval_(interval), max_keys_(std::max<size_t>(max_keys, 1)) {}

std::optional<int64_t> LogThrottle::Admit(const std::string& key, Clock::time_point now) {
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    if (entries_.size() >= max_keys_) ForgetOldest();
    entries_.emplace(key, Entry{now, 0});
    return 0;
  }
  Entry& e = it->second;
  if (now - e.logged_at < interval_) {
    ++e.held_back;
    return std::nullopt;
  }
  int64_t held = e.held_back;
  e.logged_at = now;
  e.held_back = 0;
  return held;
}

void LogThrottle::ForgetOldest() {
  auto oldest = std::min_element(
      entries_.begin(), entries_.end(),
      [](const auto& a, const auto& b) { return a.second.logged_at < b.second.logged_at; });
  if (oldest != entries_.end()) entries_.erase(oldest);
}

}  // namespace muster
