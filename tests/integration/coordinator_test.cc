// A real `muster coordinator` process on loopback with CURVE, real clients, and fake agents
// made of real RpcClients that register, heartbeat, take actions and report exits (until the
// real node agent exists). The coordinator is killed with SIGKILL and restarted for real.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "common/curve.h"
#include "common/rpc.h"
#include "coordinator/client.h"
#include "tests/testing/wait_until.h"

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

using testing::WaitUntil;

// One `muster coordinator` child process.
class CoordinatorProcess {
 public:
  CoordinatorProcess(fs::path data, fs::path keys)
      : data_(std::move(data)), keys_(std::move(keys)) {}
  ~CoordinatorProcess() { Kill(SIGKILL); }

  void Start() {
    fs::remove(data_ / "endpoint");
    pid_ = fork();
    if (pid_ == 0) {
      std::string d = data_.string(), k = keys_.string();
      execl(MUSTER_BIN, MUSTER_BIN, "coordinator", "--data-dir", d.c_str(), "--listen",
            "tcp://127.0.0.1:*", "--keys", k.c_str(), "--heartbeat-interval-ms", "200",
            "--heartbeat-timeout-ms", "1500", static_cast<char*>(nullptr));
      _exit(127);
    }
    ASSERT_TRUE(WaitUntil([&] { return fs::exists(data_ / "endpoint"); }, 30s))
        << "coordinator did not start (a loaded disk makes its first syncs slow)";
    std::ifstream in(data_ / "endpoint");
    in >> endpoint_;
  }
  void Kill(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    int st;
    waitpid(pid_, &st, 0);
    pid_ = -1;
  }
  const std::string& endpoint() const { return endpoint_; }
  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }

 private:
  fs::path data_, keys_;
  pid_t pid_ = -1;
  std::string endpoint_;
};

// A fake node agent: registers, heartbeats every 100 ms on a thread, collects actions.
class FakeAgent {
 public:
  // `key`: the agent's key pair; default the keys directory's agent.key.
  FakeAgent(zmq::context_t& ctx, const std::string& endpoint, const KeysDir& keys,
            proto::NodeLabels labels, std::optional<KeyPair> key = std::nullopt)
      : labels_(std::move(labels)) {
    RpcClient::Options o;
    o.endpoint = endpoint;
    o.client_key = key ? *key : *LoadKeyPair(keys.agent_key());
    o.server_public_key = LoadKeyPair(keys.coordinator_pub())->public_key;
    client_ = std::move(*RpcClient::Connect(ctx, o));
  }
  ~FakeAgent() { StopHeartbeats(); }

  Status Register() {
    proto::Envelope e;
    *e.mutable_agent_register()->mutable_labels() = labels_;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (const auto& r : running_) *e.mutable_agent_register()->add_running() = r;
    }
    MUSTER_ASSIGN_OR_RETURN(auto r, client_->Call(e, 5s));
    std::lock_guard<std::mutex> l(mu_);
    session_ = r.agent_registered().session_id();
    for (const auto& a : r.agent_registered().actions()) actions_.push_back(a);
    cv_.notify_all();
    return Status::Ok();
  }
  void StartHeartbeats() {
    stop_ = false;
    thread_ = std::thread([this] {
      while (!stop_) {
        proto::Envelope e;
        e.mutable_agent_heartbeat()->set_node(labels_.name());
        {
          std::lock_guard<std::mutex> l(mu_);
          e.mutable_agent_heartbeat()->set_session_id(session_);
          if (snapshots_reported_) {
            e.mutable_agent_heartbeat()->set_snapshots_reported(true);
            for (const auto& h : snapshots_held_)
              *e.mutable_agent_heartbeat()->add_snapshots_held() = h;
          }
        }
        auto r = client_->Call(e, 2s);
        if (r.ok()) {
          std::lock_guard<std::mutex> l(mu_);
          for (const auto& a : r->agent_heartbeat_reply().actions()) actions_.push_back(a);
          cv_.notify_all();
        } else if (r.status().code() == StatusCode::kNotFound) {
          Register().IgnoreError();
        }
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait_for(l, 100ms, [&] { return stop_.load(); });
      }
    });
  }
  void StopHeartbeats() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

  // Waits for an action matching `pred` and removes it.
  std::optional<proto::AgentAction> WaitAction(
      const std::function<bool(const proto::AgentAction&)>& pred, std::chrono::milliseconds t) {
    std::unique_lock<std::mutex> l(mu_);
    std::optional<proto::AgentAction> out;
    cv_.wait_for(l, t, [&] {
      for (auto it = actions_.begin(); it != actions_.end(); ++it) {
        if (pred(*it)) {
          out = *it;
          actions_.erase(it);
          return true;
        }
      }
      return false;
    });
    return out;
  }
  std::optional<proto::StartAssignment> WaitStart(std::chrono::milliseconds t = 5s) {
    auto a = WaitAction([](const auto& a) { return a.has_start(); }, t);
    if (!a) return std::nullopt;
    std::lock_guard<std::mutex> l(mu_);
    proto::RunningAssignment r;
    r.set_job_id(a->start().job_id());
    r.set_attempt(a->start().attempt());
    r.set_node_rank(a->start().node_rank());
    running_.push_back(r);
    return a->start();
  }
  // Reports this assignment as running at the next Register: an agent that kept its ranks
  // while the coordinator restarted.
  void AddRunning(const std::string& job, int attempt, int node_rank) {
    std::lock_guard<std::mutex> l(mu_);
    proto::RunningAssignment r;
    r.set_job_id(job);
    r.set_attempt(attempt);
    r.set_node_rank(node_rank);
    running_.push_back(r);
  }
  std::optional<proto::StopAssignment> WaitStop(std::chrono::milliseconds t = 5s) {
    auto a = WaitAction([](const auto& a) { return a.has_stop(); }, t);
    if (!a) return std::nullopt;
    return a->stop();
  }

  // The in-memory snapshot frames every heartbeat reports from now on (an agent with snapshot
  // memory; it ignores DropSnapshots, like one that has not received it yet).
  void SetSnapshotsHeld(std::vector<proto::SnapshotHeld> held) {
    std::lock_guard<std::mutex> l(mu_);
    snapshots_held_ = std::move(held);
    snapshots_reported_ = true;
  }
  Status Report(const std::string& job, int attempt, bool started, int exit_code, bool all_exited,
                bool stopped_by_agent = false) {
    proto::Envelope e;
    auto* r = e.mutable_agent_report();
    r->set_node(labels_.name());
    {
      std::lock_guard<std::mutex> l(mu_);
      r->set_session_id(session_);
      if (all_exited) {
        std::erase_if(running_, [&](const auto& x) { return x.job_id() == job; });
      }
    }
    r->set_job_id(job);
    r->set_attempt(attempt);
    r->set_started(started);
    if (all_exited) {
      auto* x = r->add_exits();
      x->set_rank(0);
      x->set_exit_code(exit_code);
      x->set_stopped_by_agent(stopped_by_agent);
      r->set_all_exited(true);
    }
    return client_->Call(e, 5s).status();
  }

  const std::string& name() const { return labels_.name(); }
  std::string session() {
    std::lock_guard<std::mutex> l(mu_);
    return session_;
  }
  StatusOr<proto::Envelope> Call(proto::Envelope e) { return client_->Call(std::move(e), 5s); }

 private:
  proto::NodeLabels labels_;
  std::unique_ptr<RpcClient> client_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string session_;
  std::vector<proto::AgentAction> actions_;
  std::vector<proto::RunningAssignment> running_;
  std::vector<proto::SnapshotHeld> snapshots_held_;
  bool snapshots_reported_ = false;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

proto::NodeLabels Labels(const std::string& name, const std::string& provider) {
  proto::NodeLabels l;
  l.set_name(name);
  l.set_provider(provider);
  l.set_region(provider + "-1");
  l.set_island("a");
  l.set_gpu_type("h100");
  l.set_gpus(8);
  l.set_slots(8);
  l.set_address("127.0.0.1");
  auto* v = l.add_volumes();
  v->set_name("ckpt");
  v->set_path("/tmp/ckpt");
  return l;
}

class CoordinatorIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("muster-coord-it-" + std::to_string(getpid()) + "-" +
                                         std::to_string(std::random_device{}()));
    keys_.dir = root_ / "keys";
    ASSERT_TRUE(InitKeysDir(keys_, false).ok());
    coord_ = std::make_unique<CoordinatorProcess>(root_ / "data", keys_.dir);
    coord_->Start();
    ClientOptions o;
    o.endpoint = coord_->endpoint();
    o.keys_dir = keys_.dir.string();
    client_ = std::move(*CoordinatorClient::Connect(o));
  }
  void TearDown() override {
    agents_.clear();
    coord_.reset();
    fs::remove_all(root_);
  }

  FakeAgent& AddAgent(const std::string& name, const std::string& provider) {
    agents_.push_back(
        std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, Labels(name, provider)));
    EXPECT_TRUE(agents_.back()->Register().ok());
    agents_.back()->StartHeartbeats();
    return *agents_.back();
  }

  StatusOr<std::string> Submit(const std::string& yaml) {
    return client_->Submit(yaml, "job.yaml");
  }

  proto::JobStatus Status(const std::string& id) {
    auto s = client_->Status(id);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() && s->jobs_size() ? s->jobs(0) : proto::JobStatus();
  }

  bool WaitState(const std::string& id, proto::JobState state, std::chrono::milliseconds t = 5s) {
    return WaitUntil([&] { return Status(id).state() == state; }, t);
  }

  std::vector<std::string> EventKinds(const std::string& id) {
    std::vector<std::string> out;
    auto ev = client_->Events(id, 0);
    if (ev.ok())
      for (const auto& e : ev->events()) out.push_back(e.kind());
    return out;
  }

  // A new key with `role` in authorized_keys, once the running coordinator serves it.
  KeyPair AddKeyAndWait(const std::string& name, KeyRole role, const KeyScope& scope = {}) {
    auto key = AddKey(keys_, name, role, keys_.dir / (name + ".key"), scope);
    EXPECT_TRUE(key.ok()) << key.status();
    if (!key.ok()) return {};
    RpcClient::Options o;
    o.endpoint = coord_->endpoint();
    o.client_key = *key;
    o.server_public_key = LoadKeyPair(keys_.coordinator_pub())->public_key;
    EXPECT_TRUE(WaitUntil(
        [&] {
          auto c = RpcClient::Connect(ctx_, o);
          proto::Envelope ping;
          ping.mutable_ping()->set_data("x");
          return c.ok() && (*c)->Call(ping, 1s).ok();
        },
        10s))
        << "the coordinator did not pick up key " << name;
    return *key;
  }

  fs::path root_;
  KeysDir keys_;
  zmq::context_t ctx_;
  std::unique_ptr<CoordinatorProcess> coord_;
  std::unique_ptr<CoordinatorClient> client_;
  std::vector<std::unique_ptr<FakeAgent>> agents_;
};

TEST_F(CoordinatorIntegrationTest, GangPlacementRefusalPendingReasonAndSuccess) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  FakeAgent& a1 = AddAgent("aws-1", "aws");
  AddAgent("gcp-0", "gcp");

  auto impossible = Submit("name: big\ncommand: train\nnodes: 3\n");
  ASSERT_FALSE(impossible.ok());
  EXPECT_EQ(impossible.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(impossible.status().message().find("the most on one provider is 2 (aws)"),
            std::string::npos)
      << impossible.status();

  auto first = Submit("name: ft\ncommand: [python, train.py]\nnodes: 2\nranks_per_node: 4\n");
  ASSERT_TRUE(first.ok()) << first.status();
  auto s0 = a0.WaitStart();
  auto s1 = a1.WaitStart();
  ASSERT_TRUE(s0 && s1) << "both aws nodes get the gang";
  EXPECT_EQ(s0->job_id(), *first);
  EXPECT_EQ(s0->nnodes(), 2);
  // The env contract travels as structured fields: WORLD_SIZE = nnodes x ranks_per_node.
  EXPECT_EQ(s0->nnodes() * s0->ranks_per_node(), 8);
  EXPECT_EQ(s0->master_addr(), "127.0.0.1");
  EXPECT_FALSE(s0->env().contains("WORLD_SIZE")) << "the assignment's env is the job's own";
  EXPECT_NE(s0->node_rank(), s1->node_rank());
  EXPECT_TRUE(s0->host_rendezvous() != s1->host_rendezvous());
  EXPECT_EQ(Status(*first).state(), proto::JOB_SCHEDULED);
  ASSERT_TRUE(a0.Report(*first, 1, true, 0, false).ok());
  ASSERT_TRUE(a1.Report(*first, 1, true, 0, false).ok());
  EXPECT_TRUE(WaitState(*first, proto::JOB_RUNNING));

  auto second = Submit("name: next\ncommand: train\nnodes: 2\n");
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(Status(*second).pending_reason(), "waiting: 0 of 2 nodes free on provider aws");

  ASSERT_TRUE(a0.Report(*first, 1, false, 0, true).ok());
  ASSERT_TRUE(a1.Report(*first, 1, false, 0, true).ok());
  EXPECT_TRUE(WaitState(*first, proto::JOB_SUCCEEDED));
  EXPECT_TRUE(a0.WaitStart()) << "the waiting job gets the freed nodes";
  EXPECT_TRUE(WaitState(*second, proto::JOB_SCHEDULED));
  auto kinds = EventKinds(*first);
  EXPECT_EQ(kinds, (std::vector<std::string>{"submitted", "scheduled", "started", "succeeded"}));
}

TEST_F(CoordinatorIntegrationTest, FailureRestartsThenFails) {
  FakeAgent& a = AddAgent("aws-0", "aws");
  auto id = Submit("name: flaky\ncommand: train\nrestart:\n  max_restarts: 1\n  backoff: 0s\n");
  ASSERT_TRUE(id.ok());
  auto s = a.WaitStart();
  ASSERT_TRUE(s);
  ASSERT_TRUE(a.Report(*id, 1, true, 3, true).ok());
  s = a.WaitStart();
  ASSERT_TRUE(s) << "restarted";
  EXPECT_EQ(s->attempt(), 2);
  EXPECT_EQ(s->resume_step(), -1) << "no checkpoint: the restart starts fresh";
  ASSERT_TRUE(a.Report(*id, 2, true, 3, true).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_FAILED));
  auto st = Status(*id);
  EXPECT_EQ(st.restarts(), 2);
  EXPECT_EQ(st.detail(), "rank 0 on aws-0 exited 3");
}

TEST_F(CoordinatorIntegrationTest, CancelStopsTheGang) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  FakeAgent& a1 = AddAgent("aws-1", "aws");
  auto id = Submit("name: c\ncommand: train\nnodes: 2\n");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(a0.WaitStart() && a1.WaitStart());
  auto state = client_->Cancel(*id);
  ASSERT_TRUE(state.ok());
  EXPECT_EQ(*state, proto::JOB_CANCELLED);
  auto stop0 = a0.WaitStop();
  auto stop1 = a1.WaitStop();
  ASSERT_TRUE(stop0 && stop1);
  EXPECT_EQ(stop0->reason(), proto::STOP_CANCELLED);
  ASSERT_TRUE(a0.Report(*id, 1, false, 0, true, true).ok());
  ASSERT_TRUE(a1.Report(*id, 1, false, 0, true, true).ok());
  // The nodes are free again: a new job is placed.
  auto next = Submit("name: after\ncommand: train\nnodes: 2\n");
  ASSERT_TRUE(next.ok());
  EXPECT_TRUE(a0.WaitStart());
  EXPECT_EQ(Status(*id).state(), proto::JOB_CANCELLED);
  // Cancelling a pending job is immediate.
  auto pending = Submit("name: p\ncommand: train\nnodes: 2\n");
  ASSERT_TRUE(pending.ok());
  EXPECT_EQ(*client_->Cancel(*pending), proto::JOB_CANCELLED);
  EXPECT_EQ(client_->Cancel("nope-1").status().code(), StatusCode::kNotFound);
}

TEST_F(CoordinatorIntegrationTest, LostAgentStopsAndRequeuesTheJob) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  FakeAgent& a1 = AddAgent("aws-1", "aws");
  auto id = Submit("name: l\ncommand: train\nnodes: 2\n");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(a0.WaitStart() && a1.WaitStart());
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  ASSERT_TRUE(a1.Report(*id, 1, true, 0, false).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_RUNNING));
  a1.StopHeartbeats();  // as if kill -9: heartbeats stop
  auto stop = a0.WaitStop(5s);
  ASSERT_TRUE(stop) << "the surviving node is told to stop";
  EXPECT_EQ(stop->reason(), proto::STOP_PEER_FAILED);
  ASSERT_TRUE(a0.Report(*id, 1, false, 0, true, true).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_PENDING));
  auto st = Status(*id);
  EXPECT_EQ(st.preemptions(), 1);
  EXPECT_EQ(st.restarts(), 0) << "a lost node does not count against max_restarts";
  auto kinds = EventKinds(*id);
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "node_lost"), kinds.end());
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "requeued"), kinds.end());
  auto nodes = client_->Nodes();
  ASSERT_TRUE(nodes.ok());
  for (const auto& n : nodes->nodes()) {
    if (n.labels().name() == "aws-1") {
      EXPECT_EQ(n.state(), proto::NODE_DOWN);
    }
  }
}

TEST_F(CoordinatorIntegrationTest, KillNineRestartKeepsJobsAndReconcilesAgents) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  auto running = Submit("name: r\ncommand: train\n");
  ASSERT_TRUE(running.ok());
  ASSERT_TRUE(a0.WaitStart());
  ASSERT_TRUE(a0.Report(*running, 1, true, 0, false).ok());
  ASSERT_TRUE(WaitState(*running, proto::JOB_RUNNING));
  auto pending = Submit("name: p\ncommand: train\n");
  ASSERT_TRUE(pending.ok());
  ASSERT_TRUE(client_->Drain("aws-0", true).ok());

  a0.StopHeartbeats();
  coord_->Kill(SIGKILL);
  coord_->Start();
  ClientOptions o;
  o.endpoint = coord_->endpoint();
  o.keys_dir = keys_.dir.string();
  client_ = std::move(*CoordinatorClient::Connect(o));
  EXPECT_EQ(Status(*pending).state(), proto::JOB_PENDING);
  EXPECT_EQ(Status(*running).state(), proto::JOB_RUNNING);

  // The agent comes back without the job's ranks (its node rebooted): the job is requeued.
  FakeAgent again(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "aws"));
  ASSERT_TRUE(again.Register().ok());
  // A fresh register without the job means its ranks are gone: the job is requeued.
  EXPECT_TRUE(WaitState(*running, proto::JOB_PENDING));
  auto nodes = client_->Nodes();
  ASSERT_TRUE(nodes.ok());
  ASSERT_EQ(nodes->nodes_size(), 1);
  EXPECT_EQ(nodes->nodes(0).state(), proto::NODE_DRAINING) << "drain survives the restart";
}

TEST_F(CoordinatorIntegrationTest, RestartAdoptsRunningAssignment) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  auto id = Submit("name: r\ncommand: train\n");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(a0.WaitStart());
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_RUNNING));
  a0.StopHeartbeats();
  coord_->Kill(SIGKILL);
  coord_->Start();
  ClientOptions o;
  o.endpoint = coord_->endpoint();
  o.keys_dir = keys_.dir.string();
  client_ = std::move(*CoordinatorClient::Connect(o));
  // Re-register reporting the running assignment: adopted, not stopped.
  std::unique_ptr<RpcClient> raw;
  {
    RpcClient::Options ro;
    ro.endpoint = coord_->endpoint();
    ro.client_key = *LoadKeyPair(keys_.agent_key());
    ro.server_public_key = LoadKeyPair(keys_.coordinator_pub())->public_key;
    raw = std::move(*RpcClient::Connect(ctx_, ro));
  }
  proto::Envelope e;
  *e.mutable_agent_register()->mutable_labels() = Labels("aws-0", "aws");
  auto* ra = e.mutable_agent_register()->add_running();
  ra->set_job_id(*id);
  ra->set_attempt(1);
  auto reg = raw->Call(e, 5s);
  ASSERT_TRUE(reg.ok()) << reg.status();
  EXPECT_EQ(reg->agent_registered().actions_size(), 0) << "nothing to stop";
  EXPECT_EQ(Status(*id).state(), proto::JOB_RUNNING);
  // A stale attempt is told to stop.
  proto::Envelope stale = e;
  stale.mutable_agent_register()->mutable_running(0)->set_attempt(7);
  auto reg2 = raw->Call(stale, 5s);
  ASSERT_TRUE(reg2.ok());
  ASSERT_EQ(reg2->agent_registered().actions_size(), 1);
  EXPECT_EQ(reg2->agent_registered().actions(0).stop().reason(), proto::STOP_RECONCILE);
}

TEST_F(CoordinatorIntegrationTest, UnknownKeyIsRefusedQuickly) {
  RpcClient::Options o;
  o.endpoint = coord_->endpoint();
  o.client_key = *GenerateKeyPair();
  o.server_public_key = LoadKeyPair(keys_.coordinator_pub())->public_key;
  auto c = RpcClient::Connect(ctx_, o);
  ASSERT_TRUE(c.ok());
  proto::Envelope e;
  e.mutable_nodes_request();
  auto t0 = Clock::now();
  auto r = (*c)->Call(e, 5s);
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status();
  EXPECT_LT(Clock::now() - t0, 3s);
}

TEST_F(CoordinatorIntegrationTest, CliSubmitStatusJsonAndBadSpec) {
  AddAgent("aws-0", "aws");
  fs::path job = root_ / "job.yaml";
  std::ofstream(job) << "name: cli\ncommand: train\nnodes: 2\n";
  std::string base = std::string(MUSTER_BIN) + " --log-level off ";
  std::string flags = " --coordinator " + coord_->endpoint() + " --keys " + keys_.dir.string();
  auto run = [](const std::string& cmd, int* rc) {
    std::string out;
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    char buf[512];
    while (p && fgets(buf, sizeof(buf), p)) out += buf;
    *rc = p ? WEXITSTATUS(pclose(p)) : -1;
    return out;
  };
  int rc = 0;
  std::string out = run(base + "submit " + job.string() + flags, &rc);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("no registered node set can ever hold this job"), std::string::npos) << out;
  AddAgent("aws-1", "aws");
  out = run(base + "submit " + job.string() + flags, &rc);
  ASSERT_EQ(rc, 0) << out;
  std::string id = out.substr(0, out.find('\n'));
  EXPECT_EQ(id, "cli-1");
  out = run(base + "status " + id + " --json" + flags, &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find("\"state\": \"scheduled\""), std::string::npos) << out;
  std::ofstream(job) << "name: cli\ncommand: train\nnodes: -1\n";
  out = run(base + "submit " + job.string() + flags, &rc);
  EXPECT_EQ(rc, 2);
  EXPECT_NE(out.find("job.yaml:3: nodes: must be an integer"), std::string::npos) << out;
  out = run(base + "node drain aws-0" + flags, &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find("aws-0 draining"), std::string::npos) << out;
  out = run(base + "events " + id + flags, &rc);
  EXPECT_NE(out.find("scheduled"), std::string::npos) << out;
}

TEST_F(CoordinatorIntegrationTest, LongPollDeliversStartAndLogsAreFetchedFromTheAgent) {
  RpcClient::Options ro;
  ro.endpoint = coord_->endpoint();
  ro.client_key = *LoadKeyPair(keys_.agent_key());
  ro.server_public_key = LoadKeyPair(keys_.coordinator_pub())->public_key;
  auto agent = std::move(*RpcClient::Connect(ctx_, ro));
  proto::Envelope reg;
  *reg.mutable_agent_register()->mutable_labels() = Labels("aws-0", "aws");
  auto r = agent->Call(reg, 5s);
  ASSERT_TRUE(r.ok()) << r.status();
  std::string session = r->agent_registered().session_id();
  EXPECT_EQ(r->agent_registered().heartbeat_interval_ms(), 200);
  EXPECT_EQ(r->agent_registered().heartbeat_timeout_ms(), 1500);
  auto poll = [&](int64_t wait_ms) {
    proto::Envelope p;
    p.mutable_agent_poll()->set_node("aws-0");
    p.mutable_agent_poll()->set_session_id(session);
    p.mutable_agent_poll()->set_wait_ms(wait_ms);
    return agent->Call(p, 5s);
  };
  // The poll is parked, then answered by the submit's placement.
  std::thread submitter([&] {
    // Before or after the poll parks, the start reaches it: queued actions flush on a poll.
    EXPECT_TRUE(Submit("name: lp\ncommand: train\nranks_per_node: 2\n").ok());
  });
  auto t0 = Clock::now();
  auto actions = poll(3000);
  submitter.join();
  ASSERT_TRUE(actions.ok()) << actions.status();
  ASSERT_EQ(actions->agent_actions().actions_size(), 1);
  EXPECT_LT(Clock::now() - t0, 2500ms) << "answered by the placement, not by the poll timeout";
  const auto& start = actions->agent_actions().actions(0).start();
  EXPECT_EQ(start.job_id(), "lp-1");

  // A client asks for rank 1's log; the coordinator forwards it to the agent.
  std::optional<StatusOr<proto::LogsReply>> logs;
  std::thread reader([&] { logs = client_->Logs("lp-1", 1, 0, 1000); });
  auto fetch = poll(3000);
  ASSERT_TRUE(fetch.ok());
  ASSERT_EQ(fetch->agent_actions().actions_size(), 1);
  const auto& f = fetch->agent_actions().actions(0).fetch_log();
  EXPECT_EQ(f.rank(), 1);
  proto::Envelope chunk;
  auto* c = chunk.mutable_agent_log_chunk();
  c->set_node("aws-0");
  c->set_session_id(session);
  c->set_fetch_id(f.fetch_id());
  c->set_data("hello from rank 1\n");
  c->set_next_offset(18);
  ASSERT_TRUE(agent->Call(chunk, 5s).ok());
  reader.join();
  ASSERT_TRUE(logs && logs->ok()) << (logs ? logs->status().ToString() : "no reply");
  EXPECT_EQ((*logs)->data(), "hello from rank 1\n");
  EXPECT_EQ((*logs)->next_offset(), 18);
  EXPECT_EQ(client_->Logs("lp-1", 5, 0, 10).status().code(), StatusCode::kNotFound);
  // A heartbeat with a wrong session is told to register again.
  proto::Envelope hb;
  hb.mutable_agent_heartbeat()->set_node("aws-0");
  hb.mutable_agent_heartbeat()->set_session_id("bogus");
  EXPECT_EQ(agent->Call(hb, 5s).status().code(), StatusCode::kNotFound);
}

TEST_F(CoordinatorIntegrationTest, HigherPriorityPreemptsAndTheVictimRequeues) {
  FakeAgent& a = AddAgent("aws-0", "aws");
  auto low = Submit("name: low\ncommand: train\npriority: 0\n");
  ASSERT_TRUE(low.ok());
  ASSERT_TRUE(a.WaitStart());
  ASSERT_TRUE(a.Report(*low, 1, true, 0, false).ok());
  auto high = Submit("name: high\ncommand: train\npriority: 10\n");
  ASSERT_TRUE(high.ok());
  auto stop = a.WaitStop();
  ASSERT_TRUE(stop);
  EXPECT_EQ(stop->job_id(), *low);
  EXPECT_EQ(stop->reason(), proto::STOP_PREEMPTED);
  EXPECT_NE(Status(*high).pending_reason().find("preempting"), std::string::npos);
  ASSERT_TRUE(a.Report(*low, 1, false, 143, true, true).ok());
  auto start = a.WaitStart();
  ASSERT_TRUE(start);
  EXPECT_EQ(start->job_id(), *high);
  auto st = Status(*low);
  EXPECT_EQ(st.state(), proto::JOB_PENDING);
  EXPECT_EQ(st.preemptions(), 1);
  EXPECT_EQ(st.restarts(), 0);
}

// A spec with a 30,000-digit duration or count once took the coordinator down (a recursive
// std::regex overflowed its stack). Over the wire, as YAML and as a proto JobSpec, every hostile
// spec is now a clear InvalidArgument, and the same process goes on serving.
TEST_F(CoordinatorIntegrationTest, HostileSpecsAreClearErrorsAndTheCoordinatorStaysUp) {
  AddAgent("aws-0", "aws");
  const std::string digits(30000, '9');
  struct Case {
    std::string yaml, want;
  };
  for (const Case& c : std::vector<Case>{
           {"name: d\ncommand: x\ntime_limit: " + digits + "\n", "job.yaml:3: time_limit:"},
           {"name: d\ncommand: x\nnodes: " + digits + "\n", "job.yaml:3: nodes:"},
           {"name: d\ncommand: x\ncheckpoint:\n  volume: ckpt\n  every: " + digits + "\n",
            "job.yaml:5: checkpoint.every:"},
           {"name: d\ncommand: x\nnodes: 1\nnodes: 2\n", "job.yaml:4: nodes: given twice"},
       }) {
    auto id = Submit(c.yaml);
    ASSERT_FALSE(id.ok()) << "accepted: " << *id;
    EXPECT_EQ(id.status().code(), StatusCode::kInvalidArgument) << id.status();
    EXPECT_NE(id.status().message().find(c.want), std::string::npos) << id.status();
  }
  proto::Envelope e;
  auto* spec = e.mutable_submit_request()->mutable_spec();
  spec->set_name("../../etc");
  spec->add_command("train");
  spec->set_nodes(1);
  spec->set_ranks_per_node(1);
  spec->set_checkpoint_keep(3);
  spec->set_restart_backoff_s(std::numeric_limits<int64_t>::max());
  (*spec->mutable_env())["A=B"] = "x";
  auto r = client_->Call(e);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
  for (const char* want :
       {"name: must be 1-63", "restart.backoff: must be a duration", "env.A=B: is not a valid"}) {
    EXPECT_NE(r.status().message().find(want), std::string::npos) << r.status();
  }
  auto fine = Submit("name: d\ncommand: x\n");
  EXPECT_TRUE(fine.ok()) << "the coordinator still serves: " << fine.status();
}

TEST(CoordinatorSecurityTest, InsecureMustBeAskedForAndWarnsAndMissingKeysAreAClearError) {
  fs::path root = fs::temp_directory_path() / ("muster-coord-sec-" + std::to_string(getpid()) +
                                               "-" + std::to_string(std::random_device{}()));
  fs::create_directories(root);
  auto spawn = [&](std::vector<std::string> args, const fs::path& out) {
    pid_t pid = fork();
    if (pid == 0) {
      FILE* f = freopen(out.c_str(), "w", stderr);
      (void)f;
      std::vector<char*> argv{const_cast<char*>(MUSTER_BIN)};
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(MUSTER_BIN, argv.data());
      _exit(127);
    }
    return pid;
  };
  auto slurp = [](const fs::path& p) {
    std::ifstream in(p);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  // Without keys and without --insecure: refuses to start, saying what to do.
  pid_t pid = spawn({"coordinator", "--data-dir", (root / "d1").string(), "--listen",
                     "tcp://127.0.0.1:*", "--keys", (root / "nokeys").string()},
                    root / "err1");
  int st = 0;
  waitpid(pid, &st, 0);
  EXPECT_NE(WEXITSTATUS(st), 0);
  EXPECT_NE(slurp(root / "err1").find("muster keys init"), std::string::npos)
      << slurp(root / "err1");

  // --insecure: serves, and says so loudly.
  pid = spawn({"coordinator", "--data-dir", (root / "d2").string(), "--listen", "tcp://127.0.0.1:*",
               "--insecure"},
              root / "err2");
  ASSERT_TRUE(WaitUntil([&] { return fs::exists(root / "d2" / "endpoint"); }, 30s))
      << slurp(root / "err2");
  EXPECT_NE(slurp(root / "err2").find("INSECURE"), std::string::npos);
  std::string ep;
  std::ifstream(root / "d2" / "endpoint") >> ep;
  ClientOptions o;
  o.endpoint = ep;
  o.insecure = true;
  auto c = CoordinatorClient::Connect(o);
  ASSERT_TRUE(c.ok());
  auto nodes = (*c)->Nodes();
  EXPECT_TRUE(nodes.ok()) << nodes.status();
  kill(pid, SIGTERM);
  waitpid(pid, &st, 0);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "SIGTERM stops it cleanly";
  fs::remove_all(root);
}

// D3, with the real wire protocol: an authorized key cannot take over a node's name. Before
// nodes were bound to keys, the second registration replaced the real agent's session, the job
// was requeued as "agent came back without the job's ranks" and the real agent reconciled away.
TEST_F(CoordinatorIntegrationTest, AnotherKeyCannotHijackANodeName) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  auto id = Submit("name: h\ncommand: train\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(a0.WaitStart());
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_RUNNING));

  KeyPair evil_key = AddKeyAndWait("evil", KeyRole::kAgent);
  FakeAgent evil(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "aws"), evil_key);
  muster::Status st = evil.Register();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("key 'evil' (role agent) may not register as node aws-0"),
            std::string::npos)
      << st;
  // Nor with the admin key of the CLI: it is no agent key.
  FakeAgent admin(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "aws"),
                  *LoadKeyPair(keys_.client_key()));
  st = admin.Register();
  EXPECT_NE(st.message().find("(role admin) may not agent register"), std::string::npos) << st;

  EXPECT_FALSE(a0.WaitStop(1s)) << "the real agent keeps its job";
  EXPECT_EQ(Status(*id).state(), proto::JOB_RUNNING);
  EXPECT_EQ(Status(*id).attempt(), 1);
  auto kinds = EventKinds(*id);
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "node_lost"), 0);
}

// A scoped agent key (`muster keys add --role agent --node gcp-0 --provider gcp --island a`)
// registers only inside its scope: a leaked key of one provider's node cannot pose as nodes of
// another provider (and so attract jobs and that provider's checkpoint copies).
TEST_F(CoordinatorIntegrationTest, AScopedAgentKeyRegistersOnlyInsideItsScope) {
  KeyScope scope;
  scope.nodes = {"gcp-0"};
  scope.provider = "gcp";
  scope.island = "a";
  KeyPair key = AddKeyAndWait("gcp-0-key", KeyRole::kAgent, scope);

  FakeAgent other_name(ctx_, coord_->endpoint(), keys_, Labels("aws-9", "aws"), key);
  muster::Status st = other_name.Register();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("key 'gcp-0-key' (role agent) may not register as node aws-9: node "
                              "name 'aws-9' is outside the key's scope (nodes=gcp-0 "
                              "provider=gcp island=a)"),
            std::string::npos)
      << st;
  FakeAgent other_provider(ctx_, coord_->endpoint(), keys_, Labels("gcp-0", "aws"), key);
  st = other_provider.Register();
  EXPECT_NE(st.message().find("provider 'aws' is outside the key's scope"), std::string::npos)
      << st;
  proto::NodeLabels island_b = Labels("gcp-0", "gcp");
  island_b.set_island("b");
  FakeAgent other_island(ctx_, coord_->endpoint(), keys_, island_b, key);
  st = other_island.Register();
  EXPECT_NE(st.message().find("island 'b' is outside the key's scope"), std::string::npos) << st;
  // Nothing registered: no job can be placed on those names.
  auto nodes = client_->Nodes();
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  EXPECT_EQ(nodes->nodes_size(), 0);

  // Inside its scope it works, and a job is placed there.
  agents_.push_back(
      std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, Labels("gcp-0", "gcp"), key));
  FakeAgent& inside = *agents_.back();
  ASSERT_TRUE(inside.Register().ok());
  inside.StartHeartbeats();
  nodes = client_->Nodes();
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  ASSERT_EQ(nodes->nodes_size(), 1);
  EXPECT_EQ(nodes->nodes(0).labels().name(), "gcp-0");
  auto id = Submit("name: s\ncommand: train\n");
  ASSERT_TRUE(id.ok()) << id.status();
  auto start = inside.WaitStart();
  ASSERT_TRUE(start);
  EXPECT_EQ(start->job_id(), *id);

  // A changed scope applies from the next request: the key is narrowed to another node, and
  // its next registration of gcp-0 is refused.
  auto list = LoadAuthorizedKeys(keys_.authorized_keys());
  ASSERT_TRUE(list.ok()) << list.status();
  for (auto& k : *list) {
    if (k.name == "gcp-0-key") k.scope.nodes = {"gcp-1"};
  }
  fs::path tmp = keys_.dir / "authorized_keys.new";
  ASSERT_TRUE(SaveAuthorizedKeys(tmp, *list, true).ok());
  fs::rename(tmp, keys_.authorized_keys());
  FakeAgent again(ctx_, coord_->endpoint(), keys_, Labels("gcp-0", "gcp"), key);
  EXPECT_TRUE(WaitUntil(
      [&] {
        muster::Status s = again.Register();
        return s.message().find("outside the key's scope (nodes=gcp-1") != std::string::npos;
      },
      10s));
}

// A node does not move to another provider or island, whichever key asks (the shared,
// unscoped agent.key here, the one that registered it).
TEST_F(CoordinatorIntegrationTest, ABoundNodeCannotMoveToAnotherProviderOrIsland) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  (void)a0;
  FakeAgent moved(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "gcp"));
  muster::Status st = moved.Register();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("may not register as node aws-0: node aws-0 is registered with "
                              "provider 'aws' island 'a' and claims provider 'gcp' island 'a'"),
            std::string::npos)
      << st;
  proto::NodeLabels island_b = Labels("aws-0", "aws");
  island_b.set_island("b");
  FakeAgent moved_island(ctx_, coord_->endpoint(), keys_, island_b);
  st = moved_island.Register();
  EXPECT_NE(st.message().find("does not move to another provider or island"), std::string::npos)
      << st;
  auto nodes = client_->Nodes();
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  ASSERT_EQ(nodes->nodes_size(), 1);
  EXPECT_EQ(nodes->nodes(0).labels().provider(), "aws");
  // Same provider and island: a re-registration as before.
  FakeAgent same(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "aws"));
  EXPECT_TRUE(same.Register().ok());
}

// D3: a key that may not run agents cannot register a fake node named to sort first, and so
// never becomes the replication target that receives another user's checkpoint: the copy goes
// to the real agent of the other provider.
TEST_F(CoordinatorIntegrationTest, OnlyAnAgentOfTheOtherProviderReceivesTheCopy) {
  proto::NodeLabels src = Labels("aws-0", "aws");
  src.set_transfer_endpoint("tcp://127.0.0.1:1");
  src.set_transfer_key(GenerateKeyPair()->public_key);
  agents_.push_back(std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, src));
  FakeAgent& a0 = *agents_.back();
  ASSERT_TRUE(a0.Register().ok());
  a0.StartHeartbeats();
  KeyPair user = AddKeyAndWait("mallory", KeyRole::kClient);
  FakeAgent fake(ctx_, coord_->endpoint(), keys_, Labels("aaa-fake", "gcp"), user);
  muster::Status st = fake.Register();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("key 'mallory' (role client) may not agent register"),
            std::string::npos)
      << st;
  FakeAgent& g0 = AddAgent("gcp-0", "gcp");

  auto id = Submit("name: c\ncommand: train\ncheckpoint:\n  volume: ckpt\n  every: 10\n");
  ASSERT_TRUE(id.ok()) << id.status();
  auto start = a0.WaitStart();
  ASSERT_TRUE(start);
  ASSERT_EQ(start->job_id(), *id) << "aws-0 sorts before gcp-0";
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  proto::Envelope commit;
  auto* r = commit.mutable_agent_report();
  r->set_node("aws-0");
  r->set_session_id(a0.session());
  r->set_job_id(*id);
  r->set_attempt(1);
  r->set_checkpoint_step(10);
  r->set_checkpoint_volume("ckpt");
  ASSERT_TRUE(a0.Call(commit).ok());
  auto copy = g0.WaitAction([](const auto& a) { return a.has_replicate(); }, 5s);
  ASSERT_TRUE(copy) << "the real gcp agent is asked to copy the step";
  EXPECT_EQ(copy->replicate().step(), 10);
}

// D3: a commit reported by an agent that is not a node of the job's attempt is refused, so no
// step it invents (999999) is ever catalogued or resumed from.
TEST_F(CoordinatorIntegrationTest, ACommitFromANodeOutsideTheAttemptIsRefused) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  auto id = Submit(
      "name: f\ncommand: train\ncheckpoint:\n  volume: ckpt\n  every: 10\nrestart:\n  backoff: "
      "1s\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(a0.WaitStart());
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  KeyPair other = AddKeyAndWait("node-9", KeyRole::kAgent);
  FakeAgent outsider(ctx_, coord_->endpoint(), keys_, Labels("aws-9", "aws"), other);
  ASSERT_TRUE(outsider.Register().ok());
  ASSERT_TRUE(client_->Drain("aws-9", true).ok());  // the restart below goes back to aws-0
  proto::Envelope forged;
  auto* r = forged.mutable_agent_report();
  r->set_node("aws-9");
  r->set_session_id(outsider.session());
  r->set_job_id(*id);
  r->set_attempt(1);
  r->set_checkpoint_step(999999);
  r->set_checkpoint_volume("ckpt");
  auto reply = outsider.Call(forged);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kFailedPrecondition) << reply.status();
  EXPECT_NE(reply.status().message().find("may not report for attempt 1 of job " + *id +
                                          " as node aws-9"),
            std::string::npos)
      << reply.status();
  // Speaking for aws-0 with its session id does not work either.
  r->set_node("aws-0");
  r->set_session_id(a0.session());
  EXPECT_EQ(outsider.Call(forged).status().code(), StatusCode::kFailedPrecondition);
  auto kinds = EventKinds(*id);
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "checkpoint_committed"), 0);

  // A rank fails and the job restarts: not from the forged step (there is no committed one).
  ASSERT_TRUE(a0.Report(*id, 1, false, 1, true).ok());
  auto again = a0.WaitStart(10s);
  ASSERT_TRUE(again) << "attempt 2 starts after the 1 s backoff";
  EXPECT_EQ(again->attempt(), 2);
  EXPECT_EQ(again->resume_step(), -1);
}

// D10: a key removed from authorized_keys ends the sessions it opened. Before, the reload only
// refused new connections and an open one kept working.
TEST_F(CoordinatorIntegrationTest, ARemovedKeysOpenSessionIsRefusedAfterTheReload) {
  AddAgent("aws-0", "aws");
  KeyPair carol = AddKeyAndWait("carol", KeyRole::kClient);
  (void)carol;
  ClientOptions o;
  o.endpoint = coord_->endpoint();
  o.keys_dir = keys_.dir.string();
  o.key_file = (keys_.dir / "carol.key").string();
  auto c = CoordinatorClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto mine = (*c)->Submit("name: carols\ncommand: train\n", "job.yaml");
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_TRUE((*c)->Status(*mine).ok());
  auto admins = Submit("name: admins\ncommand: train\n");
  ASSERT_TRUE(admins.ok());
  auto theirs = (*c)->Status(*admins);
  EXPECT_EQ(theirs.status().code(), StatusCode::kFailedPrecondition) << "not carol's job";

  // Remove carol's line; the coordinator re-reads the file within 2 s.
  std::ifstream in(keys_.authorized_keys());
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.find(" carol ") == std::string::npos) kept += line + "\n";
  }
  in.close();
  std::ofstream(keys_.dir / "authorized_keys.new") << kept;
  fs::rename(keys_.dir / "authorized_keys.new", keys_.authorized_keys());
  StatusOr<proto::StatusReply> after = (*c)->Status(*mine);
  ASSERT_TRUE(WaitUntil(
      [&] {
        after = (*c)->Status(*mine);  // the same connection, opened while carol was authorized
        return !after.ok();
      },
      10s))
      << "carol's open session still works after her key was removed";
  EXPECT_EQ(after.status().code(), StatusCode::kFailedPrecondition) << after.status();
  EXPECT_NE(after.status().message().find("key 'carol'"), std::string::npos) << after.status();
  EXPECT_NE(after.status().message().find("no longer authorized"), std::string::npos)
      << after.status();
  EXPECT_TRUE(client_->Status(*mine).ok()) << "the admin still is";
}

// A keys directory from before roles keeps working: its one key (CLI and agents alike) is a
// legacy key with admin and agent rights. `muster keys migrate` then makes it an admin key and
// adds agent.key, and the node name bound to the old key moves to the agent key.
TEST_F(CoordinatorIntegrationTest, ALegacyKeysDirKeepsWorkingAndMigrates) {
  KeyPair old_key = *LoadKeyPair(keys_.client_key());
  KeyPair init_agent = *LoadKeyPair(keys_.agent_key());
  fs::remove(keys_.agent_key());
  std::ofstream(keys_.dir / "authorized_keys.new")
      << "# Public keys the muster coordinator accepts: '<z85 public key> [name]' per line.\n"
      << old_key.public_key << " client\n";
  fs::rename(keys_.dir / "authorized_keys.new", keys_.authorized_keys());
  RpcClient::Options o;
  o.endpoint = coord_->endpoint();
  o.server_public_key = LoadKeyPair(keys_.coordinator_pub())->public_key;
  o.client_key = init_agent;
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto c = RpcClient::Connect(ctx_, o);
        proto::Envelope ping;
        ping.mutable_ping();
        return c.ok() && !(*c)->Call(ping, 1s).ok();
      },
      10s))
      << "the legacy file was not loaded";

  FakeAgent legacy(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "aws"), old_key);
  ASSERT_TRUE(legacy.Register().ok()) << "a legacy key may still run an agent";
  legacy.StartHeartbeats();
  auto id = Submit("name: legacy\ncommand: train\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(legacy.WaitStart());
  ASSERT_TRUE(legacy.Report(*id, 1, false, 0, true).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_SUCCEEDED));
  legacy.StopHeartbeats();

  auto changed = MigrateKeysDir(keys_, KeyRole::kAdmin);
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_EQ(*changed, 1);
  o.client_key = *LoadKeyPair(keys_.agent_key());
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto c = RpcClient::Connect(ctx_, o);
        proto::Envelope ping;
        ping.mutable_ping();
        return c.ok() && (*c)->Call(ping, 1s).ok();
      },
      10s))
      << "the new agent.key is not served";
  FakeAgent migrated(ctx_, coord_->endpoint(), keys_, Labels("aws-0", "aws"));
  EXPECT_TRUE(migrated.Register().ok()) << "aws-0 moves from the old key, now an admin key";
  muster::Status st = legacy.Register();
  EXPECT_NE(st.message().find("(role admin) may not agent register"), std::string::npos) << st;
  EXPECT_TRUE(client_->Status(*id).ok()) << "the CLI's key is an admin key now";
}

// SIGHUP re-reads authorized_keys at once, even when the file's change went unnoticed (here its
// modification time is put back, so only the signal can make the coordinator see it).
TEST_F(CoordinatorIntegrationTest, SighupReloadsTheKeysAndEndsARemovedKeysSession) {
  AddKeyAndWait("dave", KeyRole::kClient);
  ClientOptions o;
  o.endpoint = coord_->endpoint();
  o.keys_dir = keys_.dir.string();
  o.key_file = (keys_.dir / "dave.key").string();
  auto c = CoordinatorClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE((*c)->Status("").ok());
  auto mtime = fs::last_write_time(keys_.authorized_keys());
  std::ifstream in(keys_.authorized_keys());
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.find(" dave ") == std::string::npos) kept += line + "\n";
  }
  in.close();
  std::ofstream(keys_.dir / "authorized_keys.new") << kept;
  fs::last_write_time(keys_.dir / "authorized_keys.new", mtime);
  fs::rename(keys_.dir / "authorized_keys.new", keys_.authorized_keys());
  coord_->Signal(SIGHUP);
  StatusOr<proto::StatusReply> after = (*c)->Status("");
  ASSERT_TRUE(WaitUntil(
      [&] {
        after = (*c)->Status("");
        return !after.ok();
      },
      10s))
      << "dave's session survived the SIGHUP";
  EXPECT_EQ(after.status().code(), StatusCode::kFailedPrecondition) << after.status();
  EXPECT_NE(after.status().message().find("no longer authorized"), std::string::npos)
      << after.status();
  EXPECT_TRUE(client_->Status("").ok()) << "the coordinator is still up";
}

// Facts the coordinator learns at run time survive a SIGKILL and a restart on the same data dir.
class CoordinatorKillNineTest : public CoordinatorIntegrationTest {
 protected:
  void KillNineAndRestart() {
    for (auto& a : agents_) a->StopHeartbeats();
    coord_->Kill(SIGKILL);
    coord_->Start();
    ClientOptions o;
    o.endpoint = coord_->endpoint();
    o.keys_dir = keys_.dir.string();
    client_ = std::move(*CoordinatorClient::Connect(o));
  }
  // An agent of the restarted coordinator (a fresh process: it runs nothing).
  FakeAgent& Rejoin(const std::string& name) { return Rejoin(Labels(name, "aws")); }
  FakeAgent& Rejoin(const proto::NodeLabels& labels) {
    again_.push_back(std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, labels));
    EXPECT_TRUE(again_.back()->Register().ok());
    again_.back()->StartHeartbeats();
    return *again_.back();
  }
  proto::NodeStatusState NodeState(const std::string& name) {
    auto nodes = client_->Nodes();
    if (nodes.ok()) {
      for (const auto& n : nodes->nodes()) {
        if (n.labels().name() == name) return n.state();
      }
    }
    return proto::NODE_STATE_UNSPECIFIED;
  }
  void TearDown() override {
    again_.clear();
    CoordinatorIntegrationTest::TearDown();
  }
  std::vector<std::unique_ptr<FakeAgent>> again_;
};

// A preemption notice drains its node, from the admin (`muster node preempt`) or from the
// node's agent; the drain is stored, so after kill -9 and a restart the nodes come back
// draining, a new job is not placed on them, and only an undrain makes them usable again.
TEST_F(CoordinatorKillNineTest, ANoticeDrainSurvivesKillNine) {
  AddAgent("aws-0", "aws");
  FakeAgent& a1 = AddAgent("aws-1", "aws");
  proto::Envelope pre;
  pre.mutable_preempt_node_request()->set_node("aws-0");
  pre.mutable_preempt_node_request()->set_notice_ms(10000);
  ASSERT_TRUE(client_->Call(pre).ok());
  proto::Envelope notice;
  auto* r = notice.mutable_agent_report();
  r->set_node("aws-1");
  r->set_session_id(a1.session());
  r->set_notice_deadline_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch() + 30s)
                                .count());
  r->set_notice_source("test");
  auto reply = a1.Call(notice);
  ASSERT_TRUE(reply.ok() && !reply->has_error()) << reply.status() << reply->DebugString();
  EXPECT_EQ(NodeState("aws-0"), proto::NODE_DRAINING);
  EXPECT_EQ(NodeState("aws-1"), proto::NODE_DRAINING);

  KillNineAndRestart();
  Rejoin("aws-0");
  FakeAgent& b1 = Rejoin("aws-1");
  EXPECT_EQ(NodeState("aws-0"), proto::NODE_DRAINING) << "the admin's notice drain was lost";
  EXPECT_EQ(NodeState("aws-1"), proto::NODE_DRAINING) << "the agent's notice drain was lost";
  auto id = Submit("name: after\ncommand: x\n");
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_TRUE(WaitUntil(
      [&] {
        auto st = Status(*id);
        return st.state() == proto::JOB_PENDING && !st.pending_reason().empty();
      },
      5s))
      << Status(*id).DebugString();
  ASSERT_TRUE(client_->Drain("aws-1", false).ok());
  auto start = b1.WaitStart();
  ASSERT_TRUE(start.has_value()) << "undrained, the node takes work again";
  EXPECT_EQ(start->job_id(), *id);
}

// A failed in-memory snapshot resume sends the next attempt to the volume, and a coordinator
// killed with SIGKILL between the failure and that attempt still does: the decision is in the
// database (job_snapshot_fallbacks), so the restarted coordinator does not plan a resume from the
// same frames again although the agents still report them (their DropSnapshots never came).
TEST_F(CoordinatorKillNineTest, AFailedSnapshotResumeStillFallsBackToTheVolumeAfterKillNine) {
  auto labels = [](const std::string& name) {
    proto::NodeLabels l = Labels(name, "aws");
    l.set_snapshot_endpoint("tcp://127.0.0.1:9");
    l.set_snapshot_key("snapshot-key-of-" + name);
    return l;
  };
  std::vector<proto::SnapshotHeld> frames;
  for (int rank : {0, 1}) {
    proto::SnapshotHeld h;
    h.set_rank(rank);
    h.set_world_size(2);
    h.set_attempt(1);
    h.set_step(28);
    frames.push_back(h);
  }
  FakeAgent* a[2];
  for (int i = 0; i < 2; ++i) {
    agents_.push_back(std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_,
                                                  labels("aws-" + std::to_string(i))));
    ASSERT_TRUE(agents_.back()->Register().ok());
    agents_.back()->StartHeartbeats();
    a[i] = agents_.back().get();
  }
  auto id = Submit(
      "name: snap\ncommand: x\nnodes: 2\nrestart:\n  max_restarts: 5\n  backoff: 1s\n"
      "checkpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n");
  ASSERT_TRUE(id.ok()) << id.status();
  for (auto& h : frames) h.set_job_id(*id);
  // Attempt 1 commits step 20, holds frames of step 28 on both agents, and fails.
  for (FakeAgent* ag : a) ASSERT_TRUE(ag->WaitStart(10s).has_value());
  for (FakeAgent* ag : a) ASSERT_TRUE(ag->Report(*id, 1, true, 0, false).ok());
  proto::Envelope commit;
  auto* c = commit.mutable_agent_report();
  c->set_node(a[0]->name());
  c->set_session_id(a[0]->session());
  c->set_job_id(*id);
  c->set_attempt(1);
  c->set_checkpoint_step(20);
  c->set_checkpoint_volume("ckpt");
  ASSERT_TRUE(a[0]->Call(commit).ok());
  for (FakeAgent* ag : a) ag->SetSnapshotsHeld(frames);
  ASSERT_TRUE(a[0]->Report(*id, 1, false, 1, true).ok());
  ASSERT_TRUE(a[1]->Report(*id, 1, false, 75, true).ok());
  // Attempt 2 resumes from those frames, and its snapshot resume fails.
  std::optional<proto::StartAssignment> s2[2];
  for (int i = 0; i < 2; ++i) {
    s2[i] = a[i]->WaitStart(10s);
    ASSERT_TRUE(s2[i].has_value()) << Status(*id).DebugString();
    ASSERT_EQ(s2[i]->attempt(), 2);
    ASSERT_EQ(s2[i]->snapshot_resume_step(), 28) << "the frames did not reach the coordinator";
  }
  proto::Envelope failed;
  auto* f = failed.mutable_agent_report();
  f->set_node(a[0]->name());
  f->set_session_id(a[0]->session());
  f->set_job_id(*id);
  f->set_attempt(2);
  f->set_start_error("snapshot resume: rank 0 step 28: unreachable");
  f->add_exits()->set_exit_code(1);
  f->set_all_exited(true);
  ASSERT_TRUE(a[0]->Call(failed).ok());
  ASSERT_TRUE(a[1]->Report(*id, 2, false, 143, true).ok());
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto k = EventKinds(*id);
        return std::find(k.begin(), k.end(), "snapshot_resume_failed") != k.end();
      },
      5s));
  ASSERT_EQ(Status(*id).attempt(), 2) << "attempt 3 placed before the kill";

  KillNineAndRestart();
  FakeAgent* b[2];
  for (int i = 0; i < 2; ++i) {
    b[i] = &Rejoin(labels("aws-" + std::to_string(i)));
    b[i]->SetSnapshotsHeld(frames);
  }
  for (FakeAgent* ag : b) {
    auto s3 = ag->WaitStart(15s);
    ASSERT_TRUE(s3.has_value()) << Status(*id).DebugString();
    EXPECT_EQ(s3->attempt(), 3);
    EXPECT_EQ(s3->snapshot_sources_size(), 0) << "told to fetch the failed frames again";
    EXPECT_EQ(s3->snapshot_resume_step(), 0);
    EXPECT_EQ(s3->resume_step(), 20);
  }
}

// A node a launch preflight blamed stays off that job after kill -9 and a restart: the job,
// requeued when its other node does not come back, waits rather than going to the blamed node.
TEST_F(CoordinatorKillNineTest, APreflightExclusionSurvivesKillNine) {
  FakeAgent& a0 = AddAgent("aws-0", "aws");
  FakeAgent& a1 = AddAgent("aws-1", "aws");
  auto id = Submit("name: pf\ncommand: x\nrestart:\n  max_restarts: 0\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(WaitUntil([&] { return Status(*id).nodes_size() == 1; }, 5s));
  const std::string blamed = Status(*id).nodes(0);
  const std::string other = blamed == "aws-0" ? "aws-1" : "aws-0";
  FakeAgent& b = blamed == "aws-0" ? a0 : a1;
  FakeAgent& o = blamed == "aws-0" ? a1 : a0;
  ASSERT_TRUE(b.WaitStart());
  proto::Envelope e;
  auto* r = e.mutable_agent_report();
  r->set_node(blamed);
  r->set_session_id(b.session());
  r->set_job_id(*id);
  r->set_attempt(1);
  r->set_start_error("no GPU visible");
  r->set_preflight_failed(true);
  r->set_preflight_blamed_rank(0);
  r->add_exits()->set_exit_code(1);
  r->set_all_exited(true);
  auto reply = b.Call(e);
  ASSERT_TRUE(reply.ok() && !reply->has_error()) << reply.status();
  auto start = o.WaitStart();
  ASSERT_TRUE(start.has_value()) << Status(*id).DebugString();
  EXPECT_EQ(start->attempt(), 2);
  ASSERT_TRUE(o.Report(*id, 2, true, 0, false).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_RUNNING));

  KillNineAndRestart();
  FakeAgent& again = Rejoin(blamed);  // `other` does not come back: the job is requeued
  EXPECT_TRUE(WaitUntil(
      [&] {
        auto st = Status(*id);
        return st.state() == proto::JOB_PENDING && !st.pending_reason().empty();
      },
      10s))
      << Status(*id).DebugString();
  EXPECT_FALSE(again.WaitAction([](const auto& a) { return a.has_start(); }, 0ms))
      << "the blamed node was given the job again";
  EXPECT_EQ(Status(*id).attempt(), 2);
  FakeAgent& back = Rejoin(other);
  start = back.WaitStart();
  ASSERT_TRUE(start.has_value()) << Status(*id).DebugString();
  EXPECT_EQ(start->attempt(), 3);
}

// A checkpoint copy to another provider that had not landed when the coordinator was killed is
// asked again of the target once the source and the target are back.
TEST_F(CoordinatorKillNineTest, ACopyInFlightIsAskedAgainAfterKillNine) {
  proto::NodeLabels src = Labels("aws-0", "aws");
  src.set_transfer_endpoint("tcp://127.0.0.1:1");
  src.set_transfer_key(GenerateKeyPair()->public_key);
  agents_.push_back(std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, src));
  FakeAgent& a0 = *agents_.back();
  ASSERT_TRUE(a0.Register().ok());
  a0.StartHeartbeats();
  FakeAgent& g0 = AddAgent("gcp-0", "gcp");
  auto id = Submit("name: c\ncommand: train\ncheckpoint:\n  volume: ckpt\n  every: 10\n");
  ASSERT_TRUE(id.ok()) << id.status();
  auto start = a0.WaitStart();
  ASSERT_TRUE(start);
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  proto::Envelope commit;
  auto* r = commit.mutable_agent_report();
  r->set_node("aws-0");
  r->set_session_id(a0.session());
  r->set_job_id(*id);
  r->set_attempt(1);
  r->set_checkpoint_step(10);
  r->set_checkpoint_volume("ckpt");
  ASSERT_TRUE(a0.Call(commit).ok());
  auto copy = g0.WaitAction([](const auto& a) { return a.has_replicate(); }, 5s);
  ASSERT_TRUE(copy);
  ASSERT_EQ(copy->replicate().step(), 10);

  KillNineAndRestart();  // before gcp-0 reports the replica
  Rejoin(src);
  FakeAgent& g1 = Rejoin(Labels("gcp-0", "gcp"));
  copy = g1.WaitAction([](const auto& a) { return a.has_replicate(); }, 10s);
  ASSERT_TRUE(copy) << "the copy was forgotten with the coordinator";
  EXPECT_EQ(copy->replicate().step(), 10);
  EXPECT_EQ(copy->replicate().source_node(), "aws-0");
  auto ev = client_->Events(*id, 0);
  ASSERT_TRUE(ev.ok());
  bool said = false;
  for (const auto& e : ev->events()) {
    said |= e.kind() == "replicate_retry" &&
            e.message().find("the coordinator restarted during the copy") != std::string::npos;
  }
  EXPECT_TRUE(said) << "an event says why the copy is asked again";
}

// Hot spares are kept in the database: after kill -9 and a restart the spare is still held for
// its job, before and after its agent comes back (not handed to a job waiting for a node), and
// it still replaces a gang node that is lost afterwards.
TEST_F(CoordinatorKillNineTest, AHeldSpareSurvivesKillNineAndStillReplacesALostNode) {
  std::map<std::string, FakeAgent*> first;
  for (const char* n : {"aws-0", "aws-1", "aws-2"}) first[n] = &AddAgent(n, "aws");
  auto id = Submit("name: sp\ncommand: train\nnodes: 2\nspares: 1\n");
  ASSERT_TRUE(id.ok()) << id.status();
  proto::JobStatus st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(*id);
        return st.nodes_size() == 2 && st.spares_size() == 1;
      },
      5s))
      << st.DebugString();
  const std::vector<std::string> gang(st.nodes().begin(), st.nodes().end());
  const std::string spare = st.spares(0);
  for (const auto& n : gang) {
    ASSERT_TRUE(first[n]->WaitStart()) << n;
    ASSERT_TRUE(first[n]->Report(*id, 1, true, 0, false).ok());
  }
  ASSERT_TRUE(WaitState(*id, proto::JOB_RUNNING));
  // A job that waits for a node: it must not get the spare.
  auto waiting = Submit("name: w\ncommand: x\n");
  ASSERT_TRUE(waiting.ok()) << waiting.status();

  KillNineAndRestart();
  // The gang's agents kept their ranks: adopted.
  std::vector<FakeAgent*> kept;
  for (size_t r = 0; r < gang.size(); ++r) {
    again_.push_back(
        std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, Labels(gang[r], "aws")));
    again_.back()->AddRunning(*id, 1, static_cast<int>(r));
    ASSERT_TRUE(again_.back()->Register().ok());
    again_.back()->StartHeartbeats();
    kept.push_back(again_.back().get());
  }
  st = Status(*id);
  EXPECT_EQ(st.state(), proto::JOB_RUNNING) << st.DebugString();
  ASSERT_EQ(st.spares_size(), 1) << "the spare was forgotten: " << st.DebugString();
  EXPECT_EQ(st.spares(0), spare);
  // Its agent comes back: still the job's spare, still idle.
  FakeAgent& s = Rejoin(spare);
  ASSERT_TRUE(WaitUntil([&] { return NodeState(spare) == proto::NODE_UP; }, 5s));
  auto nodes = client_->Nodes();
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  for (const auto& n : nodes->nodes()) {
    if (n.labels().name() != spare) continue;
    EXPECT_EQ(n.job_id(), *id) << n.DebugString();
    EXPECT_TRUE(n.spare()) << n.DebugString();
  }

  // A gang node is lost: the spare takes its place.
  kept[1]->StopHeartbeats();
  auto stop = kept[0]->WaitStop(10s);
  ASSERT_TRUE(stop) << "the survivor was not stopped";
  ASSERT_TRUE(kept[0]->Report(*id, 1, true, 0, true, true).ok());
  auto start = s.WaitStart(10s);
  ASSERT_TRUE(start) << "the spare did not start";
  EXPECT_EQ(start->attempt(), 2);
  EXPECT_EQ(start->node_rank(), 1);
  st = Status(*id);
  EXPECT_EQ(std::vector<std::string>(st.nodes().begin(), st.nodes().end()),
            (std::vector<std::string>{gang[0], spare}));
  EXPECT_EQ(Status(*waiting).state(), proto::JOB_PENDING) << "the spare went to another job";
  auto ev = client_->Events(*id, 0);
  ASSERT_TRUE(ev.ok());
  bool restored = false, replaced = false;
  for (const auto& e : ev->events()) {
    restored |= e.kind() == "spare_restored" && e.node() == spare;
    replaced |= e.kind() == "spare_replaces" &&
                e.message() == "spare " + spare + " replaces lost node " + gang[1];
  }
  EXPECT_TRUE(restored) << "an event says the spare is held again";
  EXPECT_TRUE(replaced) << "an event says which spare replaced which node";
}

// A failed attempt's restart backoff is in the database (not_before_ms, wall-clock time): a
// coordinator killed with SIGKILL during the backoff and restarted does not place the next
// attempt before the backoff has run out (it used to submit every restored pending job at once).
TEST_F(CoordinatorKillNineTest, TheRestartBackoffHoldsAcrossKillNine) {
  FakeAgent& a = AddAgent("aws-0", "aws");
  auto id = Submit("name: b\ncommand: train\nrestart:\n  max_restarts: 2\n  backoff: 4s\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(a.WaitStart());
  const auto failed_at = Clock::now();  // the backoff counts from after this
  ASSERT_TRUE(a.Report(*id, 1, true, 3, true).ok());
  ASSERT_TRUE(WaitUntil(
      [&] { return Status(*id).pending_reason().starts_with("waiting: restart backoff"); }, 5s))
      << Status(*id).DebugString();

  KillNineAndRestart();
  FakeAgent& b = Rejoin("aws-0");
  auto st = Status(*id);
  EXPECT_EQ(st.state(), proto::JOB_PENDING) << st.DebugString();
  EXPECT_TRUE(st.pending_reason().starts_with("waiting: restart backoff"))
      << "the restored job does not wait out its backoff: " << st.DebugString();
  auto start = b.WaitStart(15s);
  const auto started_after = Clock::now() - failed_at;
  ASSERT_TRUE(start) << "the next attempt never started: " << Status(*id).DebugString();
  EXPECT_EQ(start->attempt(), 2);
  EXPECT_GE(started_after, 3900ms)
      << "attempt 2 started "
      << std::chrono::duration_cast<std::chrono::milliseconds>(started_after).count()
      << " ms after the failure, before its 4 s backoff ended";
}

// `muster node forget NODE` against a real coordinator, after a kill -9 (the restored nodes are
// disconnected until their agents register again): refused, with the reason, for a node in a
// running attempt, a held spare, a connected node, and for a key that is not an admin's; a node
// nothing needs is forgotten, an event names the key, and it stays forgotten after another
// kill -9.
TEST_F(CoordinatorKillNineTest, NodeForgetRefusesWhatIsStillNeededAndForgetsTheRest) {
  std::map<std::string, FakeAgent*> first;
  for (const char* n : {"aws-0", "aws-1"}) first[n] = &AddAgent(n, "aws");
  auto id = Submit("name: f\ncommand: train\nspares: 1\n");
  ASSERT_TRUE(id.ok()) << id.status();
  proto::JobStatus st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(*id);
        return st.nodes_size() == 1 && st.spares_size() == 1;
      },
      5s))
      << st.DebugString();
  const std::string gang = st.nodes(0), spare = st.spares(0);
  ASSERT_TRUE(first[gang]->WaitStart());
  ASSERT_TRUE(first[gang]->Report(*id, 1, true, 0, false).ok());
  ASSERT_TRUE(WaitState(*id, proto::JOB_RUNNING));
  AddAgent("aws-2", "aws");
  AddAgent("aws-3", "aws");

  KillNineAndRestart();
  FakeAgent& a2 = Rejoin("aws-2");
  proto::SnapshotHeld frame;
  frame.set_job_id(*id);
  frame.set_world_size(1);
  frame.set_attempt(1);
  frame.set_step(5);
  a2.SetSnapshotsHeld({frame});
  std::string base = std::string(MUSTER_BIN) + " --log-level off ";
  std::string flags = " --coordinator " + coord_->endpoint() + " --keys " + keys_.dir.string();
  auto run = [&](const std::string& args, int* rc, const std::string& f) {
    std::string out;
    FILE* p = popen((base + args + f + " 2>&1").c_str(), "r");
    char buf[512];
    while (p && fgets(buf, sizeof(buf), p)) out += buf;
    *rc = p ? WEXITSTATUS(pclose(p)) : -1;
    return out;
  };
  int rc = 0;
  std::string out = run("node forget " + gang, &rc, flags);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("muster node forget: node " + gang +
                     " is not forgotten: it is in attempt 1 "
                     "of job " +
                     *id),
            std::string::npos)
      << out;
  out = run("node forget " + spare, &rc, flags);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("node " + spare + " is not forgotten: it is held as a spare of job " + *id),
            std::string::npos)
      << out;
  EXPECT_TRUE(WaitUntil(
      [&] {
        out = run("node forget aws-2", &rc, flags);
        return out.find("it holds in-memory snapshots of job " + *id) != std::string::npos;
      },
      5s))
      << out;
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("node aws-2 is not forgotten: it is connected (its agent would register it "
                     "again: stop the agent first); it holds in-memory snapshots of job " +
                     *id),
            std::string::npos)
      << out;
  out = run("node forget aws-9", &rc, flags);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("unknown node aws-9"), std::string::npos) << out;

  // A client key may not, even for a node nothing needs.
  AddKeyAndWait("alice", KeyRole::kClient);
  fs::path alice = root_ / "alice-keys";
  fs::create_directories(alice);
  fs::copy_file(keys_.dir / "alice.key", alice / "client.key");
  fs::copy_file(keys_.coordinator_pub(), alice / "coordinator.pub");
  out = run("node forget aws-3", &rc,
            " --coordinator " + coord_->endpoint() + " --keys " + alice.string());
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("permission denied: key 'alice' (role client) may not node forget: it needs "
                     "an admin key"),
            std::string::npos)
      << out;
  EXPECT_NE(NodeState("aws-3"), proto::NODE_STATE_UNSPECIFIED) << "still listed";

  // The admin forgets aws-3 (its agent is gone, nothing needs it).
  out = run("node forget aws-3", &rc, flags);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, "aws-3 forgotten\n");
  EXPECT_EQ(NodeState("aws-3"), proto::NODE_STATE_UNSPECIFIED) << "still listed";
  auto ev = client_->Events("", 0);
  ASSERT_TRUE(ev.ok()) << ev.status();
  bool said = false;
  for (const auto& e : ev->events()) {
    said |=
        e.kind() == "node_forgotten" && e.node() == "aws-3" &&
        e.message() == "node record forgotten by key 'admin' (role admin); its key binding stays";
  }
  EXPECT_TRUE(said) << "no event says who forgot the node";

  KillNineAndRestart();
  EXPECT_EQ(NodeState("aws-3"), proto::NODE_STATE_UNSPECIFIED) << "back after a restart";
  EXPECT_NE(NodeState(gang), proto::NODE_STATE_UNSPECIFIED);
  // Its agent, with the same key, may register the name again.
  Rejoin("aws-3");
  EXPECT_EQ(NodeState("aws-3"), proto::NODE_UP);
}

// A node whose volume holds a checkpoint step not yet copied to the other provider (the copy's
// source) is not forgotten; every reason is given.
TEST_F(CoordinatorKillNineTest, NodeForgetRefusesTheSourceOfACopyNotDone) {
  proto::NodeLabels src = Labels("aws-0", "aws");
  src.set_transfer_endpoint("tcp://127.0.0.1:1");
  src.set_transfer_key(GenerateKeyPair()->public_key);
  agents_.push_back(std::make_unique<FakeAgent>(ctx_, coord_->endpoint(), keys_, src));
  FakeAgent& a0 = *agents_.back();
  ASSERT_TRUE(a0.Register().ok());
  a0.StartHeartbeats();
  FakeAgent& g0 = AddAgent("gcp-0", "gcp");
  auto id = Submit("name: c\ncommand: train\ncheckpoint:\n  volume: ckpt\n  every: 10\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(a0.WaitStart());
  ASSERT_TRUE(a0.Report(*id, 1, true, 0, false).ok());
  proto::Envelope commit;
  auto* r = commit.mutable_agent_report();
  r->set_node("aws-0");
  r->set_session_id(a0.session());
  r->set_job_id(*id);
  r->set_attempt(1);
  r->set_checkpoint_step(10);
  r->set_checkpoint_volume("ckpt");
  ASSERT_TRUE(a0.Call(commit).ok());
  ASSERT_TRUE(g0.WaitAction([](const auto& a) { return a.has_replicate(); }, 5s));
  // The copy of step 10 is not done (a restarted coordinator asks for it again while the job
  // has not ended).
  KillNineAndRestart();
  proto::Envelope forget;
  forget.mutable_forget_node_request()->set_node("aws-0");
  auto reply = client_->Call(forget);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(reply.status().message(),
            "node aws-0 is not forgotten: it is in attempt 1 of job " + *id +
                "; it is the source of job " + *id +
                "'s checkpoint copy of step 10 to provider gcp, not done yet");
}

// The same holds for a lost node's lease fence (no split brain): a node that went silent may
// still run its ranks until its lease runs out, so its job is not placed again before then,
// even by a coordinator restarted in between.
TEST_F(CoordinatorKillNineTest, ALostNodesLeaseFenceHoldsAcrossKillNine) {
  std::map<std::string, FakeAgent*> first;
  for (const char* n : {"aws-0", "aws-1"}) first[n] = &AddAgent(n, "aws");
  auto id = Submit("name: fence\ncommand: train\n");
  ASSERT_TRUE(id.ok()) << id.status();
  proto::JobStatus st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(*id);
        return st.nodes_size() == 1;
      },
      5s));
  const std::string silent = st.nodes(0), other = silent == "aws-0" ? "aws-1" : "aws-0";
  ASSERT_TRUE(first[silent]->WaitStart());
  ASSERT_TRUE(first[silent]->Report(*id, 1, true, 0, false).ok());
  first[silent]->StopHeartbeats();  // silent, not dead: its ranks may still run
  ASSERT_TRUE(WaitState(*id, proto::JOB_PENDING, 10s));
  int64_t requeued_ms = 0;
  auto ev = client_->Events(*id, 0);
  ASSERT_TRUE(ev.ok()) << ev.status();
  for (const auto& e : ev->events())
    if (e.kind() == "requeued") requeued_ms = e.time_ms();
  ASSERT_GT(requeued_ms, 0);

  KillNineAndRestart();
  FakeAgent& b = Rejoin(other);
  st = Status(*id);
  EXPECT_TRUE(st.pending_reason().starts_with("waiting: the lost node's lease") ||
              st.state() != proto::JOB_PENDING)
      << st.DebugString();
  auto start = b.WaitStart(10s);
  const int64_t started_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::system_clock::now().time_since_epoch())
                                 .count();
  ASSERT_TRUE(start) << "the job was never placed again: " << Status(*id).DebugString();
  // Lease 2250 ms (1.5 x the heartbeat timeout) - heartbeat timeout 1500 ms + 500 ms.
  EXPECT_GE(started_ms - requeued_ms, 1200)
      << "attempt 2 started " << started_ms - requeued_ms
      << " ms after the requeue, inside the lost node's lease fence (1250 ms)";
}

// A kept-log copy in flight when the coordinator is killed with SIGKILL is asked again of its
// node once the node's agent registers with the restarted coordinator, and is kept whole.
TEST_F(CoordinatorKillNineTest, AKeptLogCopyInFlightIsAskedAgainAfterKillNine) {
  FakeAgent& a = AddAgent("aws-0", "aws");
  auto id = Submit("name: lg\ncommand: train\n");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(a.WaitStart());
  ASSERT_TRUE(a.Report(*id, 1, true, 0, false).ok());
  ASSERT_TRUE(a.Report(*id, 1, false, 0, true).ok());
  auto answer = [&](FakeAgent& agent, const proto::FetchLog& f, const std::string& data, bool eof) {
    proto::Envelope e;
    auto* c = e.mutable_agent_log_chunk();
    c->set_node(agent.name());
    c->set_session_id(agent.session());
    c->set_fetch_id(f.fetch_id());
    c->set_data(data);
    c->set_next_offset(f.offset() + static_cast<int64_t>(data.size()));
    c->set_generation(7);
    c->set_eof(eof);
    return agent.Call(e);
  };
  auto fetch = a.WaitAction([](const auto& x) { return x.has_fetch_log(); }, 5s);
  ASSERT_TRUE(fetch) << "the finished attempt's log is not asked for";
  auto r = answer(a, fetch->fetch_log(), "first part\n", false);
  ASSERT_TRUE(r.ok() && !r->has_error()) << r.status();
  // The next chunk is asked for: the first one is in the copy being written.
  ASSERT_TRUE(a.WaitAction([](const auto& x) { return x.has_fetch_log(); }, 5s));

  KillNineAndRestart();
  FakeAgent& b = Rejoin("aws-0");
  fetch = b.WaitAction([](const auto& x) { return x.has_fetch_log(); }, 10s);
  ASSERT_TRUE(fetch) << "the copy in flight was forgotten with the coordinator";
  EXPECT_EQ(fetch->fetch_log().job_id(), *id);
  EXPECT_EQ(fetch->fetch_log().offset(), 0) << "asked again from the start";
  r = answer(b, fetch->fetch_log(), "first part\nsecond part\n", true);
  ASSERT_TRUE(r.ok() && !r->has_error()) << r.status();
  std::string kinds;
  ASSERT_TRUE(WaitUntil(
      [&] {
        kinds.clear();
        for (const auto& k : EventKinds(*id)) kinds += k + " ";
        return kinds.find("logs_kept") != std::string::npos;
      },
      5s))
      << kinds;
  EXPECT_NE(kinds.find("logs_copy_retry"), std::string::npos) << kinds;
  auto kept = client_->Logs(*id, 0, 0, 1000, 0, proto::LOG_MERGED, 0, /*kept=*/true);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->data(), "first part\nsecond part\n");
  EXPECT_TRUE(kept->kept());
}

}  // namespace
}  // namespace muster::coordinator
