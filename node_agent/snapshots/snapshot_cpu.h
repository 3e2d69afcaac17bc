#pragma once

// The CPU class of an agent's snapshot work (`muster agent --snapshot-cpu`).
//
// In-memory snapshots cost the agent CPU every step: reading a rank's frame from the local
// socket, checking its xxh3, sealing it with CURVE for the peer agent, and opening and checking it
// again there. On a node whose cores the ranks keep busy, that CPU is taken from the ranks.
// kBackground runs that work at SCHED_IDLE: it gets the cores only when nothing at the normal
// class wants them, so the ranks are not slowed, and the copies are late when the cores are full.
// The snapshot work is: the local SnapshotServer's accept and connection threads, the
// SnapshotForwarder's loop and its ZeroMQ context's threads (CURVE's sealing), and the
// SnapshotPeerServer's reactor, worker and ZeroMQ context's threads (CURVE's opening). The
// agent's own reactor, its ZeroMQ context (heartbeats, the lease, control RPCs) and a resume's
// fetch from a peer are never put in the background class (the holder serves that fetch from
// its background threads, though: on a holder whose cores are all busy it can time out, and the
// attempt resumes from the volume).
//
// Thread-safety: every function is thread-safe.

#include <string>
#include <string_view>
#include <zmq.hpp>

#include "common/status.h"

namespace muster::node_agent {

enum class SnapshotCpu { kNormal, kBackground };

// "normal" or "background"; InvalidArgument naming the value otherwise.
StatusOr<SnapshotCpu> ParseSnapshotCpu(std::string_view value);
std::string_view SnapshotCpuName(SnapshotCpu cpu);

// The snapshot contexts' ZeroMQ threads are named "<this>/ZMQbg/IO/0" and "<this>/ZMQbg/Reaper"
// (ZMQ_THREAD_NAME_PREFIX takes a number): `top -H` and tests tell them from the agent's own.
inline constexpr int kSnapshotZmqThreadPrefix = 5;

// Names the calling thread `name` (at most 15 characters, for `top -H` and tests) and, for
// kBackground, puts it at SCHED_IDLE; threads it starts afterwards inherit the class.
// kNormal leaves the class as it is. Internal naming the errno when the kernel refuses.
Status EnterSnapshotThread(SnapshotCpu cpu, const char* name);

// Whether this host lets a thread of this process take `cpu`'s class: for kBackground, a
// throw-away thread tries SCHED_IDLE (a sandbox or seccomp profile may refuse it). Call it before
// any snapshot context is configured: libzmq asserts, and so aborts the whole agent, when it
// cannot apply ZMQ_THREAD_SCHED_POLICY to a thread it starts. FailedPrecondition naming the
// errno when refused; Ok for kNormal.
Status CheckSnapshotCpuAllowed(SnapshotCpu cpu);

// Sets `context`'s thread options: its name prefix, and for kBackground SCHED_IDLE
// (ZMQ_THREAD_SCHED_POLICY). REQUIRES: no socket has been opened in `context` yet (its threads
// start with the first one).
Status ConfigureSnapshotContext(zmq::context_t& context, SnapshotCpu cpu);

}  // namespace muster::node_agent
