#pragma once

// RegisterBackoff: how long the agent waits before it asks the coordinator again after a
// registration the coordinator refused (answered with an error). Exponential from `initial`,
// doubling per refusal up to `cap`, with "equal jitter": each wait is drawn uniformly from
// [d/2, d], so agents refused together (a coordinator that refuses every change since a
// durable write failed) do not come back in step. A registration that got no answer at all is
// paced by its own call timeout, not by this.
//
// Also says which refusals are permanent: a "permission denied" from the coordinator (a key
// outside its scope, a node name bound to another key, a node that would move to another
// provider, a key without the agent role or removed from authorized_keys) does not change by
// asking again, and the agent ends with a fatal error instead of retrying it.
//
// Thread-compatible: used by the session's control thread only.

#include <chrono>
#include <cstdint>
#include <random>

#include "common/status.h"

namespace muster::node_agent {

class RegisterBackoff {
 public:
  // REQUIRES: 0 < initial <= cap.
  RegisterBackoff(std::chrono::milliseconds initial, std::chrono::milliseconds cap,
                  uint64_t seed = std::random_device{}());

  // The wait before the next attempt, after one more refusal.
  std::chrono::milliseconds Next();
  // A registration went through: the next refusal starts from `initial` again.
  void Reset() { refusals_ = 0; }
  int refusals() const { return refusals_; }

 private:
  const std::chrono::milliseconds initial_, cap_;
  int refusals_ = 0;
  std::mt19937_64 rng_;
};

// True for a refusal that asking again cannot change (above).
bool IsPermanentRegisterRefusal(const Status& status);

}  // namespace muster::node_agent
