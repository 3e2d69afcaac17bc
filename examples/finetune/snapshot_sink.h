#pragma once

// SnapshotSink: the fine-tune's in-memory peer snapshots (the job spec's
// checkpoint.snapshot_every_steps; checkpoint/snapshot_channel.h). Every `every` steps the trainer
// hands its whole train state (the trainable parameters, the AdamW moments and step counts, and the
// checkpoint's metadata: step, data position, RNG rule) to its own node's agent, which keeps it in
// memory and copies it to one agent on another node.
//
// Save() copies nothing: it hands the agent the state where it is (SnapshotSender::
// SnapshotInPlace: the agent reads the tensors out of this process's memory while training goes
// on), and Release(), which the trainer calls before its next optimizer step changes them, waits
// for the agent to have read them (it nearly always has by then). Training never waits on the
// network; the stall (gathering the index, and any wait in Release) is measured (stats()). CPU
// tensors are read straight from their storage; CUDA tensors are first brought to the host, and
// those copies are kept until Release. Where the agent cannot read this process (no ptrace
// permission), the sender's thread copies the state instead, and Release waits for that copy.
//
// Why not TrainStateSink: a volume checkpoint is read back into fresh tensors whose shapes its
// manifest gives, and may be re-sharded; a snapshot is restored in place (RestoreSnapshotInto),
// into tensors of the very shapes the same rank saved, by that rank, at the same world size.
//
// Thread-safety: one training thread calls it.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/snapshot_channel.h"
#include "common/status.h"
#include "examples/finetune/train_state_sink.h"
#include "runtime/job_context.h"

namespace muster::finetune {

class SnapshotSink {
 public:
  struct Stats {
    int64_t snapshots = 0;    // handed to the sender
    double stall_ms_sum = 0;  // from gathering the state to Save()'s return, summed
    double stall_ms_max = 0;
    double release_ms_sum = 0;  // the part of stall_ms_sum spent in Release (the agent's read)
    uint64_t bytes = 0;  // the state's bytes in the last snapshot
    double mean_ms() const { return snapshots > 0 ? stall_ms_sum / snapshots : 0.0; }
    double release_mean_ms() const { return snapshots > 0 ? release_ms_sum / snapshots : 0.0; }
  };

  // REQUIRES: sender non-null, every > 0.
  SnapshotSink(std::unique_ptr<checkpoint::SnapshotSender> sender, int64_t every)
      : sender_(std::move(sender)), every_(every) {}
  // Releases the last snapshot first: its tensors are not freed while the agent reads them.
  ~SnapshotSink();

  int64_t every() const { return every_; }
  // True when step `step` (steps done) is one to snapshot.
  bool Due(int64_t step) const { return step % every_ == 0; }

  // Hands `tensors` (any device; each under its own name) and `metadata` to the agent as step
  // `step`. REQUIRES: none of them changes until Release() (the tensors are kept alive until
  // then). InvalidArgument for a dtype snapshots cannot hold; otherwise the sender's errors on
  // the state itself (the agent's refusals show up in Flush()). The stall is counted from
  // `began`: when the caller started gathering the state.
  Status Save(int64_t step, const NamedTensors& tensors, const std::string& metadata,
              std::chrono::steady_clock::time_point began);
  // Waits until the last Save's tensors may change (the agent has read them, or they were copied
  // here); the wait is counted as stall. A wait past kReleaseTimeout gives that snapshot up
  // (logged) and returns Ok: training goes on. No-op when nothing is held.
  Status Release();
  static constexpr std::chrono::milliseconds kReleaseTimeout{10000};
  // A snapshot the agent refuses (one that does not fit its memory limit, ...) does not stop
  // training; once kStalledAfter snapshots in a row have gone without the agent keeping one,
  // Save logs a warning (once, and once more when the agent keeps one again).
  static constexpr int64_t kStalledAfter = 10;

  // Waits for the last snapshot to be handed over (SnapshotSender::Flush).
  Status Flush(std::chrono::milliseconds timeout) { return sender_->Flush(timeout); }

  const Stats& stats() const { return stats_; }
  int64_t sent() const { return sender_->sent(); }
  int64_t replaced() const { return sender_->replaced(); }

 private:
  std::unique_ptr<checkpoint::SnapshotSender> sender_;
  const int64_t every_;
  Stats stats_;
  int64_t kept_ = 0;     // sender_->sent() when last seen growing
  int64_t kept_at_ = 0;  // stats_.snapshots then
  bool warned_ = false;
  // The last Save's tensors (and host copies), alive until Release.
  std::vector<torch::Tensor> held_;
};

// Copies the snapshot this attempt resumes from (MUSTER_RESUME_SNAPSHOT_STEP, held by the local
// agent) into `into`, in place: each tensor must be in the snapshot under its name, with the dtype
// and shape it was saved with (any device; CUDA ones are staged through the host). Returns the
// step; `metadata` receives the saved metadata. FailedPrecondition when the attempt does not
// resume from a snapshot; NotFound, DataLoss or InvalidArgument from the fetch and the restore,
// with the step in the message. On an error the rank must not train on: its peers resume from
// that step.
StatusOr<int64_t> RestoreSnapshotInto(const runtime::JobContext& ctx, const NamedTensors& into,
                                      std::string* metadata);

}  // namespace muster::finetune
