#include "coordinator/node_state.h"

#include <string>

namespace muster::coordinator {

proto::NodeStatusState NodeStateToProto(NodeState state) {
  switch (state) {
    case NodeState::kUp:
      return proto::NODE_UP;
    case NodeState::kDraining:
      return proto::NODE_DRAINING;
    case NodeState::kQuarantined:
      return proto::NODE_QUARANTINED;
    case NodeState::kDown:
      return proto::NODE_DOWN;
  }
  return proto::NODE_STATE_UNSPECIFIED;
}

StatusOr<NodeState> NodeStateFromProto(proto::NodeStatusState state) {
  switch (state) {
    case proto::NODE_UP:
      return NodeState::kUp;
    case proto::NODE_DRAINING:
      return NodeState::kDraining;
    case proto::NODE_QUARANTINED:
      return NodeState::kQuarantined;
    case proto::NODE_DOWN:
      return NodeState::kDown;
    default:
      return InvalidArgumentError("node state " + std::to_string(static_cast<int>(state)) +
                                  " is not one of up, draining, quarantined, down");
  }
}

std::string NodeStateText(proto::NodeStatusState state) {
  auto s = NodeStateFromProto(state);
  return s.ok() ? std::string(NodeStateName(*s)) : "unknown";
}

}  // namespace muster::coordinator
