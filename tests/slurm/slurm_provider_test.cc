// The slurm provider against real daemons (label `slurm`): munged, slurmctld and two slurmd
// started by the test (slurm_cluster.h). A job submitted to muster gets its nodes as a Slurm
// allocation (sbatch, one agent per node with srun), finishes, and once its nodes are idle the
// allocation is scancelled: squeue is empty again. If the daemons cannot start the test fails
// with the reason; it never skips.

#include <fmt/format.h>

#include "tests/slurm/slurm_cluster.h"

namespace muster::providers_test {
namespace {

class SlurmProviderTest : public ProviderCluster {
 protected:
  void TearDown() override {
    cluster_.reset();
    if (!HasFailure()) fs::remove_all(slurm_dir_);
    ProviderCluster::TearDown();
  }
  void StartSlurm(int nodes) {
    // slurmstepd's socket paths live under the spool directory and must fit in 108 bytes.
    static int n = 0;
    slurm_dir_ = fs::path("/tmp") / fmt::format("msl-{}-{}", getpid(), ++n);
    fs::remove_all(slurm_dir_);
    cluster_ = std::make_unique<SlurmCluster>(slurm_dir_);
    muster::Status st = cluster_->Start(nodes);
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

}  // namespace
}  // namespace muster::providers_test
