// Job specs: a full spec parses; every bad field is reported with its line.

#include "coordinator/job_spec.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

namespace muster::coordinator {
namespace {

using std::chrono::seconds;

TEST(JobSpecTest, FullSpecParses) {
  auto spec = ParseJobSpec(R"(name: llama-ft
command: ["python", "train.py", "--lr", "3e-4"]
env:
  HF_HOME: /data/hf
  SEED: 7
nodes: 4
ranks_per_node: 8
gpu_type: h100
gpus_per_node: 8
placement:
  providers: [aws, gcp]
  island: preferred
priority: 10
checkpoint:
  volume: ckpt
  every: 500
  keep: 5
restart:
  max_restarts: 2
  backoff: 30s
time_limit: 1h30m
)");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name, "llama-ft");
  EXPECT_EQ(spec->command, (std::vector<std::string>{"python", "train.py", "--lr", "3e-4"}));
  EXPECT_EQ(spec->env.at("SEED"), "7");
  EXPECT_EQ(spec->nodes, 4);
  EXPECT_EQ(spec->ranks_per_node, 8);
  EXPECT_EQ(spec->gpu_type, "h100");
  EXPECT_EQ(spec->providers, (std::vector<std::string>{"aws", "gcp"}));
  EXPECT_EQ(spec->island, IslandPolicy::kPreferred);
  EXPECT_EQ(spec->priority, 10);
  EXPECT_EQ(spec->checkpoint_volume, "ckpt");
  EXPECT_EQ(spec->checkpoint_every_steps, 500);
  EXPECT_EQ(spec->checkpoint_keep, 5);
  EXPECT_EQ(spec->max_restarts, 2);
  EXPECT_EQ(spec->restart_backoff, seconds(30));
  EXPECT_EQ(spec->time_limit, seconds(5400));
  JobRequest r = ToJobRequest(*spec, "j1", 9);
  EXPECT_EQ(r.nodes, 4);
  EXPECT_EQ(r.checkpoint_volume, "ckpt");
  EXPECT_EQ(r.seq, 9u);
}

TEST(JobSpecTest, MinimalSpecGetsDefaults) {
  auto spec = ParseJobSpec("name: hello\ncommand: echo hi\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->command, (std::vector<std::string>{"/bin/sh", "-c", "echo hi"}));
  EXPECT_EQ(spec->nodes, 1);
  EXPECT_EQ(spec->island, IslandPolicy::kAny);
  EXPECT_EQ(spec->max_restarts, 3);
  EXPECT_EQ(spec->time_limit, seconds(0));
}

TEST(JobSpecTest, EveryErrorNamesFieldAndLine) {
  auto spec = ParseJobSpec(R"(name: Bad Name
command: echo
nodes: four
ranks_per_node: 0
placement:
  island: some
  provider: aws
checkpoint:
  every: soon
restart:
  backoff: -1
time_limit: forever
env:
  1BAD: x
)",
                           "bad.yaml");
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), StatusCode::kInvalidArgument);
  const std::string& m = spec.status().message();
  for (const char* want :
       {"bad.yaml:1: name:", "bad.yaml:3: nodes: must be an integer", "\"four\"",
        "bad.yaml:4: ranks_per_node:",
        "bad.yaml:6: placement.island: must be required, preferred or any",
        "bad.yaml:7: placement.provider: unknown field (did you mean providers?)",
        "bad.yaml:8: checkpoint.volume: is required",
        "bad.yaml:9: checkpoint.every: must be a duration",
        "bad.yaml:11: restart.backoff:", "bad.yaml:12: time_limit:", "bad.yaml:14: env.1BAD:"}) {
    EXPECT_NE(m.find(want), std::string::npos) << "missing '" << want << "' in:\n" << m;
  }
}

TEST(JobSpecTest, MissingRequiredFieldsAndUnknownTopLevel) {
  auto spec = ParseJobSpec("nodse: 2\n", "j.yaml");
  ASSERT_FALSE(spec.ok());
  const std::string& m = spec.status().message();
  EXPECT_NE(m.find("j.yaml: name: is required"), std::string::npos) << m;
  EXPECT_NE(m.find("j.yaml: command: is required"), std::string::npos) << m;
  EXPECT_NE(m.find("j.yaml:1: nodse: unknown field"), std::string::npos) << m;
}

TEST(JobSpecTest, EnvMayNotSetTheContractOrUnknownMusterNames) {
  auto check = [](const std::string& env) {
    auto spec = ParseJobSpec("name: a\ncommand: [x]\nenv:\n  " + env + "\n", "j.yaml");
    EXPECT_TRUE(spec.ok()) << spec.status();
    return spec.ok() ? ValidateJobSpec(*spec) : spec.status();
  };
  Status rank = check("RANK: 3");
  EXPECT_EQ(rank.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(rank.message().find("RANK is set by muster for every rank"), std::string::npos)
      << rank.message();
  Status typo = check("MUSTER_CHECKPIONT_EVERY: 3");
  EXPECT_NE(typo.message().find("MUSTER_CHECKPIONT_EVERY is not a MUSTER_ variable"),
            std::string::npos)
      << typo.message();
  EXPECT_TRUE(check("MUSTER_COLL_BACKEND: gloo").ok());
  EXPECT_TRUE(check("HF_HOME: /data").ok());
}

TEST(JobSpecTest, MalformedYamlAndWrongShapes) {
  auto spec = ParseJobSpec("name: x\ncommand: [unclosed\n", "y.yaml");
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("y.yaml:"), std::string::npos) << spec.status();
  spec = ParseJobSpec("- a\n- b\n", "list.yaml");
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("must be a mapping"), std::string::npos);
  spec = ParseJobSpec("name: x\ncommand: {a: b}\nenv: [1]\n", "shape.yaml");
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("shape.yaml:2: command: must be a string"),
            std::string::npos)
      << spec.status();
  EXPECT_NE(spec.status().message().find("shape.yaml:3: env: must be a mapping"),
            std::string::npos);
}

TEST(JobSpecTest, Durations) {
  EXPECT_EQ(*ParseDuration("90"), seconds(90));
  EXPECT_EQ(*ParseDuration("1h30m"), seconds(5400));
  EXPECT_EQ(*ParseDuration("2d"), seconds(172800));
  EXPECT_FALSE(ParseDuration("1x").ok());
  EXPECT_FALSE(ParseDuration("h").ok());
  EXPECT_FALSE(ParseDuration("").ok());
  EXPECT_EQ(FormatDuration(seconds(5430)), "1h30m30s");
}

TEST(JobSpecTest, PinnedHosts) {
  auto spec =
      ParseJobSpec("name: p\ncommand: x\nnodes: 2\nplacement:\n  hosts: [a-1, a-2]\n", "p.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(spec->hosts, (std::vector<std::string>{"a-1", "a-2"}));
  auto bad = ParseJobSpec("name: p\ncommand: x\nnodes: 2\nplacement:\n  hosts: [a-1]\n", "p.yaml");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("hosts"), std::string::npos) << bad.status().ToString();
  auto scalar = ParseJobSpec("name: p\ncommand: x\nplacement:\n  hosts: a-1\n", "p.yaml");
  ASSERT_FALSE(scalar.ok());
  EXPECT_NE(scalar.status().message().find("p.yaml:4: placement.hosts"), std::string::npos)
      << scalar.status().ToString();
}

TEST(JobSpecTest, LoadFileNotFound) {
  auto spec = LoadJobSpecFile("/nonexistent/job.yaml");
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("/nonexistent/job.yaml"), std::string::npos);
}

TEST(JobSpecTest, NoticeSignalIsOptInAndReachesTheAgentAsAJobEnvEntry) {
  auto off = ParseJobSpec("name: a\ncommand: x\n", "a.yaml");
  ASSERT_TRUE(off.ok());
  EXPECT_EQ(off->env.count("MUSTER_NOTICE_SIGNAL"), 0u);
  for (auto [text, want] : std::vector<std::pair<std::string, std::string>>{
           {"true", "SIGTERM"}, {"SIGUSR1", "SIGUSR1"}, {"INT", "SIGINT"}}) {
    auto spec = ParseJobSpec("name: a\ncommand: x\nnotice_signal: " + text + "\n", "a.yaml");
    ASSERT_TRUE(spec.ok()) << spec.status().ToString();
    EXPECT_EQ(spec->env.at("MUSTER_NOTICE_SIGNAL"), want) << text;
  }
  auto no = ParseJobSpec("name: a\ncommand: x\nnotice_signal: false\n", "a.yaml");
  ASSERT_TRUE(no.ok());
  EXPECT_EQ(no->env.count("MUSTER_NOTICE_SIGNAL"), 0u);
  auto bad = ParseJobSpec("name: a\ncommand: x\nnotice_signal: SIGKILL\n", "b.yaml");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("b.yaml:3: notice_signal: must be true, false or one of"),
            std::string::npos)
      << bad.status().message();
}

}  // namespace
}  // namespace muster::coordinator
