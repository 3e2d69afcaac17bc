// The agent's GLOO_SOCKET_IFNAME for multi-node PyTorch ranks (node_agent/torch_env.h).

#include "node_agent/torch_env.h"

#include <gtest/gtest.h>

namespace muster::node_agent {
namespace {

TEST(InterfaceWithAddressTest, FindsLoopbackAndNothingForForeignOrBadAddresses) {
  EXPECT_EQ(InterfaceWithAddress("127.0.0.1"), "lo");
  EXPECT_EQ(InterfaceWithAddress("192.0.2.77"), "");  // TEST-NET-1: on no interface here
  EXPECT_EQ(InterfaceWithAddress("not an address"), "");
  EXPECT_EQ(InterfaceWithAddress(""), "");
}

TEST(AddGlooSocketIfnameTest, NamesTheInterfaceTowardTheMasterOnMultiNodeJobs) {
  std::map<std::string, std::string> env;
  AddGlooSocketIfname({"PATH=/usr/bin"}, "127.0.0.1", 2, env);
  ASSERT_EQ(env.count("GLOO_SOCKET_IFNAME"), 1u);
  EXPECT_EQ(env["GLOO_SOCKET_IFNAME"], "lo");
}

TEST(AddGlooSocketIfnameTest, SingleNodeJobsAreLeftAlone) {
  std::map<std::string, std::string> env;
  AddGlooSocketIfname({}, "127.0.0.1", 1, env);
  EXPECT_TRUE(env.empty());
}

TEST(AddGlooSocketIfnameTest, TheUsersOwnSettingWins) {
  std::map<std::string, std::string> env = {{"GLOO_SOCKET_IFNAME", "eth7"}};
  AddGlooSocketIfname({}, "127.0.0.1", 2, env);
  EXPECT_EQ(env["GLOO_SOCKET_IFNAME"], "eth7");
  std::map<std::string, std::string> env2;
  AddGlooSocketIfname({"GLOO_SOCKET_IFNAME=ib0"}, "127.0.0.1", 2, env2);
  EXPECT_TRUE(env2.empty()) << "the inherited value passes through unchanged";
}

}  // namespace
}  // namespace muster::node_agent
