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
  const std::string m = spec.status().message();
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
  const std::string m = spec.status().message();
  EXPECT_NE(m.find("j.yaml: name: is required"), std::string::npos) << m;
  EXPECT_NE(m.find("j.yaml: command: is required"), std::string::npos) << m;
  EXPECT_NE(m.find("j.yaml:1: nodse: unknown field"), std::string::npos) << m;
}

TEST(JobSpecTest, EnvMayNotSetTheContractOrUnknownMusterNames) {
  // Refused by the YAML parse, with the line, and by ValidateJobSpec (the wire path) alike.
  auto check = [](const std::string& env) {
    auto spec = ParseJobSpec("name: a\ncommand: [x]\nenv:\n  " + env + "\n", "j.yaml");
    JobSpec wire;
    wire.name = "a";
    wire.command = {"x"};
    wire.env[env.substr(0, env.find(':'))] = env.substr(env.find(':') + 2);
    Status validated = ValidateJobSpec(wire);
    EXPECT_EQ(spec.ok(), validated.ok()) << spec.status() << " vs " << validated;
    return std::make_pair(spec.status(), validated);
  };
  auto [rank, rank_wire] = check("RANK: 3");
  EXPECT_EQ(rank.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(rank.message().find("j.yaml:4: env.RANK: RANK is set by muster for every rank"),
            std::string::npos)
      << rank.message();
  EXPECT_NE(rank_wire.message().find("RANK is set by muster for every rank"), std::string::npos)
      << rank_wire.message();
  auto [typo, typo_wire] = check("MUSTER_CHECKPIONT_EVERY: 3");
  EXPECT_NE(typo.message().find(
                "j.yaml:4: env.MUSTER_CHECKPIONT_EVERY: MUSTER_CHECKPIONT_EVERY is not a MUSTER_ "
                "variable"),
            std::string::npos)
      << typo.message();
  EXPECT_EQ(typo_wire.code(), StatusCode::kInvalidArgument);
  // The prefix alone is no known name either (the job spec fuzzer found the YAML path taking it).
  EXPECT_FALSE(check("MUSTER_: 30s").first.ok());
  EXPECT_TRUE(check("MUSTER_COLL_BACKEND: gloo").first.ok());
  EXPECT_TRUE(check("HF_HOME: /data").first.ok());
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

// The message of a refused spec, or "" (with a test failure) when it parsed.
std::string Refusal(const std::string& yaml, const std::string& file = "job.yaml") {
  auto spec = ParseJobSpec(yaml, file);
  EXPECT_FALSE(spec.ok()) << "accepted:\n" << yaml.substr(0, 200);
  if (spec.ok()) return "";
  EXPECT_EQ(spec.status().code(), StatusCode::kInvalidArgument);
  return spec.status().message();
}

#define EXPECT_MENTIONS(message, text)                                                     \
  EXPECT_NE((message).find(text), std::string::npos) << "missing '" << (text) << "' in:\n" \
                                                     << (message)

// A 30,000-digit duration or count once overflowed the stack of a recursive std::regex and took
// the coordinator down. Each is now a short error naming the field and its line.
TEST(JobSpecTest, HugeNumbersAreClearErrors) {
  const std::string digits(30000, '7');
  const std::string base = "name: big\ncommand: x\n";
  struct Case {
    std::string yaml, want;
  };
  for (const Case& c : std::vector<Case>{
           {base + "time_limit: " + digits + "\n", "job.yaml:3: time_limit: must be a duration"},
           {base + "time_limit: " + digits + "s\n", "job.yaml:3: time_limit: must be a duration"},
           {base + "restart:\n  backoff: 1h" + digits + "m\n", "job.yaml:4: restart.backoff:"},
           {base + "nodes: " + digits + "\n",
            "job.yaml:3: nodes: must be an integer in [1, 100000]"},
           {base + "priority: -" + digits + "\n", "job.yaml:3: priority: must be an integer"},
           {base + "checkpoint:\n  volume: v\n  every: " + digits + "\n",
            "job.yaml:5: checkpoint.every: must be an integer"},
           {base + "checkpoint:\n  volume: v\n  every: " + digits + "s\n",
            "job.yaml:5: checkpoint.every: must be a duration"},
           {base + "checkpoint:\n  volume: v\n  keep: " + digits + "\n",
            "job.yaml:5: checkpoint.keep: must be an integer"},
           {base + "env:\n  ? A" + digits + "\n  : x\n", "job.yaml:4: env.A777"},
       }) {
    std::string m = Refusal(c.yaml);
    EXPECT_MENTIONS(m, c.want);
    EXPECT_LT(m.size(), 1000u) << "the error repeats the whole value";
  }
  for (const std::string& text :
       std::vector<std::string>{digits, digits + "s", "1h" + digits + "m", "9223372036854775808",
                                "106751991167301d", "366d", "8761h", "1h30"}) {
    auto d = ParseDuration(text);
    EXPECT_FALSE(d.ok()) << text.substr(0, 40);
    EXPECT_LT(d.status().message().size(), 200u);
  }
  EXPECT_EQ(*ParseDuration("365d"), seconds(365 * 86400));
}

// yaml-cpp keeps both pairs of a repeated key and answers with the first: the spec would
// silently not say what the user wrote last. Refused, naming both lines.
TEST(JobSpecTest, DuplicateKeysAreRefusedWithBothLines) {
  std::string m = Refusal("name: a\ncommand: x\nnodes: 1\nnodes: 2\n");
  EXPECT_MENTIONS(m, "job.yaml:4: nodes: given twice (lines 3 and 4)");
  m = Refusal("name: a\ncommand: x\nenv:\n  A: 1\n  B: 2\n  A: 3\n");
  EXPECT_MENTIONS(m, "job.yaml:6: env.A: given twice (lines 4 and 6)");
  m = Refusal("name: a\ncommand: x\ncheckpoint:\n  volume: v\n  keep: 1\n  \"keep\": 9\n");
  EXPECT_MENTIONS(m, "job.yaml:6: checkpoint.keep: given twice (lines 5 and 6)");
  m = Refusal("name: a\ncommand: x\nplacement: {island: any, island: required}\n");
  EXPECT_MENTIONS(m, "job.yaml:3: placement.island: given twice");
  m = Refusal("name: a\ncommand: x\nrestart:\n  backoff: 1s\n  backoff: 2s\n");
  EXPECT_MENTIONS(m, "job.yaml:5: restart.backoff: given twice (lines 4 and 5)");
}

TEST(JobSpecTest, EveryFieldIsBounded) {
  const std::string base = "name: b\ncommand: x\n";
  auto list = [](size_t n, const std::string& item) {
    std::string s = "[";
    for (size_t i = 0; i < n; ++i) s += (i ? "," : "") + item + std::to_string(i);
    return s + "]";
  };
  struct Case {
    std::string yaml, want;
  };
  for (const Case& c : std::vector<Case>{
           {"name: " + std::string(64, 'a') + "\ncommand: x\n", "job.yaml:1: name: must be 1-63"},
           {"name: a/../b\ncommand: x\n", "job.yaml:1: name: must be 1-63"},
           {"name: .hidden\ncommand: x\n", "job.yaml:1: name:"},
           {"name: \"\"\ncommand: x\n", "job.yaml:1: name: must not be empty"},
           {"name: b\ncommand: " + list(4097, "a") + "\n", "job.yaml:2: command: has 4097 entries"},
           {"name: b\ncommand: [x, " + std::string(131073, 'a') + "]\n",
            "job.yaml:2: command[1]: is 131073 bytes"},
           {"name: b\ncommand: [x,\n  \"a\\0b\"]\n", "job.yaml:3: command[1]: contains a NUL"},
           {"name: b\ncommand: [\"\", x]\n", "job.yaml:2: command[0]: the program must not be"},
           {base + "env:\n  A: \"x\\0y\"\n", "job.yaml:4: env.A: contains a NUL"},
           {base + "env:\n  A: " + std::string(131072, 'v') + "\n",
            "job.yaml:4: env.A: NAME=value"},
           {base + "env:\n  " + std::string(257, 'N') + ": v\n", "job.yaml:4: env.NNN"},
           // Aliases make a small file name a big value many times over.
           {base + "env: {A: &v " + std::string(100000, 'v') +
                ", B: *v, C: *v, D: *v, E: *v, F: *v, G: *v, H: *v, I: *v, J: *v, K: *v}\n",
            "job.yaml:2: command: command and env are"},
           {base + "gpu_type: \"h 100\"\n", "job.yaml:3: gpu_type: must be 1-128"},
           {base + "placement:\n  providers: " + list(65, "p") + "\n",
            "job.yaml:4: placement.providers: has 65 entries"},
           {base + "placement:\n  providers: [aws, \"../x\"]\n",
            "job.yaml:4: placement.providers[1]:"},
           {base + "nodes: 2\nplacement:\n  hosts: [n1, n1]\n",
            "job.yaml:5: placement.hosts[1]: names node \"n1\" again"},
           {base + "placement:\n  hosts: [\"n/1\"]\n", "job.yaml:4: placement.hosts[0]: must be"},
           {base + "checkpoint:\n  volume: \"../v\"\n", "job.yaml:4: checkpoint.volume: must be"},
           {base + "checkpoint:\n  volume: v\n  every: 0s\n",
            "job.yaml:5: checkpoint.every: must be at least 1s"},
           {base + "time_limit: 366d\n", "job.yaml:3: time_limit: must be a duration"},
           {base + "restart:\n  max_restarts: 100001\n", "job.yaml:4: restart.max_restarts:"},
           {base + "gpus_per_node: 1025\n", "job.yaml:3: gpus_per_node:"},
       }) {
    std::string m = Refusal(c.yaml);
    EXPECT_MENTIONS(m, c.want);
    EXPECT_LT(m.size(), 2000u);
  }
  // Many errors are counted, not all listed.
  std::string many = base;
  for (int i = 0; i < 500; ++i) many += "unknown" + std::to_string(i) + ": 1\n";
  std::string m = Refusal(many);
  EXPECT_MENTIONS(m, "invalid job spec (500 errors)");
  EXPECT_MENTIONS(m, "... and 400 more");
  // Over 1 MiB is refused before parsing.
  m = Refusal(base + "# " + std::string(kMaxJobSpecBytes, 'c') + "\n");
  EXPECT_MENTIONS(m, "a job spec is at most 1048576");
}

// A spec from the wire (a proto JobSpec) is held to the same rules.
TEST(JobSpecTest, WireSpecsGetTheSameChecks) {
  JobSpec ok;
  ok.name = "w";
  ok.command = {"train"};
  EXPECT_TRUE(ValidateJobSpec(ok).ok());
  JobSpec s = ok;
  s.name = "../../etc";
  s.command = {"train", std::string("a\0b", 3)};
  s.env["A=B"] = "x";
  s.env["OK"] = std::string(kMaxArgBytes, 'v');
  s.nodes = 2;
  s.hosts = {"n1", "n1"};
  s.priority = 2000000;
  s.restart_backoff = std::chrono::seconds(int64_t{1} << 60);
  s.time_limit = seconds(-1);
  s.checkpoint_every_steps = 10;
  s.checkpoint_every_time = seconds(60);
  s.checkpoint_keep = 0;
  s.checkpoint_volume = "a b";
  s.providers = {""};
  Status st = ValidateJobSpec(s);
  ASSERT_FALSE(st.ok());
  for (const char* want :
       {"job spec: name: must be 1-63", "job spec: command[1]: contains a NUL",
        "job spec: env.A=B: is not a valid", "job spec: env.OK: NAME=value is",
        "job spec: placement.hosts[1]: names node \"n1\" again", "job spec: priority: must be in",
        "job spec: restart.backoff: must be a duration", "job spec: time_limit: must be a duration",
        "job spec: checkpoint.every: is a number of steps or a duration, not both",
        "job spec: checkpoint.keep: must be in [1, 100000], not 0",
        "job spec: checkpoint.volume: must be", "job spec: placement.providers[0]: must be"}) {
    EXPECT_MENTIONS(st.message(), want);
  }
  s = ok;
  s.name.clear();
  s.command.clear();
  st = ValidateJobSpec(s);
  EXPECT_MENTIONS(st.message(), "job spec: name: is required");
  EXPECT_MENTIONS(st.message(), "job spec: command: is required");
  s = ok;
  s.command.assign(kMaxCommandArgs + 1, "a");
  EXPECT_MENTIONS(ValidateJobSpec(s).message(), "command: has 4097 arguments");
  s = ok;
  for (size_t i = 0; i <= kMaxEnvVars; ++i) s.env["V" + std::to_string(i)] = "x";
  EXPECT_MENTIONS(ValidateJobSpec(s).message(), "env: has 4097 variables");
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

// The wire form keeps every field, and a wire spec is validated like YAML.
TEST(JobSpecTest, TheWireFormRoundTripsAndIsValidated) {
  auto spec = ParseJobSpec(R"(name: w
command: ["a", "b"]
env: {K: v}
nodes: 2
ranks_per_node: 4
gpu_type: h100
gpus_per_node: 8
placement: {providers: [aws], island: required}
priority: 3
checkpoint: {volume: ckpt, every: 10m, keep: 2}
restart: {max_restarts: 5, backoff: 1m}
time_limit: 2h
)");
  ASSERT_TRUE(spec.ok()) << spec.status();
  spec->hosts = {"h1", "h2"};
  spec->interactive = true;
  proto::JobSpec p = JobSpecToProto(*spec);
  auto back = JobSpecFromProto(p);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(JobSpecToProto(*back).SerializeAsString(), p.SerializeAsString());
  EXPECT_EQ(back->island, IslandPolicy::kRequired);
  EXPECT_EQ(back->checkpoint_every_time, std::chrono::minutes(10));
  EXPECT_EQ(back->hosts, spec->hosts);
  EXPECT_TRUE(back->interactive);
  p.set_island("sometimes");
  EXPECT_EQ(JobSpecFromProto(p).status().code(), StatusCode::kInvalidArgument);
  p.set_island("any");
  p.set_nodes(0);
  EXPECT_EQ(JobSpecFromProto(p).status().code(), StatusCode::kInvalidArgument);
}

TEST(JobSpecTest, SparesAreBoundedAndReachTheSchedulerAndTheWire) {
  auto spec = ParseJobSpec("name: ft\ncommand: x\nnodes: 4\nspares: 2\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->spares, 2);
  EXPECT_EQ(ToJobRequest(*spec, "ft-1", 1).spares, 2);
  EXPECT_EQ(Need(ToJobRequest(*spec, "ft-1", 1)), 6);
  auto back = JobSpecFromProto(JobSpecToProto(*spec));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->spares, 2);
  EXPECT_EQ(ParseJobSpec("name: ft\ncommand: x\n")->spares, 0);
  EXPECT_MENTIONS(Refusal("name: ft\ncommand: x\nspares: -1\n"),
                  "job.yaml:3: spares: must be an integer in [0, 100000], not \"-1\"");
  EXPECT_MENTIONS(Refusal("name: ft\ncommand: x\nspares: [1]\n"), "job.yaml:3: spares:");
  EXPECT_MENTIONS(Refusal("name: ft\ncommand: x\nnodes: 99999\nspares: 2\n"),
                  "job.yaml:4: spares: nodes + spares is 100001; at most 100000");
  JobSpec pinned = *spec;
  pinned.hosts = {"a", "b", "c", "d"};
  Status st = ValidateJobSpec(pinned);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_MENTIONS(st.message(), "spares: cannot be held for a gang pinned to named hosts");
  proto::JobSpec p = JobSpecToProto(*spec);
  p.set_spares(-3);
  EXPECT_EQ(JobSpecFromProto(p).status().code(), StatusCode::kInvalidArgument);
}

TEST(JobSpecTest, SnapshotsAreOptInEveryKStepsAndNeedAVolume) {
  auto spec = ParseJobSpec(R"(name: ft
command: [./train]
checkpoint:
  volume: ckpt
  every: 10
  snapshot_every_steps: 1
)");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->snapshot_every_steps, 1);
  auto back = JobSpecFromProto(JobSpecToProto(*spec));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->snapshot_every_steps, 1);
  EXPECT_EQ(ParseJobSpec("name: ft\ncommand: [./t]\n")->snapshot_every_steps, 0);
  auto bad = ParseJobSpec(R"(name: ft
command: [./train]
checkpoint:
  volume: ckpt
  snapshot_every_steps: 0
)");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("job.yaml:5: checkpoint.snapshot_every_steps"),
            std::string::npos)
      << bad.status();
  JobSpec wire = *spec;
  wire.checkpoint_volume.clear();
  Status s = ValidateJobSpec(wire);
  EXPECT_NE(s.message().find("checkpoint.snapshot_every_steps: needs checkpoint.volume"),
            std::string::npos)
      << s;
}

}  // namespace
}  // namespace muster::coordinator
