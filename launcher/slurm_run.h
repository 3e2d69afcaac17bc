#pragma once

// `muster run` inside a Slurm allocation (under `salloc` or in an `sbatch` script), the way
// Open MPI's mpirun runs there: the hosts and their slots come from the allocation
// (SLURM_JOB_NODELIST, expanded by `scontrol show hostnames`, and SLURM_TASKS_PER_NODE), and
// the ranks on other nodes are started through `srun`. Concretely, for an allocation of more
// than one node, RunInSlurmAllocation:
//   1. makes a private keys directory (coordinator, client and agent keys: CURVE stays on)
//      under $MUSTER_RUN_DIR, else $SLURM_SUBMIT_DIR, else the working directory; it must be
//      on a filesystem every node of the allocation sees;
//   2. starts a `muster coordinator` child on this node, listening on every address;
//   3. starts `srun --ntasks-per-node=1 muster agent --name $SLURMD_NODENAME ...`: one agent
//      per node of the allocation, with that node's slots;
//   4. once every agent has registered, runs the job through that coordinator
//      (RunThroughCoordinator, remote_run.h) with the allocation's nodes as -H: the output and
//      exit semantics are those of `muster run` on one machine;
//   5. stops the agents (srun) and the coordinator and removes the directory.
// An allocation of one node (this one) runs the ranks locally, as without Slurm.
//
// Thread-safety: as RunJob (main thread, before other threads start).

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "launcher/launcher.h"
#include "launcher/run_options.h"

namespace muster::launcher {

// SLURM_TASKS_PER_NODE ("2(x3),1") -> {2,2,2,1}. InvalidArgument for anything else.
StatusOr<std::vector<int>> ParseTasksPerNode(const std::string& text);

// The allocation's hosts with their slots, from the environment (`getenv`) and the host names
// (`expand`: SLURM_JOB_NODELIST -> names). nullopt when not inside an allocation.
StatusOr<std::optional<std::vector<HostSlots>>> SlurmAllocationHosts(
    const std::function<const char*(const char*)>& getenv,
    const std::function<StatusOr<std::vector<std::string>>(const std::string&)>& expand);

// Runs the job over the allocation's nodes (see above). REQUIRES: inside an allocation of
// more than one node and no --coordinator.
int RunInSlurmAllocation(const RunOptions& options, const std::vector<HostSlots>& hosts,
                         const RunIo& io);

}  // namespace muster::launcher
