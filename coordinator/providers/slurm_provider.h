#pragma once

// SlurmProvider: a node group is a Slurm allocation. Request writes a batch script and runs
// `sbatch --parsable --nodes N --exclusive --signal=TERM@lead [--partition P] [--gres G]
// [--time T]`; the script runs one `muster agent` per node with `srun --ntasks-per-node=1`,
// node i registering as the request's names[i]. Release marks a node given back; when every node
// of an allocation is, the allocation is `scancel`ed (Slurm gives nodes back by allocation).
// Cancel scancels at once. A node Slurm loses (node failure, time limit) stops heartbeating and
// the coordinator handles it as any lost node; the `--signal` lead time, and Slurm preemption
// with a GraceTime, reach the agent as SIGTERM, its preemption notice.
//
// Why the command-line tools and not slurmrestd: they are in slurm-client on every login node,
// authenticate through munge with no token to issue or rotate, and behave the same across
// Slurm releases, while slurmrestd's OpenAPI plugin versions change with each release and it is
// often not deployed. docs/providers.md says more.
//
// sbatch and scancel talk to slurmctld and may block (an unreachable controller): they run on
// the provider's own worker thread, one at a time in order, each with a timeout, so the
// coordinator's reactor never waits on Slurm. A failed sbatch is a failed try (Poll); so is
// an allocation that ends by itself (every 2 s, squeue: its agents exited, or Slurm ended it).
//
// Allocations outlive a coordinator that is killed before it can scancel them, and nodes that
// run jobs must keep running through a coordinator restart. So every Slurm job sbatch answered
// is recorded in the coordinator's ledger (provider_ledger.h: its database) with its request
// and node names, until it is scancelled or seen to end. An sbatch not yet answered is covered
// too: before sbatch runs, the ledger gets an intent ("name:<job name>", a name unique to the
// try, durable when Request returns); the answer replaces it with the job id, a refusal removes
// it. An sbatch that times out is scancelled by name at once (its intent stays until that
// succeeds). The worker thread's changes to the ledger reach the database at the next Poll.
//
// After a restart, Adopt reads the ledger: an allocation whose request the coordinator still
// waits for, or whose nodes it knows (they run jobs or sit idle), is adopted: its nodes that
// register are its request's, Release and Cancel scancel it as before, and an adopted intent is
// looked up by its name (squeue --name: a job found is adopted by id; none means sbatch never
// submitted, and the request fails). Everything else in the ledger is scancelled on the
// worker thread before any request of the new process (by id, or `scancel --name` for an
// intent); a job whose scancel fails for another reason than having ended stays in the ledger
// for the next start. A ledger file an older coordinator left (<slurm.work_dir>/allocations) is
// read once as such leftovers and removed.
//
// Thread-safety: the public methods are for the reactor thread; the worker shares only the
// queues under mu_.

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "coordinator/providers/provider.h"

namespace muster::coordinator::providers {

class SlurmProvider : public Provider {
 public:
  SlurmProvider(ProviderConfig config, AgentLaunch launch);
  ~SlurmProvider() override;  // scancels every allocation it holds, then joins the worker

  const ProviderConfig& config() const override { return config_; }
  Status Request(const NodeGroupRequest& request) override;
  void Cancel(uint64_t request_id) override;
  void Release(const std::string& node) override;
  std::vector<RequestFailure> Poll() override;
  std::set<uint64_t> Adopt(ProviderLedger* ledger, const KeepFn& keep) override;

  // The batch script for a request (tests read it).
  std::string BatchScript(const NodeGroupRequest& request) const;

 private:
  struct Alloc {
    std::string slurm_job;  // empty until sbatch answered
    std::string name;       // the Slurm job name (scancel --name for an adopted intent)
    std::set<std::string> nodes, released;
    bool cancelled = false;
    bool adopted = false;  // from a previous process: no sbatch of ours will answer
  };
  void Post(std::function<void()> work);
  void WorkerLoop();
  void Scancel(uint64_t id);  // worker thread
  // Worker thread: scancels the jobs (or intents) an earlier process left that were not adopted.
  void CancelLeftovers(const std::set<std::string>& left);
  // Worker thread: finds the Slurm job of an adopted intent by its name (see the top).
  void ResolveIntent(uint64_t id, const std::string& intent, const std::string& name);
  // Reactor thread: writes the ledger to the coordinator's database if it changed; an error
  // leaves it to the next flush. Ok without a ledger (never adopted: nothing is durable).
  Status FlushLedger();
  // Worker thread: scancels the Slurm job named `name` (an sbatch that did not answer) and
  // drops its `intent` from the ledger.
  void ScancelByName(const std::string& intent, const std::string& name);
  // Worker thread: allocations that ended (squeue no longer lists them as pending or running)
  // without our scancel fail their request.
  void Watch();

  ProviderConfig config_;
  AgentLaunch launch_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> work_;  // GUARDED_BY(mu_)
  std::vector<RequestFailure> failures_;    // GUARDED_BY(mu_)
  std::map<uint64_t, Alloc> allocs_;        // GUARDED_BY(mu_)
  bool stop_ = false;                       // GUARDED_BY(mu_)
  // GUARDED_BY(mu_): Slurm jobs (and intents) not known to be gone, by key.
  std::map<std::string, LedgerEntry> ledger_;
  bool ledger_dirty_ = false;            // GUARDED_BY(mu_): changed since the last flush
  ProviderLedger* ledger_db_ = nullptr;  // reactor thread only; set by Adopt
  bool watching_ = false;                // GUARDED_BY(mu_): a Watch is queued
  std::chrono::steady_clock::time_point next_watch_{};  // reactor thread only
  std::string nonce_;  // in every Slurm job name of this process: the names are unique
  std::thread worker_;
};

// Runs `argv` (argv[0] a path or a name on $PATH) with stdin from /dev/null, waits at most
// `timeout`, returns its stdout; Unavailable with its stderr (or the timeout) when it fails.
StatusOr<std::string> RunTool(const std::vector<std::string>& argv,
                              std::chrono::milliseconds timeout);

}  // namespace muster::coordinator::providers
