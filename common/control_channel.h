#pragma once

// The rank side of the control channel: how a rank tells its node agent (or `muster run`) about
// progress and committed checkpoints without printing.
//
// The agent and the launcher give every rank a socket open for writing, its number in
// MUSTER_CONTROL_FD (RankEnv::control_fd); they read it line by line with the same parser as
// the rank's stdout (node_agent/rank_lines.h: ParseProgressLine, ParseCheckpointLine). The lines:
//
//   MUSTER_PROGRESS step=120 total=1000 loss=1.93 tokens_per_s=812.5
//   MUSTER_CHECKPOINT step=100 seconds=2.417
//
// Writes never raise SIGPIPE (send with MSG_NOSIGNAL) and each line is one send of at most
// kMaxLineBytes, so lines of different threads never mix.
//
// Thread-safety: the functions may be called from any thread.

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace muster {

inline constexpr size_t kMaxControlLineBytes = 4000;

// "MUSTER_CHECKPOINT step=N", and " seconds=S" (the save's commit latency, 3 decimals) when
// `seconds` >= 0.
std::string CheckpointLine(int64_t step, double seconds = -1);

// "MUSTER_PROGRESS step=S total=T loss=L k=v ..." (`total` < 0 and a NaN `loss` are left out;
// metrics in the order given, values as %g). InvalidArgument for a negative step or a metric name
// that is empty or holds whitespace or '='.
StatusOr<std::string> ProgressLine(int64_t step, int64_t total, double loss,
                                   const std::vector<std::pair<std::string, double>>& metrics = {});

// Sends `line` and a '\n' on `fd`. InvalidArgument for a line holding '\n' or longer than
// kMaxControlLineBytes; Unavailable when the reader is gone (the agent stopped reading).
Status SendControlLine(int fd, std::string_view line);

}  // namespace muster
