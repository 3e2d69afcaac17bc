// The slurm provider against real daemons (label `slurm`): munged, slurmctld and two slurmd
// started by the test (slurm_cluster.h). A job submitted to muster gets its nodes as a Slurm
// allocation (sbatch, one agent per node with srun), finishes, and once its nodes are idle the
// allocation is scancelled: squeue is empty again. If the daemons cannot start the test fails
// with the reason; it never skips.

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <regex>

#include "tests/slurm/slurm_cluster.h"

namespace muster::providers_test {
namespace {

// Rank 0 "trains" 60 steps of 0.1 s from MUSTER_RESUME_STEP; on the notice it commits the step
// it is at (a real checkpoint), records it in marks/notice_at and exits 3. Every start appends
// its first step to marks/resumed_from.
std::string CheckpointingRank(const fs::path& marks) {
  return "s=${MUSTER_RESUME_STEP:-0}; s=${s:-0}; [ \"$RANK\" != 0 ] || echo $s >> " +
         (marks / "resumed_from").string() +
         "; while [ $s -lt 60 ]; do s=$((s+1)); echo MUSTER_PROGRESS step=$s total=60; "
         "if [ -e \"$MUSTER_PREEMPT_FILE\" ]; then if [ \"$RANK\" = 0 ]; then " +
         std::string(MUSTER_WRITE_STEP) + " \"$MUSTER_CHECKPOINT_DIR\" $s || exit 9; echo $s > " +
         (marks / "notice_at").string() +
         "; fi; echo MUSTER_CHECKPOINT step=$s; exit 3; fi; sleep 0.1; done";
}

class SlurmProviderTest : public ProviderCluster {
 protected:
  void TearDown() override {
    cluster_.reset();
    if (!HasFailure()) fs::remove_all(slurm_dir_);
    ProviderCluster::TearDown();
  }
  void StartSlurm(int nodes, const std::string& partitions = "") {
    // slurmstepd's socket paths live under the spool directory and must fit in 108 bytes.
    static int n = 0;
    slurm_dir_ = fs::path("/tmp") / fmt::format("msl-{}-{}", getpid(), ++n);
    fs::remove_all(slurm_dir_);
    cluster_ = std::make_unique<SlurmCluster>(slurm_dir_);
    muster::Status st = cluster_->Start(nodes, partitions);
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  std::string Squeue() {
    auto out = cluster_->Tool({"squeue", "-h", "-o", "%i %j %T %N"});
    return out.ok() ? *out : "squeue failed: " + out.status().message();
  }
  fs::path slurm_dir_;
  std::unique_ptr<SlurmCluster> cluster_;
};

TEST_F(SlurmProviderTest, JobGetsItsNodesFromSlurmAndTheyGoBackWhenIdle) {
  ASSERT_NO_FATAL_FAILURE(StartSlurm(2));
  ASSERT_TRUE(StartCoordinator(fmt::format("providers:\n"
                                           "  - name: hpc\n"
                                           "    kind: slurm\n"
                                           "    max_nodes: 2\n"
                                           "    idle_timeout_s: 1\n"
                                           "    request_timeout_s: 30\n"
                                           "    node: {{slots: 1}}\n"
                                           "    slurm: {{partition: debug, signal_lead_s: 30, "
                                           "work_dir: {}}}\n",
                                           (dir_ / "hpc").string()),
                               {cluster_->ConfEnv()}));
  std::string job = Submit(
      "name: onslurm\ncommand: [\"/bin/sh\", \"-c\", \"echo rank=$RANK of $WORLD_SIZE\"]\n"
      "nodes: 2\nranks_per_node: 1\n");
  ASSERT_FALSE(job.empty());
  // While it waits, the reason names the provider; the allocation shows in squeue.
  ASSERT_TRUE(
      WaitUntil([&] { return Squeue().find("muster-hpc-" + job) != std::string::npos; }, 20s))
      << Squeue() << Status(job).dump() << ReadFile(dir_ / "coord.log");
  ASSERT_TRUE(WaitState(job, "succeeded", 40s))
      << Events(job) << Squeue() << ReadFile(dir_ / "coord.log") << cluster_->Logs();
  std::string events = Events(job);
  EXPECT_NE(events.find("requested 2 nodes from hpc"), std::string::npos) << events;
  EXPECT_NE(events.find("node hpc-1 up"), std::string::npos) << events;
  EXPECT_NE(events.find("node hpc-2 up"), std::string::npos) << events;
  // Idle for 1 s: the nodes are released, the allocation is scancelled, squeue empties.
  EXPECT_TRUE(WaitUntil([&] { return Squeue().empty(); }, 30s))
      << Squeue() << ReadFile(dir_ / "coord.log");
  EXPECT_TRUE(WaitUntil([&] { return NodeCount() == 0; }, 10s)) << *Muster({"nodes"});
  std::string log = ReadFile(dir_ / "coord.log");
  EXPECT_NE(log.find("scancelled Slurm job"), std::string::npos) << log;
}

TEST_F(SlurmProviderTest, AnUnreachableControllerIsAPendingReasonNotAHang) {
  ASSERT_NO_FATAL_FAILURE(StartSlurm(1));
  // A slurm.conf naming a controller port where nothing listens.
  std::string conf = ReadFile(slurm_dir_ / "slurm.conf");
  auto at = conf.find("SlurmctldPort=");
  auto end = conf.find('\n', at);
  conf.replace(at, end - at, "SlurmctldPort=1");
  std::ofstream(dir_ / "dead.conf") << conf;
  ASSERT_TRUE(StartCoordinator(fmt::format("providers:\n"
                                           "  - name: hpc\n"
                                           "    kind: slurm\n"
                                           "    max_tries: 1\n"
                                           "    slurm: {{work_dir: {}}}\n",
                                           (dir_ / "hpc").string()),
                               {"SLURM_CONF=" + (dir_ / "dead.conf").string()}));
  std::string job = Submit("name: nowhere\ncommand: [\"true\"]\nnodes: 1\n");
  // The coordinator keeps answering while sbatch fails, and says why the job waits.
  ASSERT_TRUE(WaitUntil(
      [&] {
        return Status(job)
                   .value("pending_reason", "")
                   .find("provider hpc could not supply 1 nodes after 1 tries: sbatch") !=
               std::string::npos;
      },
      40s))
      << Status(job).dump() << ReadFile(dir_ / "coord.log");
}

TEST_F(SlurmProviderTest, SlurmPreemptionIsANoticeAndTheJobResumesFromThatStep) {
  // Two partitions on the same three nodes: muster's allocations in `low`, which a job in
  // `high` preempts (PreemptMode=CANCEL with a GraceTime: SIGTERM to the steps, the agents,
  // then SIGKILL 5 s later).
  ASSERT_NO_FATAL_FAILURE(StartSlurm(
      3,
      "PreemptType=preempt/partition_prio\nPreemptMode=CANCEL\n"
      "PartitionName=low Nodes=ALL Default=YES PriorityTier=1 PreemptMode=CANCEL GraceTime=5 "
      "State=UP\n"
      "PartitionName=high Nodes=ALL PriorityTier=2 PreemptMode=OFF State=UP\n"));
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  ASSERT_TRUE(StartCoordinator(
      fmt::format("providers:\n"
                  "  - name: hpc\n"
                  "    kind: slurm\n"
                  "    max_nodes: 3\n"
                  "    idle_timeout_s: 1\n"
                  "    request_timeout_s: 30\n"
                  "    node: {{slots: 1, volumes: {{ckpt: {}}}}}\n"
                  "    slurm: {{partition: low, work_dir: {}, agent_args: \"--notice 5\"}}\n",
                  (dir_ / "vol").string(), (dir_ / "hpc").string()),
      {cluster_->ConfEnv()}));
  std::string rank = CheckpointingRank(marks);
  std::string job =
      Submit("name: preempted\ncommand: [\"/bin/sh\", \"-c\", " + nlohmann::json(rank).dump() +
             "]\nnodes: 2\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto st = Status(job);
        return st.contains("progress") && st["progress"].value("step", 0) >= 5;
      },
      40s))
      << Events(job) << Squeue() << ReadFile(dir_ / "coord.log");
  // A higher-tier job wants one node: Slurm preempts muster's allocation.
  auto high = cluster_->Tool({"sbatch", "--parsable", "--partition", "high", "--nodes", "3",
                              "--output", "/dev/null", "--wrap", "sleep 2"});
  ASSERT_TRUE(high.ok()) << high.status().ToString();
  ASSERT_TRUE(WaitState(job, "succeeded", 60s))
      << Events(job) << Squeue() << ReadFile(dir_ / "coord.log") << cluster_->Logs();
  std::string notice_at = ReadFile(marks / "notice_at");
  ASSERT_FALSE(notice_at.empty()) << "rank 0 never got the notice\n" << Events(job);
  // Attempt 1 started from 0; attempt 2 from the very step checkpointed on the notice.
  EXPECT_EQ(ReadFile(marks / "resumed_from"), "0\n" + notice_at) << Events(job);
  auto st = Status(job);
  EXPECT_EQ(st.value("preemptions", 0), 1) << Events(job);
  EXPECT_EQ(st.value("restarts", -1), 0) << Events(job);
  std::string events = Events(job);
  // The preempted allocation's nodes are gone; the requeued job got a new allocation.
  EXPECT_NE(events.find("requested 2 nodes from hpc: hpc-1,hpc-2"), std::string::npos) << events;
  EXPECT_NE(events.find("requested 2 nodes from hpc: hpc-3,hpc-4"), std::string::npos) << events;
  // Which attempt: 2, or later when a start was retried on other ports (another test on this
  // host held one).
  EXPECT_TRUE(std::regex_search(
      events, std::regex("resumed  attempt [0-9]+ resumes from step " +
                         notice_at.substr(0, notice_at.size() - 1) + " on volume ckpt")))
      << events;
  EXPECT_TRUE(WaitUntil([&] { return Squeue().empty(); }, 30s)) << Squeue();
}

TEST_F(SlurmProviderTest, MusterRunInsideAnAllocationUsesItsNodes) {
  ASSERT_NO_FATAL_FAILURE(StartSlurm(2));
  // An sbatch script of 2 nodes x 2 tasks runs `muster run` twice: all ranks print, then one
  // fails with 3 and `muster run` exits 3, as on one machine.
  std::string script = fmt::format(
      "{0} run -np 4 -- sh -c 'echo rank=$RANK/$WORLD_SIZE node=$NODE_RANK'; echo rc=$?; "
      "{0} run -np 4 -- sh -c '[ $RANK != 2 ] || exit 3'; echo rc=$?",
      MUSTER_BIN);
  auto id =
      cluster_->Tool({"sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "2", "--chdir",
                      dir_.string(), "--output", (dir_ / "run.out").string(), "--wrap", script});
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  ASSERT_TRUE(WaitUntil([&] { return Squeue().empty(); }, 90s))
      << Squeue() << ReadFile(dir_ / "run.out") << cluster_->Logs();
  std::string out = ReadFile(dir_ / "run.out");
  for (int r = 0; r < 4; ++r) {
    EXPECT_NE(out.find(fmt::format("rank={}/4 node={}", r, r / 2)), std::string::npos) << out;
  }
  auto first = out.find("rc=0");
  ASSERT_NE(first, std::string::npos) << out;
  EXPECT_NE(out.find("rc=3", first), std::string::npos) << out;
  EXPECT_NE(out.find("rank 2"), std::string::npos) << "the failing rank is named\n" << out;
  // Nothing left behind in the submit directory.
  for (const auto& e : fs::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().filename().string().rfind(".muster-run-", 0), std::string::npos) << e.path();
  }
}

TEST_F(SlurmProviderTest, AJobFailsOverFromSlurmToTheLocalProviderAfterANotice) {
  // One pool: a slurm provider (first choice) and a local one. Slurm preempts the job's
  // allocation and keeps its nodes busy; the job checkpoints on the notice and resumes on
  // local nodes from the step copied to their volume (the slurm provider still holds its
  // max_nodes while its preempted nodes go, or, once they are gone, its request would time
  // out and be given up: either way the gang asks the next provider).
  ASSERT_NO_FATAL_FAILURE(StartSlurm(
      2,
      "PreemptType=preempt/partition_prio\nPreemptMode=CANCEL\n"
      "PartitionName=low Nodes=ALL Default=YES PriorityTier=1 PreemptMode=CANCEL GraceTime=5 "
      "State=UP\n"
      "PartitionName=high Nodes=ALL PriorityTier=2 PreemptMode=OFF State=UP\n"));
  fs::path marks = dir_ / "marks";
  fs::create_directories(marks);
  ASSERT_TRUE(StartCoordinator(
      fmt::format("providers:\n"
                  "  - name: hpc\n"
                  "    kind: slurm\n"
                  "    max_nodes: 2\n"
                  "    request_timeout_s: 8\n"
                  "    max_tries: 1\n"
                  "    retry_backoff_max_s: 120\n"
                  "    node: {{slots: 1, volumes: {{ckpt: {0}/vol-hpc}}}}\n"
                  "    slurm: {{partition: low, work_dir: {0}/hpc, agent_args: \"--notice 5\"}}\n"
                  "  - name: aws\n"
                  "    kind: local\n"
                  "    max_nodes: 3\n"
                  "    work_dir: {0}/local\n"
                  "    node: {{slots: 1, volumes: {{ckpt: {0}/vol-aws}}}}\n",
                  dir_.string()),
      {cluster_->ConfEnv()}));
  // A node of the local provider is up while the job runs on Slurm: the job's checkpoints are
  // copied to its volume (the catalog then knows the step on provider aws).
  std::string anchor = Submit(
      "name: anchor\ncommand: [\"sleep\", \"120\"]\nnodes: 1\ncheckpoint:\n  volume: ckpt\n"
      "placement:\n  providers: [aws]\n");
  ASSERT_TRUE(WaitState(anchor, "running", 30s)) << Events(anchor);
  std::string job = Submit("name: failover\ncommand: [\"/bin/sh\", \"-c\", " +
                           nlohmann::json(CheckpointingRank(marks)).dump() +
                           "]\nnodes: 2\nranks_per_node: 1\ncheckpoint:\n  volume: ckpt\n");
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto st = Status(job);
        return st.value("provider", "") == "hpc" && st.contains("progress") &&
               st["progress"].value("step", 0) >= 5;
      },
      40s))
      << Events(job) << Squeue() << ReadFile(dir_ / "coord.log");
  // Slurm takes both nodes for a minute.
  auto high = cluster_->Tool({"sbatch", "--parsable", "--partition", "high", "--nodes", "2",
                              "--output", "/dev/null", "--wrap", "sleep 60"});
  ASSERT_TRUE(high.ok()) << high.status().ToString();
  ASSERT_TRUE(WaitState(job, "succeeded", 60s))
      << Events(job) << Squeue() << ReadFile(dir_ / "coord.log");
  std::string notice_at = ReadFile(marks / "notice_at");
  ASSERT_FALSE(notice_at.empty()) << Events(job);
  EXPECT_EQ(ReadFile(marks / "resumed_from"), "0\n" + notice_at) << Events(job);
  auto st = Status(job);
  EXPECT_EQ(st.value("provider", ""), "aws") << st.dump();
  std::string events = Events(job);
  std::string step = notice_at.substr(0, notice_at.size() - 1);
  EXPECT_NE(events.find("requested 2 nodes from aws"), std::string::npos) << events;
  EXPECT_NE(events.find("resumes from step " + step + " on volume ckpt (provider aws)"),
            std::string::npos)
      << events;
  (void)Muster({"cancel", anchor});
}

}  // namespace
}  // namespace muster::providers_test

namespace muster::providers_test {
namespace {

// A coordinator killed with SIGKILL while a job runs on a Slurm allocation: the next one, on
// the same data dir and address, adopts the allocation from its ledger (it does not scancel
// it), the node's agent registers again and the job keeps running, on the same attempt; once
// the job ends and the node idles out, the adopted allocation is scancelled as its own.
TEST_F(SlurmProviderTest, ARestartedCoordinatorAdoptsTheAllocationOfARunningJob) {
  ASSERT_NO_FATAL_FAILURE(StartSlurm(2));
  std::string providers = fmt::format(
      "providers:\n"
      "  - name: hpc\n"
      "    kind: slurm\n"
      "    max_nodes: 2\n"
      "    idle_timeout_s: 1\n"
      "    request_timeout_s: 30\n"
      "    node: {{slots: 1}}\n"
      "    slurm: {{partition: debug, work_dir: {}}}\n",
      (dir_ / "hpc").string());
  int port = 0;
  {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
    close(s);
  }
  const std::string listen = fmt::format("tcp://127.0.0.1:{}", port);
  ASSERT_TRUE(StartCoordinator(providers, {cluster_->ConfEnv()}, listen));
  std::string job = Submit("name: held\ncommand: [\"sleep\", \"600\"]\nnodes: 1\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitState(job, "running", 40s))
      << Events(job) << Squeue() << ReadFile(dir_ / "coord.log");
  const int attempt = Status(job).value("attempt", 0);
  std::string before = Squeue();
  auto at = before.find(" muster-hpc-" + job);
  ASSERT_NE(at, std::string::npos) << before;
  std::string slurm_job = before.substr(0, at);
  slurm_job = slurm_job.substr(slurm_job.find_last_of('\n') + 1);
  // Killed (SIGKILL): it cannot scancel anything.
  coordinator_.reset();
  fs::remove(dir_ / "coord" / "endpoint");
  fs::rename(dir_ / "coord.log", dir_ / "coord.1.log");
  ASSERT_TRUE(StartCoordinator(providers, {cluster_->ConfEnv()}, listen));
  // The agent finds the new coordinator (this log is the new one's); the job was never stopped.
  ASSERT_TRUE(WaitUntil(
      [&] {
        return ReadFile(dir_ / "coord.log").find("node hpc-1 node_registered") != std::string::npos;
      },
      20s))
      << ReadFile(dir_ / "coord.log");
  ASSERT_TRUE(WaitState(job, "running", 20s)) << Events(job) << ReadFile(dir_ / "coord.log");
  EXPECT_EQ(Status(job).value("attempt", 0), attempt) << Events(job);
  EXPECT_NE(Squeue().find(slurm_job + " "), std::string::npos) << Squeue();
  std::string log = ReadFile(dir_ / "coord.log");
  EXPECT_NE(log.find("adopted " + slurm_job + " of request"), std::string::npos) << log;
  EXPECT_EQ(log.find("scancelled Slurm job " + slurm_job), std::string::npos) << log;
  // Its own now: the job ends, the node idles out, the allocation goes back.
  ASSERT_TRUE(Muster({"cancel", job}).ok());
  EXPECT_TRUE(WaitUntil([&] { return Squeue().find(slurm_job + " ") == std::string::npos; }, 40s))
      << Squeue() << ReadFile(dir_ / "coord.log");
}

}  // namespace
}  // namespace muster::providers_test
