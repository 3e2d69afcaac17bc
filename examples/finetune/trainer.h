#pragma once

// The fine-tune training loop: pretraining a base CharLM, full fine-tuning it, or training LoRA
// adapters on it, data-parallel across ranks, checkpointing every K steps and on a preemption
// notice, resuming bit-exactly. Collectives and storage come in through the seams in
// gradient_sync.h and train_state_sink.h; notices and progress through runtime::JobContext.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <ostream>
#include <string>

#include "common/status.h"
#include "examples/finetune/gradient_sync.h"
#include "examples/finetune/model.h"
#include "examples/finetune/snapshot_sink.h"
#include "examples/finetune/train_state_sink.h"
#include "runtime/job_context.h"

namespace muster::finetune {

enum class Mode { kPretrain, kFull, kLora };
std::string_view ModeName(Mode m);

struct TrainConfig {
  Mode mode = Mode::kLora;
  std::filesystem::path data;        // file or directory of text
  std::filesystem::path base_dir;    // checkpoint dir of the base model (not for kPretrain)
  std::optional<int64_t> base_step;  // default: the base dir's latest step
  ModelConfig model;                 // kPretrain only; fine-tunes take the base's
  int64_t steps = 300;               // total optimizer steps
  int64_t global_batch = 8;          // sequences per step, over all ranks
  double lr = 3e-3;                  // peak learning rate
  double min_lr_ratio = 0.1;         // cosine decays to lr * this
  int64_t warmup_steps = 20;
  double weight_decay = 0.01;
  double clip_norm = 1.0;
  int64_t lora_rank = 8;
  double lora_alpha = 16.0;
  uint64_t seed = 1234;
  int64_t checkpoint_every = 50;  // 0: only at the end and on notice
  int64_t log_every = 10;
  size_t bucket_bytes = 256 * 1024;  // gradient allreduce bucket size
  std::string resume;                // "", "latest", or a step number
  std::string device = "auto";       // auto, cpu, cuda
};

struct TrainResult {
  int64_t step = 0;          // steps completed
  bool preempted = false;    // stopped on a notice after checkpointing
  std::string param_digest;  // DigestTensors of every parameter (base and adapters)
  double eval_loss = 0.0;
};

// The learning rate at `step`: linear warmup to `lr` over warmup_steps, then cosine decay to
// lr * min_lr_ratio at `steps`.
double LearningRate(const TrainConfig& c, int64_t step);

// Runs training to c.steps or a notice. `store` holds this run's checkpoints; `base` (required
// unless pretraining) is the store of the base model's checkpoints, read only. Resumes from
// c.resume: a step, "latest", or empty meaning the latest checkpoint when there is one.
// `ctx` supplies the preemption notice (NoticeSeen) and takes the progress (MUSTER_PROGRESS,
// on the control channel or stdout). The other machine-readable lines (MUSTER_PREEMPTED,
// MUSTER_DONE; see examples/README.md) go to `out` from rank 0; readable ones go to the log.
//
// `snapshots` (may be null): the job's in-memory peer snapshots; the whole train state goes to it
// every snapshots->every() steps. When the attempt resumes from a snapshot
// (ctx.resume_snapshot_step()), the state comes from the local agent's memory instead of the
// volume, bit-exact; a snapshot that cannot be restored is an error (the peers resume from that
// step: never train on from another one).
StatusOr<TrainResult> Train(const TrainConfig& c, GradientSync& sync, TrainStateSink& store,
                            TrainStateSink* base, runtime::JobContext& ctx, std::ostream& out,
                            SnapshotSink* snapshots = nullptr);

}  // namespace muster::finetune
