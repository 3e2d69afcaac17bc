// The multi-host harness itself: hosts reach each other over the bridge, a cut link
// partitions a host, and nothing is left behind.

#include "tests/cluster/netns_cluster.h"

#include <gtest/gtest.h>

#include "tests/testing/subprocess.h"

namespace muster::testing {
namespace {

using namespace std::chrono_literals;

// A one-shot TCP echo server and a client, in Python so the harness test depends on nothing
// of muster's own.
const char kServer[] =
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], 7000)); s.listen()\n"
    "while True:\n"
    "  c,_=s.accept(); c.sendall(c.recv(64)); c.close()\n";
const char kClient[] =
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1], 7000), timeout=1.0)\n"
    "c.sendall(b'hello'); print(c.recv(64).decode())\n";

class NetnsClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = NetnsCluster::Create({"coord", "aws-0"});
    if (!c.ok()) GTEST_SKIP() << c.status().message();
    cluster_ = std::move(*c);
  }
  std::unique_ptr<NetnsCluster> cluster_;
};

TEST_F(NetnsClusterTest, HostsTalkOverTheBridgeAndACutLinkPartitions) {
  auto server =
      Subprocess::Start(cluster_->Wrap(0, {"python3", "-c", kServer, cluster_->address(0)}));
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = [&] {
    return RunCommand(cluster_->Wrap(1, {"python3", "-c", kClient, cluster_->address(0)}), 10s);
  };
  // The server may still be starting: retry the first connection until it answers.
  StatusOr<std::string> out = client();
  for (int i = 0; i < 50 && !out.ok(); ++i) out = client();
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "hello\n");

  ASSERT_TRUE(cluster_->CutLink(0).ok());
  EXPECT_FALSE(client().ok());
  ASSERT_TRUE(cluster_->RestoreLink(0).ok());
  out = client();
  for (int i = 0; i < 50 && !out.ok(); ++i) out = client();
  EXPECT_TRUE(out.ok()) << out.status();
}

TEST_F(NetnsClusterTest, LoopbackIsNotReachableAcrossHosts) {
  // Each host has its own loopback: a server on host 0's 127.0.0.1 is invisible to host 1.
  auto server = Subprocess::Start(cluster_->Wrap(0, {"python3", "-c", kServer, "127.0.0.1"}));
  ASSERT_TRUE(server.ok());
  EXPECT_FALSE(RunCommand(cluster_->Wrap(1, {"python3", "-c", kClient, "127.0.0.1"}), 10s).ok());
}

TEST(NetnsClusterCleanupTest, DestroyRemovesEveryNamespace) {
  std::string prefix;
  {
    auto c = NetnsCluster::Create({"a", "b", "c"});
    if (!c.ok()) GTEST_SKIP() << c.status().message();
    prefix = (*c)->netns(0).substr(0, (*c)->netns(0).find('h'));
  }
  auto list = RunCommand({"ip", "netns", "list"});
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->find(prefix + "h"), std::string::npos) << *list;
  auto links = RunCommand({"ip", "link", "show"});
  ASSERT_TRUE(links.ok());
  EXPECT_EQ(links->find(prefix), std::string::npos) << *links;
}

}  // namespace
}  // namespace muster::testing
