#pragma once

// The network variables a PyTorch rank needs on a multi-node job, added by the agent.
//
// torch.distributed's Gloo backend picks its own address from the host name unless
// GLOO_SOCKET_IFNAME names an interface; where the host name resolves to loopback (Debian's
// /etc/hosts maps it to 127.0.1.1, containers to 127.0.0.1) every rank then advertises
// 127.0.0.1 and ranks on other nodes cannot connect ("connect [127.0.0.1]:N: Connection
// refused"). The agent knows which interface reaches the job's master, so it names that one.
// Stateless; thread-safe.

#include <map>
#include <string>
#include <vector>

namespace muster::node_agent {

// The name of the local interface that holds `address` (an IPv4 or IPv6 literal); "" when no
// interface does.
std::string InterfaceWithAddress(const std::string& address);

// When `nnodes` > 1 and neither `job_env` nor `inherited` ("NAME=value" entries) sets
// GLOO_SOCKET_IFNAME, sets it in `job_env` to the interface that routes to `master_addr`
// (LocalAddressToward, common/net_address.h). Leaves `job_env` as it is when no interface is found.
void AddGlooSocketIfname(const std::vector<std::string>& inherited, const std::string& master_addr,
                         int nnodes, std::map<std::string, std::string>& job_env);

}  // namespace muster::node_agent
