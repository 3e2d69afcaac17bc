// The conformance suite, ranks as threads on the in-memory store: every backend that can run
// in one process x world sizes 1, 2, 3, 4, 8; each rank runs every collective, op and dtype
// against the CPU reference (conformance_checks.h).

#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "collectives/communicator.h"
#include "tests/collectives/conformance_checks.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;

struct Param {
  Backend backend;
  int size;
};

class ConformanceTest : public ::testing::TestWithParam<Param> {};

TEST_P(ConformanceTest, EveryCollectiveOpAndDtypeMatchesTheReference) {
  const Param p = GetParam();
  std::shared_ptr<RendezvousStore> store = NewInMemoryRendezvousStore();
  std::vector<Status> results(p.size);
  std::vector<int> checks(p.size, 0);
  std::vector<std::thread> ranks;
  for (int r = 0; r < p.size; ++r) {
    ranks.emplace_back([&, r] {
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
  return std::string(BackendName(info.param.backend)) + "_np" + std::to_string(info.param.size);
}

INSTANTIATE_TEST_SUITE_P(Gloo, ConformanceTest,
                         ::testing::Values(Param{Backend::kGloo, 1}, Param{Backend::kGloo, 2},
                                           Param{Backend::kGloo, 3}, Param{Backend::kGloo, 4},
                                           Param{Backend::kGloo, 8}),
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
