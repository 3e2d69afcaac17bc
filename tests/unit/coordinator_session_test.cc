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

#include "common/rpc.h"
#include "common/wire.h"
#include "coordinator/client.h"
#include "coordinator/server.h"
#include "tests/testing/port_range.h"
#include "tests/testing/reactor_fixture.h"

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

// A refused registration is asked again after 0.5 s, 1 s, 2 s, ... up to 30 s, each drawn from
// [d/2, d] (it used to be a flat 500 ms forever); only a "permission denied" is permanent.
TEST(RegisterBackoffTest, DoublesWithJitterUpToTheCapAndResets) {
  RegisterBackoff b(500ms, 30s, /*seed=*/7);
  int64_t want = 500;
  for (int i = 0; i < 12; ++i) {
    auto d = b.Next().count();
    EXPECT_GE(d, want / 2) << "refusal " << i;
    EXPECT_LE(d, want) << "refusal " << i;
    want = std::min<int64_t>(want * 2, 30000);
  }
  EXPECT_EQ(b.refusals(), 12);
  b.Reset();
  EXPECT_LE(b.Next().count(), 500);
  // Jitter: two agents refused together do not come back in step.
  RegisterBackoff x(500ms, 30s, 1), y(500ms, 30s, 2);
  bool differ = false;
  for (int i = 0; i < 8; ++i) differ |= x.Next() != y.Next();
  EXPECT_TRUE(differ);

  EXPECT_TRUE(IsPermanentRegisterRefusal(FailedPreconditionError(
      "permission denied: key 'k' (role agent) may not register as node n: outside")));
  EXPECT_FALSE(IsPermanentRegisterRefusal(UnavailableError("the coordinator refuses changes")));
  EXPECT_FALSE(IsPermanentRegisterRefusal(DeadlineExceededError("no reply")));
  EXPECT_FALSE(IsPermanentRegisterRefusal(FailedPreconditionError("node n was released")));
}

// A coordinator that refuses every registration with `refusal`, and a session against it.
class RefusedRegistrationTest : public muster::testing::ReactorZapTest {
 protected:
  void StartWith(Status refusal) {
    CreateReactor("refusing-coordinator", /*with_zap=*/false);
    RpcServer::Options o;
    o.name = "refusing";
    o.endpoint = "tcp://127.0.0.1:*";
    o.insecure = true;
    auto server = RpcServer::Create(
        *reactor_, o, [this, refusal](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply r) {
          if (req.has_agent_register()) {
            std::lock_guard<std::mutex> l(mu_);
            attempts_.push_back(Clock::now());
          }
          r(ErrorEnvelope(req.request_id(), refusal));
        });
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    reactor_->Start();
    coordinator::ClientOptions co;
    co.endpoint = server_->endpoint();
    co.insecure = true;
    auto ctl = coordinator::CoordinatorClient::Connect(co);
    auto poll = coordinator::CoordinatorClient::Connect(co);
    ASSERT_TRUE(ctl.ok() && poll.ok());
    watchdog_ = std::make_unique<LeaseWatchdog>(100ms, [](std::chrono::milliseconds) {});
    CoordinatorSession::Delegate d;
    d.running = [] { return std::vector<proto::RunningAssignment>(); };
    d.snapshot = [] {
      return std::make_pair(std::vector<proto::RunningAssignment>(),
                            CoordinatorSession::ProgressMap());
    };
    d.return_progress = [](CoordinatorSession::ProgressMap) {};
    d.on_action = [](const proto::AgentAction&) {};
    d.on_fatal = [this](const Status& st) {
      std::lock_guard<std::mutex> l(mu_);
      fatal_.push_back(st);
    };
    proto::NodeLabels labels;
    labels.set_name("refused-1");
    labels.set_provider("aws");
    session_ = std::make_unique<CoordinatorSession>(std::move(*ctl), std::move(*poll), labels,
                                                    3000ms, watchdog_.get(), d);
    session_->Start();
  }
  void TearDown() override {
    session_.reset();
    watchdog_.reset();
    ReactorZapTest::TearDown();
  }
  void ReleaseOnReactor() override { server_.reset(); }
  size_t Attempts() {
    std::lock_guard<std::mutex> l(mu_);
    return attempts_.size();
  }

  std::unique_ptr<RpcServer> server_;
  std::unique_ptr<LeaseWatchdog> watchdog_;
  std::unique_ptr<CoordinatorSession> session_;
  std::mutex mu_;
  std::vector<Clock::time_point> attempts_;  // GUARDED_BY(mu_)
  std::vector<Status> fatal_;                // GUARDED_BY(mu_)
};

// An answered refusal that may pass (Unavailable: the coordinator refuses changes until its
// database is fixed) is asked again with a growing wait, not every 500 ms.
TEST_F(RefusedRegistrationTest, ARefusalThatMayPassIsRetriedWithExponentialBackoff) {
  StartWith(UnavailableError("the coordinator refuses changes since a durable write failed"));
  // 5 attempts: waits of [250,500], [500,1000], [1000,2000], [2000,4000] ms (flat 500 ms before).
  ASSERT_TRUE(WaitUntil([&] { return Attempts() >= 5; }, 15s)) << Attempts() << " attempts";
  std::lock_guard<std::mutex> l(mu_);
  for (size_t i = 1; i < 5; ++i) {
    auto gap =
        std::chrono::duration_cast<std::chrono::milliseconds>(attempts_[i] - attempts_[i - 1]);
    EXPECT_GE(gap.count(), (250 << (i - 1)) - 20) << "wait before attempt " << i + 1;
  }
  EXPECT_TRUE(fatal_.empty());
}

// A permanent refusal (the key's scope) ends the asking and is handed to on_fatal once.
TEST_F(RefusedRegistrationTest, APermanentRefusalEndsTheAskingAndIsFatal) {
  StartWith(FailedPreconditionError(
      "permission denied: key 'k' (role agent) may not register as node refused-1: node name "
      "'refused-1' is outside the key's scope (nodes=other)"));
  ASSERT_TRUE(WaitUntil(
      [&] {
        std::lock_guard<std::mutex> l(mu_);
        return !fatal_.empty();
      },
      10s));
  session_->RequestStop();
  session_->Join();
  std::lock_guard<std::mutex> l(mu_);
  ASSERT_EQ(fatal_.size(), 1u);
  EXPECT_NE(fatal_[0].message().find("outside the key's scope"), std::string::npos);
  EXPECT_EQ(attempts_.size(), 1u) << "a permanent refusal is not asked again";
}

}  // namespace
}  // namespace muster::node_agent
