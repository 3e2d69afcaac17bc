// The coordinator's HTTP side (coordinator/http): the recorder's snapshots of a real Coordinator
// on an injected clock, their rendering as Prometheus text and JSON, and the server's answers
// over a real socket (404/400 JSON errors, the bearer token beyond loopback, HEAD, 405).

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "common/reactor.h"
#include "common/wire.h"
#include "coordinator/coordinator.h"
#include "coordinator/http/dashboard_server.h"
#include "coordinator/http/fleet_recorder.h"
#include "coordinator/http/render.h"
#include "tests/testing/coordinator_harness.h"
#include "tests/testing/http_get.h"

namespace muster::coordinator::http {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

int64_t Ms(TimePoint t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

// A Coordinator on an injected clock, driven like coordinator_test drives it.
class Fleet : public testing::CoordinatorHarness {
 public:
  Fleet() : CoordinatorHarness("dashboard-unit") { EXPECT_TRUE(Open()); }
  // A new coordinator on the same data dir, as after a crash (nothing is flushed at close).
  void Restart() { ASSERT_TRUE(Open()); }
  // `job`: the agent runs attempt 1 of it (it re-registers with a restarted coordinator).
  std::string Register(const std::string& name, const std::string& provider,
                       const std::string& job = "") {
    return CoordinatorHarness::Register(name, {.provider = provider,
                                               .island = provider + "-a",
                                               .volume = true,
                                               .transfer = true,
                                               .running_job = job});
  }
  std::vector<proto::AgentAction> Heartbeat(const std::string& node, const std::string& session,
                                            std::vector<proto::Progress> progress = {}) {
    proto::Envelope e = HeartbeatRequest(node, session);
    for (auto& p : progress) *e.mutable_agent_heartbeat()->add_progress() = p;
    return ActionsOf(Call(e));
  }
  proto::Envelope Report(const std::string& node, const std::string& session,
                         const std::string& job, int attempt) {
    return ReportFrom(node, session, job, attempt);
  }
  static proto::Progress Progress(const std::string& job, int64_t step, double loss,
                                  int64_t time_ms) {
    proto::Progress p;
    p.set_job_id(job);
    p.set_step(step);
    p.set_total_steps(100);
    p.set_loss(loss);
    p.set_throughput(250);
    p.set_throughput_unit("tokens/s");
    p.set_time_ms(time_ms);
    return p;
  }
};

// The fine-tune's story on the injected clock: placed on one provider, progress, a commit there
// and its verified replica on the other provider, a newer commit not yet copied, a preemption
// notice, and the gang's exit.
class RecorderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sa_ = fleet_.Register("aws-1", "aws");
    sg_ = fleet_.Register("gcp-1", "gcp");
    id_ = fleet_.Submit(
        "name: ft\ncommand: x\nplacement:\n  providers: [aws]\ncheckpoint:\n  volume: ckpt\n");
    auto actions = fleet_.Heartbeat("aws-1", sa_);
    ASSERT_EQ(actions.size(), 1u);
    ASSERT_TRUE(actions[0].has_start());
    auto started = fleet_.Report("aws-1", sa_, id_, 1);
    started.mutable_agent_report()->set_started(true);
    fleet_.Call(started);
  }
  void Commit(const std::string& node, const std::string& session, int64_t step, bool replica) {
    auto e = fleet_.Report(node, session, id_, 1);
    e.mutable_agent_report()->set_checkpoint_step(step);
    e.mutable_agent_report()->set_checkpoint_volume("ckpt");
    e.mutable_agent_report()->set_checkpoint_replica(replica);
    fleet_.Call(e);
  }
  Fleet fleet_;
  SnapshotHub hub_;
  std::string sa_, sg_, id_;
};

TEST_F(RecorderTest, SnapshotHoldsJobsAttemptsProgressCatalogLagAndPasses) {
  FleetRecorder rec(*fleet_.coord_, hub_, 250);
  int64_t t0 = Ms(fleet_.now_);
  fleet_.Heartbeat("aws-1", sa_, {Fleet::Progress(id_, 10, 2.5, t0)});
  fleet_.Heartbeat("aws-1", sa_, {Fleet::Progress(id_, 10, 2.5, t0)});  // repeated: one point
  fleet_.now_ += 2s;
  fleet_.Heartbeat("aws-1", sa_, {Fleet::Progress(id_, 20, 2.0, t0 + 2000)});
  Commit("aws-1", sa_, 20, false);
  Commit("gcp-1", sg_, 20, true);
  fleet_.now_ += 1s;
  Commit("aws-1", sa_, 30, false);  // not on gcp yet
  fleet_.now_ += 4s;
  fleet_.coord_->Tick();
  ASSERT_TRUE(rec.MaybePublish(Ms(fleet_.now_), true));
  EXPECT_FALSE(rec.MaybePublish(Ms(fleet_.now_) + 100)) << "within the 250 ms interval";

  auto s = hub_.Get();
  ASSERT_EQ(s->jobs.size(), 1u);
  const JobView& j = s->jobs[0];
  EXPECT_EQ(j.status.state(), proto::JOB_RUNNING);
  EXPECT_EQ(j.status.provider(), "aws");
  ASSERT_EQ(j.attempts.size(), 1u);
  EXPECT_EQ(j.attempts[0].provider, "aws");
  ASSERT_EQ(j.attempts[0].points.size(), 2u);
  EXPECT_EQ(j.attempts[0].points[1].step, 20);
  EXPECT_DOUBLE_EQ(j.attempts[0].points[1].loss, 2.0);
  // 10 steps in 2 s, 80 to go: 16 s.
  EXPECT_NEAR(j.eta_seconds, 16.0, 1e-6);
  ASSERT_EQ(j.catalog.size(), 3u);
  EXPECT_EQ(j.catalog[0].provider, "aws");
  EXPECT_EQ(j.catalog[2].provider, "gcp");
  EXPECT_EQ(j.catalog[2].step, 20);
  ASSERT_EQ(j.lag.size(), 2u);
  EXPECT_EQ(j.lag[0].provider, "aws");
  EXPECT_EQ(j.lag[0].lag_steps, 0);
  EXPECT_EQ(j.lag[1].provider, "gcp");
  EXPECT_EQ(j.lag[1].lag_steps, 10);
  EXPECT_NEAR(j.lag[1].lag_seconds, 4.0, 1e-6) << "step 30 was recorded 4 s before the snapshot";
  EXPECT_GT(s->passes.count, 0u);
  // The harness's store has its flusher (the default): its commits so far are in the snapshot.
  EXPECT_TRUE(s->durability.flusher);
  EXPECT_GT(s->durability.commits, 0u);
  EXPECT_FALSE(s->durability.failed);
  ASSERT_EQ(s->nodes.size(), 2u);
  bool saw_scheduled = false;
  for (const auto& e : s->events) saw_scheduled |= e.kind() == "scheduled";
  EXPECT_TRUE(saw_scheduled);

  std::string m = RenderMetrics(*s);
  EXPECT_NE(m.find("muster_jobs{state=\"running\"} 1\n"), std::string::npos) << m;
  EXPECT_NE(m.find("muster_queue_depth 0\n"), std::string::npos) << m;
  EXPECT_NE(m.find("muster_job_step{job_id=\"" + id_ + "\"} 20\n"), std::string::npos) << m;
  EXPECT_NE(m.find("muster_job_total_steps{job_id=\"" + id_ + "\"} 100\n"), std::string::npos);
  EXPECT_NE(m.find("muster_job_loss{job_id=\"" + id_ + "\"} 2\n"), std::string::npos) << m;
  EXPECT_NE(m.find("muster_job_throughput{job_id=\"" + id_ + "\",unit=\"tokens/s\"} 250\n"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("muster_replication_lag_steps{job_id=\"" + id_ + "\",provider=\"gcp\"} 10\n"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("muster_replication_lag_seconds{job_id=\"" + id_ + "\",provider=\"gcp\"} 4\n"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("muster_checkpoint_commits_total{job_id=\"" + id_ + "\",provider=\"aws\"} 2\n"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("muster_nodes{provider=\"gcp\",island=\"gcp-a\",state=\"up\"} 1\n"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("# TYPE muster_scheduler_pass_seconds histogram"), std::string::npos);
  EXPECT_NE(m.find("muster_scheduler_pass_seconds_count " + std::to_string(s->passes.count)),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("muster_scheduler_pass_seconds_bucket{le=\"+Inf\"} " +
                   std::to_string(s->passes.count)),
            std::string::npos)
      << m;

  // Retaken when something changed, else every 2 s.
  EXPECT_FALSE(rec.MaybePublish(Ms(fleet_.now_) + 1000)) << "nothing changed";
  EXPECT_TRUE(rec.MaybePublish(Ms(fleet_.now_) + 2000)) << "heartbeat ages move on";
  fleet_.Heartbeat("aws-1", sa_, {Fleet::Progress(id_, 21, 1.9, t0 + 8000)});
  EXPECT_TRUE(rec.MaybePublish(Ms(fleet_.now_) + 2300)) << "progress";
  EXPECT_FALSE(rec.MaybePublish(Ms(fleet_.now_) + 2600));
  Commit("aws-1", sa_, 21, false);  // an event
  EXPECT_TRUE(rec.MaybePublish(Ms(fleet_.now_) + 2900)) << "a new event";
}

TEST_F(RecorderTest, APreemptedAttemptIsCountedByCauseAndTheJobWaits) {
  FleetRecorder rec(*fleet_.coord_, hub_, 250);
  fleet_.Heartbeat("aws-1", sa_, {Fleet::Progress(id_, 10, 2.5, Ms(fleet_.now_))});
  proto::Envelope pre;
  pre.mutable_preempt_node_request()->set_node("aws-1");
  pre.mutable_preempt_node_request()->set_notice_ms(5000);
  ASSERT_TRUE(fleet_.Call(pre).has_preempt_node_reply());
  auto exited = fleet_.Report("aws-1", sa_, id_, 1);
  auto* x = exited.mutable_agent_report()->add_exits();
  x->set_exit_code(3);  // stopped for the notice (an exit 0 would have finished the job)
  x->set_stopped_by_agent(true);
  exited.mutable_agent_report()->set_all_exited(true);
  fleet_.Call(exited);
  ASSERT_TRUE(rec.MaybePublish(Ms(fleet_.now_), true));
  auto s = hub_.Get();
  ASSERT_EQ(s->jobs.size(), 1u);
  const JobView& j = s->jobs[0];
  ASSERT_EQ(j.attempts.size(), 1u);
  EXPECT_EQ(j.attempts[0].record.outcome, "preempted");
  EXPECT_EQ(j.ended_by_cause.at("preemption"), 1);
  std::string m = RenderMetrics(*s);
  EXPECT_NE(m.find("muster_restarts_total{cause=\"preemption\"} 1\n"), std::string::npos) << m;
  EXPECT_NE(m.find("muster_restarts_total{cause=\"failure\"} 0\n"), std::string::npos) << m;
  EXPECT_NE(m.find("muster_job_restarts_total{job_id=\"" + id_ + "\",cause=\"preemption\"} 1\n"),
            std::string::npos)
      << m;

  auto body = RenderJobJson(*s, id_);
  ASSERT_TRUE(body.ok());
  json jj = json::parse(*body);
  EXPECT_EQ(jj["attempts"][0]["outcome"], "preempted");
  EXPECT_EQ(jj["attempts"][0]["end_step"], 10);
  EXPECT_EQ(jj["preemptions"], 1);
  // The node's notice belongs to the job's story too.
  bool requeued = false, notice = false;
  for (const auto& e : jj["events"]) {
    requeued |= e["kind"] == "requeued";
    notice |= e["kind"] == "notice" && e["node"] == "aws-1";
  }
  EXPECT_TRUE(requeued) << jj["events"].dump();
  EXPECT_TRUE(notice) << jj["events"].dump();
}

// Commits and replicas as the agents report them (their size, and a commit's latency when the
// checkpointer gave one) become per job and provider byte counters and a latency histogram.
TEST_F(RecorderTest, CheckpointBytesAndCommitLatencyPerJobAndProvider) {
  FleetRecorder rec(*fleet_.coord_, hub_, 250);
  auto commit = [&](const std::string& node, const std::string& session, int64_t step, bool replica,
                    uint64_t bytes, double seconds) {
    auto e = fleet_.Report(node, session, id_, 1);
    auto* r = e.mutable_agent_report();
    r->set_checkpoint_step(step);
    r->set_checkpoint_volume("ckpt");
    r->set_checkpoint_replica(replica);
    r->set_checkpoint_bytes(bytes);
    r->set_checkpoint_commit_seconds(seconds);
    fleet_.Call(e);
  };
  commit("aws-1", sa_, 10, false, 1000, 0.3);
  commit("aws-1", sa_, 20, false, 3000, 4.0);
  commit("aws-1", sa_, 30, false, 5000, 0);  // no latency given: not observed
  commit("gcp-1", sg_, 20, true, 3000, 0);
  ASSERT_TRUE(rec.MaybePublish(Ms(fleet_.now_), true));
  auto s = hub_.Get();
  const CheckpointStats& aws = s->checkpoints.at({id_, "aws"});
  EXPECT_EQ(aws.commits, 3u);
  EXPECT_EQ(aws.commit_bytes, 9000u);
  EXPECT_EQ(aws.latency.count, 2u);
  EXPECT_EQ(s->checkpoints.at({id_, "gcp"}).replica_bytes, 3000u);

  std::string m = RenderMetrics(*s);
  const std::string aws_l = "job_id=\"" + id_ + "\",provider=\"aws\"";
  const std::string gcp_l = "job_id=\"" + id_ + "\",provider=\"gcp\"";
  for (const std::string& line :
       {"muster_checkpoint_bytes_total{" + aws_l + ",kind=\"commit\"} 9000",
        "muster_checkpoint_bytes_total{" + aws_l + ",kind=\"replica\"} 0",
        "muster_checkpoint_bytes_total{" + gcp_l + ",kind=\"replica\"} 3000",
        "muster_checkpoint_reports_total{" + aws_l + ",kind=\"commit\"} 3",
        "muster_checkpoint_reports_total{" + gcp_l + ",kind=\"replica\"} 1",
        "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"0.25\"} 0",
        "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"0.5\"} 1",
        "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"5\"} 2",
        "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"+Inf\"} 2",
        "muster_checkpoint_commit_seconds_count{" + aws_l + "} 2",
        "muster_checkpoint_commit_seconds_sum{" + aws_l + "} 4.3",
        "muster_checkpoint_commit_seconds_count{" + gcp_l + "} 0"}) {
    EXPECT_NE(m.find(line + "\n"), std::string::npos) << line << "\n" << m;
  }
  EXPECT_NE(m.find("# TYPE muster_checkpoint_commit_seconds histogram"), std::string::npos);
}

// The checkpoint counters are Prometheus counters: a coordinator restarted on the same data dir
// serves them where they were (not from zero), and a report after the restart adds to them.
TEST_F(RecorderTest, CheckpointCountersSurviveACoordinatorRestart) {
  auto commit = [&](const std::string& node, const std::string& session, int64_t step, bool replica,
                    uint64_t bytes, double seconds) {
    auto e = fleet_.Report(node, session, id_, 1);
    auto* r = e.mutable_agent_report();
    r->set_checkpoint_step(step);
    r->set_checkpoint_volume("ckpt");
    r->set_checkpoint_replica(replica);
    r->set_checkpoint_bytes(bytes);
    r->set_checkpoint_commit_seconds(seconds);
    auto reply = fleet_.Call(e);
    EXPECT_FALSE(reply.has_error()) << reply.DebugString();
  };
  const std::string aws_l = "job_id=\"" + id_ + "\",provider=\"aws\"";
  const std::string gcp_l = "job_id=\"" + id_ + "\",provider=\"gcp\"";
  auto metrics = [&] {
    FleetRecorder rec(*fleet_.coord_, hub_, 250);
    EXPECT_TRUE(rec.MaybePublish(Ms(fleet_.now_), true));
    return RenderMetrics(*hub_.Get());
  };
  commit("aws-1", sa_, 10, false, 1000, 0.3);
  commit("aws-1", sa_, 20, false, 3000, 4.0);
  commit("gcp-1", sg_, 20, true, 3000, 0);
  const std::vector<std::string> before = {
      "muster_checkpoint_bytes_total{" + aws_l + ",kind=\"commit\"} 4000",
      "muster_checkpoint_bytes_total{" + gcp_l + ",kind=\"replica\"} 3000",
      "muster_checkpoint_reports_total{" + aws_l + ",kind=\"commit\"} 2",
      "muster_checkpoint_reports_total{" + gcp_l + ",kind=\"replica\"} 1",
      "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"0.5\"} 1",
      "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"5\"} 2",
      "muster_checkpoint_commit_seconds_count{" + aws_l + "} 2",
      "muster_checkpoint_commit_seconds_sum{" + aws_l + "} 4.3"};
  std::string m = metrics();
  for (const auto& line : before) EXPECT_NE(m.find(line + "\n"), std::string::npos) << line << m;

  fleet_.Restart();
  m = metrics();
  for (const auto& line : before) {
    EXPECT_NE(m.find(line + "\n"), std::string::npos) << "after the restart: " << line << m;
  }
  // The running job's agent comes back, commits again: counted on top.
  sa_ = fleet_.Register("aws-1", "aws", id_);
  commit("aws-1", sa_, 30, false, 5000, 0.2);
  m = metrics();
  for (const std::string& line :
       {"muster_checkpoint_bytes_total{" + aws_l + ",kind=\"commit\"} 9000",
        "muster_checkpoint_reports_total{" + aws_l + ",kind=\"commit\"} 3",
        "muster_checkpoint_commit_seconds_bucket{" + aws_l + ",le=\"0.25\"} 1",
        "muster_checkpoint_commit_seconds_count{" + aws_l + "} 3",
        "muster_checkpoint_reports_total{" + gcp_l + ",kind=\"replica\"} 1"}) {
    EXPECT_NE(m.find(line + "\n"), std::string::npos) << line << "\n" << m;
  }
}

// The state database's durability: its flusher's lag, a latched failure, checkpoint errors,
// the log's size and the flush times; nothing of it for a store that syncs every commit.
TEST(RenderTest, TheStateDatabasesDurabilityIsInTheMetricsWhenItHasAFlusher) {
  FleetSnapshot s;
  EXPECT_EQ(RenderMetrics(s).find("muster_state_db_"), std::string::npos);
  s.durability.flusher = true;
  s.durability.commits = 120;
  s.durability.durable = 117;
  s.durability.log_pages = 1042;
  s.durability.checkpoint_errors = 2;
  s.durability.last_flush_seconds = 0.25;
  s.durability.max_flush_seconds = 1.5;
  std::string m = RenderMetrics(s);
  for (const std::string line :
       {"muster_state_db_commits_not_durable 3", "muster_state_db_commits_total 120",
        "muster_state_db_flush_failed 0", "muster_state_db_checkpoint_errors_total 2",
        "muster_state_db_log_pages 1042", "muster_state_db_flush_seconds{which=\"last\"} 0.25",
        "muster_state_db_flush_seconds{which=\"max\"} 1.5"}) {
    EXPECT_NE(m.find(line + "\n"), std::string::npos) << line << "\n" << m;
  }
  s.durability.failed = true;
  EXPECT_NE(RenderMetrics(s).find("muster_state_db_flush_failed 1\n"), std::string::npos);
}

TEST(RenderTest, UnknownJobIsNotFoundAndEventsFollowACursor) {
  FleetSnapshot s;
  for (int i = 1; i <= 5; ++i) {
    proto::Event e;
    e.set_id(i);
    e.set_job_id(i % 2 ? "a-1" : "b-2");
    e.set_kind("k" + std::to_string(i));
    s.events.push_back(e);
  }
  EXPECT_EQ(RenderJobJson(s, "nope-1").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(RenderCheckpointsJson(s, "nope-1").status().code(), StatusCode::kNotFound);
  json all = json::parse(RenderEventsJson(s, 2, "", 2));
  ASSERT_EQ(all["events"].size(), 2u);
  EXPECT_EQ(all["events"][0]["id"], 3);
  EXPECT_EQ(all["next"], 4);
  json a = json::parse(RenderEventsJson(s, 0, "a-1", 100));
  ASSERT_EQ(a["events"].size(), 3u);
  EXPECT_EQ(a["next"], 5);
  EXPECT_FALSE(a["truncated"]);
  EXPECT_EQ(PendingReasonClass("waiting: 2 of 4 nodes free on provider aws"), "waiting");
  EXPECT_EQ(PendingReasonClass(""), "none");
}

// ---------------------------------------------------------------------------------------------
// The server over a real socket.

using muster::testing::HttpReply;

HttpReply Get(int port, const std::string& path, const std::string& extra = "",
              const std::string& method = "GET") {
  return muster::testing::HttpGet(port, path, extra, method);
}

class ServerTest : public ::testing::Test {
 protected:
  void StartServer(HttpOptions o) {
    reactor_.Start();
    auto s =
        reactor_.Call("start", [&] { return DashboardServer::Start(reactor_, *fleet_.coord_, o); });
    status_ = s.status();
    if (s.ok()) server_ = std::move(*s);
  }
  void TearDown() override {
    reactor_.Stop();
    server_.reset();
  }
  Fleet fleet_;
  Reactor reactor_{"dashboard-test"};
  std::unique_ptr<DashboardServer> server_;
  Status status_;
};

TEST_F(ServerTest, AnswersJsonErrorsForUnknownJobsAndMalformedQueries) {
  fleet_.Register("aws-1", "aws");
  fleet_.Submit("name: ft\ncommand: x\n");                   // placed on aws-1
  std::string id = fleet_.Submit("name: ft\ncommand: x\n");  // waits for it
  HttpOptions o;
  o.listen = "127.0.0.1:0";
  o.publish_interval_ms = 0;
  StartServer(o);
  ASSERT_TRUE(status_.ok()) << status_;
  ASSERT_GT(server_->port(), 0);
  int port = server_->port();
  // Snapshots are published from the reactor's ticks (here: posted by the test).
  reactor_.Call("tick", [&] {
    server_->OnTick();
    return 0;
  });

  auto jobs = Get(port, "/api/jobs");
  ASSERT_EQ(jobs.code, 200) << jobs.body;
  auto listed = json::parse(jobs.body)["jobs"];
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_TRUE(listed[0]["id"] == id || listed[1]["id"] == id) << listed.dump();
  auto one = Get(port, "/api/jobs/" + id);
  EXPECT_EQ(one.code, 200);
  EXPECT_EQ(json::parse(one.body)["state"], "pending");

  auto missing = Get(port, "/api/jobs/nope-7");
  EXPECT_EQ(missing.code, 404);
  EXPECT_NE(json::parse(missing.body)["error"].get<std::string>().find("nope-7"),
            std::string::npos);
  EXPECT_NE(missing.headers.find("application/json"), std::string::npos);
  EXPECT_EQ(Get(port, "/api/jobs/nope-7/logs?rank=0").code, 404);
  EXPECT_EQ(Get(port, "/api/events?job=nope-7").code, 404);
  EXPECT_EQ(Get(port, "/api/checkpoints?job=nope-7").code, 404);
  EXPECT_EQ(Get(port, "/nowhere").code, 404);

  auto bad = Get(port, "/api/events?after=abc");
  EXPECT_EQ(bad.code, 400);
  EXPECT_NE(json::parse(bad.body)["error"].get<std::string>().find("'after' must be an integer"),
            std::string::npos)
      << bad.body;
  EXPECT_EQ(Get(port, "/api/events?limit=0").code, 400);
  EXPECT_EQ(Get(port, "/api/events?after=1&after=2").code, 400);
  EXPECT_EQ(Get(port, "/api/jobs?x=1").code, 400);
  EXPECT_EQ(Get(port, "/api/jobs/" + id + "/logs?rank=-1").code, 400);
  EXPECT_EQ(Get(port, "/api/events?after=%zz").code, 400);
  auto ev = Get(port, "/api/events?after=0&limit=1");
  ASSERT_EQ(ev.code, 200);
  EXPECT_EQ(json::parse(ev.body)["events"].size(), 1u);

  EXPECT_EQ(Get(port, "/api/jobs", "", "POST").code, 405);
  auto head = Get(port, "/metrics", "", "HEAD");
  EXPECT_EQ(head.code, 200);
  EXPECT_TRUE(head.body.empty());
  auto metrics = Get(port, "/metrics");
  ASSERT_EQ(metrics.code, 200);
  EXPECT_NE(metrics.body.find("muster_jobs{state=\"pending\"} 1"), std::string::npos);
  EXPECT_NE(metrics.body.find("muster_queue_depth 1"), std::string::npos);
  auto page = Get(port, "/");
  EXPECT_EQ(page.code, 200);
  EXPECT_NE(page.body.find("<script src=\"/app.js\">"), std::string::npos);
  EXPECT_EQ(Get(port, "/app.js").code, 200);
}

TEST_F(ServerTest, BeyondLoopbackATokenIsRequired) {
  HttpOptions o;
  o.listen = "0.0.0.0:0";
  StartServer(o);
  EXPECT_EQ(status_.code(), StatusCode::kFailedPrecondition) << status_;
  EXPECT_NE(status_.message().find("http_token"), std::string::npos);
}

TEST_F(ServerTest, BeyondLoopbackEveryDataRouteWantsTheBearerToken) {
  HttpOptions o;
  o.listen = "0.0.0.0:0";
  o.token = std::string(64, 'f');
  StartServer(o);
  ASSERT_TRUE(status_.ok()) << status_;
  int port = server_->port();
  auto none = Get(port, "/metrics");
  EXPECT_EQ(none.code, 401);
  EXPECT_NE(none.headers.find("WWW-Authenticate: Bearer"), std::string::npos);
  EXPECT_EQ(Get(port, "/api/jobs", "Authorization: Bearer " + std::string(64, 'e') + "\r\n").code,
            401);
  EXPECT_EQ(Get(port, "/api/jobs/x", "Authorization: Bearer \r\n").code, 401);
  EXPECT_EQ(Get(port, "/metrics", "Authorization: Bearer " + o.token + "\r\n").code, 200);
  EXPECT_EQ(Get(port, "/api/jobs", "Authorization: Bearer " + o.token + "\r\n").code, 200);
  EXPECT_EQ(Get(port, "/").code, 200) << "the page holds no data";
}

TEST(ListenTest, ParsesAndRefuses) {
  EXPECT_TRUE(ParseListen("127.0.0.1:8780").ok());
  EXPECT_EQ(ParseListen("localhost:0")->first, "127.0.0.1");
  EXPECT_FALSE(ParseListen("8780").ok());
  EXPECT_FALSE(ParseListen("127.0.0.1:99999").ok());
  EXPECT_FALSE(ParseListen("example.com:80").ok());
  EXPECT_TRUE(IsLoopbackHost("127.3.0.1"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
}

}  // namespace
}  // namespace muster::coordinator::http
