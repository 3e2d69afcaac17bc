// The local provider end to end: a real coordinator started with --providers gets a job's
// nodes by starting real `muster agent` processes, runs the job on them, and stops them once
// they have been idle for the provider's idle_timeout.

#include <fmt/format.h>
#include <signal.h>

#include "tests/integration/provider_fixture.h"

namespace muster::providers_test {
namespace {

std::string LocalProviders(const fs::path& dir, const std::string& extra = "") {
  return fmt::format(
      "providers:\n"
      "  - name: aws\n"
      "    kind: local\n"
      "    max_nodes: 3\n"
      "    idle_timeout_s: 1\n"
      "    request_timeout_s: 20\n"
      "    work_dir: {}\n"
      "    node: {{slots: 2, volumes: {{ckpt: \"{}/vol-{{node}}\"}}}}\n{}",
      (dir / "local").string(), dir.string(), extra);
}

TEST_F(ProviderCluster, LocalJobGetsItsNodesOnDemandAndIdleNodesAreReleased) {
  ASSERT_TRUE(StartCoordinator(LocalProviders(dir_)));
  EXPECT_EQ(NodeCount(), 0);
  std::string job = Submit(
      "name: ondemand\ncommand: [\"/bin/sh\", \"-c\", \"echo rank=$RANK node=$NODE_RANK\"]\n"
      "nodes: 2\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "succeeded", 40s)) << Events(job) << ReadFile(dir_ / "coord.log");
  std::string events = Events(job);
  EXPECT_NE(events.find("requested 2 nodes from aws"), std::string::npos) << events;
  EXPECT_NE(events.find("node aws-1 up"), std::string::npos) << events;
  EXPECT_NE(events.find("node aws-2 up"), std::string::npos) << events;
  // Idle for 1 s: both go back, their agents exit, and the coordinator forgets them.
  EXPECT_TRUE(WaitUntil([&] { return NodeCount() == 0; }, 15s)) << *Muster({"nodes"});
  EXPECT_TRUE(
      WaitUntil([&] { return ProcessesMentioning((dir_ / "local").string()).empty(); }, 10s))
      << "agents still running";
  std::string log = ReadFile(dir_ / "coord.log");
  EXPECT_NE(log.find("released idle node aws-1"), std::string::npos) << log;
  EXPECT_NE(log.find("released idle node aws-2"), std::string::npos) << log;
}

// A finished job's rank logs outlive its on-demand nodes: the coordinator copies each node's
// rank logs when the attempt ends there, the idle nodes go back only after that, and `muster
// logs` reads every rank's lines, in order, from the coordinator's copy, also after a
// coordinator restart. (Before, the logs lived only on the released nodes: `muster logs` failed
// with "the agent of node aws-1 is not connected".)
TEST_F(ProviderCluster, AFinishedJobsLogsAreReadableAfterItsNodesAreReleasedIdle) {
  ASSERT_TRUE(StartCoordinator(LocalProviders(dir_)));
  std::string job = Submit(
      "name: logkeep\n"
      "command: [\"/bin/sh\", \"-c\", \"i=1; while [ $i -le 300 ]; do echo rank=$RANK "
      "line=$i; i=$((i+1)); done; echo rank=$RANK err >&2\"]\n"
      "nodes: 2\nranks_per_node: 2\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "succeeded", 40s)) << Events(job) << ReadFile(dir_ / "coord.log");
  // Both nodes idle out and go back; their agents are gone.
  ASSERT_TRUE(WaitUntil([&] { return NodeCount() == 0; }, 40s)) << *Muster({"nodes"});
  ASSERT_TRUE(
      WaitUntil([&] { return ProcessesMentioning((dir_ / "local").string()).empty(); }, 10s))
      << "agents still running";
  std::string events = Events(job);
  // The attempt that ran the ranks to the end (a start retried on other ports is another).
  const int attempt = Status(job).value("attempt", 0);
  ASSERT_GE(attempt, 1) << Status(job).dump();
  EXPECT_NE(events.find("logs_kept [aws-1]"), std::string::npos) << events;
  EXPECT_NE(events.find("logs_kept [aws-2]"), std::string::npos) << events;
  EXPECT_EQ(events.find("logs_lost"), std::string::npos) << events;

  auto expected = [](int rank) {
    std::string out;
    for (int i = 1; i <= 300; ++i) out += fmt::format("rank={} line={}\n", rank, i);
    return out + fmt::format("rank={} err\n", rank);
  };
  // `muster logs JOB --rank R [more]` with its stderr in a file.
  auto logs = [&](int rank, const std::string& more, std::string* err) {
    fs::path errf = dir_ / "logs-stderr.txt";
    auto out = RunCommand({"/bin/sh", "-c",
                           fmt::format("exec {} logs {} --rank {} {} --coordinator {} --keys {} "
                                       "2>{}",
                                       MUSTER_BIN, job, rank, more, endpoint_,
                                       (dir_ / "keys").string(), errf.string())},
                          15s);
    *err = ReadFile(errf);
    return out;
  };
  for (int rank = 0; rank < 4; ++rank) {
    std::string err;
    auto out = logs(rank, "", &err);
    ASSERT_TRUE(out.ok()) << out.status().ToString() << err;
    EXPECT_EQ(*out, expected(rank)) << "rank " << rank;
    std::string node = rank < 2 ? "aws-1" : "aws-2";
    EXPECT_EQ(err, fmt::format("muster logs: logs of attempt {} kept by the coordinator; node {} "
                               "was released\n",
                               attempt, node))
        << events;
  }
  // -f of a finished job ends at the end of the copy; --attempt N names the same copy.
  std::string err;
  auto follow = logs(3, "-f --attempt " + std::to_string(attempt), &err);
  ASSERT_TRUE(follow.ok()) << follow.status().ToString() << err;
  EXPECT_EQ(*follow, expected(3));

  // The copies are files under the data dir: a restarted coordinator serves them too.
  coordinator_.reset();
  fs::remove(dir_ / "coord" / "endpoint");
  ASSERT_TRUE(StartCoordinator(LocalProviders(dir_)));
  auto again = logs(2, "", &err);
  ASSERT_TRUE(again.ok()) << again.status().ToString() << err;
  EXPECT_EQ(*again, expected(2));
  EXPECT_TRUE(fs::exists(dir_ / "coord" / "logs" / job / std::to_string(attempt) / "rank-2.log"));
}

TEST_F(ProviderCluster, RequestsBeyondMaxNodesWaitWithTheLimitAsTheReason) {
  ASSERT_TRUE(StartCoordinator(LocalProviders(dir_)));
  // 4 nodes: the provider could hold it by its template, but max_nodes is 3: refused at submit.
  fs::path f = dir_ / "big.yaml";
  std::ofstream(f) << "name: big\ncommand: [\"true\"]\nnodes: 4\n";
  auto out = Muster({"submit", f.string()});
  EXPECT_FALSE(out.ok()) << *out;
  // Two jobs of 2 nodes: the second waits for the first's nodes (3 < 4).
  std::string a = Submit("name: a\ncommand: [\"sleep\", \"3\"]\nnodes: 2\n");
  std::string b = Submit("name: b\ncommand: [\"true\"]\nnodes: 2\n");
  ASSERT_TRUE(WaitState(a, "running", 30s)) << Events(a);
  auto st = Status(b);
  EXPECT_EQ(st.value("state", ""), "pending");
  EXPECT_TRUE(WaitUntil(
      [&] {
        return Status(b).value("pending_reason", "").find("at its limit of 3 nodes") !=
               std::string::npos;
      },
      5s))
      << Status(b).dump();
  ASSERT_TRUE(WaitState(b, "succeeded", 40s)) << Events(b);
}

// Hot spares come from the provider like gang nodes: a 1-node job with `spares: 1` gets two
// nodes, holds one idle for as long as it runs (never released, though idle_timeout is 1 s),
// and a spec whose gang and spares exceed max_nodes is refused at submit with the reason.
TEST_F(ProviderCluster, ASparesNodesComeFromTheProviderAndAreNotReleasedAsIdle) {
  ASSERT_TRUE(StartCoordinator(LocalProviders(dir_)));
  fs::path f = dir_ / "big.yaml";
  std::ofstream(f) << "name: big\ncommand: [\"true\"]\nnodes: 2\nspares: 2\n";
  auto refused = Muster({"submit", f.string()});
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("4 (2 for the gang + 2 spares)"), std::string::npos)
      << refused.status();
  EXPECT_NE(refused.status().message().find("provider aws: 3 (max_nodes 3)"), std::string::npos)
      << refused.status();
  std::string job = Submit("name: sp\ncommand: [\"sleep\", \"600\"]\nnodes: 1\nspares: 1\n");
  ASSERT_TRUE(WaitState(job, "running", 30s)) << Events(job);
  EXPECT_NE(Events(job).find("requested 2 nodes from aws"), std::string::npos) << Events(job);
  // The gang may start before its spare's agent has registered (it never waits for it).
  nlohmann::json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(job);
        return st.contains("spares") && st["spares"].size() == 1;
      },
      30s))
      << st.dump() << Events(job);
  const std::string spare = st["spares"][0];
  // Idle three times its idle_timeout while the job runs: never released.
  EXPECT_FALSE(WaitUntil(
      [&] {
        return ReadFile(dir_ / "coord.log").find("released idle node " + spare) !=
               std::string::npos;
      },
      3s))
      << "the spare was released while its job ran";
  auto nodes = Muster({"nodes", "--json"});
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  bool marked = false;
  for (const auto& n : nlohmann::json::parse(*nodes)) {
    if (n.value("name", "") == spare) marked = n.value("spare", false) && n["job_id"] == job;
  }
  EXPECT_TRUE(marked) << *nodes;
  ASSERT_TRUE(Muster({"cancel", job}).ok());
}

// The spare replaces a node whose agent is killed with SIGKILL; the job is then short of a
// spare, asks its provider for one, and holds the new node as its spare; the events say which
// spare replaced which node and that a new one was requested and held.
TEST_F(ProviderCluster, AfterASpareReplacesALostNodeTheProviderSuppliesANewSpare) {
  ASSERT_TRUE(StartCoordinator(LocalProviders(dir_)));
  std::string job = Submit(
      "name: sp\ncommand: [\"sleep\", \"600\"]\nnodes: 1\nspares: 1\n"
      "restart:\n  max_restarts: 0\n");
  ASSERT_TRUE(WaitState(job, "running", 30s)) << Events(job);
  // The gang may start before its spare's agent has registered (it never waits for it).
  nlohmann::json st;
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(job);
        return st.contains("spares") && st["spares"].size() == 1;
      },
      30s))
      << st.dump() << Events(job);
  const std::string lost = st["nodes"][0], spare = st["spares"][0];
  const int killed_attempt = st.value("attempt", 0);
  // Exactly one: a child the agent is forking has its command line until it execs.
  std::vector<pid_t> agent;
  ASSERT_TRUE(WaitUntil(
      [&] {
        agent = ProcessesMentioning((dir_ / "local" / lost).string() + std::string(1, '\0'));
        return agent.size() == 1;
      },
      5s))
      << "the agent of " << lost << ": " << agent.size() << " processes";
  ASSERT_EQ(kill(agent[0], SIGKILL), 0);
  // The next attempt, or a later one when the port it was given was taken on the spare by
  // another process (the agent's retry on other ports, not counted; seen under ctest -j2, which
  // can also have made the attempt the kill hits a later one than 1).
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(job);
        return st.value("attempt", 0) > killed_attempt && st.value("state", "") == "running" &&
               st["nodes"] == nlohmann::json({spare});
      },
      30s))
      << st.dump() << Events(job);
  ASSERT_TRUE(WaitUntil(
      [&] {
        st = Status(job);
        return st.contains("spares") && st["spares"].size() == 1 && st["spares"][0] != spare;
      },
      30s))
      << st.dump() << Events(job);
  const std::string fresh = st["spares"][0];
  std::string events = Events(job);
  auto at = [&](const std::string& what) { return events.find(what); };
  EXPECT_NE(at("spare " + spare + " replaces lost node " + lost), std::string::npos) << events;
  EXPECT_NE(at("a new one is requested"), std::string::npos) << events;
  EXPECT_NE(at("requested 1 node from aws"), std::string::npos) << events;
  // Held as the new spare: on its own, or by the placement of a port retry's attempt.
  EXPECT_TRUE(at("node " + fresh + " held as a new spare") != std::string::npos ||
              at("holding " + fresh + " idle as spare") != std::string::npos)
      << events;
  EXPECT_LT(at("replaces lost node"), at("requested 1 node from aws")) << events;
  ASSERT_TRUE(Muster({"cancel", job}).ok());
}

TEST_F(ProviderCluster, AFailingProviderIsRetriedThenSurfacedAsEventAndPendingReason) {
  // The work directory cannot be created: every try fails.
  ASSERT_TRUE(StartCoordinator(
      "providers:\n  - name: aws\n    kind: local\n    max_tries: 2\n    retry_backoff_s: 0.2\n"
      "    work_dir: /proc/muster-cannot-write\n"));
  std::string job = Submit("name: stuck\ncommand: [\"true\"]\nnodes: 1\n");
  ASSERT_TRUE(WaitUntil(
      [&] {
        return Status(job)
                   .value("pending_reason", "")
                   .find("provider aws could not supply 1 nodes after 2 tries") !=
               std::string::npos;
      },
      15s))
      << Status(job).dump() << Events(job);
  std::string events = Events(job);
  EXPECT_NE(events.find("provider_retry"), std::string::npos) << events;
  EXPECT_NE(events.find("provider_failed"), std::string::npos) << events;
  EXPECT_NE(events.find("cannot create /proc/muster-cannot-write"), std::string::npos) << events;
}

TEST_F(ProviderCluster, ABadProvidersFileStopsTheCoordinatorWithFileLineAndField) {
  fs::create_directories(dir_ / "coord");
  std::ofstream(dir_ / "bad.yaml") << "providers:\n  - name: aws\n    kind: local\n"
                                      "    work_dir: /tmp\n    max_nodes: lots\n";
  auto out = RunCommand({MUSTER_BIN, "coordinator", "--data-dir", (dir_ / "coord").string(),
                         "--keys", (dir_ / "keys").string(), "--listen", "tcp://127.0.0.1:*",
                         "--providers", (dir_ / "bad.yaml").string()},
                        10s);
  ASSERT_FALSE(out.ok());
  EXPECT_NE(out.status().message().find(
                (dir_ / "bad.yaml").string() +
                ":5: providers[0].max_nodes: must be an integer in [1, 100000], not \"lots\""),
            std::string::npos)
      << out.status().message();
}

}  // namespace
}  // namespace muster::providers_test
