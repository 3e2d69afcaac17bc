// The rendezvous relay (collectives/rendezvous_relay.h): real sockets (a Unix socket to the
// ranks, CURVE to the store). Its aggregation (one upstream request per node for a gather or a
// barrier), its batching window, per-caller deadlines inside a batch, its trust boundary (the 0700
// directory, the kernel-reported pid, the one scope) and its answers to bad input.

#include "collectives/rendezvous_relay.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <zmq_addon.hpp>

#include "collectives/rendezvous_client.h"
#include "collectives/rendezvous_server.h"
#include "common/local_rpc.h"
#include "common/wire.h"
#include "tests/testing/reactor_fixture.h"
#include "tests/testing/wait_until.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class RelayTest : public testing::ReactorZapTest {
 protected:
  void SetUp() override {
    std::string templ = "/tmp/relay-test-XXXXXX";
    ASSERT_NE(mkdtemp(templ.data()), nullptr);
    dir_ = templ;
    CreateReactor("relay-test");
    if (HasFatalFailure()) return;
    auto s = RendezvousServer::Create(*reactor_, zap_.get(), {});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    auto creds = server_->AddScope("job", 1);
    ASSERT_TRUE(creds.ok()) << creds.status();
    creds_ = *RdzvCredentials::Parse(*creds);
    reactor_->Start();
  }
  void TearDown() override {
    testing::ReactorZapTest::TearDown();
    std::filesystem::remove_all(dir_);
  }
  void ReleaseOnReactor() override {
    relays_.clear();
    server_.reset();
  }

  // A relay for "node" `node` of `per_node` ranks (ranks node*per_node ..).
  RendezvousRelay* AddRelay(int node, int per_node, std::chrono::milliseconds window = 10s,
                            std::function<Status(pid_t)> admit = {},
                            const RdzvCredentials* upstream = nullptr) {
    RendezvousRelay::Options o;
    o.socket_parent = dir_;
    o.upstream_endpoint = server_->endpoint();
    o.credentials = upstream ? *upstream : creds_;
    o.job = "job";
    o.attempt = 1;
    for (int i = 0; i < per_node; ++i) o.local_ranks.push_back(node * per_node + i);
    o.batch_window = window;
    o.admit = std::move(admit);
    o.rpc_slack = 1s;
    o.shared_gather_min_bytes = shared_min_;
    o.on_upstream_ready = on_upstream_ready_;
    o.accept_zstd = accept_zstd_;
    if (max_held_ > 0) o.max_held_requests = max_held_;
    auto r = reactor_->Call("relay", [&] { return RendezvousRelay::Create(*reactor_, o); });
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return nullptr;
    relays_.push_back(std::move(*r));
    return relays_.back().get();
  }

  std::unique_ptr<RendezvousClient> Client(const RendezvousRelay* relay, uint64_t attempt = 1) {
    RendezvousClient::Options o;
    o.endpoint = relay->endpoint();
    o.credentials = creds_;
    o.job = "job";
    o.attempt = attempt;
    o.op_timeout = 5s;
    o.rpc_slack = 1s;
    auto c = RendezvousClient::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }

  RendezvousRelay::Stats Stats(const RendezvousRelay* r) {
    return reactor_->Call("stats", [&] { return r->stats(); });
  }
  size_t ParkedRequests() {
    return reactor_->Call("parked", [&] { return server_->parked_requests(); });
  }

  std::filesystem::path dir_;
  std::unique_ptr<RendezvousServer> server_;
  RdzvCredentials creds_;
  std::vector<std::unique_ptr<RendezvousRelay>> relays_;
  int64_t shared_min_ = 64 << 10;
  std::function<void()> on_upstream_ready_;
  bool accept_zstd_ = true;
  size_t max_held_ = 0;  // 0: the relay's default
};

TEST_F(RelayTest, TheUpstreamHandshakeCompletesBeforeAnyRankSendsARequest) {
  // An agent creates its relay before it spawns the ranks, so that the CURVE handshake with the
  // store overlaps their start-up: the relay must connect eagerly, not on a first request.
  struct Ready {
    std::mutex mu;
    std::condition_variable cv;
    int count = 0;
  };
  auto ready = std::make_shared<Ready>();  // the relay may outlive this test's body
  on_upstream_ready_ = [ready] {
    std::lock_guard<std::mutex> l(ready->mu);
    ++ready->count;
    ready->cv.notify_all();
  };
  RendezvousRelay* relay = AddRelay(0, 4);
  ASSERT_NE(relay, nullptr);
  {
    std::unique_lock<std::mutex> l(ready->mu);
    ASSERT_TRUE(ready->cv.wait_for(l, 10s, [&] { return ready->count > 0; }))
        << "no handshake with the store within 10 s of creating the relay";
  }
  auto st = Stats(relay);
  EXPECT_EQ(st.upstream_handshakes, 1u);
  EXPECT_EQ(st.local_requests, 0u);
  EXPECT_EQ(st.upstream_requests, 0u) << "the handshake needed no request";
  EXPECT_TRUE(reactor_->Call("ready", [&] { return relay->upstream_ready(); }));
  // And the connection it made is the one the ranks' requests then use.
  auto client = Client(relay);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->Set("k", "v").ok());
  st = Stats(relay);
  EXPECT_EQ(st.upstream_handshakes, 1u);
  EXPECT_EQ(st.upstream_requests, 1u);
}

TEST_F(RelayTest, AGatherAndABarrierGoUpstreamOncePerNode) {
  constexpr int kNodes = 2, kPerNode = 4, kN = kNodes * kPerNode;
  std::vector<RendezvousRelay*> relay;
  for (int n = 0; n < kNodes; ++n) relay.push_back(AddRelay(n, kPerNode));
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int r = 0; r < kN; ++r) clients.push_back(Client(relay[r / kPerNode]));
  auto entry = [](int r) { return "addr-" + std::to_string(r); };
  std::vector<StatusOr<std::vector<std::string>>> got(kN, InternalError("not run"));
  std::vector<Status> barrier(kN, InternalError("not run"));
  std::vector<std::thread> threads;
  auto t0 = Clock::now();
  for (int r = 0; r < kN; ++r) {
    threads.emplace_back([&, r] {
      got[r] = clients[r]->AllGather("addrs", r, kN, entry(r), 20s);
      barrier[r] = clients[r]->Barrier("after", kN, 20s);
    });
  }
  for (auto& t : threads) t.join();
  // The window is 10 s: a batch went upstream because it was complete, not because it waited.
  EXPECT_LT(Clock::now() - t0, 5s);
  for (int r = 0; r < kN; ++r) {
    ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status();
    ASSERT_EQ(got[r]->size(), size_t{kN});
    for (int e = 0; e < kN; ++e) EXPECT_EQ((*got[r])[e], entry(e));
    EXPECT_TRUE(barrier[r].ok()) << barrier[r];
  }
  for (auto* r : relay) {
    auto st = Stats(r);
    EXPECT_EQ(st.local_requests, uint64_t{2 * kPerNode});
    EXPECT_EQ(st.upstream_requests, 2u) << "one gather and one barrier request per node";
  }
  EXPECT_EQ(ParkedRequests(), 0u);
}

TEST_F(RelayTest, ABatchThatOnlySomeLocalRanksJoinGoesUpstreamAfterTheWindow) {
  // Node 0 serves ranks 0 and 1, but a gather of n=2 has rank 0 here and rank 1 on node 1 (a
  // subgroup): node 0's batch can never be complete, and must not wait for rank 1.
  auto* a = AddRelay(0, 2, 100ms);
  auto* b = AddRelay(1, 2, 100ms);
  auto ca = Client(a), cb = Client(b);
  StatusOr<std::vector<std::string>> ra = InternalError("not run");
  std::thread t([&] { ra = ca->AllGather("sub", 0, 2, "x", 10s); });
  auto rb = cb->AllGather("sub", 1, 2, "y", 10s);
  t.join();
  ASSERT_TRUE(rb.ok()) << rb.status();
  ASSERT_TRUE(ra.ok()) << ra.status();
  EXPECT_EQ(*ra, (std::vector<std::string>{"x", "y"}));
}

TEST_F(RelayTest, EachCallerInABatchKeepsItsOwnDeadline) {
  auto* a = AddRelay(0, 2, 50ms);
  auto* b = AddRelay(1, 2, 50ms);
  auto c0 = Client(a), c1 = Client(a), c2 = Client(b);
  // Ranks 0 and 1 go upstream together; rank 2 is late. Rank 0 gives up after 300 ms, rank 1
  // waits on: it goes upstream again alone, and completes once ranks 2 and 0 come.
  StatusOr<std::vector<std::string>> r0 = InternalError(""), r1 = InternalError("");
  std::thread t1([&] { r1 = c1->AllGather("g", 1, 3, "b", 20s); });
  auto t0 = Clock::now();
  r0 = c0->AllGather("g", 0, 3, "stale", 300ms);
  EXPECT_GE(Clock::now() - t0, 290ms);
  ASSERT_EQ(r0.status().code(), StatusCode::kDeadlineExceeded) << r0.status();
  EXPECT_NE(r0.status().message().find("missing rank(s) 2"), std::string::npos) << r0.status();
  StatusOr<std::vector<std::string>> r2 = InternalError("");
  std::thread t2([&] { r2 = c2->AllGather("g", 2, 3, "c", 20s); });
  auto again = c0->AllGather("g", 0, 3, "fresh", 20s);
  t1.join();
  t2.join();
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE(r1.ok()) << r1.status();
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(*again, (std::vector<std::string>{"fresh", "b", "c"}));
  EXPECT_EQ(*r1, *again);
  EXPECT_EQ(*r2, *again);
}

TEST_F(RelayTest, ACallerNeverWaitsInABatchPastItsOwnTimeout) {
  // A 10 s window, and a batch that cannot complete (rank 1 of this node never comes): the
  // caller's 200 ms timeout sends the batch upstream, and the store's answer names who is
  // missing.
  auto* a = AddRelay(0, 2, 10s);
  auto c = Client(a);
  auto t0 = Clock::now();
  auto r = c->AllGather("lonely", 0, 2, "x", 200ms);
  EXPECT_LT(Clock::now() - t0, 2s);
  ASSERT_EQ(r.status().code(), StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_NE(r.status().message().find("missing rank(s) 1"), std::string::npos) << r.status();
  auto b = c->Barrier("lonely-barrier", 2, 200ms);
  EXPECT_LT(Clock::now() - t0, 4s);
  EXPECT_EQ(b.code(), StatusCode::kDeadlineExceeded) << b;
}

TEST_F(RelayTest, GetsOfOneKeyJoinAndEachCallerKeepsItsOwnTimeout) {
  constexpr int kRanks = 8;
  auto* relay = AddRelay(0, kRanks);
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int r = 0; r < kRanks; ++r) clients.push_back(Client(relay));
  auto joined = [&] { return reactor_->Call("joined", [&] { return relay->joined(); }); };
  const uint64_t before = Stats(relay).upstream_requests;
  // A broadcast: every rank but the setter waits on one key.
  std::vector<StatusOr<std::string>> got(kRanks - 1, InternalError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks - 1; ++r) {
    threads.emplace_back([&, r] { got[r] = clients[r]->Get("uid", 10s); });
  }
  ASSERT_TRUE(testing::WaitUntil([&] { return joined().callers == kRanks - 1; }, 10s));
  EXPECT_EQ(joined().requests, 1u) << "one request upstream; the others wait for it";
  EXPECT_TRUE(testing::WaitUntil([&] { return ParkedRequests() == 1; }, 10s));
  // One more with a short timeout: it waits behind the one upstream, and is answered at its
  // own deadline, not the others'.
  auto t0 = Clock::now();
  auto late = clients[kRanks - 1]->Get("uid", 300ms);
  EXPECT_EQ(late.status().code(), StatusCode::kDeadlineExceeded) << late.status();
  EXPECT_NE(late.status().message().find("'uid' not set within 300 ms"), std::string::npos)
      << late.status();
  EXPECT_GE(Clock::now() - t0, 290ms);
  EXPECT_LT(Clock::now() - t0, 5s);
  ASSERT_TRUE(clients[kRanks - 1]->Set("uid", "nccl-id").ok());
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks - 1; ++r) {
    ASSERT_TRUE(got[r].ok()) << r << ": " << got[r].status();
    EXPECT_EQ(*got[r], "nccl-id");
  }
  EXPECT_TRUE(testing::WaitUntil([&] { return joined().callers == 0; }, 5s));
  // The set; the first get; at the short one's deadline, the seven waiting behind it together
  // (the store answered at once: the short one got DeadlineExceeded); the six with time left
  // again: 4, not 9.
  EXPECT_EQ(Stats(relay).upstream_requests - before, 4u);
  // A value set since is what the next callers get: each answer comes from a request sent after
  // its caller asked.
  ASSERT_TRUE(clients[0]->Set("uid", "second").ok());
  threads.clear();
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      auto v = clients[r]->Get("uid", 10s);
      EXPECT_TRUE(v.ok() && *v == "second") << (v.ok() ? *v : v.status().message());
    });
  }
  for (auto& t : threads) t.join();
  // Waits join the same way, and keys that differ do not.
  std::thread wx([&] { EXPECT_TRUE(clients[0]->Wait({"x"}, 10s).ok()); });
  std::thread wy([&] { EXPECT_TRUE(clients[1]->Wait({"x", "y"}, 10s).ok()); });
  std::thread wx2([&] { EXPECT_TRUE(clients[2]->Wait({"x"}, 10s).ok()); });
  ASSERT_TRUE(testing::WaitUntil([&] { return joined().callers == 3; }, 10s));
  EXPECT_EQ(joined().requests, 2u);
  ASSERT_TRUE(clients[3]->Set("x", "1").ok());
  ASSERT_TRUE(clients[3]->Set("y", "1").ok());
  wx.join();
  wy.join();
  wx2.join();
}

// A relay holds a bounded number of requests, each caller once (waiting in a join or a batch,
// or upstream): past it a request is refused at once, naming the limit, and nothing is kept for
// it; as the held ones are answered, it serves again.
TEST_F(RelayTest, RequestsPastTheRelaysLimitAreRefusedAtOnceAndNothingIsKept) {
  max_held_ = 4;
  auto* relay = AddRelay(0, 8, /*window=*/30s);
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int r = 0; r < 6; ++r) clients.push_back(Client(relay));
  auto held = [&] { return reactor_->Call("held", [&] { return relay->held(); }); };
  // Two gets of one key (one join, one request upstream), one of another, and a barrier of
  // 4 that waits in its batch: four callers held.
  std::vector<std::thread> threads;
  std::vector<Status> done(4, InternalError("not run"));
  threads.emplace_back([&] { done[0] = clients[0]->Get("a", 10s).status(); });
  threads.emplace_back([&] { done[1] = clients[1]->Get("a", 10s).status(); });
  threads.emplace_back([&] { done[2] = clients[2]->Get("b", 10s).status(); });
  threads.emplace_back([&] { done[3] = clients[3]->Barrier("bar", 4, 30s); });
  ASSERT_TRUE(testing::WaitUntil([&] { return held() == 4; }, 10s)) << held();
  const uint64_t upstream = Stats(relay).upstream_requests;
  auto t0 = Clock::now();
  Status refused = clients[4]->Set("c", "v");
  EXPECT_LT(Clock::now() - t0, 2s) << "refused at once, not after a timeout";
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("holds 4 requests already; the limit is 4"), std::string::npos)
      << refused;
  EXPECT_EQ(clients[4]->Get("a", 10s).status().code(), StatusCode::kFailedPrecondition)
      << "not joined to the get upstream either";
  EXPECT_EQ(Stats(relay).upstream_requests, upstream) << "nothing went upstream for them";
  EXPECT_EQ(held(), 4u);
  // Set from a rank that reaches the store itself (the relay is full): the gets of 'a' are
  // answered, and the relay takes requests again.
  RendezvousClient::Options o;
  o.endpoint = server_->endpoint();
  o.credentials = creds_;
  o.job = "job";
  o.attempt = 1;
  auto direct = RendezvousClient::Connect(o);
  ASSERT_TRUE(direct.ok()) << direct.status();
  ASSERT_TRUE((*direct)->Set("a", "1").ok());
  ASSERT_TRUE(testing::WaitUntil([&] { return held() == 2; }, 10s)) << held();
  EXPECT_TRUE(clients[4]->Set("b", "2").ok());
  ASSERT_TRUE(testing::WaitUntil([&] { return held() == 1; }, 10s)) << held();
  // The barrier's other three arrive (held 1, 2, 3 before each: all taken) and it completes.
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] { EXPECT_TRUE(clients[r]->Barrier("bar", 4, 30s).ok()); });
  }
  EXPECT_TRUE(clients[5]->Barrier("bar", 4, 30s).ok());
  for (auto& t : threads) t.join();
  EXPECT_TRUE(done[0].ok() && done[1].ok() && done[2].ok() && done[3].ok())
      << done[0] << done[1] << done[2] << done[3];
  EXPECT_EQ(held(), 0u);
}

TEST_F(RelayTest, TheSocketIsPrivateAndOnlyAdmittedProcessesMayUseIt) {
  // Only a process other than this one is "a rank of the attempt": this test process is the
  // outsider, and the relay learns its pid from the kernel, not from anything it sends.
  const pid_t me = getpid();
  std::atomic<pid_t> rank_pid{me + 1};
  auto* relay = AddRelay(0, 1, 10ms, [&](pid_t pid) -> Status {
    if (pid == rank_pid.load()) return Status::Ok();
    return FailedPreconditionError("process " + std::to_string(pid) + " is not a rank");
  });
  std::string path = relay->endpoint().substr(std::string("unix://").size());
  struct stat st {};
  ASSERT_EQ(stat(std::filesystem::path(path).parent_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u) << "the socket's directory is the agent user's only";

  auto c = Client(relay);
  Status refused = c->Set("k", "v");
  ASSERT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("refused process " + std::to_string(me)), std::string::npos)
      << refused;
  auto parked = c->AllGather("g", 0, 1, "v", 1s);
  EXPECT_EQ(parked.status().code(), StatusCode::kFailedPrecondition) << parked.status();
  EXPECT_EQ(Stats(relay).upstream_requests, 0u) << "nothing of an outsider reaches the store";
  rank_pid = me;  // now this process is admitted
  EXPECT_TRUE(c->Set("k", "v").ok());
  // The relay serves its own scope only.
  auto other = Client(relay, /*attempt=*/2);
  auto st2 = other->Set("k", "v");
  ASSERT_EQ(st2.code(), StatusCode::kFailedPrecondition) << st2;
  EXPECT_NE(st2.message().find("serves scope 'job/1', not 'job/2'"), std::string::npos) << st2;
  // When the relay closes, its directory goes with it.
  reactor_->Call("close", [&] { relays_.clear(); });
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(path).parent_path()));
}

TEST_F(RelayTest, BadInputOnTheLocalSocketGetsAClearErrorAndTheRelayKeepsServing) {
  auto* relay = AddRelay(0, 2, 10ms);
  LocalRpcClient::Options ro;
  ro.endpoint = relay->endpoint();
  auto rpc = std::move(*LocalRpcClient::Connect(ro));
  auto call = [&](proto::Envelope e) { return rpc->Call(std::move(e), 5s).status(); };
  auto expect = [](const Status& s, StatusCode code, const std::string& words) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(words), std::string::npos) << s;
  };
  proto::Envelope ping;
  ping.mutable_ping();
  expect(call(ping), StatusCode::kInvalidArgument, "expected a StoreRequest");
  proto::Envelope none;
  none.mutable_store_request()->mutable_scope()->set_job("job");
  none.mutable_store_request()->mutable_scope()->set_attempt(1);
  expect(call(none), StatusCode::kInvalidArgument, "no operation");
  auto gather = [&](int rank, int n) {
    proto::Envelope e = none;
    auto* g = e.mutable_store_request()->mutable_gather();
    g->set_name("g");
    g->set_rank(rank);
    g->set_n(n);
    g->set_timeout_ms(1000);
    return e;
  };
  expect(call(gather(5, 2)), StatusCode::kInvalidArgument, "rank 5 is not in 0..1");
  expect(call(gather(0, 0)), StatusCode::kInvalidArgument, "n=0 is not in 1..");
  proto::Envelope forged = gather(0, 2);
  auto* entry = forged.mutable_store_request()->mutable_gather()->add_batch();
  entry->set_rank(1);
  expect(call(forged), StatusCode::kInvalidArgument, "comes from relays, not ranks");
  proto::Envelope barrier = none;
  barrier.mutable_store_request()->mutable_barrier()->set_name("b");
  barrier.mutable_store_request()->mutable_barrier()->set_n(4);
  barrier.mutable_store_request()->mutable_barrier()->set_arrivals(4);
  expect(call(barrier), StatusCode::kInvalidArgument, "come from relays, not ranks");

  // Raw bytes on the socket, as any process of the agent's user could write them.
  const std::string path = relay->endpoint().substr(std::string("unix://").size());
  auto raw_connect = [&] {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << errno;
    timeval tv{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
  };
  // Reads one reply frame; nullopt when the relay closed the connection instead.
  auto read_reply = [](int fd) -> std::optional<proto::Envelope> {
    LocalFrameReader in(kDefaultMaxMessageBytes);
    for (;;) {
      std::string_view frame;
      if (in.Next(&frame) == LocalFrameReader::Result::kFrame) {
        auto env = ParseEnvelope(frame.data(), frame.size());
        EXPECT_TRUE(env.ok()) << env.status();
        return env.ok() ? std::optional<proto::Envelope>(*env) : std::nullopt;
      }
      char buf[4096];
      ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) return std::nullopt;
      in.Append(buf, static_cast<size_t>(n));
    }
  };
  int fd = raw_connect();
  // A frame that is no Envelope: an error reply with request_id 0, and the connection serves on.
  std::string junk = LocalFrame("\xff\xff not a protobuf");
  ASSERT_EQ(send(fd, junk.data(), junk.size(), MSG_NOSIGNAL), static_cast<ssize_t>(junk.size()));
  auto reply = read_reply(fd);
  ASSERT_TRUE(reply && reply->has_error());
  EXPECT_EQ(reply->request_id(), 0u);
  EXPECT_EQ(reply->error().code(), proto::INVALID_ARGUMENT) << reply->error().message();
  proto::Envelope set = none;
  set.set_request_id(7);
  set.mutable_store_request()->mutable_set()->set_key("raw");
  set.mutable_store_request()->mutable_set()->set_value("v");
  std::string good = LocalFrame(SerializeEnvelope(set));
  // Sent one byte at a time: frames are whole whatever the chunks.
  for (char b : good) ASSERT_EQ(send(fd, &b, 1, MSG_NOSIGNAL), 1);
  reply = read_reply(fd);
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(reply->request_id(), 7u);
  EXPECT_FALSE(reply->has_error()) << reply->error().message();
  // A header announcing more than the message limit (4 GiB - 1): an error naming the sizes,
  // then the connection is closed (nothing after the header can be framed).
  const char huge[] = "\xff\xff\xff\xff and then some";
  ASSERT_GT(send(fd, huge, sizeof(huge) - 1, MSG_NOSIGNAL), 0);
  reply = read_reply(fd);
  ASSERT_TRUE(reply && reply->has_error());
  EXPECT_NE(reply->error().message().find("4294967295 bytes exceeds the limit"), std::string::npos)
      << reply->error().message();
  EXPECT_FALSE(read_reply(fd).has_value()) << "the connection is closed after it";
  close(fd);
  // A connection that goes away with half a frame sent is just closed.
  fd = raw_connect();
  ASSERT_EQ(send(fd, good.data(), good.size() / 2, MSG_NOSIGNAL),
            static_cast<ssize_t>(good.size() / 2));
  close(fd);
  // Still serving.
  auto c = Client(relay);
  EXPECT_TRUE(c->Set("k", "v").ok());
  EXPECT_EQ(*c->Get("k", 1s), "v");
  EXPECT_EQ(*c->Get("raw", 1s), "v");
}

TEST_F(RelayTest, ALargeGatherResultComesFromTheStoreCompressedAndReachesTheRanksPlain) {
  constexpr int kNodes = 2, kPerNode = 2, kN = kNodes * kPerNode;
  auto entry = [](int r) {
    std::string e = "tcp://198.18.0.1:" + std::to_string(20000 + r);
    e.resize(2000, ' ');  // 8000 bytes in all: past kZstdMinBytes, and they compress
    return e;
  };
  auto gather = [&](const std::vector<RendezvousRelay*>& relay, const std::string& name) {
    std::vector<std::unique_ptr<RendezvousClient>> clients;
    for (int r = 0; r < kN; ++r) clients.push_back(Client(relay[r / kPerNode]));
    std::vector<StatusOr<std::vector<std::string>>> got(kN, InternalError("not run"));
    std::vector<std::thread> threads;
    for (int r = 0; r < kN; ++r) {
      threads.emplace_back([&, r] { got[r] = clients[r]->AllGather(name, r, kN, entry(r), 10s); });
    }
    for (auto& t : threads) t.join();
    for (int r = 0; r < kN; ++r) {
      ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status();
      ASSERT_EQ(got[r]->size(), size_t{kN});
      for (int e = 0; e < kN; ++e) EXPECT_EQ((*got[r])[e], entry(e));
    }
  };
  std::vector<RendezvousRelay*> zrelays;
  for (int n = 0; n < kNodes; ++n) zrelays.push_back(AddRelay(n, kPerNode));
  gather(zrelays, "addrs");
  for (auto* r : zrelays) EXPECT_EQ(Stats(r).compressed_gathers, 1u);
  // A relay that does not ask gets the plain bytes.
  accept_zstd_ = false;
  std::vector<RendezvousRelay*> plain;
  for (int n = 0; n < kNodes; ++n) plain.push_back(AddRelay(n, kPerNode));
  gather(plain, "addrs-plain");
  for (auto* r : plain) EXPECT_EQ(Stats(r).compressed_gathers, 0u);
}

// A store (here a fake one, without CURVE) whose compressed gather result does not inflate:
// every caller of the batch gets DataLoss naming it, and the relay keeps serving.
TEST(RelayCompressedGatherTest, AFrameThatDoesNotInflateFailsTheBatchWithDataLoss) {
  std::string templ = "/tmp/relay-test-XXXXXX";
  ASSERT_NE(mkdtemp(templ.data()), nullptr);
  zmq::context_t fake_ctx(1);
  zmq::socket_t store(fake_ctx, zmq::socket_type::router);
  store.set(zmq::sockopt::linger, 0);
  store.bind("tcp://127.0.0.1:*");
  const std::string endpoint = store.get(zmq::sockopt::last_endpoint);
  std::atomic<bool> stop{false};
  std::thread fake([&] {
    while (!stop) {
      zmq::pollitem_t it{store.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&it, 1, std::chrono::milliseconds(20));
      std::vector<zmq::message_t> frames;
      while (zmq::recv_multipart(store, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
        auto req = ParseEnvelope(frames.back().data(), frames.back().size());
        proto::Envelope out;
        out.set_request_id(req.ok() ? req->request_id() : 0);
        if (req.ok() && req->store_request().has_gather()) {
          EXPECT_TRUE(req->store_request().gather().accept_zstd());
          out.mutable_store_reply()->set_gathered(std::string("\x28\xb5\x2f\xfd", 4) +
                                                  std::string(64, '\x7f'));
          out.mutable_store_reply()->set_gathered_zstd(true);
        } else {
          out.mutable_store_reply()->set_counter(1);
        }
        store.send(frames.front(), zmq::send_flags::sndmore);
        store.send(zmq::buffer(SerializeEnvelope(out)), zmq::send_flags::none);
        frames.clear();
      }
    }
  });
  {
    Reactor reactor("relay-fake-store");
    RendezvousRelay::Options o;
    o.socket_parent = templ;
    o.upstream_endpoint = endpoint;
    o.credentials.insecure = true;
    o.job = "job";
    o.attempt = 1;
    o.local_ranks = {0, 1};
    o.rpc_slack = 1s;
    auto relay = RendezvousRelay::Create(reactor, o);
    ASSERT_TRUE(relay.ok()) << relay.status();
    reactor.Start();
    std::vector<std::unique_ptr<RendezvousClient>> clients;
    for (int r = 0; r < 2; ++r) {
      RendezvousClient::Options co;
      co.endpoint = (*relay)->endpoint();
      co.credentials.insecure = true;
      co.job = "job";
      co.attempt = 1;
      co.op_timeout = 5s;
      co.rpc_slack = 1s;
      clients.push_back(std::move(*RendezvousClient::Connect(co)));
    }
    std::vector<StatusOr<std::vector<std::string>>> got(2, InternalError("not run"));
    std::thread t([&] { got[1] = clients[1]->AllGather("g", 1, 2, "b", 5s); });
    got[0] = clients[0]->AllGather("g", 0, 2, "a", 5s);
    t.join();
    for (auto& g : got) {
      ASSERT_FALSE(g.ok());
      EXPECT_EQ(g.status().code(), StatusCode::kDataLoss) << g.status();
      EXPECT_NE(g.status().message().find("the store's compressed result"), std::string::npos)
          << g.status();
    }
    // Still serving.
    auto added = clients[0]->Add("k", 1);
    EXPECT_TRUE(added.ok()) << added.status();
    EXPECT_EQ(reactor.Call("stats", [&] { return (*relay)->stats().compressed_gathers; }), 0u);
    reactor.Call("close", [&] { relay->reset(); });
    reactor.Stop();
  }
  stop = true;
  fake.join();
  std::filesystem::remove_all(templ);
}

TEST_F(RelayTest, ALargeGatherReachesTheLocalRanksThroughOneSealedMemoryFile) {
  shared_min_ = 1;  // every gather of two or more local callers goes through a file
  constexpr int kPerNode = 4;
  auto* relay = AddRelay(0, kPerNode);
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int r = 0; r < kPerNode; ++r) clients.push_back(Client(relay));
  auto entry = [](int r) { return "addr-" + std::to_string(r); };
  std::vector<StatusOr<std::vector<std::string>>> got(kPerNode, InternalError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < kPerNode; ++r) {
    threads.emplace_back(
        [&, r] { got[r] = clients[r]->AllGather("addrs", r, kPerNode, entry(r), 10s); });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kPerNode; ++r) {
    ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status();
    ASSERT_EQ(got[r]->size(), static_cast<size_t>(kPerNode));
    for (int i = 0; i < kPerNode; ++i) EXPECT_EQ((*got[r])[i], entry(i));
  }
  EXPECT_EQ(Stats(relay).shared_gathers, 1u);
  // Nothing is left behind in the relay's directory: the kernel frees the file with its last
  // mapping.
  std::filesystem::path socket = relay->endpoint().substr(7);
  for (const auto& e : std::filesystem::directory_iterator(socket.parent_path())) {
    EXPECT_EQ(e.path(), socket) << "left in the relay's directory";
  }

  // What a rank accepts as such a file: a regular file of exactly the size the reply says,
  // sealed against writes, shrinking and growing.
  const std::string bytes = "the serialized result";
  auto memfd = [&](unsigned seals) {
    int fd = memfd_create("test-gather", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    if (seals != 0) EXPECT_EQ(fcntl(fd, F_ADD_SEALS, seals), 0);
    return ScopedFd(fd);
  };
  constexpr unsigned kSealed = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;
  auto mapped = MappedGather::FromDescriptor(memfd(kSealed), bytes.size());
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ(mapped->bytes(), bytes);
  auto expect = [&](StatusOr<MappedGather> m, const std::string& words) {
    ASSERT_FALSE(m.ok()) << words;
    EXPECT_EQ(m.status().code(), StatusCode::kDataLoss) << m.status();
    EXPECT_NE(m.status().message().find(words), std::string::npos) << m.status();
  };
  expect(MappedGather::FromDescriptor(memfd(kSealed), bytes.size() + 1), "not a file of");
  expect(MappedGather::FromDescriptor(memfd(kSealed), 0), "not a file of");
  // Writable, or only partly sealed: another process holding it could change the bytes.
  expect(MappedGather::FromDescriptor(memfd(0), bytes.size()), "not sealed");
  expect(MappedGather::FromDescriptor(memfd(F_SEAL_SHRINK | F_SEAL_GROW), bytes.size()),
         "not sealed");
  // Not a regular file at all: a pipe (a FIFO) of that many bytes, a directory.
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  ASSERT_EQ(write(p[1], bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  close(p[1]);
  expect(MappedGather::FromDescriptor(ScopedFd(p[0]), bytes.size()), "not a file of");
  expect(MappedGather::FromDescriptor(ScopedFd(open("/tmp", O_RDONLY | O_CLOEXEC)), 4096),
         "not a file of");
}

TEST_F(RelayTest, AGatherReplyNamingAFileWithoutItsDescriptorIsRefused) {
  // A relay (or anything at its socket) whose reply says the result is in a file, but sends no
  // descriptor, or two: the rank refuses it with DataLoss instead of reading anything.
  std::string templ = (dir_ / "fake-XXXXXX").string();
  ASSERT_NE(mkdtemp(templ.data()), nullptr);
  const std::string path = templ + "/s";
  std::atomic<int> descriptors{0};
  auto fake = reactor_->Call("fake", [&] {
    LocalRpcServer::Options o;
    o.path = path;
    return LocalRpcServer::Create(
        *reactor_, o, [&](const PeerInfo&, proto::Envelope&&, RpcServer::Reply reply) {
          proto::Envelope e;
          e.mutable_store_reply()->set_gathered_fd(true);
          e.mutable_store_reply()->set_gathered_size(3);
          auto bytes = std::make_shared<const SerializedReply>(e);
          if (descriptors.load() == 0) return RpcServer::ReplyWith(reply, bytes);
          int fd = memfd_create("x", MFD_CLOEXEC);
          EXPECT_TRUE(ReplyWithDescriptor(reply, bytes, std::make_shared<const ScopedFd>(fd)));
        });
  });
  ASSERT_TRUE(fake.ok()) << fake.status();
  RendezvousClient::Options co;
  co.endpoint = (*fake)->endpoint();
  co.credentials = creds_;
  co.job = "job";
  co.attempt = 1;
  auto c = std::move(*RendezvousClient::Connect(co));
  auto none = c->AllGather("g", 0, 2, "v", 5s);
  EXPECT_EQ(none.status().code(), StatusCode::kDataLoss) << none.status();
  EXPECT_NE(none.status().message().find("0 descriptors"), std::string::npos) << none.status();
  descriptors = 1;  // an unsealed, empty file: refused too
  auto unsealed = c->AllGather("g", 0, 2, "v", 5s);
  EXPECT_EQ(unsealed.status().code(), StatusCode::kDataLoss) << unsealed.status();
  reactor_->Call("close", [&] { fake->reset(); });
}

TEST_F(RelayTest, AStoreThatRefusesTheRelaysKeyIsNamedAtOnceNotATimeout) {
  // A key the store never authorized, and the right key with a wrong store public key.
  RdzvCredentials stranger = creds_;
  stranger.client_key = *GenerateKeyPair();
  RdzvCredentials wrong_server = creds_;
  wrong_server.server_public_key = GenerateKeyPair()->public_key;
  struct Case {
    const RdzvCredentials* creds;
    std::string words;
  };
  for (const Case& c : {Case{&stranger, "refused this node's key"},
                        Case{&wrong_server, "wrong store public key"}}) {
    auto* relay = AddRelay(0, 2, 10ms, {}, c.creds);
    ASSERT_NE(relay, nullptr);
    auto rank0 = Client(relay), rank1 = Client(relay);
    auto t0 = Clock::now();
    // A forwarded request (its op timeout is 30 s) and a barrier batch (20 s). The refusal
    // takes a handshake or three (libzmq reconnects every 100 ms); 8 s leaves room for a
    // loaded machine (a parallel ctest once took more than 4 s) and still tells it from a
    // timeout, which would also be DeadlineExceeded.
    Status set = rank0->Set("k", "v");
    Status barrier = InternalError("not run");
    std::thread t([&] { barrier = rank1->Barrier("b", 2, 20s); });
    Status barrier0 = rank0->Barrier("b", 2, 20s);
    t.join();
    EXPECT_LT(Clock::now() - t0, 8s) << c.words;
    for (const Status& s : {set, barrier, barrier0}) {
      EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s;
      EXPECT_NE(s.message().find(c.words), std::string::npos) << s;
      EXPECT_NE(s.message().find(server_->endpoint()), std::string::npos) << s;
    }
  }
}

// ZeroMQ releases a closed socket's context slot (and descriptors) asynchronously, on its
// reaper thread. A loop that makes and closes relays faster than that thread frees them (the
// fuzzer, on a loaded machine) used to fail Create with "Too many open files". Here the context
// holds exactly one relay's ZeroMQ sockets (its upstream socket, and the pair that watches the
// upstream handshakes; its local socket is a plain one), so every Create but the first needs
// the slots of the relay closed just before it: it waits for them instead of failing.
TEST(RelayLifecycleTest, ARelayMadeRightAfterOneClosedWaitsForItsSocketsToBeReleased) {
  constexpr int kRelaySockets = 3;
  std::string templ = "/tmp/relay-test-XXXXXX";
  ASSERT_NE(mkdtemp(templ.data()), nullptr);
  zmq::context_t ctx;
  ctx.set(zmq::ctxopt::max_sockets, kRelaySockets);
  {
    Reactor reactor("relay-lifecycle", &ctx);  // not running: Create and close on this thread
    RendezvousRelay::Options o;
    o.socket_parent = templ;
    o.upstream_endpoint = "ipc://" + templ + "/nobody-listens";
    o.credentials.insecure = true;
    o.job = "job";
    o.local_ranks = {0, 1};
    for (int i = 0; i < 200; ++i) {
      auto relay = RendezvousRelay::Create(reactor, o);
      ASSERT_TRUE(relay.ok()) << "relay " << i << ": " << relay.status();
    }
  }
  // Once the context is full for good, the error names the limit instead.
  std::vector<zmq::socket_t> held;
  for (int i = 0; i < kRelaySockets; ++i) {
    auto s = OpenSocket(ctx, zmq::socket_type::pair);
    ASSERT_TRUE(s.ok()) << s.status();
    held.push_back(std::move(*s));
  }
  auto more = OpenSocket(ctx, zmq::socket_type::dealer, 50ms);
  ASSERT_FALSE(more.ok());
  EXPECT_EQ(more.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(
      more.status().message().find("holds at most " + std::to_string(kRelaySockets) + " sockets"),
      std::string::npos)
      << more.status();
  held.clear();
  std::filesystem::remove_all(templ);
}

bool OnTmpfs(const std::filesystem::path& p) {
  struct statfs sf {};
  return ::statfs(p.c_str(), &sf) == 0 && sf.f_type == TMPFS_MAGIC;
}

void MakeOld(const std::filesystem::path& p) {
  struct timespec ts[2];
  ts[0].tv_sec = ts[1].tv_sec = ::time(nullptr) - 3600;
  ts[0].tv_nsec = ts[1].tv_nsec = 0;
  ASSERT_EQ(::utimensat(AT_FDCWD, p.c_str(), ts, AT_SYMLINK_NOFOLLOW), 0) << p;
}

// Relays' directories go on a memory file system when the host has one that is safe to use:
// this user's own directory writable by nobody else, or a sticky one (/dev/shm); never a
// symlink, a relative path, a directory on disk, or a shared directory without the sticky bit.
TEST(RelayDirectoryTest, AMemoryFileSystemThatOthersCannotTamperWithIsPreferred) {
  if (!OnTmpfs("/dev/shm")) GTEST_SKIP() << "no tmpfs at /dev/shm on this host";
  const std::filesystem::path fallback = "/nonexistent/fallback";
  std::string templ = "/dev/shm/relay-test-XXXXXX";
  ASSERT_NE(mkdtemp(templ.data()), nullptr);
  const std::filesystem::path own = templ;
  const std::filesystem::path link = own.string() + "-link";
  std::filesystem::create_directory_symlink(own, link);
  std::string disk_templ = std::filesystem::current_path() / "relay-test-XXXXXX";
  ASSERT_NE(mkdtemp(disk_templ.data()), nullptr);
  const std::filesystem::path disk = disk_templ;

  // Our own 0700 directory on tmpfs.
  EXPECT_EQ(PickRelaySocketParent({own}, fallback), own);
  // Group-writable and not sticky: another user of the group could swap entries.
  ASSERT_EQ(::chmod(own.c_str(), 0770), 0);
  EXPECT_EQ(PickRelaySocketParent({own}, fallback), fallback);
  // Sticky: mkdtemp's 0700 directory in it stays ours, as in /tmp.
  ASSERT_EQ(::chmod(own.c_str(), 01770), 0);
  EXPECT_EQ(PickRelaySocketParent({own}, fallback), own);
  ASSERT_EQ(::chmod(own.c_str(), 0700), 0);
  // A symlink to it, a relative path, a missing one: skipped for the next candidate.
  EXPECT_EQ(PickRelaySocketParent({link, "dev/shm", "/nonexistent/x", own}, fallback), own);
  EXPECT_EQ(PickRelaySocketParent({link}, fallback), fallback);
  // A directory on disk (where the test runs), unless that is a tmpfs too.
  if (!OnTmpfs(disk)) {
    EXPECT_EQ(PickRelaySocketParent({disk}, fallback), fallback);
  }
  EXPECT_EQ(PickRelaySocketParent({}, fallback), fallback);
  // The usual list ends with /dev/shm, which this host has.
  auto usual = RelaySocketParentCandidates();
  ASSERT_FALSE(usual.empty());
  EXPECT_EQ(usual.back(), "/dev/shm");
  EXPECT_TRUE(OnTmpfs(PickRelaySocketParent(usual, fallback)));

  std::filesystem::remove(link);
  std::filesystem::remove_all(own);
  std::filesystem::remove_all(disk);
}

// A relay's directory outlives a process killed with -9 (its destructor never runs); the
// sweep removes such directories (old, and nobody holds their lock) and nothing else: not a
// live relay's, not one whose process still runs, not one just made, not other names.
TEST(RelayDirectoryTest, TheSweepRemovesOnlyWhatRelaysOfDeadProcessesLeft) {
  std::string templ = "/tmp/relay-test-XXXXXX";
  ASSERT_NE(mkdtemp(templ.data()), nullptr);
  const std::filesystem::path parent = templ;
  auto make = [&](const std::string& name) {
    std::filesystem::path d = parent / name;
    std::filesystem::create_directory(d);
    std::ofstream(d / "gather-0") << "result";
    return d;
  };
  const auto orphan = make("muster-rdzv-aaaaaa");  // nobody holds it: its relay's process died
  const auto young = make("muster-rdzv-bbbbbb");   // just made: its relay may not hold it yet
  const auto other = make("muster-rdzv-other-name");
  const auto held = make("muster-rdzv-cccccc");  // its relay's process is alive (a child here)
  MakeOld(orphan);
  MakeOld(other);

  // A real process holds `held` as a relay does, until it is killed with -9.
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    int fd = ::open(held.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd < 0 || ::flock(fd, LOCK_EX) != 0) ::_exit(1);
    char c = 'r';
    if (::write(ready[1], &c, 1) != 1) ::_exit(1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ::close(ready[0]);
  MakeOld(held);

  zmq::context_t ctx;
  Reactor reactor("relay-sweep", &ctx);  // not running: Create and close on this thread
  RendezvousRelay::Options o;
  o.socket_parent = parent;
  o.upstream_endpoint = "ipc://" + templ + "/nobody-listens";
  o.credentials.insecure = true;
  o.job = "job";
  auto live = RendezvousRelay::Create(reactor, o);
  ASSERT_TRUE(live.ok()) << live.status();
  const std::filesystem::path live_dir =
      std::filesystem::path((*live)->endpoint().substr(7)).parent_path();
  EXPECT_EQ(live_dir.parent_path(), parent);
  EXPECT_EQ(live_dir.filename().string().rfind("muster-rdzv-", 0), 0u) << live_dir;
  MakeOld(live_dir);

  EXPECT_EQ(SweepStaleRelayDirs(parent), 1);
  EXPECT_FALSE(std::filesystem::exists(orphan));
  EXPECT_TRUE(std::filesystem::exists(young));
  EXPECT_TRUE(std::filesystem::exists(other));
  EXPECT_TRUE(std::filesystem::exists(held / "gather-0"));
  EXPECT_TRUE(std::filesystem::exists(live_dir / "s"));

  // Its process killed with -9: the kernel drops the lock, and the next sweep takes it.
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_EQ(SweepStaleRelayDirs(parent), 1);
  EXPECT_FALSE(std::filesystem::exists(held));
  EXPECT_TRUE(std::filesystem::exists(live_dir / "s"));
  // A zero minimum age takes the young one too, never the live relay's.
  EXPECT_EQ(SweepStaleRelayDirs(parent, std::chrono::seconds(0)), 1);
  EXPECT_FALSE(std::filesystem::exists(young));
  EXPECT_TRUE(std::filesystem::exists(live_dir / "s"));
  live->reset();
  EXPECT_FALSE(std::filesystem::exists(live_dir));
  std::filesystem::remove_all(parent);
}

}  // namespace
}  // namespace muster::collectives
