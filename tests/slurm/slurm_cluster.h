#pragma once

// SlurmCluster: a real Slurm cluster on this machine for tests: munged with its own key and
// socket, slurmctld and `nodes` slurmd daemons (`slurmd -N nK`, each on its own port), all in
// the foreground (-D), no systemd, from a generated slurm.conf under the test's directory.
// Every process it starts (and everything they start: slurmstepd, job steps) carries
// SLURM_CONF=<dir>/slurm.conf in its environment; Stop() kills them all, from the destructor
// too, so a failing test leaves no daemon behind.

#include <string>
#include <vector>

#include "common/status.h"
#include "tests/integration/provider_fixture.h"

namespace muster::providers_test {

class SlurmCluster {
 public:
  explicit SlurmCluster(fs::path dir) : dir_(std::move(dir)) {}
  ~SlurmCluster() { Stop(); }

  // Starts the daemons and waits until every node is idle. Unavailable with the reason (and
  // the daemons' logs) when they cannot start.
  // `partitions`: PartitionName lines (and any further slurm.conf lines) in place of the
  // default one (`debug`, every node).
  Status Start(int nodes, const std::string& partitions = "");
  void Stop();

  // "SLURM_CONF=..." for processes that use the Slurm tools.
  std::string ConfEnv() const { return "SLURM_CONF=" + (dir_ / "slurm.conf").string(); }
  // Runs a Slurm tool (squeue, scancel, ...) against this cluster.
  StatusOr<std::string> Tool(std::vector<std::string> argv);
  std::string Logs() const;

 private:
  fs::path dir_;
  std::vector<std::unique_ptr<Subprocess>> daemons_;
  bool started_ = false;
};

}  // namespace muster::providers_test
