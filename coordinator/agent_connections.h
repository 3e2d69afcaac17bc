#pragma once

// AgentConnections: tells a DEAD agent from a SILENT one, from the coordinator's side of the
// agents' TCP connections (docs/protocol.md, "Dead or silent").
//
// When an agent's process ends (kill -9, crash, exit) its kernel closes its connections at once
// (FIN or RST), and its ranks end with it (PR_SET_PDEATHSIG, node_agent/supervisor.h). A node
// that is only silent (a partition, a hung host, a cut cable) closes nothing: it keeps the
// heartbeat timeout and the lease fence. This class turns the RpcServer's connection events
// (common/rpc.h, ConnectionEvent) and the agents' requests into "node N's agent is gone":
//   - a request from an agent (node, session) over connection fd F maps F to that agent, if F is
//     open (a request from a connection already closed maps nothing);
//   - when the last open connection mapped to an agent closes, the agent is suspect;
//   - a suspect agent that sends nothing (on a new connection) for `grace` is declared gone by
//     Due(). The grace covers a live agent whose connection alone was dropped (a reset, libzmq
//     closing it): its DEALER reconnects (100 ms) and its next heartbeat or poll clears it.
// What is done with a declaration (the session must still be the node's current one) is the
// coordinator's business.
//
// Pure: no clock, no I/O; times are the caller's (ms). Not thread-safe (the coordinator's
// reactor owns it).

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace muster::coordinator {

class AgentConnections {
 public:
  struct Agent {
    std::string node, session;
    bool operator<(const Agent& o) const {
      return node != o.node ? node < o.node : session < o.session;
    }
    bool operator==(const Agent&) const = default;
  };

  explicit AgentConnections(int64_t grace_ms) : grace_ms_(grace_ms) {}

  void OnAccepted(int fd);
  void OnClosed(int fd, int64_t now_ms);
  // A request of `agent` came in over `fd` (-1: unknown, only clears a suspicion).
  void OnRequest(int fd, const Agent& agent);

  // Agents whose grace has run out by `now_ms`: each is returned once, and forgotten.
  std::vector<Agent> Due(int64_t now_ms);
  // When the next suspect's grace runs out (nullopt: none suspect).
  std::optional<int64_t> NextDue() const;

  size_t open_connections() const { return open_.size(); }

 private:
  int64_t grace_ms_;
  std::set<int> open_;                 // fds accepted and not closed since
  std::map<int, Agent> owner_;         // open fd -> the agent whose request came over it
  std::map<Agent, int64_t> suspects_;  // agent -> when its last connection closed
};

}  // namespace muster::coordinator
