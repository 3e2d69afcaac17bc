// The pool that stands in for libsodium's sodium_malloc (common/sodium_pool.h): that libzmq's
// CURVE handshakes really use it in a binary that links it, what it keeps of libsodium's
// guarantees (locked, zeroed on free, canaries that abort on an overrun, a double free or a
// foreign pointer), and what it hands to libsodium (large sizes, a full region, the pool off).

#include "common/sodium_pool.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <sodium.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

namespace muster {
namespace {

class SodiumPoolTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_GE(sodium_init(), 0);
    GTEST_FLAG_SET(death_test_style, "threadsafe");  // a fresh process: a pool not yet set up
  }
};

// Locked memory of this process, in KiB, from /proc/self/status.
long LockedKiB() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmLck:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  return -1;
}

TEST_F(SodiumPoolTest, LibzmqsCurveHandshakesAllocateFromThePool) {
  // This binary's definitions are the ones every library resolves to.
  EXPECT_EQ(::dlsym(RTLD_DEFAULT, "sodium_allocarray"),
            reinterpret_cast<void*>(&sodium_allocarray));
  EXPECT_EQ(::dlsym(RTLD_DEFAULT, "sodium_free"), reinterpret_cast<void*>(&sodium_free));

  const SodiumPoolStats before = GetSodiumPoolStats();
  ASSERT_TRUE(before.enabled);
  char server_public[41], server_secret[41], client_public[41], client_secret[41];
  ASSERT_EQ(zmq_curve_keypair(server_public, server_secret), 0);
  ASSERT_EQ(zmq_curve_keypair(client_public, client_secret), 0);
  {
    zmq::context_t ctx(1);
    zmq::socket_t server(ctx, zmq::socket_type::rep);
    server.set(zmq::sockopt::curve_server, 1);
    server.set(zmq::sockopt::curve_secretkey, std::string(server_secret));
    server.set(zmq::sockopt::linger, 0);
    server.bind("tcp://127.0.0.1:*");
    const std::string endpoint = server.get(zmq::sockopt::last_endpoint);
    zmq::socket_t client(ctx, zmq::socket_type::req);
    client.set(zmq::sockopt::curve_serverkey, std::string(server_public));
    client.set(zmq::sockopt::curve_publickey, std::string(client_public));
    client.set(zmq::sockopt::curve_secretkey, std::string(client_secret));
    client.set(zmq::sockopt::linger, 0);
    client.connect(endpoint);
    ASSERT_TRUE(client.send(zmq::str_buffer("ping")));
    zmq::message_t msg;
    ASSERT_TRUE(server.recv(msg));
    EXPECT_EQ(msg.to_string(), "ping");
    ASSERT_TRUE(server.send(zmq::str_buffer("pong")));
    ASSERT_TRUE(client.recv(msg));
    EXPECT_EQ(msg.to_string(), "pong");
  }
  const SodiumPoolStats after = GetSodiumPoolStats();
  // Both ends of one handshake: the plaintexts of HELLO, COOKIE, WELCOME, INITIATE, VOUCH and
  // READY on the server, and those of the client.
  EXPECT_GE(after.pooled - before.pooled, 8u);
  EXPECT_EQ(after.passed_through, before.passed_through);
  EXPECT_EQ(after.in_use, before.in_use) << "every handshake plaintext was freed";
  EXPECT_GT(after.committed_bytes, 0u);
}

TEST_F(SodiumPoolTest, APooledAllocationIsLockedAlignedAndZeroedWhenFreed) {
  auto* p = static_cast<unsigned char*>(sodium_malloc(100));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 16, 0u);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(p[i], 0xdb) << "libsodium's fill, byte " << i;
  const SodiumPoolStats s = GetSodiumPoolStats();
  if (s.lock_failures == 0) {
    EXPECT_GE(LockedKiB(), 64) << "the pool's pieces are mlock'ed";
  }
  std::memset(p, 0xab, 100);
  sodium_free(p);
  // The slot stays mapped (the pool keeps its pieces): all of it is zero again, the header and
  // the canaries too (the free queue is not kept in the slots).
  for (int i = -16; i < 112; ++i) ASSERT_EQ(p[i], 0) << "byte " << i;
}

TEST_F(SodiumPoolTest, EachSizeGetsTheSmallestSlotItFitsAndAllocArrayRefusesAnOverflow) {
  // The slot holds a 16-byte header, the bytes and an 8-byte canary after them.
  const struct {
    size_t n, slot;
  } cases[] = {{0, 128},   {1, 128},    {104, 128},   {105, 512},
               {488, 512}, {489, 2048}, {1000, 2048}, {kMaxPooledBytes, 2048}};
  for (const auto& c : cases) {
    const uint64_t pooled = GetSodiumPoolStats().pooled;
    auto* p = static_cast<unsigned char*>(sodium_malloc(c.n));
    ASSERT_NE(p, nullptr) << c.n;
    EXPECT_EQ(GetSodiumPoolStats().pooled, pooled + 1) << c.n;
    EXPECT_EQ(SodiumPoolSlotBytes(p), c.slot) << c.n;
    std::memset(p, 0x5a, c.n);  // every byte is usable; the canary after it is checked at free
    sodium_free(p);
  }
  errno = 0;
  EXPECT_EQ(sodium_allocarray(SIZE_MAX / 2, 4), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  void* a = sodium_allocarray(16, 32);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(SodiumPoolSlotBytes(a), 2048u);
  std::memset(a, 1, 16 * 32);
  sodium_free(a);
  sodium_free(nullptr);  // as libsodium's: nothing
}

TEST_F(SodiumPoolTest, FreedSlotsAreReusedFirstInFirstOut) {
  void* a = sodium_malloc(40);
  void* b = sodium_malloc(40);
  ASSERT_NE(a, b);
  sodium_free(a);
  // The slot just freed is the last of its class to be handed out again.
  void* c = sodium_malloc(40);
  EXPECT_NE(c, a);
  sodium_free(b);
  sodium_free(c);
}

TEST_F(SodiumPoolTest, LargeAllocationsAreLibsodiumsWithTheirGuardPages) {
  const SodiumPoolStats before = GetSodiumPoolStats();
  auto* p = static_cast<unsigned char*>(sodium_malloc(kMaxPooledBytes + 1));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(GetSodiumPoolStats().passed_through, before.passed_through + 1);
  EXPECT_EQ(GetSodiumPoolStats().in_use, before.in_use);
  EXPECT_EQ(SodiumPoolSlotBytes(p), 0u);
  std::memset(p, 7, kMaxPooledBytes + 1);
  // libsodium's own protection works on its own allocations...
  EXPECT_EQ(sodium_mprotect_readonly(p), 0);
  EXPECT_EQ(sodium_mprotect_readwrite(p), 0);
  sodium_free(p);
  // ...and an impossible size is libsodium's NULL, not a wrapped pooled size.
  EXPECT_EQ(sodium_malloc(SIZE_MAX), nullptr);
}

TEST_F(SodiumPoolTest, ChangingTheProtectionOfAPooledAllocationIsRefused) {
  void* p = sodium_malloc(64);
  ASSERT_NE(p, nullptr);
  errno = 0;
  EXPECT_EQ(sodium_mprotect_noaccess(p), -1);
  EXPECT_EQ(errno, ENOTSUP);
  EXPECT_EQ(sodium_mprotect_readonly(p), -1);
  EXPECT_EQ(sodium_mprotect_readwrite(p), -1);
  std::memset(p, 3, 64);  // still writable: nothing was changed
  sodium_free(p);
}

TEST_F(SodiumPoolTest, AnOverrunAbortsAtFree) {
  EXPECT_DEATH(
      {
        auto* p = static_cast<unsigned char*>(sodium_malloc(32));
        p[32] = 0xff;
        sodium_free(p);
      },
      "sodium_free: the canary after the allocation is broken");
}

TEST_F(SodiumPoolTest, AnUnderrunAbortsAtFree) {
  EXPECT_DEATH(
      {
        auto* p = static_cast<unsigned char*>(sodium_malloc(32));
        p[-1] ^= 0x01;
        sodium_free(p);
      },
      "sodium_free: the canary before the allocation is broken");
}

TEST_F(SodiumPoolTest, ADoubleFreeAborts) {
  EXPECT_DEATH(
      {
        void* p = sodium_malloc(32);
        sodium_free(p);
        sodium_free(p);
      },
      "sodium_free: a double free");
  // Also after other allocations of its class have come and gone (its slot is not yet reused).
  EXPECT_DEATH(
      {
        void* p = sodium_malloc(32);
        sodium_free(p);
        for (int i = 0; i < 20; ++i) sodium_free(sodium_malloc(32));
        sodium_free(p);
      },
      "sodium_free: a double free");
}

TEST_F(SodiumPoolTest, AWriteAfterFreeAbortsWhenTheSlotIsTakenAgain) {
  EXPECT_DEATH(
      {
        // A fresh process: the first piece of 128-byte slots has 512, handed out in order, and
        // the freed one goes behind them.
        std::vector<void*> held;
        auto* p = static_cast<unsigned char*>(sodium_malloc(32));
        sodium_free(p);
        p[3] = 1;
        for (int i = 0; i < 600; ++i) held.push_back(sodium_malloc(32));
      },
      "sodium_malloc: a free slot of the pool was written to");
}

TEST_F(SodiumPoolTest, AnOverrunIntoAFreeNeighbourAbortsBeforeItIsUsed) {
  EXPECT_DEATH(
      {
        std::vector<void*> held;
        auto* p = static_cast<unsigned char*>(sodium_malloc(32));
        p[32 + 8 + 100] = 1;  // past its canary and its slot (128 bytes), into the next one
        for (int i = 0; i < 40; ++i) held.push_back(sodium_malloc(32));
      },
      "sodium_malloc: a free slot of the pool was written to");
}

TEST_F(SodiumPoolTest, APointerIntoTheMiddleOfAnAllocationAborts) {
  EXPECT_DEATH(
      {
        auto* p = static_cast<unsigned char*>(sodium_malloc(64));
        sodium_free(p + 8);
      },
      "sodium_free: a pointer inside the pool that is not the start of an allocation");
}

TEST_F(SodiumPoolTest, ThreadsAllocatingAtOnceGetDistinctIntactMemory) {
  const uint64_t in_use = GetSodiumPoolStats().in_use;
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &bad] {
      std::vector<std::pair<unsigned char*, size_t>> held;
      for (int i = 0; i < 20000; ++i) {
        const size_t n = static_cast<size_t>((i * 37 + t * 101) % 1500);
        auto* p = static_cast<unsigned char*>(sodium_malloc(n));
        if (p == nullptr) {
          ++bad;
          continue;
        }
        std::memset(p, t + 1, n);
        held.emplace_back(p, n);
        if (held.size() > 16 || i % 3 == 0) {
          auto [q, m] = held.front();
          held.erase(held.begin());
          for (size_t k = 0; k < m; ++k) {
            if (q[k] != t + 1) {
              ++bad;
              break;
            }
          }
          sodium_free(q);
        }
      }
      for (auto [q, m] : held) sodium_free(q);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(GetSodiumPoolStats().in_use, in_use);
}

TEST_F(SodiumPoolTest, AFullRegionHandsTheRestToLibsodium) {
  // In a child: filling the region would leave this process's pool with no room for the others.
  // The exact counts hold because the "threadsafe" death test style runs the child as a fresh
  // process (its pool has served nothing before).
  EXPECT_EXIT(
      {
        if (sodium_init() < 0) std::exit(10);
        std::vector<void*> held;
        for (int i = 0; i < 2100; ++i) held.push_back(sodium_malloc(2000));  // 2048 slots fit
        const SodiumPoolStats full = GetSodiumPoolStats();
        for (void* p : held) {
          if (p == nullptr) std::exit(11);
          std::memset(p, 1, 2000);
        }
        for (void* p : held) sodium_free(p);
        const SodiumPoolStats after = GetSodiumPoolStats();
        if (full.committed_bytes != (size_t{4} << 20)) std::exit(12);
        if (full.pooled != 2048 || full.passed_through != 52) std::exit(13);
        if (after.in_use != 0) std::exit(14);
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST_F(SodiumPoolTest, OffByEnvironmentEverythingIsLibsodiums) {
  EXPECT_EXIT(
      {
        ::setenv("MUSTER_SODIUM_POOL", "off", 1);
        if (sodium_init() < 0) std::exit(10);
        void* p = sodium_malloc(16);
        if (p == nullptr) std::exit(11);
        if (sodium_mprotect_readonly(p) != 0 || sodium_mprotect_readwrite(p) != 0) std::exit(12);
        sodium_free(p);
        const SodiumPoolStats s = GetSodiumPoolStats();
        if (s.enabled || s.pooled != 0 || s.passed_through != 1) std::exit(13);
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace muster
