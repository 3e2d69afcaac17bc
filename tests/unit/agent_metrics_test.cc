// The agent's /metrics: its rendering from a snapshot (pure), and the server over a real socket
// (publication from the reactor, 404/400/405 JSON errors, the bearer token beyond loopback).

#include "node_agent/metrics/agent_metrics.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>

#include "common/reactor.h"
#include "node_agent/metrics/metrics_server.h"
#include "tests/testing/http_get.h"
#include "tests/testing/wait_until.h"

namespace muster::node_agent {
namespace {

using namespace std::chrono_literals;
using testing::HttpGet;
using testing::WaitUntil;

bool Has(const std::string& text, const std::string& line) {
  return text.find(line + "\n") != std::string::npos;
}

AgentMetricsSnapshot Sample() {
  AgentMetricsSnapshot s;
  s.time_ms = 1'000'000;
  s.node = "aws-1";
  s.provider = "aws";
  RankMetrics r0;
  r0.job_id = "ft-1";
  r0.attempt = 2;
  r0.rank = 0;
  r0.pid = 4242;
  r0.state = "running";
  r0.started_ms = 900'000;
  r0.last_output_ms = 997'500;
  r0.last_progress_ms = 990'000;
  RankMetrics r1 = r0;
  r1.rank = 1;
  r1.pid = 4243;
  r1.last_output_ms = 0;  // printed nothing yet: aged from its start
  r1.last_progress_ms = 0;
  RankMetrics r2 = r0;
  r2.rank = 2;
  r2.pid = 4244;
  r2.state = "exited";
  s.ranks = {r0, r1, r2};
  CopyMetrics c;
  c.job_id = "ft-1";
  c.volume = "ckpt";
  c.source_node = "gcp-1";
  c.step = 40;
  c.bytes = 8 << 20;
  c.seconds = 2;
  s.copies = {c};
  s.notices = {{"file", 1}, {"sigterm", 2}};
  return s;
}

TEST(AgentMetricsRenderTest, RanksAgesCopiesAndNotices) {
  std::string text = RenderAgentMetrics(Sample());
  const std::string node = "node=\"aws-1\",provider=\"aws\"";
  const std::string id = node + ",job_id=\"ft-1\",attempt=\"2\"";
  EXPECT_TRUE(
      Has(text, "muster_agent_rank_info{" + id + ",rank=\"0\",pid=\"4242\",state=\"running\"} 1"))
      << text;
  EXPECT_TRUE(
      Has(text, "muster_agent_rank_info{" + id + ",rank=\"2\",pid=\"4244\",state=\"exited\"} 1"))
      << text;
  EXPECT_TRUE(Has(text, "muster_agent_ranks{" + node + ",state=\"running\"} 2")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_ranks{" + node + ",state=\"exited\"} 1")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_ranks{" + node + ",state=\"stopping\"} 0")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_rank_last_output_age_seconds{" + id + ",rank=\"0\"} 2.5"))
      << text;
  EXPECT_TRUE(Has(text, "muster_agent_rank_last_output_age_seconds{" + id + ",rank=\"1\"} 100"))
      << text;
  EXPECT_TRUE(Has(text, "muster_agent_rank_last_progress_age_seconds{" + id + ",rank=\"0\"} 10"))
      << text;
  // No progress line yet, or the process is gone: no age.
  EXPECT_EQ(text.find("muster_agent_rank_last_progress_age_seconds{" + id + ",rank=\"1\"}"),
            std::string::npos);
  EXPECT_EQ(text.find("muster_agent_rank_last_output_age_seconds{" + id + ",rank=\"2\"}"),
            std::string::npos);
  const std::string copy =
      node + ",job_id=\"ft-1\",volume=\"ckpt\",step=\"40\",source_node=\"gcp-1\"";
  EXPECT_TRUE(Has(text, "muster_agent_replication_copies_in_flight{" + node + "} 1")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_replication_copy_bytes{" + copy + "} 8388608")) << text;
  EXPECT_TRUE(
      Has(text, "muster_agent_replication_copy_rate_bytes_per_second{" + copy + "} 4194304"))
      << text;
  EXPECT_TRUE(Has(text, "# TYPE muster_agent_notices_total counter")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_notices_total{" + node + ",source=\"sigterm\"} 2")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_snapshot_timestamp_seconds{" + node + "} 1000")) << text;
  // Snapshots off: no memory series.
  EXPECT_EQ(text.find("snapshot_memory"), std::string::npos);
}

TEST(AgentMetricsRenderTest, SnapshotMemoryWhenEnabledAndEscapedLabels) {
  AgentMetricsSnapshot s = Sample();
  s.snapshots = true;
  s.snapshot_used = 100;
  s.snapshot_reserved = 300;
  s.snapshot_limit = 1000;
  s.snapshot_offered = 5000;
  s.snapshot_offered_sent = 700;
  s.ranks[0].job_id = "a\"b\\c";
  std::string text = RenderAgentMetrics(s);
  const std::string node = "{node=\"aws-1\",provider=\"aws\"}";
  EXPECT_TRUE(Has(text, "muster_agent_snapshot_memory_used_bytes" + node + " 100")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_snapshot_memory_reserved_bytes" + node + " 300")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_snapshot_memory_limit_bytes" + node + " 1000")) << text;
  EXPECT_TRUE(Has(text, "# TYPE muster_agent_snapshot_peer_offered_bytes_total counter")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_snapshot_peer_offered_bytes_total" + node + " 5000")) << text;
  EXPECT_TRUE(Has(text, "muster_agent_snapshot_peer_offered_sent_bytes_total" + node + " 700"))
      << text;
  EXPECT_NE(text.find("job_id=\"a\\\"b\\\\c\""), std::string::npos) << text;
}

class AgentMetricsServerTest : public ::testing::Test {
 protected:
  void SetUp() override { reactor_.Start(); }
  void TearDown() override {
    if (server_) {
      reactor_.Call("stop", [&] {
        server_->Stop();
        return 0;
      });
    }
    reactor_.Stop();
    server_.reset();
  }
  Status Start(AgentMetricsOptions o) {
    auto s = reactor_.Call("start", [&] {
      return AgentMetricsServer::Start(reactor_, o, [this] {
        EXPECT_TRUE(reactor_.InReactorThread()) << "collect runs on the agent's reactor";
        AgentMetricsSnapshot snap = Sample();
        snap.notices = {{"file", collected_.fetch_add(1) + 1}};
        return snap;
      });
    });
    if (!s.ok()) return s.status();
    server_ = std::move(*s);
    return Status::Ok();
  }
  Reactor reactor_{"agent-metrics-test"};
  std::atomic<uint64_t> collected_{0};
  std::unique_ptr<AgentMetricsServer> server_;
};

TEST_F(AgentMetricsServerTest, ServesTheNewestSnapshotAndJsonErrors) {
  AgentMetricsOptions o;
  o.listen = "127.0.0.1:0";
  o.publish_interval = 20ms;
  ASSERT_TRUE(Start(o).ok());
  int port = server_->port();
  ASSERT_GT(port, 0);
  EXPECT_EQ(server_->url(), "http://127.0.0.1:" + std::to_string(port) + "/metrics");
  auto m = HttpGet(port, "/metrics");
  ASSERT_EQ(m.code, 200) << m.body;
  EXPECT_NE(m.headers.find("text/plain; version=0.0.4"), std::string::npos) << m.headers;
  EXPECT_NE(m.body.find("muster_agent_rank_info{"), std::string::npos) << m.body;
  // Republished from the reactor: the counter the collector bumps moves on.
  uint64_t seen_at = collected_.load();
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto r = HttpGet(port, "/metrics");
        return r.body.find("source=\"file\"} " + std::to_string(seen_at + 2)) != std::string::npos;
      },
      10s));

  auto nf = HttpGet(port, "/api/jobs");
  EXPECT_EQ(nf.code, 404);
  EXPECT_EQ(nlohmann::json::parse(nf.body)["code"], "NotFound") << nf.body;
  auto bad = HttpGet(port, "/metrics?x=1");
  EXPECT_EQ(bad.code, 400);
  EXPECT_EQ(nlohmann::json::parse(bad.body)["code"], "InvalidArgument") << bad.body;
  EXPECT_EQ(HttpGet(port, "/metrics", "", "POST").code, 405);
  auto head = HttpGet(port, "/metrics", "", "HEAD");
  EXPECT_EQ(head.code, 200);
  EXPECT_TRUE(head.body.empty());
}

// Serving reads only the published snapshot: a stalled reactor (the agent's, busy or stuck)
// does not hold up a scrape.
TEST_F(AgentMetricsServerTest, AStalledReactorDoesNotBlockAScrape) {
  AgentMetricsOptions o;
  o.listen = "127.0.0.1:0";
  o.publish_interval = 20ms;
  ASSERT_TRUE(Start(o).ok());
  std::mutex mu;
  std::condition_variable cv;
  bool stalled = false, release = false;
  reactor_.Post("stall", [&] {
    std::unique_lock<std::mutex> l(mu);
    stalled = true;
    cv.notify_all();
    cv.wait(l, [&] { return release; });
  });
  {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, 10s, [&] { return stalled; }));
  }
  auto t0 = std::chrono::steady_clock::now();
  auto m = HttpGet(server_->port(), "/metrics");
  auto took = std::chrono::steady_clock::now() - t0;
  {
    std::lock_guard<std::mutex> l(mu);
    release = true;
  }
  cv.notify_all();
  EXPECT_EQ(m.code, 200);
  EXPECT_NE(m.body.find("muster_agent_rank_info{"), std::string::npos) << m.body;
  EXPECT_LT(took, 5s) << "answered while the reactor was stalled";
}

TEST_F(AgentMetricsServerTest, BeyondLoopbackTheBearerTokenIsRequired) {
  AgentMetricsOptions o;
  o.listen = "0.0.0.0:0";
  Status st = Start(o);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("http_token"), std::string::npos) << st;

  o.token = std::string(64, 'a');
  ASSERT_TRUE(Start(o).ok());
  int port = server_->port();
  auto none = HttpGet(port, "/metrics");
  EXPECT_EQ(none.code, 401);
  EXPECT_NE(none.headers.find("WWW-Authenticate: Bearer"), std::string::npos);
  EXPECT_EQ(
      HttpGet(port, "/metrics", "Authorization: Bearer " + std::string(64, 'b') + "\r\n").code,
      401);
  EXPECT_EQ(HttpGet(port, "/metrics", "Authorization: Bearer " + o.token + "\r\n").code, 200);
  EXPECT_EQ(HttpGet(port, "/nowhere", "Authorization: Bearer " + o.token + "\r\n").code, 404);
}

TEST_F(AgentMetricsServerTest, ABadAddressIsRefused) {
  AgentMetricsOptions o;
  o.listen = "127.0.0.1:99999";
  EXPECT_EQ(Start(o).code(), StatusCode::kInvalidArgument);
  o.listen = "nohost";
  EXPECT_EQ(Start(o).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace muster::node_agent
