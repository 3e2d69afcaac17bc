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
  std::shared_ptr<Store> store = NewInMemoryStore();
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
    // 6 dtypes x 2 counts x (4 ops x 2 + broadcast + allgather) + barrier.
    EXPECT_EQ(checks[r], 6 * 2 * 10 + 1) << "rank " << r;
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
  std::shared_ptr<Store> store = NewInMemoryStore();
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
  std::shared_ptr<Store> store = NewInMemoryStore();
  CommConfig c;
  c.rank = 0;
  c.size = 2;
  c.timeout = 500ms;
  auto t0 = std::chrono::steady_clock::now();
  auto comm = CreateCommunicator(Backend::kGloo, store, c);
  EXPECT_FALSE(comm.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
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
