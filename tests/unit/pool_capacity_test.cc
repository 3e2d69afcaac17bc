// PoolCanEverHold: a job's gang and spares against what each provider can ever hold at once
// (static providers: their registered nodes; on-demand providers: max_nodes).

#include "coordinator/pool_capacity.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace muster::coordinator {
namespace {

NodeView Node(const std::string& name, const std::string& provider, const std::string& island = "a",
              NodeState state = NodeState::kUp, int gpus = 8) {
  NodeView v;
  v.spec.name = name;
  v.spec.provider = provider;
  v.spec.island = island;
  v.spec.gpu_type = "h100";
  v.spec.gpus = gpus;
  v.spec.slots = 8;
  v.state = state;
  return v;
}

providers::ProviderConfig OnDemand(const std::string& name, int max_nodes,
                                   const std::string& island = "a", int gpus = 8) {
  providers::ProviderConfig p;
  p.name = name;
  p.kind = "local";
  p.max_nodes = max_nodes;
  p.node.island = island;
  p.node.gpu_type = "h100";
  p.node.gpus = gpus;
  p.node.slots = 8;
  return p;
}

JobRequest Job(int nodes, int spares, IslandPolicy island = IslandPolicy::kAny) {
  JobRequest j;
  j.id = "j";
  j.nodes = nodes;
  j.spares = spares;
  j.gpu_type = "h100";
  j.gpus_per_node = 8;
  j.island = island;
  return j;
}

std::string Refusal(const Status& st) {
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  return std::string(st.message());
}

// A lost node waiting for its release and its replacement are both registered, but the
// provider never holds more than max_nodes at once: max_nodes counts, not what is registered.
TEST(PoolCapacityTest, AnOnDemandProviderCountsItsMaxNodesNotItsRegisteredNodes) {
  providers::ProvidersConfig cfg;
  cfg.providers = {OnDemand("loc", 2)};
  std::vector<NodeView> nodes = {Node("loc-0", "loc", "a", NodeState::kDown), Node("loc-1", "loc"),
                                 Node("loc-2", "loc")};
  std::string m = Refusal(PoolCanEverHold(Job(2, 1), nodes, cfg));
  EXPECT_NE(m.find("it needs 3 (2 for the gang + 1 spare) on one provider"), std::string::npos)
      << m;
  EXPECT_NE(m.find("the most that can ever exist on one provider is 2: provider loc: 2 "
                   "(max_nodes 2)"),
            std::string::npos)
      << m;
  EXPECT_TRUE(PoolCanEverHold(Job(2, 0), nodes, cfg).ok());
  // And one with few nodes registered yet may grow to max_nodes.
  cfg.providers = {OnDemand("loc", 4)};
  EXPECT_TRUE(PoolCanEverHold(Job(2, 1), {Node("loc-0", "loc")}, cfg).ok());
  EXPECT_TRUE(PoolCanEverHold(Job(2, 2), {}, cfg).ok());
}

// Static providers (named `static` in the file, or not named at all) hold their registered
// nodes that fit, down ones included; a provider is one pool: no sum across providers.
TEST(PoolCapacityTest, StaticProvidersCountTheirRegisteredNodesAndPoolsAreNeverSummed) {
  providers::ProvidersConfig cfg;
  providers::ProviderConfig st;
  st.name = "dc";
  st.kind = "static";
  st.max_nodes = 1;  // means nothing for a static provider
  cfg.providers = {st, OnDemand("loc", 2)};
  std::vector<NodeView> nodes = {Node("dc-0", "dc"), Node("dc-1", "dc", "a", NodeState::kDown),
                                 Node("aws-0", "aws"), Node("aws-1", "aws"),
                                 Node("aws-2", "aws", "a", NodeState::kUp, /*gpus=*/4)};
  EXPECT_TRUE(PoolCanEverHold(Job(1, 1), nodes, cfg).ok());
  std::string m = Refusal(PoolCanEverHold(Job(2, 1), nodes, cfg));
  EXPECT_NE(m.find("it needs 3 (2 for the gang + 1 spare) on one provider with gpu_type h100, "
                   ">= 8 GPUs"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("is 2: provider aws: 2 (2 registered nodes fit); provider dc: 2 (2 "
                   "registered nodes fit); provider loc: 2 (max_nodes 2)"),
            std::string::npos)
      << m;
}

// Island policy `required`: each (provider, island) is a pool; an on-demand provider's nodes
// are on its template's island.
TEST(PoolCapacityTest, ARequiredIslandCountsOneIslandOfOneProvider) {
  providers::ProvidersConfig cfg;
  cfg.providers = {OnDemand("loc", 2, "c")};
  std::vector<NodeView> nodes = {Node("aws-0", "aws", "a"), Node("aws-1", "aws", "a"),
                                 Node("aws-2", "aws", "b")};
  EXPECT_TRUE(PoolCanEverHold(Job(2, 1), nodes, cfg).ok()) << "any island: 3 on aws";
  std::string m = Refusal(PoolCanEverHold(Job(2, 1, IslandPolicy::kRequired), nodes, cfg));
  EXPECT_NE(m.find("on one island"), std::string::npos) << m;
  EXPECT_NE(m.find("is 2: provider aws, island a: 2 (2 registered nodes fit); provider loc, "
                   "island c: 2 (max_nodes 2); provider aws, island b: 1 (1 registered node "
                   "fits)"),
            std::string::npos)
      << m;
}

// An on-demand provider whose template does not fit holds only its fitting nodes that are up
// (at most max_nodes); a job limited to some providers counts only those; nothing fits: said so.
TEST(PoolCapacityTest, TemplatesThatDoNotFitAndProviderFiltersAreHonoured) {
  providers::ProvidersConfig cfg;
  cfg.providers = {OnDemand("small", 8, "a", /*gpus=*/4), OnDemand("big", 8)};
  std::vector<NodeView> nodes = {Node("small-0", "small"), Node("small-1", "small"),
                                 Node("small-2", "small", "a", NodeState::kDown)};
  JobRequest j = Job(2, 1);
  j.providers = {"small"};
  std::string m = Refusal(PoolCanEverHold(j, nodes, cfg));
  EXPECT_NE(m.find("provider small: 2 (its template does not fit; 2 registered nodes fit)"),
            std::string::npos)
      << m;
  EXPECT_EQ(m.find("provider big"), std::string::npos) << m;
  j.providers.clear();
  EXPECT_TRUE(PoolCanEverHold(j, nodes, cfg).ok()) << "big can boot 8";
  j.gpu_type = "a100";
  m = Refusal(PoolCanEverHold(j, nodes, cfg));
  EXPECT_NE(m.find("no registered node and no on-demand provider's node template fits"),
            std::string::npos)
      << m;
}

}  // namespace
}  // namespace muster::coordinator
