// `muster run` argument, host-list and hostfile parsing, and rank planning.

#include "launcher/run_options.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "launcher/launcher.h"

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

}  // namespace
}  // namespace muster::launcher
