#include "common/rank_env.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace muster {
namespace {

using Env = std::map<std::string, std::string>;

// A rank of an agent-started job with every field set.
RankEnv Full() {
  RankEnv e;
  e.rank = 5;
  e.world_size = 8;
  e.local_rank = 1;
  e.local_world_size = 4;
  e.node_rank = 1;
  e.nnodes = 2;
  e.master_addr = "10.0.0.5";
  e.master_port = 29507;
  e.cuda_visible_devices = "1";
  e.job_id = "finetune-3";
  e.attempt = 2;
  e.rdzv_endpoint = "tcp://10.0.0.5:30007";
  e.rdzv_key = "insecure";
  e.checkpoint_dir = "/mnt/ckpt/finetune-3";
  e.resume_step = 120;
  e.checkpoint_every = 50;
  e.checkpoint_every_s = 600;
  e.preempt_file = "/var/lib/muster/notice/finetune-3.attempt-2";
  e.node = "aws-2";
  e.provider = "aws";
  e.control_fd = 3;
  e.snapshot_every = 1;
  e.snapshot_socket = "/var/lib/muster/snapshots/s.sock";
  e.resume_snapshot_step = 41;
  e.resume_snapshot_attempt = 1;
  e.coll_backend = "gloo";
  e.coll_timeout_ms = 2000;
  e.socket_ifname = "eth1";
  return e;
}

std::string Error(const Env& env) {
  auto e = RankEnv::FromEnviron(env);
  EXPECT_FALSE(e.ok()) << "accepted";
  return e.ok() ? "" : e.status().message();
}

TEST(RankEnvTest, RoundTripsEveryField) {
  RankEnv e = Full();
  auto back = RankEnv::FromEnviron(e.ToEnviron());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, e);
}

TEST(RankEnvTest, RoundTripsTheDefaultsOfALauncherRank) {
  RankEnv e;  // `muster run`: attempt 0, no volume, no notice file, fresh
  e.rank = 2;
  e.world_size = 4;
  e.local_rank = 2;
  e.local_world_size = 4;
  e.cuda_visible_devices = "";
  auto back = RankEnv::FromEnviron(e.ToEnviron());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, e);
}

TEST(RankEnvTest, WritesTorchrunNamesAndAliases) {
  auto env = Full().ToEnviron();
  EXPECT_EQ(env.at("RANK"), "5");
  EXPECT_EQ(env.at("OMPI_COMM_WORLD_RANK"), "5");
  EXPECT_EQ(env.at("OMPI_COMM_WORLD_SIZE"), "8");
  EXPECT_EQ(env.at("OMPI_COMM_WORLD_LOCAL_RANK"), "1");
  EXPECT_EQ(env.at("GROUP_RANK"), "1");
  EXPECT_EQ(env.at("TORCHELASTIC_RESTART_COUNT"), "1");  // attempt - 1
  EXPECT_EQ(env.at("MUSTER_RESUME_STEP"), "120");
  RankEnv fresh;
  EXPECT_EQ(fresh.ToEnviron().at("MUSTER_RESUME_STEP"), "");  // the contract: empty when fresh
  EXPECT_EQ(fresh.ToEnviron().count("MUSTER_CONTROL_FD"), 0u);
}

TEST(RankEnvTest, NothingSetIsAJobOfOne) {
  auto e = RankEnv::FromEnviron({});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->rank, 0);
  EXPECT_EQ(e->world_size, 1);
  EXPECT_FALSE(e->has_rendezvous());
  EXPECT_FALSE(e->resume_step.has_value());
  EXPECT_EQ(e->control_fd, -1);
}

TEST(RankEnvTest, ReadsMpirunAliasesWhenRankIsAbsent) {
  auto e = RankEnv::FromEnviron({{"OMPI_COMM_WORLD_RANK", "3"},
                                 {"OMPI_COMM_WORLD_SIZE", "4"},
                                 {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                 {"LOCAL_WORLD_SIZE", "2"},
                                 {"NNODES", "2"},
                                 {"NODE_RANK", "1"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->rank, 3);
  EXPECT_EQ(e->world_size, 4);
  EXPECT_EQ(e->local_rank, 1);
}

TEST(RankEnvTest, MalformedValuesAreClearErrors) {
  EXPECT_EQ(Error({{"RANK", "abc"}, {"WORLD_SIZE", "2"}}),
            "RANK='abc' is not a non-negative integer");
  EXPECT_EQ(Error({{"RANK", "-1"}, {"WORLD_SIZE", "2"}}),
            "RANK='-1' is not a non-negative integer");
  EXPECT_EQ(Error({{"RANK", " 1"}, {"WORLD_SIZE", "2"}}),
            "RANK=' 1' is not a non-negative integer");
  EXPECT_EQ(Error({{"RANK", "99999999999999"}, {"WORLD_SIZE", "2"}}),
            "RANK='99999999999999' is not a non-negative integer");
  EXPECT_EQ(Error({{"RANK", "4"}, {"WORLD_SIZE", "4"}}), "RANK=4 is not below WORLD_SIZE=4");
  EXPECT_EQ(Error({{"RANK", "0"}, {"WORLD_SIZE", "0"}}),
            "WORLD_SIZE='0' is not a positive integer");
  EXPECT_EQ(Error({{"RANK", "0"}}), "RANK is set but WORLD_SIZE is not");
  EXPECT_EQ(Error({{"WORLD_SIZE", "2"}}), "WORLD_SIZE is set but RANK is not");
  EXPECT_EQ(
      Error({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}}),
      "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2");
  EXPECT_EQ(Error({{"NODE_RANK", "2"}, {"NNODES", "2"}}), "NODE_RANK=2 is not below NNODES=2");
  EXPECT_EQ(Error({{"MASTER_PORT", "70000"}}), "MASTER_PORT='70000' is not a port (1-65535)");
  EXPECT_EQ(Error({{"MASTER_PORT", "0"}}), "MASTER_PORT='0' is not a port (1-65535)");
  EXPECT_EQ(Error({{"MUSTER_ATTEMPT", "two"}}),
            "MUSTER_ATTEMPT='two' is not a non-negative integer");
  EXPECT_EQ(Error({{"MUSTER_RESUME_STEP", "12x"}}),
            "MUSTER_RESUME_STEP='12x' is not a non-negative integer");
  EXPECT_EQ(Error({{"MUSTER_CHECKPOINT_EVERY", "0"}}),
            "MUSTER_CHECKPOINT_EVERY='0' is not a positive integer");
  EXPECT_EQ(Error({{"MUSTER_SNAPSHOT_EVERY", "0"}}),
            "MUSTER_SNAPSHOT_EVERY='0' is not a positive integer");
  EXPECT_EQ(Error({{"MUSTER_CONTROL_FD", "-3"}}),
            "MUSTER_CONTROL_FD='-3' is not a file descriptor number");
  EXPECT_EQ(Error({{"MUSTER_COLL_TIMEOUT_MS", "0"}}),
            "MUSTER_COLL_TIMEOUT_MS='0' is not a positive integer");
}

TEST(RankEnvTest, ValidateNamesTheFieldOutOfRange) {
  RankEnv e = Full();
  e.rank = 8;
  EXPECT_EQ(e.Validate().message(), "RANK=8 is not below WORLD_SIZE=8");
  e = Full();
  e.checkpoint_every = 0;
  EXPECT_EQ(e.Validate().code(), StatusCode::kInvalidArgument);
}

TEST(RankEnvTest, ASnapshotResumeNeedsItsStepAttemptAndSocket) {
  RankEnv e = Full();
  e.resume_snapshot_attempt.reset();
  EXPECT_EQ(e.Validate().message(),
            "MUSTER_RESUME_SNAPSHOT_STEP and MUSTER_RESUME_SNAPSHOT_ATTEMPT go together");
  e = Full();
  e.snapshot_socket.clear();
  EXPECT_EQ(e.Validate().message(),
            "MUSTER_RESUME_SNAPSHOT_STEP is set without MUSTER_SNAPSHOT_SOCKET");
  auto env = Full().ToEnviron();
  env["MUSTER_RESUME_SNAPSHOT_STEP"] = "-3";
  EXPECT_NE(Error(env).find("MUSTER_RESUME_SNAPSHOT_STEP"), std::string::npos);
}

TEST(RankEnvTest, UnknownMusterNamesAreReportedNotFatal) {
  // An older library under a newer agent must keep working: reported, not an error.
  std::vector<std::string> unknown;
  auto e = RankEnv::FromEnviron({{"MUSTER_CHECKPIONT_DIR", "/x"},
                                 {"MUSTER_LOG_LEVEL", "debug"},
                                 {"TORCHELASTIC_RUN_ID", "abc"},
                                 {"GROUP_WORLD_SIZE", "3"}},
                                &unknown);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(unknown, std::vector<std::string>{"MUSTER_CHECKPIONT_DIR"});
}

TEST(RankEnvTest, EmptyValuesCountAsUnset) {
  auto e = RankEnv::FromEnviron({{"RANK", ""}, {"WORLD_SIZE", ""}, {"MUSTER_RESUME_STEP", ""}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->world_size, 1);
  EXPECT_FALSE(e->resume_step.has_value());
}

TEST(RankEnvTest, ComposeLayersInheritedJobAndContract) {
  RankEnv e = Full();
  e.coll_backend.clear();  // the agent never sets knobs: the job's env decides
  e.coll_timeout_ms.reset();
  auto env = ComposeRankEnviron({"PATH=/bin", "RANK=9", "MUSTER_KEYS=/root/.muster",
                                 "MUSTER_LOG_LEVEL=warn", "HOME=/root", "MUSTER_RESUME_STEP=7"},
                                {{"HOME", "/home/job"}, {"MUSTER_COLL_BACKEND", "mpi"}}, e);
  auto has = [&](const std::string& kv) {
    return std::find(env.begin(), env.end(), kv) != env.end();
  };
  EXPECT_TRUE(has("PATH=/bin"));
  EXPECT_TRUE(has("HOME=/home/job"));              // the job's env over the inherited
  EXPECT_TRUE(has("RANK=5"));                      // the contract over both
  EXPECT_TRUE(has("MUSTER_RESUME_STEP=120"));      // never inherited
  EXPECT_TRUE(has("MUSTER_COLL_BACKEND=mpi"));     // a knob from the job
  EXPECT_TRUE(has("MUSTER_LOG_LEVEL=warn"));       // a knob is inherited
  EXPECT_FALSE(has("MUSTER_KEYS=/root/.muster"));  // the writer's own config is not
  EXPECT_TRUE(std::is_sorted(env.begin(), env.end()));
  // What a rank reads back is what was written.
  std::map<std::string, std::string> m;
  for (const auto& kv : env) m[kv.substr(0, kv.find('='))] = kv.substr(kv.find('=') + 1);
  auto back = RankEnv::FromEnviron(m);
  ASSERT_TRUE(back.ok()) << back.status();
  e.coll_backend = "mpi";
  EXPECT_EQ(*back, e);
}

TEST(RankEnvTest, SocketInterfaceIsExportedForGlooAndNcclUnlessTheUserSetIt) {
  RankEnv e = Full();  // the preflight found eth1
  auto has = [](const std::vector<std::string>& env, const std::string& kv) {
    return std::find(env.begin(), env.end(), kv) != env.end();
  };
  auto env = ComposeRankEnviron({"PATH=/bin"}, {}, e);
  EXPECT_TRUE(has(env, "GLOO_SOCKET_IFNAME=eth1"));
  EXPECT_TRUE(has(env, "NCCL_SOCKET_IFNAME==eth1"));  // exact name, not a prefix
  // The job's env wins for the variable it sets; the other still gets the preflight's.
  env = ComposeRankEnviron({"PATH=/bin"}, {{"NCCL_SOCKET_IFNAME", "ib"}}, e);
  EXPECT_TRUE(has(env, "NCCL_SOCKET_IFNAME=ib"));
  EXPECT_TRUE(has(env, "GLOO_SOCKET_IFNAME=eth1"));
  // So does the operator's, in the agent's own environment.
  env = ComposeRankEnviron({"GLOO_SOCKET_IFNAME=bond0"}, {}, e);
  EXPECT_TRUE(has(env, "GLOO_SOCKET_IFNAME=bond0"));
  EXPECT_TRUE(has(env, "NCCL_SOCKET_IFNAME==eth1"));
  // Unknown (single node, no preflight): neither is written.
  e.socket_ifname.clear();
  env = ComposeRankEnviron({}, {}, e);
  for (const auto& kv : env) EXPECT_EQ(kv.find("SOCKET_IFNAME"), std::string::npos) << kv;
  // A user's list is read back as is, never refused.
  auto back = RankEnv::FromEnviron({{"GLOO_SOCKET_IFNAME", "eth0,eth1"}});
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->socket_ifname, "eth0,eth1");
  EXPECT_TRUE(CheckJobEnv({{"NCCL_SOCKET_IFNAME", "^docker"}}).ok());
}

TEST(RankEnvTest, CheckJobEnvRejectsContractNamesAndUnknownMusterNames) {
  EXPECT_TRUE(CheckJobEnv({{"HF_HOME", "/data"}, {"MUSTER_COLL_BACKEND", "gloo"}}).ok());
  EXPECT_EQ(CheckJobEnv({{"RANK", "3"}}).message(),
            "env: RANK is set by muster for every rank (docs/env-contract.md)");
  EXPECT_EQ(CheckJobEnv({{"MUSTER_CHECKPIONT_EVERY", "3"}}).message(),
            "env: MUSTER_CHECKPIONT_EVERY is not a MUSTER_ variable muster knows "
            "(docs/env-contract.md)");
  EXPECT_EQ(CheckJobEnv({{"", "3"}}).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace muster
