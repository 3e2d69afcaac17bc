// AgentConnections (coordinator/agent_connections.h): which agents' connections closed, on a fake
// clock.
#include "coordinator/agent_connections.h"

#include <gtest/gtest.h>

namespace muster::coordinator {
namespace {

using Agent = AgentConnections::Agent;
const Agent kA{"a", "s1"};
const Agent kB{"b", "s2"};

TEST(AgentConnectionsTest, LastConnectionClosedIsDueAfterTheGrace) {
  AgentConnections c(300);
  c.OnAccepted(7);
  c.OnRequest(7, kA);
  EXPECT_EQ(c.NextDue(), std::nullopt);
  c.OnClosed(7, 1000);
  EXPECT_EQ(c.NextDue(), 1300);
  EXPECT_TRUE(c.Due(1299).empty());
  EXPECT_EQ(c.Due(1300), std::vector<Agent>{kA});
  EXPECT_TRUE(c.Due(5000).empty()) << "declared once";
  EXPECT_EQ(c.NextDue(), std::nullopt);
}

TEST(AgentConnectionsTest, AnotherOpenConnectionKeepsTheAgent) {
  AgentConnections c(300);
  c.OnAccepted(7);
  c.OnAccepted(8);
  c.OnRequest(7, kA);  // heartbeats
  c.OnRequest(8, kA);  // long polls
  c.OnClosed(7, 1000);
  EXPECT_EQ(c.NextDue(), std::nullopt);
  c.OnClosed(8, 2000);
  EXPECT_EQ(c.Due(2300), std::vector<Agent>{kA});
}

TEST(AgentConnectionsTest, ARequestWithinTheGraceClearsTheSuspicion) {
  // A live agent whose connection alone was dropped reconnects and heartbeats.
  AgentConnections c(300);
  c.OnAccepted(7);
  c.OnRequest(7, kA);
  c.OnClosed(7, 1000);
  c.OnAccepted(9);
  c.OnRequest(9, kA);
  EXPECT_TRUE(c.Due(5000).empty());
  c.OnClosed(9, 6000);
  EXPECT_EQ(c.Due(6300), std::vector<Agent>{kA});
}

TEST(AgentConnectionsTest, ConnectionsNobodySpokeOnAreNobodys) {
  AgentConnections c(300);
  c.OnAccepted(7);  // a CLI client, or a handshake that failed
  c.OnClosed(7, 1000);
  c.OnClosed(12, 1000);  // never accepted (seen)
  EXPECT_TRUE(c.Due(9999).empty());
  EXPECT_EQ(c.open_connections(), 0u);
}

TEST(AgentConnectionsTest, ARequestFromAClosedConnectionMapsNothing) {
  // Queued before its connection closed, read after the close was seen.
  AgentConnections c(300);
  c.OnAccepted(7);
  c.OnClosed(7, 1000);
  c.OnRequest(7, kA);
  c.OnAccepted(7);  // the fd reused by someone else, who closes again
  c.OnClosed(7, 2000);
  EXPECT_TRUE(c.Due(9999).empty());
}

TEST(AgentConnectionsTest, AReusedFdBelongsToItsNewSpeaker) {
  AgentConnections c(300);
  c.OnAccepted(7);
  c.OnRequest(7, kA);
  c.OnClosed(7, 1000);
  c.OnAccepted(7);
  c.OnRequest(7, kB);
  EXPECT_EQ(c.Due(1300), std::vector<Agent>{kA});
  c.OnClosed(7, 2000);
  EXPECT_EQ(c.Due(2300), std::vector<Agent>{kB});
}

TEST(AgentConnectionsTest, SessionsAreToldApart) {
  // A restarted agent (new session) on the same node is another agent.
  AgentConnections c(300);
  const Agent a2{"a", "s9"};
  c.OnAccepted(7);
  c.OnRequest(7, kA);
  c.OnAccepted(8);
  c.OnRequest(8, a2);
  c.OnClosed(7, 1000);
  EXPECT_EQ(c.Due(1300), std::vector<Agent>{kA});
  c.OnClosed(8, 1000);
  EXPECT_EQ(c.Due(1300), std::vector<Agent>{a2});
}

TEST(AgentConnectionsTest, UnknownFdOnlyClearsSuspicion) {
  AgentConnections c(300);
  c.OnAccepted(7);
  c.OnRequest(7, kA);
  c.OnClosed(7, 1000);
  c.OnRequest(-1, kA);
  EXPECT_TRUE(c.Due(9999).empty());
}

}  // namespace
}  // namespace muster::coordinator
