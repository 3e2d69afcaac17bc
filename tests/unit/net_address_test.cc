// common/net_address.h: the one home of the local-address helpers.

#include "common/net_address.h"

#include <gtest/gtest.h>

namespace muster {
namespace {

TEST(LocalAddressTest, LoopbackWildcardAndUnresolvableAnswerLoopback) {
  EXPECT_EQ(LocalAddressToward(""), "127.0.0.1");
  EXPECT_EQ(LocalAddressToward("localhost"), "127.0.0.1");
  EXPECT_EQ(LocalAddressToward("127.0.0.1"), "127.0.0.1");
  EXPECT_EQ(LocalAddressToward("0.0.0.0"), "127.0.0.1");
  EXPECT_EQ(LocalAddressToward("no-such-host.invalid"), "127.0.0.1");
  EXPECT_EQ(LocalAddressFor("tcp://127.0.0.1:7070"), "127.0.0.1");
  EXPECT_EQ(LocalAddressFor("tcp://*:7070"), "127.0.0.1");
  EXPECT_EQ(LocalAddressFor("tcp://no-such-host.invalid:7070"), "127.0.0.1");
}

TEST(LocalAddressTest, AnEndpointAndItsHostGiveTheSameAddress) {
  // Whatever routes this host has, the endpoint form and the bare host agree.
  EXPECT_EQ(LocalAddressFor("tcp://192.0.2.1:7070"), LocalAddressToward("192.0.2.1", "7070"));
  EXPECT_EQ(LocalAddressFor("192.0.2.1"), LocalAddressToward("192.0.2.1", "7070"));
}

}  // namespace
}  // namespace muster
