#pragma once

// JobContext: what a rank program of a muster job needs from muster, in one object.
//
//   auto ctx = *runtime::JobContext::FromEnv();           // the env contract, one store connection
//   runtime::JobContext::InstallSigtermHandler();          // optional: SIGTERM counts as a notice
//   auto comm = *ctx->NewCommunicator();                   // over the shared store
//   auto ck = *ctx->NewCheckpointer();                     // ditto; announces its own commits
//   for (int64_t step = start; step < total; ++step) {
//     train();
//     bool stop = *ctx->AgreeToStop(*comm);                // the same answer on every rank
//     ctx->Progress(step + 1, total, loss, {{"tokens_per_s", tps}}).IgnoreError();
//     if (step % 100 == 0 || stop) ck->Save(step + 1, state);
//     if (stop) { ck->Wait(); return 3; }                   // checkpointed on notice: exit
//   }
//
// What it holds:
//   - the rank's RankEnv (common/rank_env.h), parsed and validated once;
//   - ONE connection to the job attempt's rendezvous store (a thread-safe RendezvousClient: each
//     concurrent call uses its own socket from a small pool, so the notice check never queues
//     behind a checkpoint commit), shared by every communicator and checkpointer built here;
//     null when the rank has no store (a program started by hand: a job of one);
//   - the rank's control channel to its agent or `muster run` (MUSTER_CONTROL_FD), on which
//     Progress() and the checkpointer's commits are announced; without one (torchrun, an older
//     agent, by hand) those lines go to stdout instead, where agents parse them too.
//
// Preemption (docs/env-contract.md, "Checkpoint on notice"): NoticeSeen() is true once this
// rank has seen a notice: SIGTERM (after InstallSigtermHandler), the notice file
// (MUSTER_PREEMPT_FILE), or, on rank 0 only, the store key `muster/preempt` that the node-rank-0
// agent sets (one non-waiting Get per call). AgreeToStop() turns that into one decision every
// rank takes at the same step (an allreduce of one value); a program that already does a
// collective each step may instead fold NoticeSeen() into it, as examples/finetune does.
//
// Thread-safety: the accessors and Progress() may be called from any thread. NoticeSeen() and
// AgreeToStop() are called by the training thread (AgreeToStop issues a collective: same order
// on every rank). The communicators and checkpointers it makes may outlive it (they share the
// store connection).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "checkpoint/snapshot_channel.h"
#include "collectives/communicator.h"
#include "collectives/rendezvous_store.h"
#include "common/rank_env.h"
#include "common/status.h"

namespace muster::runtime {

class JobContext {
 public:
  // The largest snapshot payload FetchSnapshot accepts from the agent.
  static constexpr uint64_t kMaxSnapshotFetchBytes = uint64_t{1} << 40;

  // The store key the node-rank-0 agent sets (value: the deadline, unix ms) to ask the ranks to
  // checkpoint and stop.
  static constexpr char kPreemptKey[] = "muster/preempt";

  // Parses the process environment (InvalidArgument names a malformed variable) and, when the
  // rank has a rendezvous store (MUSTER_RDZV_ENDPOINT), connects to it (lazily: a store that
  // is not up yet is retried by the first call). Sets the log context (job, rank).
  static StatusOr<std::unique_ptr<JobContext>> FromEnv();
  // The same from a given env (tests, embedders).
  static StatusOr<std::unique_ptr<JobContext>> FromEnv(const RankEnv& env);
  // From a given env over a store the caller already holds (an embedder's connection, or an
  // in-memory store in tests); `store` may be null (no store).
  static StatusOr<std::unique_ptr<JobContext>> FromEnv(
      const RankEnv& env, std::shared_ptr<collectives::RendezvousStore> store);

  // SIGTERM sets the notice flag instead of ending the process (async-signal-safe: a flag).
  // For programs that want to checkpoint on the agent's or a user's SIGTERM. Process-wide.
  static void InstallSigtermHandler();

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  int local_rank() const { return env_.local_rank; }
  const RankEnv& env() const { return env_; }
  // The shared store connection; null when the rank has none.
  const std::shared_ptr<collectives::RendezvousStore>& store() const { return store_; }

  // A communicator over the shared store (Communicator::FromEnv's backend choice). Give each
  // communicator of a program its own config.name. FailedPrecondition... as CreateCommunicator;
  // InvalidArgument for Gloo or NCCL when the rank has no store.
  StatusOr<std::unique_ptr<collectives::Communicator>> NewCommunicator(
      collectives::CommConfig config = {}, bool want_gpu = false) const;

  // A checkpointer over MUSTER_CHECKPOINT_DIR (or base.dir when set) and the shared store,
  // resuming from MUSTER_RESUME_STEP; rank 0 announces each commit (MUSTER_CHECKPOINT step=N)
  // on the control channel, or on stdout without one. FailedPrecondition without a directory.
  StatusOr<std::unique_ptr<checkpoint::Checkpointer>> NewCheckpointer(
      checkpoint::CheckpointerOptions base = {}) const;

  // In-memory snapshots (the job spec's checkpoint.snapshot_every_steps; checkpoint/
  // snapshot_channel.h): a sender to this node's agent, or null when the job or the agent has
  // none (MUSTER_SNAPSHOT_EVERY / MUSTER_SNAPSHOT_SOCKET unset). Call its Snapshot(step, state)
  // every snapshot_every() steps; it returns once the state is copied.
  std::unique_ptr<checkpoint::SnapshotSender> NewSnapshotSender() const;
  // MUSTER_SNAPSHOT_EVERY; 0 when unset.
  int64_t snapshot_every() const { return env_.snapshot_every.value_or(0); }
  // This rank's snapshot of `step` of `attempt` as the local agent holds it (its payload
  // checked), for checkpoint::RestoreSnapshotState. FailedPrecondition without a snapshot
  // socket; NotFound when the agent has none.
  StatusOr<checkpoint::SnapshotFrame> FetchSnapshot(int64_t step, int attempt) const;
  // The step this attempt resumes from in memory (MUSTER_RESUME_SNAPSHOT_STEP), nullopt when it
  // does not (it resumes from resume_step() on the volume, or fresh).
  std::optional<int64_t> resume_snapshot_step() const { return env_.resume_snapshot_step; }
  // The snapshot resume: fetches this rank's frame of MUSTER_RESUME_SNAPSHOT_STEP (of attempt
  // MUSTER_RESUME_SNAPSHOT_ATTEMPT) from the local agent, checks its xxh3, and copies the saved
  // tensors into `requests` (checkpoint::RestoreSnapshotState) and the saved metadata into
  // `metadata`. Returns the step. FailedPrecondition when the attempt does not resume from a
  // snapshot; NotFound, DataLoss or InvalidArgument as the fetch and the restore say. On an
  // error the rank must not go on with another step than its peers: exit non-zero.
  StatusOr<int64_t> RestoreSnapshot(const std::vector<checkpoint::RestoreRequest>& requests,
                                    std::string* metadata = nullptr) const;

  // True once this rank has seen a preemption notice (see above); stays true.
  bool NoticeSeen();
  // Why ("SIGTERM", "notice file F", "store key muster/preempt (deadline D unix ms)"); empty
  // before a notice.
  std::string NoticeReason() const;
  // True on every rank, at the same call, once any rank has seen a notice. One allreduce (max
  // of one int32) on `comm`. REQUIRES: every rank calls it, in the same order as its other
  // collectives on `comm`.
  StatusOr<bool> AgreeToStop(collectives::Communicator& comm);

  // Reports progress: `MUSTER_PROGRESS step=S total=T loss=L name=value...` (rank 0 only; a
  // no-op elsewhere). `total` < 0 and a NaN `loss` are left out. A metric `<x>_per_s` is shown
  // by `muster status` as throughput in `<x>/s`. InvalidArgument for a bad metric name.
  Status Progress(int64_t step, int64_t total, double loss,
                  const std::vector<std::pair<std::string, double>>& metrics = {});

  // Sends a line on the control channel, or prints it on stdout when there is none.
  Status Announce(const std::string& line) const;

 private:
  explicit JobContext(RankEnv env) : env_(std::move(env)) {}

  RankEnv env_;
  std::shared_ptr<collectives::RendezvousStore> store_;
  mutable std::mutex mu_;
  std::string notice_reason_;  // GUARDED_BY(mu_)
};

}  // namespace muster::runtime
