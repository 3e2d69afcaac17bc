// The conformance suite, ranks as threads on the in-memory store: every backend that can run
// in one process x world sizes 1, 2, 3, 4, 8; each rank runs every collective, op and dtype
// against the CPU reference (conformance_checks.h). Gloo also meets on the ZeroMQ store (CURVE),
// each rank with its own connection (direct) or through relays of two ranks each (relayed, as
// under node agents: collectives/rendezvous_relay.h).

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <thread>

#include "collectives/communicator.h"
#include "collectives/rendezvous_client.h"
#include "collectives/rendezvous_relay.h"
#include "collectives/rendezvous_server.h"
#include "tests/collectives/conformance_checks.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;

enum class StorePath { kMemory, kDirect, kRelayed };

struct Param {
  Backend backend;
  int size;
  StorePath path = StorePath::kMemory;
};

// The ZeroMQ store on its own reactor, and, for the relayed path, relays of two ranks each.
class ZmqStores {
 public:
  ZmqStores(int size, bool relayed) : reactor_("conformance-store") {
    zap_ = std::move(*ZapAuthenticator::Create(reactor_));
    server_ = std::move(*RendezvousServer::Create(reactor_, zap_.get(), {}));
    creds_ = *RdzvCredentials::Parse(*server_->AddScope("conformance", 0));
    reactor_.Start();
    if (!relayed) return;
    std::string templ = "/tmp/relay-conformance-XXXXXX";
    if (mkdtemp(templ.data()) != nullptr) dir_ = templ;
    for (int node = 0; node * 2 < size; ++node) {
      RendezvousRelay::Options o;
      o.socket_parent = dir_;
      o.upstream_endpoint = server_->endpoint();
      o.credentials = creds_;
      o.job = "conformance";
      for (int r = node * 2; r < std::min(size, node * 2 + 2); ++r) o.local_ranks.push_back(r);
      // Every gather both local ranks join reaches them through the relay's file, however
      // small: the checks cover that path too.
      o.shared_gather_min_bytes = 1;
      auto relay = reactor_.Call("relay", [&] { return RendezvousRelay::Create(reactor_, o); });
      EXPECT_TRUE(relay.ok()) << relay.status();
      if (relay.ok()) relays_.push_back(std::move(*relay));
    }
  }
  ~ZmqStores() {
    reactor_.Call("teardown", [&] {
      relays_.clear();
      server_.reset();
      zap_.reset();
    });
    reactor_.Stop();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  StatusOr<std::shared_ptr<RendezvousStore>> ClientFor(int rank) {
    RendezvousClient::Options o;
    o.endpoint = relays_.empty() ? server_->endpoint() : relays_.at(rank / 2)->endpoint();
    o.credentials = creds_;
    o.job = "conformance";
    MUSTER_ASSIGN_OR_RETURN(auto c, RendezvousClient::Connect(o));
    return std::shared_ptr<RendezvousStore>(std::move(c));
  }

 private:
  Reactor reactor_;
  std::unique_ptr<ZapAuthenticator> zap_;
  std::unique_ptr<RendezvousServer> server_;
  RdzvCredentials creds_;
  std::string dir_;
  std::vector<std::unique_ptr<RendezvousRelay>> relays_;
};

class ConformanceTest : public ::testing::TestWithParam<Param> {};

TEST_P(ConformanceTest, EveryCollectiveOpAndDtypeMatchesTheReference) {
  const Param p = GetParam();
  std::shared_ptr<RendezvousStore> memory = NewInMemoryRendezvousStore();
  std::unique_ptr<ZmqStores> zmq;
  if (p.path != StorePath::kMemory) {
    zmq = std::make_unique<ZmqStores>(p.size, p.path == StorePath::kRelayed);
  }
  std::vector<Status> results(p.size);
  std::vector<int> checks(p.size, 0);
  std::vector<std::thread> ranks;
  for (int r = 0; r < p.size; ++r) {
    ranks.emplace_back([&, r] {
      std::shared_ptr<RendezvousStore> store = memory;
      if (zmq) {
        auto client = zmq->ClientFor(r);
        if (!client.ok()) {
          results[r] = client.status();
          return;
        }
        store = std::move(*client);
      }
      CommConfig c;
      c.rank = r;
      c.size = p.size;
      c.timeout = 10s;
      auto comm = CreateCommunicator(p.backend, store, c);
      if (!comm.ok()) {
        results[r] = comm.status();
        return;
      }
      auto report = testing::RunConformance(**comm);
      results[r] = report.status();
      if (report.ok()) checks[r] = report->checks;
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < p.size; ++r) {
    EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    // 8 reducible dtypes x 2 counts x (4 ops x 2 + broadcast + allgather), bool x 2 counts x
    // (reductions refused + broadcast + allgather), barrier.
    EXPECT_EQ(checks[r], 8 * 2 * 10 + 2 * 3 + 1) << "rank " << r;
  }
}

std::string Name(const ::testing::TestParamInfo<Param>& info) {
  const char* path = info.param.path == StorePath::kDirect    ? "_direct"
                     : info.param.path == StorePath::kRelayed ? "_relayed"
                                                              : "";
  return std::string(BackendName(info.param.backend)) + "_np" + std::to_string(info.param.size) +
         path;
}

INSTANTIATE_TEST_SUITE_P(Gloo, ConformanceTest,
                         ::testing::Values(Param{Backend::kGloo, 1}, Param{Backend::kGloo, 2},
                                           Param{Backend::kGloo, 3}, Param{Backend::kGloo, 4},
                                           Param{Backend::kGloo, 8},
                                           Param{Backend::kGloo, 4, StorePath::kDirect},
                                           Param{Backend::kGloo, 3, StorePath::kRelayed},
                                           Param{Backend::kGloo, 4, StorePath::kRelayed}),
                         Name);

TEST(CommunicatorTest, BadConfigIsRefused) {
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  CommConfig c;
  c.rank = 2;
  c.size = 2;
  EXPECT_EQ(CreateCommunicator(Backend::kGloo, store, c).status().code(),
            StatusCode::kInvalidArgument);
  c.rank = 0;
  EXPECT_EQ(CreateCommunicator(Backend::kGloo, nullptr, c).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(CommunicatorTest, RendezvousTimesOutWhenAPeerNeverComes) {
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  CommConfig c;
  c.rank = 0;
  c.size = 2;
  c.timeout = 500ms;
  auto t0 = std::chrono::steady_clock::now();
  auto comm = CreateCommunicator(Backend::kGloo, store, c);
  EXPECT_FALSE(comm.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
}

// Two Gloo ranks as threads; returns rank 0's and rank 1's communicators.
std::pair<std::unique_ptr<Communicator>, std::unique_ptr<Communicator>> Pair(
    std::chrono::milliseconds timeout) {
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  std::unique_ptr<Communicator> c1;
  std::thread t([&] {
    CommConfig c;
    c.rank = 1;
    c.size = 2;
    c.timeout = timeout;
    auto comm = CreateCommunicator(Backend::kGloo, store, c);
    if (comm.ok()) c1 = std::move(*comm);
  });
  CommConfig c;
  c.size = 2;
  c.timeout = timeout;
  auto c0 = CreateCommunicator(Backend::kGloo, store, c);
  t.join();
  EXPECT_TRUE(c0.ok()) << c0.status();
  EXPECT_TRUE(c1 != nullptr);
  return {c0.ok() ? std::move(*c0) : nullptr, std::move(c1)};
}

TEST(CommunicatorTest, WorkWaitHonoursTheCallersDeadline) {
  auto [c0, c1] = Pair(10s);
  ASSERT_TRUE(c0 && c1);
  std::vector<float> a(1000, 1.0f), b(1000, 2.0f);
  auto w0 = c0->AllReduce(a.data(), a.size(), DType::kF32, ReduceOp::kSum);
  // Rank 1 has not joined: a short wait gives up, the collective goes on.
  EXPECT_EQ(w0->Wait(std::chrono::steady_clock::now() + 100ms).code(),
            StatusCode::kDeadlineExceeded);
  EXPECT_FALSE(w0->Done());
  auto w1 = c1->AllReduce(b.data(), b.size(), DType::kF32, ReduceOp::kSum);
  EXPECT_TRUE(w0->Wait().ok());
  EXPECT_TRUE(w1->Wait().ok());
  EXPECT_EQ(a[999], 3.0f);
  EXPECT_EQ(b[0], 3.0f);
}

TEST(CommunicatorTest, APeerThatLeavesFailsTheCollectiveAndTheCommunicatorStaysFailed) {
  auto [c0, c1] = Pair(2s);
  ASSERT_TRUE(c0 && c1);
  std::vector<float> a(1 << 16, 1.0f);
  c1.reset();  // closes rank 1's connections
  auto t0 = std::chrono::steady_clock::now();
  Status s = c0->AllReduce(a.data(), a.size(), DType::kF32, ReduceOp::kSum)->Wait();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.code() == StatusCode::kAborted || s.code() == StatusCode::kDeadlineExceeded) << s;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s + 1s);
  // Later collectives fail at once with the first error.
  t0 = std::chrono::steady_clock::now();
  Status again = c0->Barrier()->Wait();
  EXPECT_EQ(again.code(), s.code());
  EXPECT_NE(again.message().find("failed earlier"), std::string::npos) << again;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 100ms);
}

TEST(CommunicatorTest, UnbuiltOrUnknownBackendsSaySo) {
  EXPECT_EQ(ParseBackend("ucc").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseBackend("nccl"), Backend::kNccl);
}

TEST(CommunicatorTest, HalfAndBFloat16RoundTrip) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 1e-7f, 3.140625f}) {
    EXPECT_EQ(HalfToFloat(FloatToHalf(f)), HalfToFloat(FloatToHalf(HalfToFloat(FloatToHalf(f)))));
  }
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f)), 1.0f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(-2.5f)), -2.5f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(1e6f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + 1.0f / 4096)), 1.0f);  // rounds to even
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(3.0f)), 3.0f);
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(1.0f + 1.0f / 512)), 1.0f);
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(NAN))));
}

}  // namespace
}  // namespace muster::collectives
