// The CPU class of an agent's snapshot work (node_agent/snapshots/snapshot_cpu.h), on the real
// path: a rank's frames go through the local SnapshotServer, the SnapshotForwarder and a
// SnapshotPeerServer (CURVE) into the peer's store, while a control reactor with its own RPC
// server (standing in for the agent's: heartbeats, the lease, control calls) answers calls that
// read the same store, as a heartbeat does. With `background`, every snapshot thread (the
// server's, the forwarder's, the peer server's reactor and worker, and both snapshot ZeroMQ
// contexts' I/O threads, where CURVE runs) is at SCHED_IDLE, and the control reactor, its
// ZeroMQ I/O thread and the caller stay at the normal class, answering promptly while the path
// is flooded and, for a while, every core is kept busy at the normal class as ranks would.

#include "node_agent/snapshots/snapshot_cpu.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "checkpoint/snapshot_channel.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "node_agent/snapshots/peer_copy.h"
#include "node_agent/snapshots/snapshot_server.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

using checkpoint::SnapshotKey;
using node_agent::SnapshotCpu;
using node_agent::SnapshotStore;
using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

struct Task {
  pid_t tid = 0;
  std::string name;
  int policy = -1;
};

// Every thread of this process: its name and scheduling policy.
std::vector<Task> Tasks() {
  std::vector<Task> out;
  DIR* d = ::opendir("/proc/self/task");
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    Task t;
    t.tid = static_cast<pid_t>(std::atoi(e->d_name));
    std::ifstream in(std::string("/proc/self/task/") + e->d_name + "/comm");
    std::getline(in, t.name);
    t.policy = ::sched_getscheduler(t.tid);
    out.push_back(t);
  }
  ::closedir(d);
  return out;
}

bool SnapshotThread(const std::string& name) {
  return name.rfind("snap-", 0) == 0 ||
         name.rfind(std::to_string(node_agent::kSnapshotZmqThreadPrefix) + "/ZMQbg/", 0) == 0;
}

TEST(SnapshotCpuTest, ParsesTheTwoClassesAndNamesABadOne) {
  EXPECT_EQ(*node_agent::ParseSnapshotCpu("background"), SnapshotCpu::kBackground);
  EXPECT_EQ(*node_agent::ParseSnapshotCpu("normal"), SnapshotCpu::kNormal);
  auto bad = node_agent::ParseSnapshotCpu("idle");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'idle'"), std::string::npos) << bad.status();
  EXPECT_EQ(node_agent::SnapshotCpuName(SnapshotCpu::kBackground), "background");
}

// The probe leaves the caller's class alone, passes where the kernel allows SCHED_IDLE, and is
// refused with the reason where it does not: a child process whose seccomp filter answers
// sched_setscheduler with EPERM (as a sandbox might).
TEST(SnapshotCpuTest, TheProbeSaysWhetherTheHostAllowsTheBackgroundClass) {
  ASSERT_TRUE(node_agent::CheckSnapshotCpuAllowed(SnapshotCpu::kNormal).ok());
  ASSERT_TRUE(node_agent::CheckSnapshotCpuAllowed(SnapshotCpu::kBackground).ok());
  EXPECT_EQ(sched_getscheduler(0), SCHED_OTHER) << "the probe changed the caller's class";

  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_sched_setscheduler, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(sizeof(filter) / sizeof(filter[0])), filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
      _exit(3);
    }
    Status st = node_agent::CheckSnapshotCpuAllowed(SnapshotCpu::kBackground);
    if (st.ok()) _exit(1);
    bool named = st.code() == StatusCode::kFailedPrecondition &&
                 st.message().find("refuses SCHED_IDLE") != std::string::npos &&
                 st.message().find(std::strerror(EPERM)) != std::string::npos;
    _exit(named && node_agent::CheckSnapshotCpuAllowed(SnapshotCpu::kNormal).ok() ? 0 : 2);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: not refused under the filter; 2: refused without the "
                                       "reason; 3: could not install the filter";
}

class SnapshotCpuPathTest : public ::testing::TestWithParam<SnapshotCpu> {
 protected:
  void TearDown() override { std::filesystem::remove_all(dir_); }
  const std::string dir_ = "/tmp/snapbg-cpu-test-" + std::to_string(::getpid());
};

TEST_P(SnapshotCpuPathTest, OnlyTheSnapshotThreadsTakeTheClassAndControlStaysPrompt) {
  const SnapshotCpu cpu = GetParam();
  const int expected_policy = cpu == SnapshotCpu::kBackground ? SCHED_IDLE : SCHED_OTHER;
  SnapshotStore own({.memory_limit = 256 << 20});
  SnapshotStore peer_store({.memory_limit = 256 << 20});

  // The control plane: a reactor on the default context, with an RPC server whose handler
  // reads the store (as the agent's heartbeat does with SnapshotsHeld).
  Reactor control("control");
  RpcServer::Options so;
  so.name = "control";
  so.endpoint = "tcp://127.0.0.1:*";
  so.insecure = true;
  auto rpc = RpcServer::Create(control, so,
                               [&](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply reply) {
                                 (void)own.Held("ft-1");
                                 proto::Envelope out;
                                 out.set_request_id(req.request_id());
                                 out.mutable_snapshot_peer_reply();
                                 reply(std::move(out));
                               });
  ASSERT_TRUE(rpc.ok()) << rpc.status();
  control.Start();
  zmq::context_t client_context;
  auto client =
      RpcClient::Connect(client_context, {.endpoint = (*rpc)->endpoint(), .insecure = true});
  ASSERT_TRUE(client.ok()) << client.status();

  auto gang = GenerateKeyPair();
  ASSERT_TRUE(gang.ok());
  auto peer = node_agent::SnapshotPeerServer::Create(
      {.endpoint = "tcp://127.0.0.1:*", .store = &peer_store, .cpu = cpu});
  ASSERT_TRUE(peer.ok()) << peer.status();
  ASSERT_TRUE((*peer)->Allow("ft-1", gang->public_key).ok());
  node_agent::SnapshotForwarder fwd({.cpu = cpu});
  fwd.SetTarget("ft-1", {.attempt = 1,
                         .node = "peer",
                         .endpoint = (*peer)->endpoint(),
                         .server_key = (*peer)->public_key(),
                         .client_key = *gang});
  auto local = node_agent::SnapshotServer::Start(
      dir_ + "/s.sock", &own,
      [&](std::shared_ptr<const checkpoint::SnapshotFrame> f) { fwd.Offer(std::move(f)); },
      node_agent::kSnapshotFrameTimeout, nullptr, cpu);
  ASSERT_TRUE(local.ok()) << local.status();
  auto rank = checkpoint::SnapshotClient::Connect(dir_ + "/s.sock");
  ASSERT_TRUE(rank.ok()) << rank.status();

  // The flood: a rank hands over 1 MiB frames as fast as its agent takes them. For the first
  // 1.5 s every core also runs a normal-class spinner, as busy ranks would.
  constexpr int kSteps = 24;
  std::atomic<bool> spin{true};
  std::vector<std::thread> spinners;
  for (unsigned i = 0; i < std::max(2u, std::thread::hardware_concurrency()); ++i) {
    spinners.emplace_back([&] {
      while (spin.load(std::memory_order_relaxed)) {
      }
    });
  }
  const auto spin_until = Clock::now() + milliseconds(1500);
  std::atomic<bool> flooding{true};
  Status flood_status;
  std::thread flood([&] {
    const std::string payload(1 << 20, 'f');
    for (int step = 1; step <= kSteps && flood_status.ok(); ++step) {
      flood_status = (*rank)->Put(
          SnapshotKey{.job = "ft-1", .attempt = 1, .rank = 0, .world_size = 2, .step = step},
          payload);
    }
    flooding = false;
  });

  // Meanwhile the control plane is asked, round after round: a reactor call that reads the
  // store and a round trip through its RPC server.
  Clock::duration worst{};
  int rounds = 0;
  Status control_status;
  while ((flooding || Clock::now() < spin_until || rounds < 10) && control_status.ok()) {
    if (Clock::now() >= spin_until) spin = false;
    auto t0 = Clock::now();
    (void)control.Call("heartbeat", [&] { return own.Held("ft-1").size(); });
    proto::Envelope ping;
    ping.mutable_snapshot_peer_request();
    auto pong = (*client)->Call(std::move(ping), seconds(10));
    if (!pong.ok()) control_status = pong.status();
    worst = std::max(worst, Clock::now() - t0);
    ++rounds;
    std::this_thread::sleep_for(milliseconds(20));  // a heartbeat's pace, not a wait for state
  }
  spin = false;
  for (auto& t : spinners) t.join();
  flood.join();
  ASSERT_TRUE(flood_status.ok()) << flood_status;
  ASSERT_TRUE(control_status.ok()) << control_status;
  // Generous for a shared 2-core machine; a control plane stuck behind the snapshot path (or a
  // lock held by a starved snapshot thread) takes seconds.
  RecordProperty("worst_control_ms",
                 static_cast<int>(std::chrono::duration_cast<milliseconds>(worst).count()));
  EXPECT_LT(std::chrono::duration_cast<milliseconds>(worst).count(), 1000)
      << "the slowest of " << rounds << " control rounds";

  // The copies still arrive once the cores are free: the newest frame reaches the peer.
  ASSERT_TRUE(
      testing::WaitUntil([&] { return peer_store.Get("ft-1", 0, kSteps).ok(); }, seconds(60)))
      << fwd.last_error();

  // The classes, while every thread is still there.
  const pid_t control_tid = control.Call("tid", [] { return static_cast<pid_t>(::gettid()); });
  std::map<std::string, int> snapshot_threads;
  bool saw_control = false, saw_control_io = false;
  for (const Task& t : Tasks()) {
    if (SnapshotThread(t.name)) {
      snapshot_threads[t.name]++;
      EXPECT_EQ(t.policy, expected_policy) << t.name << " (" << t.tid << ")";
    } else {
      // The control reactor, its ZeroMQ threads, this thread and the others of the test.
      EXPECT_EQ(t.policy, SCHED_OTHER) << t.name << " (" << t.tid << ")";
    }
    saw_control |= t.tid == control_tid;
    saw_control_io |= t.name.rfind("ZMQbg/IO/", 0) == 0;
  }
  EXPECT_TRUE(saw_control);
  EXPECT_TRUE(saw_control_io);
  for (const char* name : {"snap-accept", "snap-conn", "snap-forward", "snap-peer", "snap-peer-rx"})
    EXPECT_EQ(snapshot_threads.count(name), 1u) << name;
  // The forwarder's context and the peer server's: CURVE's sealing and opening.
  EXPECT_EQ(snapshot_threads["5/ZMQbg/IO/0"], 2);

  rank->reset();
  local->reset();
  peer->reset();
  control.Call("stop", [&] { rpc->reset(); });
  control.Stop();
}

INSTANTIATE_TEST_SUITE_P(Classes, SnapshotCpuPathTest,
                         ::testing::Values(SnapshotCpu::kBackground, SnapshotCpu::kNormal),
                         [](const auto& info) {
                           return std::string(node_agent::SnapshotCpuName(info.param));
                         });

}  // namespace
}  // namespace muster
