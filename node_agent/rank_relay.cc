#include "node_agent/rank_relay.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <set>

#include "collectives/rendezvous_client.h"
#include "common/logging.h"

namespace muster::node_agent {

bool WantsDirectRendezvous(const proto::StartAssignment& s) {
  auto it = s.env().find(kRdzvDirectEnv);
  if (it == s.env().end()) return false;
  return it->second == "1" || it->second == "true" || it->second == "yes";
}

Status InRankGroups(pid_t pid, const std::vector<pid_t>& groups) {
  pid_t pgid = ::getpgid(pid);
  if (pgid < 0) {
    return FailedPreconditionError("process " + std::to_string(pid) +
                                   " is gone: " + std::strerror(errno));
  }
  if (std::find(groups.begin(), groups.end(), pgid) != groups.end()) return Status::Ok();
  return FailedPreconditionError("process " + std::to_string(pid) + " (process group " +
                                 std::to_string(pgid) +
                                 ") is not one of this attempt's ranks on this node");
}

StatusOr<std::unique_ptr<collectives::RendezvousRelay>> StartRankRelay(
    Reactor& reactor, const proto::StartAssignment& s, const std::string& creds,
    const std::filesystem::path& work_dir, std::function<std::vector<pid_t>()> rank_groups) {
  collectives::RendezvousRelay::Options o;
  o.upstream_endpoint = "tcp://" + s.master_addr() + ":" + std::to_string(s.rendezvous_port());
  MUSTER_ASSIGN_OR_RETURN(o.credentials, collectives::RdzvCredentials::Parse(creds));
  o.job = s.job_id();
  o.attempt = s.attempt();
  for (int i = 0; i < s.ranks_per_node(); ++i) {
    o.local_ranks.push_back(s.node_rank() * s.ranks_per_node() + i);
  }
  o.admit = [groups = std::move(rank_groups)](pid_t pid) { return InRankGroups(pid, groups()); };
  // The relay connects to the store as soon as it is made, before the ranks are spawned: the log
  // says how long its handshake took, to set beside the programs' start-up.
  o.on_upstream_ready = [scope = s.job_id() + "/" + std::to_string(s.attempt()),
                         store = o.upstream_endpoint, made = std::chrono::steady_clock::now()] {
    log::Get("agent.relay")
        ->info("rendezvous relay for {}: connected to the store at {} ({} ms after it was made)",
               scope, store,
               std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - made)
                   .count());
  };
  o.socket_parent = collectives::PickRelaySocketParent(collectives::RelaySocketParentCandidates(),
                                                       work_dir / "rdzv");
  {
    // Once per directory and agent process: what relays of a killed agent left there.
    static std::mutex mu;
    static std::set<std::filesystem::path> swept;
    std::lock_guard<std::mutex> l(mu);
    if (swept.insert(o.socket_parent).second) collectives::SweepStaleRelayDirs(o.socket_parent);
  }
  auto relay = collectives::RendezvousRelay::Create(reactor, o);
  if (relay.ok() || relay.status().code() != StatusCode::kInvalidArgument ||
      relay.status().message().find("Unix socket") == std::string::npos) {
    return relay;
  }
  // The work directory's path is too long for a socket address: the private directory goes
  // straight into the temp directory, whose sticky bit keeps other users from renaming it
  // (a shared subdirectory another user made first would not).
  std::error_code ec;
  o.socket_parent = std::filesystem::temp_directory_path(ec);
  return collectives::RendezvousRelay::Create(reactor, o);
}

}  // namespace muster::node_agent
