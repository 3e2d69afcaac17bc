#pragma once

// NodeState on the wire: the scheduler's NodeState (scheduler.h) is the one node-state enum;
// proto::NodeStatusState is only its encoding in messages and in the database. These are
// the one mapping between them, so a fifth state is added in one place.
//
// Thread-safety: pure functions.

#include "common/proto/coordinator.pb.h"
#include "common/status.h"
#include "coordinator/scheduler.h"

namespace muster::coordinator {

proto::NodeStatusState NodeStateToProto(NodeState state);

// InvalidArgument for NODE_STATE_UNSPECIFIED or a value this build does not know.
StatusOr<NodeState> NodeStateFromProto(proto::NodeStatusState state);

// NodeStateName of the state, or "unknown" (what `muster nodes` shows for a value it cannot
// read).
std::string NodeStateText(proto::NodeStatusState state);

}  // namespace muster::coordinator
