#include "node_agent/register_backoff.h"

#include <algorithm>

namespace muster::node_agent {

RegisterBackoff::RegisterBackoff(std::chrono::milliseconds initial, std::chrono::milliseconds cap,
                                 uint64_t seed)
    : initial_(initial), cap_(cap), rng_(seed) {}

std::chrono::milliseconds RegisterBackoff::Next() {
  int64_t d = initial_.count();
  for (int i = 0; i < refusals_ && d < cap_.count(); ++i) d *= 2;
  d = std::min<int64_t>(d, cap_.count());
  ++refusals_;
  std::uniform_int_distribution<int64_t> pick(d - d / 2, d);
  return std::chrono::milliseconds(pick(rng_));
}

bool IsPermanentRegisterRefusal(const Status& status) {
  return status.code() == StatusCode::kFailedPrecondition &&
         status.message().rfind("permission denied", 0) == 0;
}

}  // namespace muster::node_agent
