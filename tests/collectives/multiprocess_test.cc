// Collectives across real processes: the conformance checks with one process per rank (Gloo
// ranks started by the real launcher, `muster run -np N`; MPI ranks by mpirun), and kill -9 of
// one rank in the middle of an allreduce loop.
//
// The failure tests start their ranks themselves (StartRanks(), with the env contract of
// DESIGN.md and a CURVE store hosted by the test, as `muster run` does): they check each
// surviving rank's own exit code and timing, which `muster run` hides by stopping every other
// rank at the first failure. tests/integration/run_test.cc covers what `muster run` reports.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "collectives/communicator.h"
#include "collectives/rendezvous_server.h"
#include "tests/testing/child_process.h"
#include "tests/testing/reactor_fixture.h"

namespace muster::collectives {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

using Child = ::muster::testing::Child;

// Hosts a CURVE rendezvous store, as the launcher does, and starts ranks with the env contract.
class MultiProcessTest : public ::muster::testing::ReactorZapTest {
 protected:
  void SetUp() override {
    CreateReactor("mp-test");
    if (HasFatalFailure()) return;
    auto s = RendezvousServer::Create(*reactor_, zap_.get(), {});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_->Start();
  }
  void ReleaseOnReactor() override { server_.reset(); }

  std::vector<std::unique_ptr<Child>> StartRanks(int np, std::vector<std::string> args,
                                                 uint64_t attempt = 0) {
    auto creds = server_->AddScope("mp", attempt);
    EXPECT_TRUE(creds.ok()) << creds.status();
    std::vector<std::unique_ptr<Child>> ranks;
    for (int r = 0; r < np; ++r) {
      std::vector<std::string> argv = {MUSTER_CONFORMANCE_RANK};
      argv.insert(argv.end(), args.begin(), args.end());
      ranks.push_back(
          std::make_unique<Child>(argv, std::map<std::string, std::string>{
                                            {"RANK", std::to_string(r)},
                                            {"WORLD_SIZE", std::to_string(np)},
                                            {"LOCAL_RANK", std::to_string(r)},
                                            {"LOCAL_WORLD_SIZE", std::to_string(np)},
                                            {"NODE_RANK", "0"},
                                            {"MASTER_ADDR", "127.0.0.1"},
                                            {"MUSTER_JOB_ID", "mp"},
                                            {"MUSTER_ATTEMPT", std::to_string(attempt)},
                                            {"MUSTER_RDZV_ENDPOINT", server_->endpoint()},
                                            {"MUSTER_RDZV_KEY", *creds},
                                            {"MUSTER_COLL_BACKEND", "gloo"},
                                            {"MUSTER_COLL_TIMEOUT_MS", "2000"},
                                        }));
    }
    return ranks;
  }

  std::unique_ptr<RendezvousServer> server_;
};

// `muster run -np N` hosts the rendezvous store (CURVE, the attempt's key) and gives each rank
// the env contract; the rank builds its Gloo communicator from it (Communicator::FromEnv).
class GlooProcessConformance : public ::testing::TestWithParam<int> {};

TEST_P(GlooProcessConformance, EveryRankPassesTheChecksUnderMusterRun) {
  int np = GetParam();
  Child run({MUSTER_BIN, "run", "-np", std::to_string(np), "--tag-output", "--timeout", "60", "--",
             MUSTER_CONFORMANCE_RANK},
            {{"MUSTER_COLL_BACKEND", "gloo"}, {"MUSTER_COLL_TIMEOUT_MS", "10000"}});
  int code = run.WaitExit(Clock::now() + 90s);
  ASSERT_EQ(code, 0) << run.Output();
  for (int r = 0; r < np; ++r) {
    std::string line = "[" + std::to_string(r) + "] rank " + std::to_string(r) + " of " +
                       std::to_string(np) + " (gloo): 167 checks ok";
    EXPECT_NE(run.Output().find(line), std::string::npos) << line << " not in:\n" << run.Output();
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, GlooProcessConformance, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "np" + std::to_string(info.param); });

TEST_F(MultiProcessTest, KillNineMidAllreduceFailsEveryOtherRankWithinTheTimeout) {
  constexpr int kNp = 4, kVictim = 2;
  auto ranks = StartRanks(kNp, {"--loop"});
  for (int r = 0; r < kNp; ++r) {
    ASSERT_TRUE(ranks[r]->WaitOutput("looping", Clock::now() + 30s)) << "rank " << r << ":\n"
                                                                     << ranks[r]->Output();
  }
  auto killed_at = Clock::now();
  ranks[kVictim]->Kill(SIGKILL);
  EXPECT_EQ(ranks[kVictim]->WaitExit(Clock::now() + 5s), 128 + SIGKILL);
  for (int r = 0; r < kNp; ++r) {
    if (r == kVictim) continue;
    // The collective timeout is 2 s; allow for a loaded 2-core machine beyond it.
    int code = ranks[r]->WaitExit(killed_at + 5s);
    ASSERT_EQ(code, kPeerFailureExitCode) << "rank " << r << ":\n" << ranks[r]->Output();
    EXPECT_LT(ranks[r]->exit_time() - killed_at, 2s + 1500ms) << ranks[r]->Output();
    EXPECT_NE(ranks[r]->Output().find("failed after"), std::string::npos) << ranks[r]->Output();
  }
}

TEST_F(MultiProcessTest, AStalledRankFailsTheOthersAtTheCollectiveTimeout) {
  // SIGSTOP leaves the victim's sockets open: only the 2 s collective timeout can end the wait.
  constexpr int kNp = 3, kVictim = 0;
  auto ranks = StartRanks(kNp, {"--loop"});
  for (int r = 0; r < kNp; ++r) {
    ASSERT_TRUE(ranks[r]->WaitOutput("looping", Clock::now() + 30s)) << ranks[r]->Output();
  }
  auto stopped_at = Clock::now();
  ranks[kVictim]->Kill(SIGSTOP);
  for (int r = 0; r < kNp; ++r) {
    if (r == kVictim) continue;
    int code = ranks[r]->WaitExit(stopped_at + 8s);
    ASSERT_EQ(code, kPeerFailureExitCode) << "rank " << r << ":\n" << ranks[r]->Output();
    EXPECT_GE(ranks[r]->exit_time() - stopped_at, 1500ms) << ranks[r]->Output();
    EXPECT_LT(ranks[r]->exit_time() - stopped_at, 2s + 3s) << ranks[r]->Output();
  }
  ranks[kVictim]->Kill(SIGKILL);
}

TEST_F(MultiProcessTest, ARankThatNeverArrivesTimesOutTheRendezvous) {
  auto ranks = StartRanks(3, {});
  ranks.pop_back();  // rank 2 is killed before it can join
  for (auto& r : ranks) {
    int code = r->WaitExit(Clock::now() + 10s);
    EXPECT_EQ(code, kPeerFailureExitCode) << r->Output();
  }
}

#if MUSTER_HAVE_MPI_VALUE
class MpiProcessConformance : public ::testing::TestWithParam<int> {};

TEST_P(MpiProcessConformance, EveryRankPassesTheChecksUnderMpirun) {
  int np = GetParam();
  Child mpirun({"/usr/bin/mpirun", "--allow-run-as-root", "--oversubscribe", "--mca",
                "btl_tcp_if_include", "lo", "-np", std::to_string(np), MUSTER_CONFORMANCE_RANK},
               {{"MUSTER_RDZV_ENDPOINT", ""}, {"MUSTER_COLL_BACKEND", ""}});
  int code = mpirun.WaitExit(Clock::now() + 90s);
  ASSERT_EQ(code, 0) << mpirun.Output();
  for (int r = 0; r < np; ++r) {
    EXPECT_NE(mpirun.Output().find("rank " + std::to_string(r) + " of " + std::to_string(np) +
                                   " (mpi): 167 checks ok"),
              std::string::npos)
        << mpirun.Output();
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, MpiProcessConformance, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "np" + std::to_string(info.param); });
#endif

}  // namespace
}  // namespace muster::collectives
