#pragma once

// RankReaper: the ranks of an agent that dies (kill -9, crash) die with it, the processes they
// started included.
//
// A rank leads its own process group and gets SIGKILL when its agent dies (PR_SET_PDEATHSIG,
// node_agent/supervisor.h), but what it started (a launcher's workers, `sh -c` children) is not
// covered by that. The reaper is a small process of its own (`muster rank-reaper`, exec'd, in
// its own session so a terminal's ^C does not reach it) that the agent starts once. It blocks on
// a pipe whose only write end is the agent's; when the agent's process ends, for whatever
// reason, the kernel closes that end, the reaper reads EOF and SIGKILLs every process group of
// the ranks the agent last recorded (<work_dir>/ranks.pids, KillLeftoverRanks: a group whose
// leader's number was reused by another process is left alone), then exits. That takes
// milliseconds; the coordinator declares such an agent lost only after its connection closed
// and a grace (200 ms or more) passed (docs/protocol.md, "Dead or silent").
//
// If the reaper itself is killed, the agent's next start still kills the leftovers
// (KillLeftoverRanks at start), as before.

#include <filesystem>
#include <string>

#include "common/status.h"

namespace muster::node_agent {

// Starts `reaper_bin rank-reaper --pids <pids_file>` with the read end of a pipe as its fd 3 and
// keeps the write end open (close-on-exec, so no rank holds it) for the rest of this process.
Status StartRankReaper(const std::string& reaper_bin, const std::filesystem::path& pids_file);

// The reaper's body: waits for EOF on `fd`, then kills the groups in `pids_file`. Returns 0.
int RunRankReaper(int fd, const std::filesystem::path& pids_file);

}  // namespace muster::node_agent
