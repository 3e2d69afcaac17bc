// CoordinatorSession on its own, against a real coordinator: no reactor, no ranks. A fake
// delegate stands in for the assignment runner.

#include "node_agent/coordinator_session.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <thread>

#include "coordinator/client.h"
#include "coordinator/server.h"
#include "tests/testing/port_range.h"

namespace muster::node_agent {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

template <typename F>
bool WaitUntil(F pred, std::chrono::milliseconds timeout) {
  auto end = Clock::now() + timeout;
  while (Clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

// A coordinator, and a session against it whose delegate records what it is asked.
class CoordinatorSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("agentsplit-session-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    coordinator::ServerOptions so;
    so.data_dir = dir_;
    so.listen = "tcp://127.0.0.1:*";
    so.insecure = true;
    so.coordinator.heartbeat_interval = 100ms;
    so.coordinator.heartbeat_timeout = 6000ms;
    so.coordinator.lease = 8000ms;
    so.coordinator.rendezvous_port_base = ports_.base();
    auto server = coordinator::CoordinatorServer::Start(so);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    co_.endpoint = server_->endpoint();
    co_.insecure = true;
    auto ctl = coordinator::CoordinatorClient::Connect(co_);
    auto poll = coordinator::CoordinatorClient::Connect(co_);
    ASSERT_TRUE(ctl.ok() && poll.ok());
    watchdog_ =
        std::make_unique<LeaseWatchdog>(100ms, [this](std::chrono::milliseconds) { ++expiries_; });
    CoordinatorSession::Delegate d;
    d.running = [] { return std::vector<proto::RunningAssignment>(); };
    d.snapshot = [this] {
      ++snapshots_;
      return std::make_pair(std::vector<proto::RunningAssignment>(),
                            CoordinatorSession::ProgressMap());
    };
    d.return_progress = [](CoordinatorSession::ProgressMap) {};
    d.on_action = [this](const proto::AgentAction& a) {
      std::lock_guard<std::mutex> l(mu_);
      actions_.push_back(a);
    };
    proto::NodeLabels labels;
    labels.set_name("session-1");
    labels.set_provider("aws");
    labels.set_slots(1);
    labels.set_address("127.0.0.1");
    session_ = std::make_unique<CoordinatorSession>(std::move(*ctl), std::move(*poll), labels,
                                                    3000ms, watchdog_.get(), d);
    session_->Start();
    ASSERT_TRUE(WaitUntil([&] { return !session_->session().empty(); }, 10s));
  }
  void TearDown() override {
    session_.reset();
    watchdog_.reset();
    server_.reset();
    fs::remove_all(dir_);
  }

  fs::path dir_;
  muster::testing::PortRange ports_;
  std::unique_ptr<coordinator::CoordinatorServer> server_;
  coordinator::ClientOptions co_;
  std::unique_ptr<LeaseWatchdog> watchdog_;
  std::unique_ptr<CoordinatorSession> session_;
  std::atomic<int> expiries_{0}, snapshots_{0};
  std::mutex mu_;
  std::vector<proto::AgentAction> actions_;  // GUARDED_BY(mu_)
};

TEST_F(CoordinatorSessionTest, HeartbeatsFeedTheLeaseAndStopDoesNotWaitOutTheLongPoll) {
  // Heartbeats go out on the coordinator's interval and keep the lease fed.
  ASSERT_TRUE(WaitUntil([&] { return snapshots_.load() >= 5; }, 10s));
  EXPECT_FALSE(watchdog_->expired());
  EXPECT_EQ(expiries_.load(), 0);
  // With nothing to do for this node, the 10 s long poll is outstanding: Stop replaces it with
  // an immediate one, so both threads end at once.
  auto t0 = Clock::now();
  session_->RequestStop();
  session_->Join();
  EXPECT_TRUE(session_->stopping());
  EXPECT_LT(Clock::now() - t0, 2s);
}

TEST_F(CoordinatorSessionTest, AStartForThisNodeReachesTheDelegateAndAReportIsSent) {
  auto client = coordinator::CoordinatorClient::Connect(co_);
  ASSERT_TRUE(client.ok());
  auto job = (*client)->Submit("name: s\ncommand: [\"/bin/true\"]\nnodes: 1\nranks_per_node: 1\n",
                               "s.yaml");
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(WaitUntil(
      [&] {
        std::lock_guard<std::mutex> l(mu_);
        for (const auto& a : actions_) {
          if (a.has_start() && a.start().job_id() == *job) return true;
        }
        return false;
      },
      10s));
  proto::AgentReport r;
  r.set_job_id(*job);
  r.set_attempt(1);
  r.set_started(true);
  auto t0 = Clock::now();
  session_->QueueReport(r);
  // WaitSent wakes when the last queued message is sent, not at its deadline (it used to wait
  // for the next unrelated notification, which made agent shutdown take up to 2 s more).
  EXPECT_TRUE(session_->WaitSent(t0 + 20s));
  EXPECT_LT(Clock::now() - t0, 10s);
}

}  // namespace
}  // namespace muster::node_agent
