// coordinator/node_state.h: the one mapping between the scheduler's NodeState and the wire's.

#include "coordinator/node_state.h"

#include <gtest/gtest.h>

namespace muster::coordinator {
namespace {

TEST(NodeStateTest, EveryStateRoundTripsThroughTheWireWithItsName) {
  for (NodeState s :
       {NodeState::kUp, NodeState::kDraining, NodeState::kQuarantined, NodeState::kDown}) {
    SCOPED_TRACE(std::string(NodeStateName(s)));
    proto::NodeStatusState p = NodeStateToProto(s);
    EXPECT_NE(p, proto::NODE_STATE_UNSPECIFIED);
    auto back = NodeStateFromProto(p);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, s);
    EXPECT_EQ(NodeStateText(p), NodeStateName(s));
  }
  EXPECT_EQ(NodeStateToProto(NodeState::kDraining), proto::NODE_DRAINING);
}

TEST(NodeStateTest, AnUnknownWireValueIsAnErrorAndShowsAsUnknown) {
  auto st = NodeStateFromProto(proto::NODE_STATE_UNSPECIFIED);
  EXPECT_EQ(st.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.status().message().find("not one of up, draining"), std::string::npos);
  EXPECT_EQ(NodeStateText(static_cast<proto::NodeStatusState>(99)), "unknown");
}

}  // namespace
}  // namespace muster::coordinator
