#pragma once

// The lines a rank prints for its agent (docs/protocol.md, common/control_channel.h): progress
// (`MUSTER_PROGRESS step=N ...`) and checkpoint commits (`MUSTER_CHECKPOINT step=N`), read
// from its stdout, stderr or control channel alike. The assignment runner parses them; the
// demo parses progress the same way.
//
// Thread-safety: pure functions.

#include <cstdint>
#include <optional>
#include <string_view>

#include "common/proto/envelope.pb.h"

namespace muster::node_agent {

// Parses a `MUSTER_PROGRESS key=value ...` line (docs/protocol.md). nullopt when the line is
// not one. Unknown keys are ignored; `<x>_per_s=V` is taken as throughput V with unit "<x>/s".
std::optional<proto::Progress> ParseProgressLine(std::string_view line);
// Parses `MUSTER_CHECKPOINT step=N`; nullopt when the line is not one.
std::optional<int64_t> ParseCheckpointLine(std::string_view line);
// The same line with what may follow the step: `seconds=S`, the commit latency the
// checkpointer measured (-1 when absent or not a finite number >= 0; other keys are ignored).
struct CheckpointCommitLine {
  int64_t step = 0;
  double seconds = -1;
};
std::optional<CheckpointCommitLine> ParseCheckpointCommitLine(std::string_view line);

}  // namespace muster::node_agent
