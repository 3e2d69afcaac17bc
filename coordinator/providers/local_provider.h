#pragma once

// LocalProvider: the reference provider. A node is a `muster agent` process on this machine,
// started with the node's name and the provider's template labels, its work directory (and
// log, agent.log) under config.work_dir/<node>. Volume paths may contain "{node}", replaced by
// the node's name (each local node then has its own checkpoint directory, as separate
// machines would). Release sends SIGINT (the agent stops at once; an idle node runs no ranks);
// the process is reaped by Poll() or, at the latest, by the destructor (SIGKILL after 5 s).
// An agent that exits before the coordinator released it fails its request (Poll) if the
// request is still outstanding; later, the coordinator sees it as a lost node.
//
// Thread-safety: reactor thread only (fork/exec is quick and never waits on anything remote).

#include <sys/types.h>

#include <map>
#include <set>

#include "coordinator/providers/provider.h"

namespace muster::coordinator::providers {

class LocalProvider : public Provider {
 public:
  LocalProvider(ProviderConfig config, AgentLaunch launch);
  ~LocalProvider() override;

  const ProviderConfig& config() const override { return config_; }
  Status Request(const NodeGroupRequest& request) override;
  void Cancel(uint64_t request_id) override;
  void Release(const std::string& node) override;
  std::vector<RequestFailure> Poll() override;

  // The pid of a node's agent, or -1 (tests).
  pid_t PidOf(const std::string& node) const;

 private:
  struct Agent {
    pid_t pid = -1;
    uint64_t request = 0;
    bool stopping = false;  // released or cancelled: its exit is expected
  };
  void Stop(Agent& a);

  ProviderConfig config_;
  AgentLaunch launch_;
  std::map<std::string, Agent> agents_;  // by node name, until reaped
};

}  // namespace muster::coordinator::providers
