#pragma once

// The node agent's rendezvous relay for one attempt (collectives/rendezvous_relay.h): where its
// socket lives, which ranks it serves, and who may use it. The AssignmentRunner starts one per
// attempt before spawning the ranks and hands them its endpoint as MUSTER_RDZV_ENDPOINT, unless
// the job asks for the direct path (MUSTER_RDZV_DIRECT=1 in its env: every rank connects to the
// store itself, as before relays).
//
// Who may use the socket: a process in the process group of one of the attempt's ranks on
// this node (each rank leads its own group, so its children qualify and nothing else does),
// running as the agent's user (the socket's directory is 0700).
//
// Thread-safety: none; reactor thread only, like the AssignmentRunner.

#include <sys/types.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "collectives/rendezvous_relay.h"
#include "common/proto/coordinator.pb.h"
#include "common/reactor.h"
#include "common/status.h"

namespace muster::node_agent {

// The job env knob that keeps the direct path.
inline constexpr char kRdzvDirectEnv[] = "MUSTER_RDZV_DIRECT";

// True when the job's env asks for the direct path ("1", "true" or "yes").
bool WantsDirectRendezvous(const proto::StartAssignment& s);

// Starts the relay of the attempt `s` (its local ranks: node_rank * ranks_per_node onwards),
// with `creds` (MUSTER_RDZV_KEY's format) for the store at tcp://master_addr:rendezvous_port.
// The socket's private directory goes on a memory file system where the host has one
// (collectives::PickRelaySocketParent: $XDG_RUNTIME_DIR, /dev/shm), else under `work_dir`/rdzv,
// or straight under the system's temp directory where that path is too long for a Unix socket.
// The first relay of this process in a directory removes what relays of a killed agent left
// there (collectives::SweepStaleRelayDirs). `rank_groups` returns the
// process groups of the attempt's ranks here (their pids) when a request comes in. REQUIRES: on the
// reactor thread.
StatusOr<std::unique_ptr<collectives::RendezvousRelay>> StartRankRelay(
    Reactor& reactor, const proto::StartAssignment& s, const std::string& creds,
    const std::filesystem::path& work_dir, std::function<std::vector<pid_t>()> rank_groups);

// OK when `pid` is in one of `groups` (process group ids); FailedPrecondition naming the pid
// and its group otherwise (or when it is gone).
Status InRankGroups(pid_t pid, const std::vector<pid_t>& groups);

}  // namespace muster::node_agent
