// The ZeroMQ rendezvous store: real sockets, CURVE with a ZAP handler, one scope per attempt.

#include "collectives/rendezvous_server.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <limits>
#include <map>
#include <thread>

#include "collectives/rendezvous_client.h"
#include "collectives/rendezvous_codec.h"
#include "collectives/rendezvous_relay.h"
#include "tests/testing/log_capture.h"
#include "tests/testing/reactor_fixture.h"
#include "tests/testing/wait_until.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Ranks reach the store directly (their own CURVE connection each) or, with relayed_, through
// node agents' relays (collectives/rendezvous_relay.h): two relays per scope, the clients
// alternating between them, so every batch meets the other relay's on the store.
class RendezvousServerTest : public testing::ReactorZapTest {
 protected:
  void SetUp() override { Start(/*insecure=*/false); }

  void TearDown() override {
    testing::ReactorZapTest::TearDown();
    if (!relay_dir_.empty()) std::filesystem::remove_all(relay_dir_);
  }

  void Start(bool insecure) {
    CreateReactor("store-test", /*with_zap=*/!insecure);
    if (HasFatalFailure()) return;
    RendezvousServer::Options o;
    o.insecure = insecure;
    auto s = RendezvousServer::Create(*reactor_, zap_.get(), o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_->Start();
  }

  void ReleaseOnReactor() override {
    relays_.clear();
    server_.reset();
  }

  // The endpoint the next client of (creds, job, attempt) uses: the store's, or one of the
  // scope's two relays in turn.
  std::string EndpointFor(const std::string& creds, const RdzvCredentials& c,
                          const std::string& job, uint64_t attempt) {
    if (!relayed_) return server_->endpoint();
    if (relay_dir_.empty()) {
      std::string templ = "/tmp/relay-rdzvtest-XXXXXX";
      EXPECT_NE(mkdtemp(templ.data()), nullptr);
      relay_dir_ = templ;
    }
    auto& pair = relays_[creds + "|" + job + "|" + std::to_string(attempt)];
    if (pair.size() < 2) {
      RendezvousRelay::Options ro;
      ro.socket_parent = relay_dir_;
      ro.upstream_endpoint = server_->endpoint();
      ro.credentials = c;
      ro.job = job;
      ro.attempt = attempt;
      ro.rpc_slack = 1s;
      auto relay = reactor_->Call("relay", [&] { return RendezvousRelay::Create(*reactor_, ro); });
      EXPECT_TRUE(relay.ok()) << relay.status();
      if (!relay.ok()) return "";
      pair.push_back(std::move(*relay));
    }
    return pair[next_relay_++ % 2]->endpoint();
  }

  std::unique_ptr<RendezvousClient> Client(const std::string& creds, const std::string& job,
                                           uint64_t attempt) {
    RendezvousClient::Options o;
    auto c = RdzvCredentials::Parse(creds);
    EXPECT_TRUE(c.ok()) << c.status();
    o.endpoint = EndpointFor(creds, *c, job, attempt);
    o.credentials = *c;
    o.job = job;
    o.attempt = attempt;
    o.op_timeout = 5s;
    o.rpc_slack = 1s;
    auto client = RendezvousClient::Connect(o);
    EXPECT_TRUE(client.ok()) << client.status();
    return std::move(*client);
  }

  std::unique_ptr<RendezvousClient> OpenClient(const std::string& job = "job-a",
                                               uint64_t attempt = 0) {
    auto creds = server_->AddScope(job, attempt);
    EXPECT_TRUE(creds.ok()) << creds.status();
    return Client(*creds, job, attempt);
  }

  // Callers parked: on the server, and through a relay, held by it for a request upstream (a
  // relay joins the gets and waits of its callers for the same keys into one request).
  size_t Parked() {
    return reactor_->Call("parked", [&] {
      size_t n = server_->parked();
      for (const auto& [scope, pair] : relays_) {
        for (const auto& r : pair) n += r->joined().callers - r->joined().requests;
      }
      return n;
    });
  }

  // Waits (bounded) until `n` callers are parked (above).
  bool WaitParked(size_t n, std::chrono::milliseconds timeout = 5s) {
    auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      if (Parked() == n) return true;
      std::this_thread::yield();
    }
    return Parked() == n;
  }

  std::unique_ptr<RendezvousServer> server_;
  bool relayed_ = false;
  std::string relay_dir_;
  std::map<std::string, std::vector<std::unique_ptr<RendezvousRelay>>> relays_;
  int next_relay_ = 0;
};

// What a rank relies on, on both paths: direct to the store, and through relays.
class RendezvousStoreConformanceTest : public RendezvousServerTest,
                                       public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    relayed_ = GetParam();
    RendezvousServerTest::SetUp();
  }
};

INSTANTIATE_TEST_SUITE_P(Paths, RendezvousStoreConformanceTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Relayed" : "Direct"; });

TEST_P(RendezvousStoreConformanceTest, SetGetAddCompareSet) {
  auto c = OpenClient();
  ASSERT_TRUE(c->Set("k", std::string("v\0x", 3)).ok());
  auto v = c->Get("k", 1s);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, std::string("v\0x", 3));

  EXPECT_EQ(*c->Add("n", 5), 5);
  EXPECT_EQ(*c->Add("n", -2), 3);
  EXPECT_EQ(c->Add("k", 1).status().code(), StatusCode::kInvalidArgument);

  // Absent key matches an empty `expected`.
  EXPECT_EQ(*c->CompareSet("leader", "", "r3"), "r3");
  EXPECT_EQ(*c->CompareSet("leader", "", "r5"), "r3");
  EXPECT_EQ(*c->CompareSet("leader", "r3", "r7"), "r7");

  EXPECT_EQ(*c->Get("leader", 1s), "r7");
  EXPECT_EQ(*c->Get("n", 1s), "3");
}

TEST_P(RendezvousStoreConformanceTest, WaitersAreParkedAndWokenOnceBySet) {
  auto setter = OpenClient();
  constexpr int kWaiters = 16;
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int i = 0; i < kWaiters; ++i) clients.push_back(OpenClient());
  std::atomic<int> got{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      auto v = clients[i]->Get("addr", 10s);
      if (v.ok() && *v == "tcp://x:1") got++;
    });
  }
  ASSERT_TRUE(WaitParked(kWaiters)) << "parked: " << Parked();
  EXPECT_EQ(got.load(), 0);
  ASSERT_TRUE(setter->Set("addr", "tcp://x:1").ok());
  for (auto& t : threads) t.join();
  EXPECT_EQ(got.load(), kWaiters);
  EXPECT_EQ(Parked(), 0u);
  // A second set wakes nobody and leaves nothing behind.
  ASSERT_TRUE(setter->Set("addr", "tcp://x:2").ok());
  EXPECT_EQ(Parked(), 0u);
}

TEST_P(RendezvousStoreConformanceTest, WaitForSeveralKeys) {
  auto a = OpenClient(), b = OpenClient();
  std::atomic<bool> done{false};
  Status st;
  std::thread t([&] {
    st = a->Wait({"x", "y", "z"}, 10s);
    done = true;
  });
  ASSERT_TRUE(WaitParked(1));
  ASSERT_TRUE(b->Set("x", "1").ok());
  ASSERT_TRUE(b->Set("y", "1").ok());
  EXPECT_EQ(Parked(), 1u);
  EXPECT_FALSE(done.load());
  ASSERT_TRUE(b->Set("z", "1").ok());
  t.join();
  EXPECT_TRUE(st.ok()) << st;
}

TEST_P(RendezvousStoreConformanceTest, GetTimesOutOnTheServer) {
  auto c = OpenClient();
  auto t0 = Clock::now();
  auto v = c->Get("never", 300ms);
  auto took = Clock::now() - t0;
  ASSERT_EQ(v.status().code(), StatusCode::kDeadlineExceeded) << v.status();
  EXPECT_NE(v.status().message().find("'never'"), std::string::npos) << v.status();
  EXPECT_GE(took, 290ms);
  EXPECT_LT(took, 1000ms) << "the server, not the client's slack, should end the wait";
  EXPECT_EQ(Parked(), 0u);
  // The timed-out waiter is gone: setting the key later wakes nothing.
  ASSERT_TRUE(c->Set("never", "now").ok());
  EXPECT_EQ(*c->Get("never", 0ms), "now");
}

TEST_P(RendezvousStoreConformanceTest, BarrierReleasesAllAtOnceAndTimesOutWithCount) {
  constexpr int kN = 5;
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int i = 0; i < kN; ++i) clients.push_back(OpenClient());
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kN - 1; ++i)
    threads.emplace_back([&, i] { ok += clients[i]->Barrier("start", kN, 10s).ok(); });
  ASSERT_TRUE(WaitParked(kN - 1));
  EXPECT_EQ(ok.load(), 0);
  EXPECT_TRUE(clients[kN - 1]->Barrier("start", kN, 10s).ok());
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kN - 1);
  // Names are single use; a mismatched n is refused.
  EXPECT_EQ(clients[0]->Barrier("start", kN, 1s).code(), StatusCode::kInvalidArgument);

  Status st1, st2;
  std::thread a([&] { st1 = clients[0]->Barrier("partial", 3, 300ms); });
  st2 = clients[1]->Barrier("partial", 3, 300ms);
  a.join();
  EXPECT_EQ(st1.code(), StatusCode::kDeadlineExceeded);
  ASSERT_EQ(st2.code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(st2.message().find("of 3 arrived"), std::string::npos) << st2;
  EXPECT_EQ(clients[2]->Barrier("bad-n", 0, 1s).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Parked(), 0u);
}

TEST_P(RendezvousStoreConformanceTest, AllGatherAnswersEveryRankOnceWithAllEntriesInRankOrder) {
  constexpr int kN = 6;
  std::vector<std::unique_ptr<RendezvousClient>> clients;
  for (int i = 0; i < kN; ++i) clients.push_back(OpenClient());
  auto entry = [](int r) { return std::string("addr\0", 5) + std::to_string(r * 7); };
  std::vector<StatusOr<std::vector<std::string>>> got(kN, InternalError("not run"));
  std::vector<std::thread> threads;
  // Ranks arrive out of order; none is answered before the last one.
  for (int r : {4, 0, 5, 2, 1}) {
    threads.emplace_back([&, r] { got[r] = clients[r]->AllGather("addrs", r, kN, entry(r), 10s); });
  }
  ASSERT_TRUE(WaitParked(kN - 1)) << "parked: " << Parked();
  got[3] = clients[3]->AllGather("addrs", 3, kN, entry(3), 10s);
  for (auto& t : threads) t.join();
  for (int r = 0; r < kN; ++r) {
    ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status();
    ASSERT_EQ(got[r]->size(), size_t{kN});
    for (int e = 0; e < kN; ++e) EXPECT_EQ((*got[r])[e], entry(e)) << "rank " << r;
  }
  EXPECT_EQ(Parked(), 0u);
  // Names are single use.
  auto again = clients[0]->AllGather("addrs", 0, kN, "x", 1s);
  EXPECT_EQ(again.status().code(), StatusCode::kInvalidArgument) << again.status();
  EXPECT_NE(again.status().message().find("single use"), std::string::npos) << again.status();
}

TEST_P(RendezvousStoreConformanceTest, AllGatherRefusesInconsistentCallers) {
  auto a = OpenClient(), b = OpenClient();
  EXPECT_EQ(a->AllGather("g", 3, 3, "v", 1s).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a->AllGather("g", -1, 3, "v", 1s).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a->AllGather("g", 0, 0, "v", 1s).status().code(), StatusCode::kInvalidArgument);
  StatusOr<std::vector<std::string>> first = InternalError("not run");
  std::thread t([&] { first = a->AllGather("g", 0, 2, "a", 10s); });
  ASSERT_TRUE(WaitParked(1));
  // The server checks what only it can know: the n of the others, and who has contributed.
  auto wrong_n = b->AllGather("g", 1, 3, "b", 1s);
  EXPECT_EQ(wrong_n.status().code(), StatusCode::kInvalidArgument) << wrong_n.status();
  EXPECT_NE(wrong_n.status().message().find("n=2"), std::string::npos) << wrong_n.status();
  auto twice = b->AllGather("g", 0, 2, "b", 1s);
  EXPECT_EQ(twice.status().code(), StatusCode::kInvalidArgument) << twice.status();
  EXPECT_NE(twice.status().message().find("already contributed"), std::string::npos);
  EXPECT_EQ(Parked(), 1u) << "refused callers are not parked";
  auto ok = b->AllGather("g", 1, 2, "b", 10s);
  t.join();
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(*ok, *first);
}

TEST_P(RendezvousStoreConformanceTest, AllGatherTimesOutNamingMissingRanksAndWithdrawsTheEntry) {
  auto a = OpenClient(), b = OpenClient(), c = OpenClient();
  auto t0 = Clock::now();
  auto late = a->AllGather("g", 0, 3, "stale", 300ms);
  EXPECT_GE(Clock::now() - t0, 290ms);
  ASSERT_EQ(late.status().code(), StatusCode::kDeadlineExceeded) << late.status();
  EXPECT_NE(late.status().message().find("missing rank(s) 1, 2"), std::string::npos)
      << late.status();
  EXPECT_EQ(Parked(), 0u);
  // Rank 0 left the gather: the others still wait for it, and its new entry is the one used.
  StatusOr<std::vector<std::string>> rb = InternalError(""), rc = InternalError("");
  std::thread tb([&] { rb = b->AllGather("g", 1, 3, "b", 10s); });
  std::thread tc([&] { rc = c->AllGather("g", 2, 3, "c", 10s); });
  ASSERT_TRUE(WaitParked(2));
  auto ra = a->AllGather("g", 0, 3, "fresh", 10s);
  tb.join();
  tc.join();
  ASSERT_TRUE(ra.ok()) << ra.status();
  EXPECT_EQ(*ra, (std::vector<std::string>{"fresh", "b", "c"}));
  EXPECT_EQ(*rb, *ra);
  EXPECT_EQ(*rc, *ra);
}

TEST_P(RendezvousStoreConformanceTest, ClosingTheScopeAbortsAParkedGather) {
  auto a = OpenClient("job-g", 1);
  StatusOr<std::vector<std::string>> r = InternalError("not run");
  std::thread t([&] { r = a->AllGather("g", 0, 2, "a", 10s); });
  ASSERT_TRUE(WaitParked(1));
  server_->RemoveScope("job-g", 1);
  t.join();
  EXPECT_EQ(r.status().code(), StatusCode::kAborted) << r.status();
}

TEST(StoreServerLimitsTest, AGatherLargerThanTheMessageLimitFailsEveryRank) {
  Reactor reactor("store-limits");
  RendezvousServer::Options o;
  o.insecure = true;
  o.max_message_bytes = 4096;
  auto server = std::move(*RendezvousServer::Create(reactor, nullptr, o));
  reactor.Start();
  ASSERT_TRUE(server->AddScope("j", 0).ok());
  RendezvousClient::Options co;
  co.endpoint = server->endpoint();
  co.credentials.insecure = true;
  co.job = "j";
  auto a = std::move(*RendezvousClient::Connect(co));
  auto b = std::move(*RendezvousClient::Connect(co));
  // Each entry fits a request; the two together do not fit a reply.
  StatusOr<std::vector<std::string>> ra = InternalError("not run");
  std::thread t([&] { ra = a->AllGather("big", 0, 2, std::string(3000, 'a'), 10s); });
  auto rb = b->AllGather("big", 1, 2, std::string(3000, 'b'), 10s);
  t.join();
  EXPECT_EQ(rb.status().code(), StatusCode::kFailedPrecondition) << rb.status();
  EXPECT_NE(rb.status().message().find("message size limit"), std::string::npos) << rb.status();
  EXPECT_EQ(ra.status().code(), StatusCode::kFailedPrecondition) << ra.status();
  reactor.Call("teardown", [&] { server.reset(); });
  reactor.Stop();
}

// An insecure server with small limits, and raw requests: what a rank's code could send.
class StoreServerValidationTest : public testing::ReactorZapTest {
 protected:
  void Start(RendezvousServer::Options o) {
    o.insecure = true;
    CreateReactor("store-validation", /*with_zap=*/false);
    server_ = std::move(*RendezvousServer::Create(*reactor_, nullptr, o));
    reactor_->Start();
    ASSERT_TRUE(server_->AddScope("j", 0).ok());
    RpcClient::Options ro;
    ro.endpoint = server_->endpoint();
    ro.insecure = true;
    rpc_ = std::move(*RpcClient::Connect(ctx_, ro));
    RendezvousClient::Options co;
    co.endpoint = server_->endpoint();
    co.credentials.insecure = true;
    co.job = "j";
    co.op_timeout = 5s;
    client_ = std::move(*RendezvousClient::Connect(co));
  }
  void ReleaseOnReactor() override { server_.reset(); }
  StatusOr<proto::StoreReply> Raw(proto::StoreRequest r, std::chrono::milliseconds t = 5s) {
    r.mutable_scope()->set_job("j");
    proto::Envelope e;
    *e.mutable_store_request() = std::move(r);
    MUSTER_ASSIGN_OR_RETURN(auto reply, rpc_->Call(std::move(e), t));
    return reply.store_reply();
  }
  size_t Parked() {
    return reactor_->Call("parked", [&] { return server_->parked(); });
  }
  int64_t ScopeBytes() {
    return reactor_->Call("bytes", [&] { return server_->scope_bytes("j", 0); });
  }
  bool WaitUntilParked(size_t n) {
    return testing::WaitUntil([&] { return Parked() == n; }, 5s);
  }

  zmq::context_t ctx_;
  std::unique_ptr<RendezvousServer> server_;
  std::unique_ptr<RpcClient> rpc_;
  std::unique_ptr<RendezvousClient> client_;
};

TEST_F(StoreServerValidationTest, AddRefusesToOverflow) {
  Start({});
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(*client_->Add("n", kMax), kMax);
  auto over = client_->Add("n", 1);
  EXPECT_EQ(over.status().code(), StatusCode::kInvalidArgument) << over.status();
  EXPECT_NE(over.status().message().find("overflows"), std::string::npos) << over.status();
  EXPECT_EQ(*client_->Get("n", 1s), std::to_string(kMax)) << "the counter is unchanged";
  EXPECT_EQ(*client_->Add("m", std::numeric_limits<int64_t>::min()),
            std::numeric_limits<int64_t>::min());
  EXPECT_EQ(client_->Add("m", -1).status().code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(client_->Set("text", std::string(30000, '9')).ok());
  EXPECT_EQ(client_->Add("text", 1).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(StoreServerValidationTest, KeysNamesAndKeyListsAreBounded) {
  RendezvousServer::Options o;
  o.max_key_bytes = 64;
  o.max_keys_per_request = 8;
  Start(o);
  auto bad = [](const Status& s, const char* want) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(want), std::string::npos) << s;
  };
  const std::string long_key(65, 'k');
  bad(client_->Set(long_key, "v"), "must be 1..64 bytes, not 65");
  bad(client_->Set("", "v"), "must be 1..64 bytes, not 0");
  bad(client_->Add(long_key, 1).status(), "rendezvous add");
  bad(client_->CompareSet(long_key, "", "x").status(), "rendezvous compare_set");
  bad(client_->Get(long_key, 1s).status(), "rendezvous get");
  bad(client_->Barrier(long_key, 2, 1s), "rendezvous barrier");
  bad(client_->AllGather(long_key, 0, 2, "v", 1s).status(), "rendezvous gather");
  bad(client_->Wait(std::vector<std::string>(9, "k"), 1s), "9 keys; at most 8");
  proto::StoreRequest g;
  for (int i = 0; i < 9; ++i) g.mutable_get()->add_keys("k");
  bad(Raw(g).status(), "9 keys; at most 8");
  proto::StoreRequest b;
  b.mutable_barrier()->set_name("b");
  b.mutable_barrier()->set_n(std::numeric_limits<int32_t>::max());
  bad(Raw(b).status(), "is more than the");
  EXPECT_EQ(Parked(), 0u) << "nothing refused was parked";
  EXPECT_TRUE(client_->Set(std::string(64, 'k'), "v").ok());
}

// A get may name one big key many times; the reply would pass the message limit and be dropped
// by the client's socket, leaving it waiting. It is an error reply instead.
TEST_F(StoreServerValidationTest, AGetWhoseReplyWouldPassTheMessageLimitIsAnError) {
  RendezvousServer::Options o;
  o.max_message_bytes = 64 << 10;
  Start(o);
  ASSERT_TRUE(client_->Set("big", std::string(40 << 10, 'b')).ok());
  proto::StoreRequest g;
  g.mutable_get()->add_keys("big");
  g.mutable_get()->add_keys("big");
  g.mutable_get()->set_timeout_ms(1000);
  auto r = Raw(g, 3s);
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("message size limit"), std::string::npos) << r.status();
  // The same, parked until the key is set.
  proto::StoreRequest w;
  w.mutable_get()->add_keys("later");
  w.mutable_get()->add_keys("later");
  w.mutable_get()->set_timeout_ms(5000);
  StatusOr<proto::StoreReply> parked = InternalError("not run");
  std::thread t([&] { parked = Raw(w, 8s); });
  ASSERT_TRUE(WaitUntilParked(1));
  ASSERT_TRUE(client_->Set("later", std::string(40 << 10, 'l')).ok());
  t.join();
  EXPECT_EQ(parked.status().code(), StatusCode::kFailedPrecondition) << parked.status();
  auto one = client_->Get("big", 1s);
  ASSERT_TRUE(one.ok()) << one.status();
}

// A relay asks for a gather result compressed (StoreGather.accept_zstd): it gets one zstd frame
// of the same bytes, compressed once, when that is an eighth smaller; a caller that does not
// ask, a small result and one that does not compress get the plain bytes.
TEST_F(StoreServerValidationTest, AGatherResultGoesCompressedOnlyToCallersThatAskAndWhenSmaller) {
  Start({});
  auto gather = [&](const std::string& name, int rank, const std::string& value, bool zstd) {
    proto::StoreRequest g;
    g.mutable_gather()->set_name(name);
    g.mutable_gather()->set_rank(rank);
    g.mutable_gather()->set_n(2);
    g.mutable_gather()->set_value(value);
    g.mutable_gather()->set_timeout_ms(5000);
    g.mutable_gather()->set_accept_zstd(zstd);
    return g;
  };
  auto run = [&](const std::string& name, const std::string& v0, const std::string& v1) {
    StatusOr<proto::StoreReply> zr = InternalError("not run");
    std::thread t([&] { zr = Raw(gather(name, 0, v0, true), 8s); });
    EXPECT_TRUE(WaitUntilParked(1));
    auto plain = client_->AllGather(name, 1, 2, v1, 5s);
    t.join();
    EXPECT_TRUE(plain.ok()) << plain.status();
    if (plain.ok()) EXPECT_EQ(*plain, (std::vector<std::string>{v0, v1}));
    return zr;
  };
  proto::StoreGathered expected;
  expected.add_values(std::string(3000, 'a'));
  expected.add_values(std::string(3000, 'b'));
  auto zr = run("big", std::string(3000, 'a'), std::string(3000, 'b'));
  ASSERT_TRUE(zr.ok()) << zr.status();
  EXPECT_TRUE(zr->gathered_zstd());
  EXPECT_LT(zr->gathered().size(), 1000u);
  auto inflated = InflateGathered(zr->gathered(), 1 << 20);
  ASSERT_TRUE(inflated.ok()) << inflated.status();
  EXPECT_EQ(*inflated, expected.SerializeAsString());

  auto small = run("small", "x", "y");
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_FALSE(small->gathered_zstd()) << "under kZstdMinBytes";

  std::string noise0(3000, '\0'), noise1(3000, '\0');
  uint64_t x = 88172645463325252ull;
  for (auto* s : {&noise0, &noise1}) {
    for (char& c : *s) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      c = static_cast<char>(x);
    }
  }
  auto noise = run("noise", noise0, noise1);
  ASSERT_TRUE(noise.ok()) << noise.status();
  EXPECT_FALSE(noise->gathered_zstd()) << "random bytes do not compress by an eighth";
  proto::StoreGathered got;
  ASSERT_TRUE(got.ParseFromString(noise->gathered()));
  ASSERT_EQ(got.values_size(), 2);
  EXPECT_EQ(got.values(0), noise0);
}

TEST_F(StoreServerValidationTest, AScopeHoldsBoundedBytesEntriesAndParkedRequests) {
  RendezvousServer::Options o;
  o.max_scope_bytes = 10000;
  o.max_scope_entries = 4;
  o.max_parked_per_scope = 2;
  Start(o);
  auto full = [](const Status& s) {
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find("rendezvous scope j/0"), std::string::npos) << s;
  };
  ASSERT_TRUE(client_->Set("a", std::string(6000, 'a')).ok());
  full(client_->Set("b", std::string(6000, 'b')));
  EXPECT_EQ(ScopeBytes(), 6001);
  ASSERT_TRUE(client_->Set("a", std::string(3000, 'a')).ok()) << "an overwrite frees the old value";
  EXPECT_EQ(ScopeBytes(), 3001);
  ASSERT_TRUE(client_->Set("b", std::string(6000, 'b')).ok());
  full(client_->CompareSet("c", "", std::string(2000, 'c')).status());
  full(client_->AllGather("g", 0, 2, std::string(2000, 'g'), 1s).status());
  // Entries: a, b, then c and d fill the scope; e does not fit.
  ASSERT_TRUE(client_->Set("c", "1").ok());
  ASSERT_TRUE(client_->Add("d", 1).ok());
  full(client_->Set("e", "1"));
  full(client_->Barrier("bar", 2, 1s));
  EXPECT_TRUE(client_->Set("c", "2").ok()) << "an existing key may change";
  // Parked requests: two wait; a third is refused at once; once they time out, two more fit.
  std::vector<std::thread> ts;
  std::atomic<int> timed_out{0};
  for (int i = 0; i < 2; ++i) {
    ts.emplace_back([&] {
      if (client_->Get("never", 300ms).status().code() == StatusCode::kDeadlineExceeded)
        ++timed_out;
    });
  }
  ASSERT_TRUE(WaitUntilParked(2));
  full(client_->Get("never", 5s).status());
  for (auto& t : ts) t.join();
  EXPECT_EQ(timed_out, 2);
  EXPECT_EQ(Parked(), 0u);
  ts.clear();
  for (int i = 0; i < 2; ++i) {
    ts.emplace_back([&] {
      if (client_->Get("never", 200ms).status().code() == StatusCode::kDeadlineExceeded)
        ++timed_out;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(timed_out, 4) << "the count of parked requests went back down";
}

TEST_F(RendezvousServerTest, AttemptsAreIsolated) {
  auto creds1 = *server_->AddScope("job-a", 1);
  auto creds2 = *server_->AddScope("job-a", 2);
  EXPECT_NE(creds1, creds2);
  EXPECT_EQ(*server_->AddScope("job-a", 1), creds1) << "re-opening returns the same key";
  auto old = Client(creds1, "job-a", 1);
  auto fresh = Client(creds2, "job-a", 2);
  ASSERT_TRUE(old->Set("master", "stale").ok());
  // The new attempt never sees the old attempt's value.
  EXPECT_EQ(fresh->Get("master", 200ms).status().code(), StatusCode::kDeadlineExceeded);
  // A client holding attempt 1's key cannot reach into attempt 2 by naming it.
  auto sneaky = Client(creds1, "job-a", 2);
  auto r = sneaky->Get("master", 200ms);
  ASSERT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("job-a/1"), std::string::npos) << r.status();

  // Closing attempt 1 aborts its parked waiters and revokes its key.
  Status parked_status;
  std::thread t([&] { parked_status = old->Get("never", 10s).status(); });
  ASSERT_TRUE(WaitParked(1));
  server_->RemoveScope("job-a", 1);
  t.join();
  EXPECT_EQ(parked_status.code(), StatusCode::kAborted) << parked_status;
  auto after = Client(creds1, "job-a", 1);  // a new connection with the revoked key
  EXPECT_EQ(after->Set("x", "y").code(), StatusCode::kUnavailable);
  EXPECT_TRUE(fresh->Set("x", "y").ok());
}

TEST_F(RendezvousServerTest, UnknownKeyIsRefused) {
  ASSERT_TRUE(server_->AddScope("job-a", 0).ok());
  RdzvCredentials c;
  c.server_public_key = server_->public_key();
  c.client_key = *GenerateKeyPair();
  testing::LogCapture logs;
  auto intruder = Client(c.ToString(), "job-a", 0);
  auto st = intruder->Set("k", "v");
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find("refused"), std::string::npos) << st;
}

TEST_F(RendezvousServerTest, BadJobIdsAreRejected) {
  EXPECT_EQ(server_->AddScope("", 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(server_->AddScope("a/b", 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(server_->AddScope("a b", 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(server_->AddScope(std::string(200, 'x'), 0).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_P(RendezvousStoreConformanceTest, ClosingTheServerAbortsWaiters) {
  auto c = OpenClient();
  Status st;
  std::thread t([&] { st = c->Get("never", 10s).status(); });
  ASSERT_TRUE(WaitParked(1));
  reactor_->Call("close", [&] { server_.reset(); });
  t.join();
  EXPECT_EQ(st.code(), StatusCode::kAborted) << st;
}

TEST(StoreServerInsecureTest, ScopeMustBeOpen) {
  Reactor reactor("store-insecure");
  RendezvousServer::Options o;
  o.insecure = true;
  auto server = std::move(*RendezvousServer::Create(reactor, nullptr, o));
  reactor.Start();
  EXPECT_EQ(*server->AddScope("j", 3), "insecure");
  RendezvousClient::Options co;
  co.endpoint = server->endpoint();
  co.credentials.insecure = true;
  co.job = "j";
  co.attempt = 3;
  auto c = std::move(*RendezvousClient::Connect(co));
  EXPECT_TRUE(c->Set("k", "v").ok());
  co.attempt = 2;
  auto stale = std::move(*RendezvousClient::Connect(co));
  EXPECT_EQ(stale->Get("k", 100ms).status().code(), StatusCode::kFailedPrecondition);
  reactor.Call("teardown", [&] { server.reset(); });
  reactor.Stop();
}

TEST(RdzvCredentialsTest, ParseAndPrint) {
  auto s = *GenerateKeyPair(), c = *GenerateKeyPair();
  std::string text = "v1," + s.public_key + "," + c.public_key + "," + c.secret_key;
  auto parsed = RdzvCredentials::Parse(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->ToString(), text);
  EXPECT_TRUE(RdzvCredentials::Parse("insecure")->insecure);
  EXPECT_EQ(RdzvCredentials::Parse("").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RdzvCredentials::Parse("v2," + s.public_key + "," + c.public_key + "," + c.secret_key)
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  // A public key that does not belong to the secret.
  EXPECT_EQ(RdzvCredentials::Parse("v1," + s.public_key + "," + s.public_key + "," + c.secret_key)
                .status()
                .code(),
            StatusCode::kInvalidArgument);
}

TEST_F(RendezvousServerTest, ConnectFromEnv) {
  auto creds = *server_->AddScope("envjob", 4);
  unsetenv("MUSTER_RDZV_ENDPOINT");
  auto missing = ConnectRendezvousFromEnv();
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("MUSTER_RDZV_ENDPOINT"), std::string::npos);
  setenv("MUSTER_RDZV_ENDPOINT", server_->endpoint().c_str(), 1);
  setenv("MUSTER_RDZV_KEY", creds.c_str(), 1);
  setenv("MUSTER_JOB_ID", "envjob", 1);
  setenv("MUSTER_ATTEMPT", "x4", 1);
  auto bad = ConnectRendezvousFromEnv();
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("MUSTER_ATTEMPT"), std::string::npos);
  setenv("MUSTER_ATTEMPT", "4", 1);
  auto c = ConnectRendezvousFromEnv();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->Set("hello", "world").ok());
  for (auto* v : {"MUSTER_RDZV_ENDPOINT", "MUSTER_RDZV_KEY", "MUSTER_JOB_ID", "MUSTER_ATTEMPT"})
    unsetenv(v);
}

}  // namespace
}  // namespace muster::collectives
