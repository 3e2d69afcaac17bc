// The launch preflight (node_agent/preflight.h): routes, probes, the verdict, and whole
// preflights of several "nodes" run as threads over an in-memory store on loopback.

#include "node_agent/preflight.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>

namespace muster::node_agent {
namespace {

using namespace std::chrono_literals;

TEST(RouteToTest, NamesTheInterfaceThatHoldsTheSourceAddress) {
  auto r = RouteTo("127.0.0.1");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->interface, "lo");
  EXPECT_EQ(r->local_address, "127.0.0.1");
  auto bad = RouteTo("no-such-host.invalid");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("no-such-host.invalid"), std::string::npos);
}

TEST(ProbeTcpTest, SeesAListenerAndNamesARefusal) {
  auto l = ProbeListener::Open("127.0.0.1");
  ASSERT_TRUE(l.ok()) << l.status().message();
  EXPECT_TRUE(ProbeTcp("127.0.0.1", (*l)->port(), 1000ms).ok());
  int port = (*l)->port();
  l->reset();  // closed: refused now
  Status st = ProbeTcp("127.0.0.1", port, 1000ms);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("refused"), std::string::npos) << st.message();
  EXPECT_FALSE(ProbeTcp("127.0.0.1", 0, 100ms).ok());
}

TEST(PreflightCodecTest, RoundTripsAndRejectsGarbage) {
  PreflightPeer p{"n1", "198.18.0.11", "eth0", 4242};
  auto q = PreflightPeer::Decode(p.Encode());
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->node, "n1");
  EXPECT_EQ(q->interface, "eth0");
  EXPECT_EQ(q->probe_port, 4242);
  EXPECT_FALSE(PreflightPeer::Decode("n1|a|eth0").ok());
  EXPECT_FALSE(PreflightPeer::Decode("n1|a|eth0|70000").ok());
  EXPECT_FALSE(PreflightPeer::Decode("n1|a|eth0|12x").ok());
  EXPECT_FALSE(PreflightPeer::Decode("n1||eth0|12").ok());
  EXPECT_FALSE(PreflightPeer::Decode("n\n1|a|eth0|12").ok());

  std::vector<ProbeFailure> f = {{0, 2, "timed out\nafter"}, {1, -1, "did not join"}};
  auto g = DecodeFailures(EncodeFailures(f), 3);
  ASSERT_TRUE(g.ok());
  ASSERT_EQ(g->size(), 2u);
  EXPECT_EQ((*g)[0].to, 2);
  EXPECT_EQ((*g)[0].error, "timed out after");
  EXPECT_EQ((*g)[1].to, -1);
  EXPECT_FALSE(DecodeFailures("0 3 x\n", 3).ok());  // rank out of range
  EXPECT_FALSE(DecodeFailures("zero 1 x\n", 3).ok());
}

TEST(BlameTest, PicksTheNodeMostFailuresInvolveAndTheHighestRankOnATie) {
  EXPECT_EQ(Blame(3, {}), std::nullopt);
  // One cut link between 1 and 3: both ends see it; the master side is kept.
  EXPECT_EQ(Blame(4, {{1, 3, "t"}, {3, 1, "t"}}), 3);
  EXPECT_EQ(Blame(4, {{0, 1, "t"}, {1, 0, "t"}}), 1);
  // Node 2 cannot reach anyone and nobody reaches it.
  EXPECT_EQ(Blame(4, {{2, 0, "t"},
                      {2, 1, "t"},
                      {2, 3, "t"},
                      {0, 2, "t"},
                      {1, 2, "t"},
                      {3, 2, "t"},
                      {1, 3, "t"}}),
            2);
  // A node that did not take part outweighs one probe it failed against.
  EXPECT_EQ(Blame(3, {{1, -1, "missing"}, {2, 1, "t"}}), 1);
}

// A store that hands out a wrong probe port for one node in round 1: its peers cannot reach
// it (the port is closed), as if its link were cut.
class RewritingStore : public collectives::RendezvousStore {
 public:
  RewritingStore(collectives::RendezvousStore& inner, int rank, int port)
      : inner_(inner), rank_(rank), port_(port) {}
  Status Set(const std::string& k, const std::string& v) override { return inner_.Set(k, v); }
  StatusOr<std::string> Get(const std::string& k, std::chrono::milliseconds t) override {
    return inner_.Get(k, t);
  }
  StatusOr<int64_t> Add(const std::string& k, int64_t d) override { return inner_.Add(k, d); }
  StatusOr<std::string> CompareSet(const std::string& k, const std::string& e,
                                   const std::string& d) override {
    return inner_.CompareSet(k, e, d);
  }
  Status Wait(const std::vector<std::string>& k, std::chrono::milliseconds t) override {
    return inner_.Wait(k, t);
  }
  Status Barrier(const std::string& n, int c, std::chrono::milliseconds t) override {
    return inner_.Barrier(n, c, t);
  }
  StatusOr<std::vector<std::string>> AllGather(const std::string& name, int rank, int n,
                                               const std::string& value,
                                               std::chrono::milliseconds t) override {
    auto all = inner_.AllGather(name, rank, n, value, t);
    if (all.ok() && name == "muster/preflight/1") {
      auto p = PreflightPeer::Decode((*all)[rank_]);
      if (p.ok() && rank != rank_) {
        p->probe_port = port_;
        (*all)[rank_] = p->Encode();
      }
    }
    return all;
  }

 private:
  collectives::RendezvousStore& inner_;
  int rank_, port_;
};

struct Gang {
  std::unique_ptr<collectives::RendezvousStore> store = collectives::NewInMemoryRendezvousStore();
  std::unique_ptr<ProbeListener> store_port;  // stands for the master's rendezvous store
  std::vector<PreflightResult> results;

  explicit Gang(int n) : results(n) {
    auto l = ProbeListener::Open("127.0.0.1");
    EXPECT_TRUE(l.ok());
    store_port = std::move(*l);
  }
  PreflightOptions Options(int rank, int n) const {
    PreflightOptions o;
    o.node = "n" + std::to_string(rank);
    o.node_rank = rank;
    o.nnodes = n;
    o.master_addr = "127.0.0.1";
    o.store_port = store_port->port();
    o.timeout = 3000ms;
    o.probe_timeout = 1000ms;
    return o;
  }
  // Runs ranks [0, running) of n, each with `store_of(rank)`.
  void Run(int n, int running, const std::function<collectives::RendezvousStore&(int)>& store_of) {
    std::vector<std::thread> t;
    for (int r = 0; r < running; ++r) {
      t.emplace_back([&, r] { results[r] = RunPreflight(Options(r, n), store_of(r)); });
    }
    for (auto& x : t) x.join();
  }
};

TEST(RunPreflightTest, PassesWhenEveryNodeReachesEveryOtherAndNamesTheInterface) {
  Gang g(3);
  g.Run(3, 3, [&](int) -> collectives::RendezvousStore& { return *g.store; });
  for (int r = 0; r < 3; ++r) {
    EXPECT_TRUE(g.results[r].ok) << g.results[r].message;
    EXPECT_EQ(g.results[r].route.interface, "lo");
    EXPECT_EQ(g.results[r].route.local_address, "127.0.0.1");
  }
}

TEST(RunPreflightTest, ANodeItsPeersCannotReachIsBlamedTheSameWayEverywhere) {
  Gang g(3);
  auto closed = ProbeListener::Open("127.0.0.1");
  ASSERT_TRUE(closed.ok());
  int dead_port = (*closed)->port();
  closed->reset();
  RewritingStore rewriting(*g.store, 1, dead_port);
  g.Run(3, 3, [&](int) -> collectives::RendezvousStore& { return rewriting; });
  for (int r = 0; r < 3; ++r) {
    const auto& res = g.results[r];
    EXPECT_FALSE(res.ok);
    EXPECT_EQ(res.blamed_rank, 1) << res.message;
    EXPECT_EQ(res.blamed_node, "n1");
    // Names the node that failed to reach it, its interface and address, and the error.
    EXPECT_NE(res.message.find("cannot reach node n1 at 127.0.0.1:" + std::to_string(dead_port)),
              std::string::npos)
        << res.message;
    EXPECT_NE(res.message.find("via lo"), std::string::npos) << res.message;
    EXPECT_NE(res.message.find("refused"), std::string::npos) << res.message;
    EXPECT_EQ(res.message, g.results[0].message);  // one verdict
  }
}

TEST(RunPreflightTest, ANodeThatNeverJoinsIsBlamedByThoseWhoWaited) {
  Gang g(3);
  g.Run(3, 2,
        [&](int) -> collectives::RendezvousStore& { return *g.store; });  // rank 2 never comes
  for (int r = 0; r < 2; ++r) {
    EXPECT_FALSE(g.results[r].ok);
    EXPECT_EQ(g.results[r].blamed_rank, 2) << g.results[r].message;
    EXPECT_NE(g.results[r].message.find("did not take part"), std::string::npos)
        << g.results[r].message;
  }
}

TEST(RunPreflightTest, ANodeThatCannotReachTheMasterBlamesItselfAndSaysWhy) {
  Gang g(2);
  auto o = g.Options(1, 2);
  g.store_port.reset();  // nothing listens on the store's port
  o.timeout = 400ms;
  auto res = RunPreflight(o, *g.store);
  EXPECT_FALSE(res.ok);
  EXPECT_EQ(res.blamed_rank, 1);
  EXPECT_NE(res.message.find("node n1 (127.0.0.1 via lo) cannot reach the master at 127.0.0.1:" +
                             std::to_string(o.store_port)),
            std::string::npos)
      << res.message;
}

TEST(PreflightTest, RunsOnItsOwnThreadAndNeverCallsBackOnceDestroyed) {
  std::mutex mu;
  std::condition_variable cv;
  std::optional<PreflightResult> got;
  PreflightOptions o;
  o.node = "n1";
  o.node_rank = 1;
  o.nnodes = 2;
  o.master_addr = "127.0.0.1";
  o.store_port = 1;  // refused: retried until the deadline
  o.timeout = 300ms;
  auto connect = []() -> StatusOr<std::unique_ptr<collectives::RendezvousStore>> {
    return collectives::NewInMemoryRendezvousStore();
  };
  auto p = Preflight::Start(o, connect, [&](PreflightResult r) {
    std::lock_guard<std::mutex> l(mu);
    got = std::move(r);
    cv.notify_all();
  });
  {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, 5s, [&] { return got.has_value(); }));
    EXPECT_FALSE(got->ok);
    EXPECT_EQ(got->blamed_rank, 1);
  }
  bool called = false;
  o.timeout = 200ms;
  auto q = Preflight::Start(o, connect, [&](PreflightResult) { called = true; });
  q.reset();  // cancelled before its deadline: never calls back
  EXPECT_FALSE(called);
}

}  // namespace
}  // namespace muster::node_agent
