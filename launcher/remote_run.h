#pragma once

// `muster run` through a coordinator: the job runs as an interactive job on node agents, with
// the same output and exit semantics as on this machine (launcher.h).
//
//   muster run --coordinator tcp://coord:7070 -np 8 -H a:4,b:4 -- prog args
//
// The hosts become the job's pinned nodes in node-rank order (every node gets the same number
// of ranks: a gang); without -H the coordinator places one node of -np ranks. Each rank's output
// is streamed back through the coordinator (LogsRequest) and printed in whole lines, tagged with
// [rank] under --tag-output (a rank's stdout and stderr arrive merged, on stdout). The exit code
// is that of the first rank to fail (128 + signal when it was killed), named in one summary
// line, or 0; SIGINT/SIGTERM cancel the job (the agents stop the ranks) and exit 128 + signal;
// --timeout cancels it and exits 124. The job is marked interactive: when this client stops
// asking about it (killed, network gone), the coordinator cancels it. stdin is not forwarded.
//
// Thread-safety: call from the main thread, before other threads start (signals are blocked
// and read synchronously).

#include "launcher/launcher.h"
#include "launcher/run_options.h"

namespace muster::launcher {

int RunThroughCoordinator(const RunOptions& options, const RunIo& io);

}  // namespace muster::launcher
