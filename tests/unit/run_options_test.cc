// `muster run` argument, host-list and hostfile parsing, and rank planning.

#include "launcher/run_options.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <map>

#include "common/rank_env.h"
#include "launcher/launcher.h"
#include "node_agent/supervisor.h"

namespace muster::launcher {
namespace {

using namespace std::chrono_literals;

TEST(RunOptionsTest, ParsesMpirunStyleOptionsThenTheProgram) {
  auto o = ParseRunArgs({"-np", "4", "-H", "localhost:2,localhost:2", "-x", "A=1", "-x", "B",
                         "--tag-output", "--timeout", "1.5", "--grace=0.25", "prog", "-np", "x"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->np, 4);
  ASSERT_EQ(o->hosts.size(), 2u);
  EXPECT_EQ(o->hosts[1].slots, 2);
  EXPECT_EQ(o->exports, (std::vector<std::string>{"A=1", "B"}));
  EXPECT_TRUE(o->tag_output);
  EXPECT_EQ(*o->timeout, 1500ms);
  EXPECT_EQ(o->grace, 250ms);
  // Everything from the program on belongs to the program.
  EXPECT_EQ(o->program, (std::vector<std::string>{"prog", "-np", "x"}));
}

TEST(RunOptionsTest, DoubleDashEndsOptions) {
  auto o = ParseRunArgs({"-n", "2", "--", "--weird-prog-name"});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->program, (std::vector<std::string>{"--weird-prog-name"}));
}

TEST(RunOptionsTest, RejectsBadValuesNamingThem) {
  EXPECT_NE(ParseRunArgs({"-np", "zero", "x"}).status().message().find("zero"), std::string::npos);
  EXPECT_FALSE(ParseRunArgs({"-np", "0", "x"}).ok());
  EXPECT_FALSE(ParseRunArgs({"--timeout", "-1", "x"}).ok());
  EXPECT_FALSE(ParseRunArgs({"--timeout", "0", "x"}).ok());
  EXPECT_FALSE(ParseRunArgs({"--grace", "soon", "x"}).ok());
  EXPECT_FALSE(ParseRunArgs({"-np"}).ok());
  EXPECT_FALSE(ParseRunArgs({"-x", "=v", "x"}).ok());
  EXPECT_EQ(ParseRunArgs({"--hostfile", "/nonexistent/hosts", "x"}).status().code(),
            StatusCode::kNotFound);
  EXPECT_FALSE(ParseRunArgs({"-H", "a:,b", "x"}).ok());
}

TEST(RunOptionsTest, ParsesHostListsAndHostfilesAsOpenMpi) {
  auto h = ParseHostList("a:2,b,c:16");
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->size(), 3u);
  EXPECT_EQ((*h)[0].host, "a");
  EXPECT_EQ((*h)[1].slots, 1);
  EXPECT_EQ((*h)[2].slots, 16);

  auto f = ParseHostfile(
      "# cluster\nnode1 slots=4\n\nnode2   # one slot\nnode3 slots=2 max_slots=8\n", "hosts");
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->size(), 3u);
  EXPECT_EQ((*f)[0].slots, 4);
  EXPECT_EQ((*f)[1].host, "node2");
  EXPECT_EQ((*f)[1].slots, 1);
  EXPECT_EQ((*f)[2].slots, 2);

  auto bad = ParseHostfile("node1 slots=4\nnode2 cpus=3\n", "hosts");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("hosts:2"), std::string::npos) << bad.status();
  EXPECT_FALSE(ParseHostfile("# nothing\n", "hosts").ok());
}

TEST(RunOptionsTest, KnowsWhichHostsAreThisMachine) {
  EXPECT_TRUE(IsLocalHost("localhost"));
  EXPECT_TRUE(IsLocalHost("127.0.0.1"));
  char name[256] = {};
  ASSERT_EQ(gethostname(name, sizeof(name) - 1), 0);
  EXPECT_TRUE(IsLocalHost(name));
  EXPECT_FALSE(IsLocalHost("gpu-node-17.example.com"));
}

TEST(RunOptionsTest, ResolvesExportsByValueOrFromTheEnvironment) {
  auto got = ResolveExports({"A=1", "B", "C=x=y", "EMPTY"}, {"B=from-env", "BB=no", "EMPTY="});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, (std::map<std::string, std::string>{
                      {"A", "1"}, {"B", "from-env"}, {"C", "x=y"}, {"EMPTY", ""}}));
  auto missing = ResolveExports({"B"}, {"BB=no", "B"});
  EXPECT_EQ(missing.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("-x B: B is not set"), std::string::npos)
      << missing.status();
}

TEST(PlanRanksTest, FillsSlotsInOrderAndRefusesTooManyRanks) {
  RunOptions o;
  o.program = {"true"};
  o.hosts = {{"localhost", 2}, {"127.0.0.1", 3}};
  LaunchContext ctx;
  ctx.job_id = "j";
  auto plan = PlanRanks(o, ctx);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->size(), 5u);  // -np defaults to every slot
  EXPECT_EQ((*plan)[1].host, "localhost");
  EXPECT_EQ((*plan)[2].host, "127.0.0.1");
  o.np = 6;
  EXPECT_EQ(PlanRanks(o, ctx).status().code(), StatusCode::kInvalidArgument);
  o.np = 0;
  o.hosts = {{"gpu-node-17", 8}};
  auto remote = PlanRanks(o, ctx);
  ASSERT_FALSE(remote.ok());
  EXPECT_NE(remote.status().message().find("--coordinator"), std::string::npos);
}

TEST(PlanRanksTest, ContractOverridesExportsWhichOverrideTheEnvironment) {
  RunOptions o;
  o.program = {"true"};
  o.np = 2;
  o.exports = {"A=from-x", "RANK=99", "B"};
  LaunchContext ctx;
  ctx.job_id = "j";
  ctx.base_env = {"A=from-env", "B=kept", "PATH=/bin"};
  auto plan = PlanRanks(o, ctx);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto has = [&](const RankPlan& p, const std::string& kv) {
    return std::find(p.env.begin(), p.env.end(), kv) != p.env.end();
  };
  EXPECT_TRUE(has((*plan)[1], "A=from-x"));
  EXPECT_TRUE(has((*plan)[1], "B=kept"));
  EXPECT_TRUE(has((*plan)[1], "RANK=1"));
  EXPECT_TRUE(has((*plan)[1], "CUDA_VISIBLE_DEVICES="));  // no GPUs: none visible
  o.exports = {"UNSET_VAR_FOR_TEST"};
  EXPECT_NE(PlanRanks(o, ctx).status().message().find("UNSET_VAR_FOR_TEST"), std::string::npos);
}

// `muster run` keeps its own spawn path (docs/architecture.md, "muster run"), so this pins what
// keeps it from drifting from the agents': every rank's environment is the one env type's
// (RankEnv) through the one builder (ComposeRankEnviron), the same as an agent's. The ranks
// read it back with RankEnv::FromEnviron into exactly the fields the plan chose, every
// variable ToEnviron writes is there as written, and the launcher adds no contract or
// MUSTER_* variable of its own beside them.
TEST(PlanRanksTest, EveryRankGetsTheEnvContractThroughTheOneEnvType) {
  RunOptions o;
  o.program = {"true"};
  o.np = 3;
  o.checkpoint_dir = "/ckpt/j";
  o.exports = {"MUSTER_COLL_BACKEND=gloo", "USER_VAR=1"};
  LaunchContext ctx;
  ctx.job_id = "j";
  ctx.master_port = 29500;
  ctx.rdzv_endpoint = "tcp://127.0.0.1:30000";
  ctx.rdzv_key = "insecure";
  ctx.gpus = {"0", "1"};
  ctx.base_env = {"PATH=/bin", "MUSTER_STALE_FROM_PARENT=x", "RANK=7"};
  auto plan = PlanRanks(o, ctx);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->size(), 3u);
  for (const RankPlan& p : *plan) {
    SCOPED_TRACE("rank " + std::to_string(p.rank));
    std::map<std::string, std::string> env;
    for (const auto& kv : p.env) {
      size_t eq = kv.find('=');
      ASSERT_NE(eq, std::string::npos) << kv;
      ASSERT_TRUE(env.emplace(kv.substr(0, eq), kv.substr(eq + 1)).second) << "twice: " << kv;
    }
    std::vector<std::string> unknown;
    auto got = RankEnv::FromEnviron(env, &unknown);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(unknown.empty()) << unknown[0];
    RankEnv want;
    want.rank = p.rank;
    want.world_size = 3;
    want.local_rank = p.rank;
    want.local_world_size = 3;
    want.master_addr = "127.0.0.1";
    want.master_port = 29500;
    want.cuda_visible_devices = ctx.gpus[p.rank % 2];
    want.job_id = "j";
    want.rdzv_endpoint = ctx.rdzv_endpoint;
    want.rdzv_key = "insecure";
    want.checkpoint_dir = "/ckpt/j";
    want.control_fd = node_agent::Supervisor::kControlFd;
    want.coll_backend = "gloo";
    EXPECT_EQ(*got, want);
    for (const auto& [k, v] : want.ToEnviron()) {
      auto it = env.find(k);
      ASSERT_NE(it, env.end()) << k << " is missing";
      EXPECT_EQ(it->second, v) << k;
    }
    for (const auto& [k, v] : env) {
      if (RankEnv::IsContractName(k) || k.rfind("MUSTER_", 0) == 0) {
        EXPECT_TRUE(want.ToEnviron().count(k) || RankEnv::IsKnobName(k)) << k << "=" << v;
      }
    }
    EXPECT_EQ(env["USER_VAR"], "1");
  }
}

}  // namespace
}  // namespace muster::launcher
