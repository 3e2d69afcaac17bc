#pragma once

// NetnsCluster: simulated hosts for multi-host tests, one Linux network namespace each, joined
// by a bridge that the cluster creates. Hosts are addressed in 198.18.0.0/15 (the range
// reserved for benchmarking); no address is given to the root namespace, so test traffic never
// leaves the bridge. Everything is deleted when the cluster is destroyed, and namespaces left
// by a killed earlier run (their owner pid is gone) are removed at the next Create.
//
// Requires root and iproute2; Create returns FailedPrecondition otherwise, and tests skip with
// that message.

#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::testing {

class NetnsCluster {
 public:
  // One namespace per entry of `hosts` (names for logs), addressed 198.18.0.10, .11, ...
  static StatusOr<std::unique_ptr<NetnsCluster>> Create(const std::vector<std::string>& hosts);
  ~NetnsCluster();

  int size() const { return static_cast<int>(hosts_.size()); }
  const std::string& host_name(int i) const { return hosts_[i]; }
  const std::string& netns(int i) const { return netns_[i]; }
  std::string address(int i) const;

  // `argv` wrapped to run inside host i: {"ip", "netns", "exec", netns, argv...}.
  std::vector<std::string> Wrap(int i, const std::vector<std::string>& argv) const;

  // Takes host i's link down (a partition: its packets go nowhere) or back up.
  Status CutLink(int i);
  Status RestoreLink(int i);

  // Kills (SIGKILL) every process in host i's namespace, whatever its process group: the host
  // crashed. Returns how many were signalled. The destructor does this for every host, so no
  // daemon or rank a test started outlives the cluster.
  StatusOr<int> KillAll(int i);
  // The pids of the processes in host i's namespace.
  StatusOr<std::vector<int>> Pids(int i) const;

 private:
  NetnsCluster() = default;
  static void RemoveStale();

  std::string prefix_;  // "mt<pid>"
  std::string bridge_;
  std::vector<std::string> hosts_, netns_, veths_;
};

}  // namespace muster::testing
