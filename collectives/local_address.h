#pragma once

// Which local address a rank's peers can reach it on. Thread-safe; no state.

#include <string>

namespace muster::collectives {

// The local address that routes to `master` (MASTER_ADDR): what this rank's peers on other
// hosts can reach it on (CommConfig::host). "127.0.0.1" when `master` is empty, loopback or
// unresolvable. Sends no packet (a UDP connect).
std::string LocalAddressToward(const std::string& master);

}  // namespace muster::collectives
