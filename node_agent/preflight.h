#pragma once

// Launch preflight: what a node agent checks before it starts the ranks of a multi-node
// attempt, so that a node that cannot talk to the others is named at once instead of failing
// deep inside NCCL or Gloo minutes later.
//
// Every agent of the attempt, on its own worker thread (Preflight below):
//   1. finds the interface and local address the kernel routes toward the master (RouteTo);
//   2. opens a TCP listener on that address (any port) for its peers' probes;
//   3. connects to the master's rendezvous store port (retrying "connection refused" until the
//      deadline: the master's agent may not have opened its store yet);
//   4. joins round 1, an allgather through the attempt's store of every node's
//      {name, address, interface, probe port};
//   5. connects to every peer's probe listener (all at once, each with probe_timeout);
//   6. joins round 2, an allgather of the probes that failed; its completion also tells every
//      node that its peers are done probing it;
//   7. computes the verdict (Blame): every node computes the same one from the same data.
// A node that cannot reach the master blames itself (it cannot learn anything else); a node
// missing from a round when the deadline passes is blamed by those who waited for it.
//
// On success the ranks get NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for the interface of step
// 1 (RankEnv::socket_ifname), unless the user set them.
//
// The listener needs no accept(): the kernel completes the handshake into the backlog, which
// is all a probe needs to see.

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "collectives/rendezvous_store.h"
#include "common/status.h"

namespace muster::node_agent {

// The interface and the local IPv4 address the kernel routes to a destination through.
struct Route {
  std::string interface;      // e.g. "eth0"; "lo" for a local destination
  std::string local_address;  // e.g. "198.18.0.11"
};

// Where packets to `address` (an IPv4 literal or a host name) leave from: a UDP connect (no
// packet is sent), getsockname, and the interface (getifaddrs) that holds that local address.
// Unavailable naming the address and the errno text when there is no route; InvalidArgument
// when the name does not resolve to IPv4.
StatusOr<Route> RouteTo(const std::string& address);

// One TCP connect to address:port within `timeout`. Unavailable with what went wrong
// ("connection refused", "no route to host", "timed out after 2000 ms", ...).
Status ProbeTcp(const std::string& address, int port, std::chrono::milliseconds timeout);

// A TCP listener on `address` at an ephemeral port, closed by the destructor. Probes connect
// to it; it accepts nothing.
class ProbeListener {
 public:
  static StatusOr<std::unique_ptr<ProbeListener>> Open(const std::string& address);
  ~ProbeListener();
  int port() const { return port_; }

 private:
  ProbeListener(int fd, int port) : fd_(fd), port_(port) {}
  int fd_;
  int port_;
};

// What a node tells the others in round 1.
struct PreflightPeer {
  std::string node;
  std::string address;
  std::string interface;
  int probe_port = 0;

  std::string Encode() const;  // "node|address|interface|port"
  static StatusOr<PreflightPeer> Decode(const std::string& text);
};

// A failed check: node rank `from` could not reach node rank `to` (to == -1: the whole check
// never ran for `from`, e.g. it did not join a round).
struct ProbeFailure {
  int from = 0;
  int to = 0;
  std::string error;
};

// Encodes a list of failures for round 2 (one per line: "from to error") and back. Decode
// rejects malformed lines and ranks outside [0, nnodes) with InvalidArgument.
std::string EncodeFailures(const std::vector<ProbeFailure>& failures);
StatusOr<std::vector<ProbeFailure>> DecodeFailures(const std::string& text, int nnodes);

// The node rank to quarantine for these failures, nullopt when there are none. Each failure
// counts against both of its ends; the rank with the highest count is blamed, and on a tie
// the highest node rank (so the master, which hosts the store, is blamed last). A one-sided
// failure (to == -1) counts twice against `from`: that node did not even take part.
// REQUIRES: every rank in `failures` is in [0, nnodes) or -1 for `to`.
std::optional<int> Blame(int nnodes, const std::vector<ProbeFailure>& failures);

struct PreflightOptions {
  std::string node;  // this node's name
  int node_rank = 0;
  int nnodes = 1;
  std::string master_addr;  // node rank 0's address
  int store_port = 0;       // the attempt's rendezvous store on the master
  // The whole preflight must end by then; a probe's connect gives up after probe_timeout.
  std::chrono::milliseconds timeout{15000};
  std::chrono::milliseconds probe_timeout{2000};
};

struct PreflightResult {
  bool ok = false;
  Route route;              // this node's route toward the master (empty when unknown)
  int blamed_rank = -1;     // when !ok: the node rank to quarantine for the job
  std::string blamed_node;  // its name when known
  // When !ok: names the node, its interface and address, the peer address it could not reach
  // and the error, e.g. "node n3 (198.18.1.13 via p1) cannot reach node n2 at
  // 198.18.1.12:40123: timed out after 2000 ms".
  std::string message;
};

// Runs the whole preflight, blocking, through `store` (the attempt's; its AllGather is the
// collective). `cancelled` is checked between steps.
// REQUIRES: options.nnodes >= 2, 0 <= node_rank < nnodes.
PreflightResult RunPreflight(const PreflightOptions& options, collectives::RendezvousStore& store,
                             const std::atomic<bool>* cancelled = nullptr);

// Runs RunPreflight on its own thread and hands the result to `done` (on that thread). The
// destructor cancels: `done` is not called after it returns, and the thread, if still
// blocked in the store, is left to end on its own (it owns everything it touches).
// `connect` makes the store on the worker thread (a RendezvousClient connects lazily, but building
// one may still take time).
class Preflight {
 public:
  using StoreFactory = std::function<StatusOr<std::unique_ptr<collectives::RendezvousStore>>()>;
  using Done = std::function<void(PreflightResult)>;
  static std::unique_ptr<Preflight> Start(PreflightOptions options, StoreFactory connect,
                                          Done done);
  ~Preflight();
  Preflight(const Preflight&) = delete;
  Preflight& operator=(const Preflight&) = delete;

 private:
  struct State;
  explicit Preflight(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

}  // namespace muster::node_agent
