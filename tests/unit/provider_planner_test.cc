// The provider rules of planner.h, table-driven: no processes, time passed in.

#include <gtest/gtest.h>

#include "coordinator/providers/planner.h"
#include "coordinator/providers/provider_config.h"

namespace muster::coordinator::providers {
namespace {

using namespace std::chrono_literals;

const TimePoint kT0 = TimePoint(std::chrono::seconds(1'800'000'000));

ProviderConfig Prov(std::string name, std::string kind = "local") {
  ProviderConfig p;
  p.name = std::move(name);
  p.kind = std::move(kind);
  p.max_nodes = 4;
  p.max_pending_requests = 1;
  p.idle_timeout = 30s;
  p.request_timeout = 60s;
  p.max_tries = 3;
  p.retry_backoff = 2s;
  p.retry_backoff_max = 5s;
  p.node.slots = 2;
  p.node.volumes["ckpt"] = "/v/{node}";
  return p;
}

JobRequest Job(std::string id, int nodes, uint64_t seq = 1) {
  JobRequest j;
  j.id = std::move(id);
  j.nodes = nodes;
  j.ranks_per_node = 1;
  j.seq = seq;
  return j;
}

NodeView Node(std::string name, std::string provider, std::string job = "",
              NodeState state = NodeState::kUp) {
  NodeView v;
  v.spec.name = std::move(name);
  v.spec.provider = std::move(provider);
  v.spec.slots = 2;
  v.job = std::move(job);
  v.state = state;
  return v;
}

OutstandingRequest Req(uint64_t id, std::string provider, std::string job,
                       std::vector<std::string> nodes, TimePoint issued, int tries = 1) {
  OutstandingRequest r;
  r.id = id;
  r.provider = std::move(provider);
  r.job = std::move(job);
  r.nodes = std::move(nodes);
  r.issued = issued;
  r.tries = tries;
  return r;
}

PlannerInput Input(std::vector<ProviderConfig> providers) {
  PlannerInput in;
  in.providers = std::move(providers);
  in.now = kT0;
  return in;
}

TEST(ProviderPlannerTest, RequestsTheNodesAGangLacksFromTheFirstFittingProvider) {
  struct Case {
    std::string name;
    std::vector<ProviderConfig> providers;
    JobRequest job;
    std::vector<NodeView> nodes;
    std::string want_provider;  // empty: no request
    int want_nodes;
    std::string want_reason;
  };
  auto gpu = Prov("gcp");
  gpu.node.gpu_type = "h100";
  gpu.node.gpus = 8;
  auto h100 = Job("j", 2);
  h100.gpu_type = "h100";
  auto only_gcp = Job("j", 2);
  only_gcp.providers = {"gcp"};
  auto vol = Job("j", 1);
  vol.checkpoint_volume = "other";
  auto pinned = Job("j", 1);
  pinned.hosts = {"x"};
  std::vector<Case> cases = {
      {"plain",
       {Prov("aws"), Prov("gcp")},
       Job("j", 2),
       {},
       "aws",
       2,
       "waiting for 2 nodes from provider aws"},
      {"static providers are never asked",
       {Prov("onprem", "static"), Prov("gcp")},
       Job("j", 2),
       {},
       "gcp",
       2,
       "waiting for 2 nodes from provider gcp"},
      {"gpu type picks the provider",
       {Prov("aws"), gpu},
       h100,
       {},
       "gcp",
       2,
       "waiting for 2 nodes from provider gcp"},
      {"the job's provider list",
       {Prov("aws"), Prov("gcp")},
       only_gcp,
       {},
       "gcp",
       2,
       "waiting for 2 nodes from provider gcp"},
      {"idle nodes count",
       {Prov("aws")},
       Job("j", 3),
       {Node("aws-1", "aws")},
       "aws",
       2,
       "waiting for 2 nodes from provider aws"},
      {"no provider mounts the volume", {Prov("aws")}, vol, {}, "", 0, ""},
      {"pinned hosts are not requested", {Prov("aws")}, pinned, {}, "", 0, ""},
      {"max_nodes",
       {Prov("aws")},
       Job("j", 3),
       {Node("aws-1", "aws", "other"), Node("aws-2", "aws", "other")},
       "",
       0,
       "waiting: provider aws is at its limit of 4 nodes (2 held)"},
      {"max_nodes falls through to the next provider",
       {Prov("aws"), Prov("gcp")},
       Job("j", 5),
       {},
       "",
       0,
       "waiting: provider aws is at its limit of 4 nodes (0 held)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto in = Input(c.providers);
    in.pending = {c.job};
    in.nodes = c.nodes;
    auto d = PlanProviders(in);
    if (c.want_provider.empty()) {
      EXPECT_TRUE(d.requests.empty());
    } else {
      ASSERT_EQ(d.requests.size(), 1u);
      EXPECT_EQ(d.requests[0].provider, c.want_provider);
      EXPECT_EQ(d.requests[0].nodes, c.want_nodes);
      EXPECT_EQ(d.requests[0].job, "j");
    }
    EXPECT_EQ(d.pending_reasons["j"], c.want_reason);
  }
}

TEST(ProviderPlannerTest, MaxPendingRequestsHoldsTheNextGang) {
  auto in = Input({Prov("aws")});
  in.pending = {Job("a", 1, 1), Job("b", 1, 2)};
  auto d = PlanProviders(in);
  ASSERT_EQ(d.requests.size(), 1u);
  EXPECT_EQ(d.requests[0].job, "a");
  EXPECT_EQ(d.pending_reasons["b"], "waiting: provider aws already has 1 requests pending");
  // With the first in flight, the second still waits; with a higher limit it goes.
  in.requests = {Req(1, "aws", "a", {"aws-1"}, kT0)};
  d = PlanProviders(in);
  EXPECT_TRUE(d.requests.empty());
  EXPECT_EQ(d.pending_reasons["a"], "waiting for 1 nodes from provider aws");
  in.providers[0].max_pending_requests = 2;
  d = PlanProviders(in);
  ASSERT_EQ(d.requests.size(), 1u);
  EXPECT_EQ(d.requests[0].job, "b");
}

TEST(ProviderPlannerTest, OutstandingRequestCountsItsMissingNodesAndEndsWhenAllAreUp) {
  auto in = Input({Prov("aws")});
  in.pending = {Job("a", 2)};
  in.requests = {Req(7, "aws", "a", {"aws-1", "aws-2"}, kT0)};
  in.nodes = {Node("aws-1", "aws")};
  in.idle_since["aws-1"] = kT0 - 1h;  // up long ago, but its group is not complete
  auto d = PlanProviders(in);
  EXPECT_TRUE(d.requests.empty());
  EXPECT_TRUE(d.releases.empty()) << "a node whose group is still coming is kept";
  EXPECT_EQ(d.pending_reasons["a"], "waiting for 1 nodes from provider aws");
  in.nodes.push_back(Node("aws-2", "aws"));
  d = PlanProviders(in);
  EXPECT_EQ(d.done, std::vector<uint64_t>{7});
}

TEST(ProviderPlannerTest, FailedOrLateTriesRetryWithBackoffThenGiveUp) {
  struct Case {
    std::string name;
    int tries;
    std::optional<std::string> failed;
    std::chrono::seconds age;
    bool want_retry, want_give_up;
    std::chrono::seconds want_backoff;
    std::string want_reason;
  };
  std::vector<Case> cases = {
      {"in time", 1, std::nullopt, 59s, false, false, 0s, "waiting for 1 nodes from provider aws"},
      {"timed out, first try", 1, std::nullopt, 60s, true, false, 2s,
       "waiting for 1 nodes from provider aws: try 1 of 3 failed (1 of 1 nodes not up after 60 "
       "s); retrying in 2 s"},
      {"failed, second try: backoff doubles", 2, "sbatch: no partition", 1s, true, false, 4s,
       "waiting for 1 nodes from provider aws: try 2 of 3 failed (sbatch: no partition); "
       "retrying in 4 s"},
      {"last try: given up", 3, "sbatch: no partition", 1s, false, true, 0s,
       "provider aws could not supply 1 nodes after 3 tries: sbatch: no partition"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto in = Input({Prov("aws")});
    in.pending = {Job("a", 1)};
    auto r = Req(3, "aws", "a", {"aws-1"}, kT0 - c.age, c.tries);
    r.failed = c.failed;
    in.requests = {r};
    auto d = PlanProviders(in);
    EXPECT_TRUE(d.requests.empty());
    EXPECT_EQ(d.retries.size(), c.want_retry ? 1u : 0u);
    if (c.want_retry) {
      EXPECT_EQ(d.retries[0].at, kT0 + c.want_backoff);
    }
    EXPECT_EQ(d.give_ups.size(), c.want_give_up ? 1u : 0u);
    EXPECT_EQ(d.pending_reasons["a"], c.want_reason);
  }
}

TEST(ProviderPlannerTest, BackoffIsCapped) {
  auto p = Prov("aws");
  p.max_tries = 10;
  auto in = Input({p});
  in.pending = {Job("a", 1)};
  auto r = Req(3, "aws", "a", {"aws-1"}, kT0, 6);
  r.failed = "no";
  in.requests = {r};
  auto d = PlanProviders(in);
  ASSERT_EQ(d.retries.size(), 1u);
  EXPECT_EQ(d.retries[0].at, kT0 + 5s);  // 2 * 2^5 = 64 s, capped at retry_backoff_max
}

TEST(ProviderPlannerTest, ARetryIsMadeWhenDueAndDroppedWhenTheGangLeft) {
  auto in = Input({Prov("aws")});
  in.pending = {Job("a", 2)};
  auto r = Req(3, "aws", "a", {"aws-1", "aws-2"}, kT0 - 10s, 1);
  r.waiting_retry = true;
  r.retry_at = kT0 + 1s;
  r.last_error = "boom";
  in.requests = {r};
  auto d = PlanProviders(in);
  EXPECT_TRUE(d.requests.empty());
  EXPECT_EQ(d.pending_reasons["a"],
            "waiting for 2 nodes from provider aws: try 1 of 3 failed (boom); retrying in 1 s");
  in.now = kT0 + 1s;
  d = PlanProviders(in);
  ASSERT_EQ(d.requests.size(), 1u);
  EXPECT_EQ(d.requests[0].retry_of, 3u);
  EXPECT_EQ(d.requests[0].tries, 2);
  EXPECT_EQ(d.requests[0].nodes, 2);
  in.pending.clear();
  d = PlanProviders(in);
  EXPECT_TRUE(d.requests.empty());
  EXPECT_EQ(d.done, std::vector<uint64_t>{3});
}

TEST(ProviderPlannerTest, AGivenUpProviderIsSkippedThenAskedAgainAfterTheMaxBackoff) {
  std::string why = "provider aws could not supply 1 nodes after 3 tries: x";
  auto in = Input({Prov("aws")});
  in.pending = {Job("a", 1)};
  in.given_up["a"]["aws"] = GivenUp{why, kT0};
  auto d = PlanProviders(in);
  EXPECT_TRUE(d.requests.empty());
  EXPECT_EQ(d.pending_reasons["a"], why);
  in.now = kT0 + 5s;  // retry_backoff_max
  d = PlanProviders(in);
  ASSERT_EQ(d.requests.size(), 1u);
  EXPECT_EQ(d.requests[0].provider, "aws");
}

TEST(ProviderPlannerTest, AGangFailsOverToTheNextProviderWhenOneIsGivenUp) {
  auto in = Input({Prov("hpc", "slurm"), Prov("aws")});
  in.pending = {Job("a", 2)};
  in.given_up["a"]["hpc"] = GivenUp{"provider hpc could not supply 2 nodes after 1 tries: x", kT0};
  auto d = PlanProviders(in);
  ASSERT_EQ(d.requests.size(), 1u);
  EXPECT_EQ(d.requests[0].provider, "aws");
  EXPECT_EQ(d.pending_reasons["a"], "waiting for 2 nodes from provider aws");
}

TEST(ProviderPlannerTest, ReleasesOnlyIdleNodesPastTheirProvidersTimeout) {
  auto slow = Prov("gcp");
  slow.idle_timeout = 120s;
  struct Case {
    std::string name;
    NodeView node;
    std::chrono::seconds idle;
    bool want_release;
  };
  std::vector<Case> cases = {
      {"idle past timeout", Node("aws-1", "aws"), 30s, true},
      {"idle, not yet", Node("aws-1", "aws"), 29s, false},
      {"runs ranks, however long", Node("aws-1", "aws", "job-1"), 3600s, false},
      {"draining and idle", Node("aws-1", "aws", "", NodeState::kDraining), 30s, true},
      {"lost: forgotten after the timeout", Node("aws-1", "aws", "", NodeState::kDown), 30s, true},
      {"lost, not yet", Node("aws-1", "aws", "", NodeState::kDown), 29s, false},
      {"per-provider timeout", Node("gcp-1", "gcp"), 60s, false},
      {"per-provider timeout, reached", Node("gcp-1", "gcp"), 120s, true},
      {"static nodes stay", Node("lab-1", "lab"), 3600s, false},
      {"unknown provider: static", Node("x-1", "x"), 3600s, false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto in = Input({Prov("aws"), slow, Prov("lab", "static")});
    in.nodes = {c.node};
    in.idle_since[c.node.spec.name] = kT0 - c.idle;
    auto d = PlanProviders(in);
    ASSERT_EQ(d.releases.size(), c.want_release ? 1u : 0u);
    if (c.want_release) {
      EXPECT_EQ(d.releases[0].node, c.node.spec.name);
    }
  }
}

TEST(ProviderPlannerTest, AnIdleNodeAPendingGangCountsOnIsKept) {
  auto in = Input({Prov("aws")});
  in.pending = {Job("a", 2)};
  in.nodes = {Node("aws-1", "aws"), Node("aws-2", "aws", "busy")};
  in.idle_since["aws-1"] = kT0 - 1h;
  auto d = PlanProviders(in);
  EXPECT_TRUE(d.releases.empty());
  ASSERT_EQ(d.requests.size(), 1u);
  EXPECT_EQ(d.requests[0].nodes, 1);
}

TEST(ProviderPlannerTest, NeverReleasesANodeThatRunsRanksWhateverElseHolds) {
  // Property over many inputs: whatever the idle clocks say, busy nodes stay.
  for (int idle = 0; idle < 200; idle += 7) {
    auto p = Prov("aws");
    p.idle_timeout = std::chrono::seconds(idle % 50);
    auto in = Input({p});
    for (int i = 0; i < 6; ++i) {
      std::string n = "aws-" + std::to_string(i);
      in.nodes.push_back(Node(n, "aws", i % 2 ? "job" : ""));
      in.idle_since[n] = kT0 - std::chrono::seconds(idle);
    }
    for (const auto& r : PlanProviders(in).releases) {
      int i = std::stoi(r.node.substr(4));
      EXPECT_EQ(i % 2, 0) << r.node << " runs a job";
    }
  }
}

TEST(ProvidersConfigTest, ParsesAFullFile) {
  auto cfg = ParseProvidersConfig(R"(
providers:
  - name: lab
  - name: aws
    kind: local
    max_nodes: 6
    max_pending_requests: 2
    idle_timeout_s: 1.5
    request_timeout_s: 20
    max_tries: 4
    retry_backoff_s: 0.5
    work_dir: /tmp/x
    node: {gpu_type: h100, gpus: 8, slots: 8, island: a, volumes: {ckpt: "/v/{node}"}}
  - name: hpc
    kind: slurm
    slurm: {partition: gpu, gres: "gpu:h100:8", signal_lead_s: 90, extra_args: [--qos=high]}
)",
                                  "p.yaml");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  ASSERT_EQ(cfg->providers.size(), 3u);
  EXPECT_EQ(cfg->providers[0].kind, "static");
  const auto& aws = cfg->providers[1];
  EXPECT_EQ(aws.max_nodes, 6);
  EXPECT_EQ(aws.idle_timeout, 1500ms);
  EXPECT_EQ(aws.retry_backoff, 500ms);
  EXPECT_EQ(aws.node.gpus, 8);
  EXPECT_EQ(aws.node.volumes.at("ckpt"), "/v/{node}");
  EXPECT_EQ(cfg->providers[2].slurm.gres, "gpu:h100:8");
  EXPECT_EQ(cfg->providers[2].slurm.signal_lead_s, 90);
  EXPECT_EQ(cfg->providers[2].slurm.extra_args, std::vector<std::string>{"--qos=high"});
}

// The providers config reports its errors as the job spec does (coordinator/config_errors.h):
// every one, sorted by line, counted past the listed ones, bad values clipped and escaped.
TEST(ProvidersConfigTest, ErrorsAreSortedCountedAndEscapedAsTheJobSpecs) {
  std::string text = "providers:\n";
  for (int i = 0; i < 120; ++i) {
    text += "  - name: p" + std::to_string(i) + "\n    kind: local\n    work_dir: /w\n" +
            "    max_nodes: \"x\\ty\"\n";
  }
  text += "nodes: 3\n";
  auto cfg = ParseProvidersConfig(text, "p.yaml");
  ASSERT_FALSE(cfg.ok());
  const std::string m = cfg.status().message();
  EXPECT_EQ(m.rfind("invalid providers config (121 errors):", 0), 0u) << m;
  EXPECT_NE(m.find("p.yaml:5: providers[0].max_nodes: must be an integer in [1, 100000], not "
                   "\"x\\x09y\""),
            std::string::npos)
      << m;
  EXPECT_LT(m.find("p.yaml:5:"), m.find("p.yaml:9:")) << m;
  EXPECT_NE(m.find("... and 21 more"), std::string::npos) << m;
}

TEST(ProvidersConfigTest, ErrorsNameFileLineAndField) {
  struct Case {
    std::string text, want;
  };
  std::vector<Case> cases = {
      {"providers:\n  - name: aws\n    kind: local\n    work_dir: /w\n    max_nodes: -1\n",
       "p.yaml:5: providers[0].max_nodes: must be an integer in [1, 100000], not \"-1\""},
      {"providers:\n  - name: aws\n    kind: cloud\n",
       "p.yaml:3: providers[0].kind: must be static, local or slurm, not \"cloud\""},
      {"providers:\n  - name: aws\n    kind: local\n    work_dir: /w\n    idle_timeout: 5\n",
       "p.yaml:5: providers[0].idle_timeout: unknown field"},
      {"providers:\n  - name: aws\n  - name: aws\n",
       "p.yaml:3: providers[1].name: provider aws is defined twice"},
      {"providers:\n  - name: aws\n    kind: local\n",
       "p.yaml:2: providers[0].work_dir: is required for a local provider"},
      {"providers:\n  - kind: local\n", "p.yaml:2: providers[0].name: is required"},
      {"providers: [\n", "p.yaml:2: yaml:"},
      {"nodes: 3\n", "p.yaml:1: nodes: unknown field"},
      {"providers:\n  - name: aws\n    kind: slurm\n    slurm: {partition: \"a b\"}\n",
       "p.yaml:4: providers[0].slurm.partition: must not hold spaces"},
      {"providers:\n  - name: aws\n    slurm: {}\n",
       "p.yaml:3: providers[0].slurm: only a provider of kind slurm"},
      {"providers:\n  - name: aws\n    kind: local\n    work_dir: /w\n    node: {volumes: {c: "
       "rel}}\n",
       "p.yaml:5: providers[0].node.volumes.c: must be an absolute path"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    auto cfg = ParseProvidersConfig(c.text, "p.yaml");
    ASSERT_FALSE(cfg.ok());
    EXPECT_NE(cfg.status().message().find(c.want), std::string::npos) << cfg.status().message();
  }
  EXPECT_EQ(LoadProvidersConfig("/nonexistent/p.yaml").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace muster::coordinator::providers
