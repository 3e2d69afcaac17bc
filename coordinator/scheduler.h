#pragma once

// Scheduler: the gang scheduler of the coordinator, as a pure library. It holds an in-memory
// model of the registered nodes, the pending queue and the current allocations; the caller
// mutates the model as events arrive and calls Schedule(now) for a pass, which returns
// decisions (placements to start, running jobs to preempt). It does no I/O and reads no clock:
// time is passed in. That is what lets it be simulated at 10,000 nodes (muster-bench scheduler).
//
// Rules (docs/job-spec.md points users here):
//  - A node runs at most one job at a time (whole-node allocation, as Slurm --exclusive); it
//    fits a job if gpu_type matches (empty = any), gpus >= gpus_per_node, slots >=
//    ranks_per_node and it mounts the job's checkpoint volume.
//  - Gangs: all N nodes or none, all on one provider; island policy `required` puts them all on
//    one island, `preferred` does when some island can, `any` packs by island without requiring.
//  - Order: priority (higher first), then submission sequence.
//  - Backfill (EASY): the first job that cannot be placed is the head; it reserves the nodes of
//    the group (provider, island) where it would start soonest. A later job may use those nodes
//    only if it ends (by its time_limit) before the head's shadow time, or only the nodes the
//    head will not need at that time; nodes outside the reservation are free to use.
//  - Preemption: a head job that cannot be placed from free nodes preempts running jobs of
//    strictly lower priority (fewest victims, lowest priority, youngest first) when that gives
//    it a gang; it then waits while they stop, and nobody else takes their nodes.
//  - Exclusion: a job is never placed on its excluded_nodes (the placement pass hides them from
//    it; the backfill reservation still counts them, which at worst delays a backfill).
//  - Quarantine: a node with `failures_to_quarantine` failures within `failure_window` is
//    quarantined for quarantine_base * 2^(previous quarantines), capped at quarantine_max.
//  - Refusal: Feasible() says whether the registered nodes (in any state) could ever hold a job.
//  - Hot spares (JobRequest::spares = S): the job is placed on nodes + S nodes at once when they
//    fit, all under the rules above (one provider; one island when the policy requires it); the
//    first `nodes` (in node-rank order) are the gang, the rest its spares. When only the gang
//    fits, it starts alone and its spares follow (below): a gang never waits for, preempts or
//    reserves nodes for its spares. Spares stay allocated to the
//    job (never free, never placed for another job, never idle) until it is released or
//    requeued. TakeSpare swaps a spare into a lost node's place (a spare on the lost node's
//    island first). A running job short of spares (one taken, one lost) gets new ones in each
//    pass from free nodes of its gang's provider (its gang's island first; only that island when
//    the policy requires one), after the queue and never from nodes held for the head job
//    (Decisions::spares_held).
//
// Thread-safety: none; the coordinator uses it from its reactor thread only.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace muster::coordinator {

using SchedClock = std::chrono::system_clock;
using TimePoint = SchedClock::time_point;

enum class NodeState { kUp, kDraining, kQuarantined, kDown };
std::string_view NodeStateName(NodeState state);
StatusOr<NodeState> ParseNodeState(std::string_view name);

enum class IslandPolicy { kAny, kPreferred, kRequired };
std::string_view IslandPolicyName(IslandPolicy policy);
StatusOr<IslandPolicy> ParseIslandPolicy(std::string_view name);

// A node's labels, as its agent registers them.
struct NodeSpec {
  std::string name;
  std::string provider;
  std::string region;
  std::string island;
  std::string gpu_type;
  int gpus = 0;
  int slots = 1;
  std::vector<std::string> volumes;  // names of the checkpoint volumes it mounts
};

// What the scheduler needs to know of a job.
struct JobRequest {
  std::string id;
  int nodes = 1;
  int ranks_per_node = 1;
  std::string gpu_type;  // empty: any
  int gpus_per_node = 0;
  std::vector<std::string> providers;  // empty: any
  IslandPolicy island = IslandPolicy::kAny;
  int priority = 0;
  uint64_t seq = 0;                    // submission order; unique per job
  std::string checkpoint_volume;       // empty: none required
  std::vector<std::string> hosts;      // pinned node names in node-rank order (`muster run -H`)
  std::chrono::seconds time_limit{0};  // 0: unlimited (never backfills ahead of a shadow)
  // Nodes this job is never placed on (a launch preflight found them unable to reach the
  // others); other jobs may use them. Not honoured for pinned `hosts`.
  std::set<std::string> excluded_nodes;
  // Hot spares held idle for the job while it runs (see the rules above). REQUIRES: hosts empty.
  int spares = 0;
};

// The nodes a job needs at once: its gang and its spares.
inline int Need(const JobRequest& j) { return j.nodes + j.spares; }

struct Placement {
  std::string job;
  std::vector<std::string> nodes;   // index = node rank
  std::vector<std::string> spares;  // held for the job, idle
};

// A node held as a new spare for a running job that was short of them.
struct SpareHeld {
  std::string job;
  std::string node;
};

struct Preemption {
  std::string victim;
  std::string for_job;
};

struct Decisions {
  std::vector<Placement> placements;    // already committed as allocations in the model
  std::vector<Preemption> preemptions;  // the caller stops these, then Requeue()s them
  size_t pending = 0;                   // jobs still waiting after this pass
  std::vector<SpareHeld> spares_held;   // already committed in the model
};

struct QuarantinePolicy {
  int failures_to_quarantine = 3;
  std::chrono::seconds failure_window{600};
  std::chrono::seconds quarantine_base{60};
  std::chrono::seconds quarantine_max{3600};
};

// What the model knows of one node (for `muster nodes`).
struct NodeView {
  NodeSpec spec;
  NodeState state = NodeState::kUp;  // kQuarantined while quarantined_until > now
  std::string job;                   // allocated to, or empty
  bool spare = false;                // held idle as a spare of `job`
  int quarantines = 0;
  TimePoint quarantined_until{};
};

class Scheduler {
 public:
  explicit Scheduler(QuarantinePolicy policy = {});
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // --- nodes ---
  // Adds a node or replaces its labels (re-registration). A new node is kUp. A node that runs a
  // job keeps it.
  void UpsertNode(const NodeSpec& spec);
  // REQUIRES: the node runs no job (Release it first); NotFound if unknown.
  Status RemoveNode(const std::string& name);
  // kUp, kDraining or kDown (quarantine is RecordNodeFailure's business). NotFound if unknown.
  Status SetNodeState(const std::string& name, NodeState state);
  // Counts a failure of a job attempt on this node. Returns the end of a quarantine when this
  // failure starts one.
  std::optional<TimePoint> RecordNodeFailure(const std::string& name, TimePoint now);
  // A clean finish on this node ends its failure streak (not its quarantine history).
  void RecordNodeSuccess(const std::string& name);
  // Restores quarantine state from the database after a restart.
  void RestoreQuarantine(const std::string& name, int quarantines, TimePoint until);
  StatusOr<NodeView> GetNode(const std::string& name, TimePoint now) const;
  std::vector<NodeView> Nodes(TimePoint now) const;  // sorted by name

  // --- jobs ---
  // FailedPrecondition with the reason when no set of registered nodes (whatever their state)
  // could ever hold the job; InvalidArgument for a malformed request.
  Status Feasible(const JobRequest& job) const;
  // Queues a job (no feasibility check: the coordinator refuses at submit, but a job restored
  // after a restart waits for its nodes to come back). InvalidArgument if the id is known.
  Status Submit(const JobRequest& job);
  // Restores an allocation after a coordinator restart (a node not registered yet is
  // known by name only and kDown until its agent registers). InvalidArgument if the id is known.
  Status RestoreRunning(const JobRequest& job, const std::vector<std::string>& nodes);
  // Restores a hot spare of a job restored with RestoreRunning (a node not registered yet is
  // known by name only and kDown until its agent registers). NotFound if the job is not
  // running; FailedPrecondition if the node is held by a job already or the job holds all the
  // spares it asks for.
  Status RestoreSpare(const std::string& job, const std::string& node);
  // Frees a running job's nodes and forgets it (finished, failed, cancelled) or, with Requeue,
  // puts it back in the queue at its original position. NotFound if not running.
  Status Release(const std::string& job);
  Status Requeue(const std::string& job);
  // Keeps the job off `node` from now on (JobRequest::excluded_nodes). NotFound if the job is
  // not known.
  Status Exclude(const std::string& job, const std::string& node);
  // Removes a pending job from the queue. NotFound if not pending.
  Status CancelPending(const std::string& job);
  bool IsPending(const std::string& job) const;
  bool IsRunning(const std::string& job) const;
  // The nodes of a running job (node-rank order); empty if not running.
  std::vector<std::string> AllocationOf(const std::string& job) const;
  // The spares a running job holds (sorted by name); empty if none or not running.
  std::vector<std::string> SparesOf(const std::string& job) const;
  // The running job's gang lost `lost`: a spare that is up (not draining or quarantined) takes
  // its node rank (one on the lost node's island first, then the first by name), `lost` is no
  // longer the job's, and the job is short of a spare until a pass finds one. Returns the spare.
  // NotFound if the job is not running or `lost` is not in its gang; FailedPrecondition if it
  // holds no spare that is up.
  StatusOr<std::string> TakeSpare(const std::string& job, const std::string& lost);
  // `node`, a spare of the running `job`, is of no use any more (lost): it is no longer the
  // job's, and the job is short of a spare. NotFound if it is not a spare of that job.
  Status DropSpare(const std::string& job, const std::string& node);
  // For each running job short of spares, what it lacks as a request of its own (id = the
  // job's, nodes = the spares it lacks, no spares, its gang's provider only), in queue order:
  // what an on-demand provider is asked for (coordinator/providers/planner.h).
  std::vector<JobRequest> SpareRequests() const;

  // Why a pending job waits, e.g. "waiting: 2 of 4 nodes free on provider aws, island a".
  // Valid after a pass; empty for a job that is not pending.
  std::string PendingReason(const std::string& job) const;

  // --- the pass ---
  Decisions Schedule(TimePoint now);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace muster::coordinator
