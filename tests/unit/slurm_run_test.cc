// `muster run` inside a Slurm allocation: reading the allocation from the environment.

#include "launcher/slurm_run.h"

#include <gtest/gtest.h>

#include <map>

namespace muster::launcher {
namespace {

TEST(SlurmRunTest, ParsesTasksPerNode) {
  struct Case {
    std::string text;
    std::vector<int> want;  // empty: an error
  };
  std::vector<Case> cases = {
      {"1", {1}},
      {"2(x3)", {2, 2, 2}},
      {"2(x3),1", {2, 2, 2, 1}},
      {"4,4", {4, 4}},
      {"", {}},
      {"0", {}},
      {"2(x0)", {}},
      {"2(3)", {}},
      {"2(x3", {}},
      {"2,", {}},
      {",2", {}},
      {"a", {}},
      {"2(x3)x", {}},
      {"-1", {}},
      {"2(x99999999)", {}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    auto got = ParseTasksPerNode(c.text);
    if (c.want.empty()) {
      EXPECT_FALSE(got.ok());
    } else {
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_EQ(*got, c.want);
    }
  }
}

TEST(SlurmRunTest, HostsComeFromTheAllocation) {
  std::map<std::string, std::string> env = {{"SLURM_JOB_ID", "7"},
                                            {"SLURM_JOB_NODELIST", "gpu[01-02],cpu9"},
                                            {"SLURM_TASKS_PER_NODE", "4(x2),1"}};
  auto getenv = [&](const char* k) -> const char* {
    auto it = env.find(k);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  auto expand = [](const std::string& list) -> StatusOr<std::vector<std::string>> {
    EXPECT_EQ(list, "gpu[01-02],cpu9");
    return std::vector<std::string>{"gpu01", "gpu02", "cpu9"};
  };
  auto hosts = SlurmAllocationHosts(getenv, expand);
  ASSERT_TRUE(hosts.ok()) << hosts.status().ToString();
  ASSERT_TRUE(hosts->has_value());
  ASSERT_EQ((*hosts)->size(), 3u);
  EXPECT_EQ((**hosts)[0].host, "gpu01");
  EXPECT_EQ((**hosts)[1].slots, 4);
  EXPECT_EQ((**hosts)[2].slots, 1);

  env["SLURM_TASKS_PER_NODE"] = "4(x2)";  // two counts for three nodes
  EXPECT_FALSE(SlurmAllocationHosts(getenv, expand).ok());
  env.erase("SLURM_JOB_ID");  // not inside an allocation
  auto none = SlurmAllocationHosts(getenv, expand);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

}  // namespace
}  // namespace muster::launcher
