// muster-finetune: pretrain a tiny byte-level transformer LM, then fully fine-tune it or train
// LoRA adapters on it, data-parallel over the torchrun env contract. See examples/README.md.

#include <ATen/Context.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "collectives/communicator.h"
#include "common/logging.h"
#include "common/rank_env.h"
#include "examples/finetune/checkpointer_state_sink.h"
#include "examples/finetune/gradient_sync.h"
#include "examples/finetune/snapshot_sink.h"
#include "examples/finetune/train_state_sink.h"
#include "examples/finetune/trainer.h"
#include "runtime/job_context.h"

namespace {

// Exit codes a supervisor can act on.
constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitPreempted = 3;  // checkpointed on a notice and stopped; resume later
// A collective failed because a peer died or stopped answering: not this rank's fault.
constexpr int kExitPeerFailed = muster::kPeerFailureExitCode;

}  // namespace

int main(int argc, char** argv) {
  using muster::finetune::Mode;
  muster::finetune::TrainConfig c;
  CLI::App app{
      "muster-finetune: a byte-level transformer LM, pretrained and fine-tuned (full or "
      "LoRA), data-parallel, checkpointed, resumable"};
  bool pretrain = false, deterministic = false;
  std::string mode = "lora", checkpoint_dir, notice_file, log_level;
  std::string data;
  int threads = 0;
  int64_t bucket_kb = 256;
  std::optional<std::string> resume;
  std::optional<double> lr;
  app.add_flag("--pretrain", pretrain,
               "Train a base model from scratch (default data: "
               "/usr/share/common-licenses)");
  app.add_option("--mode", mode, "Fine-tune mode: full or lora")
      ->check(CLI::IsMember({"full", "lora"}))
      ->capture_default_str();
  app.add_option("--data", data, "Training text: a file or a directory");
  app.add_option("--base", c.base_dir, "Checkpoint dir of the base model (fine-tunes)");
  app.add_option("--base-step", c.base_step, "Step of the base checkpoint (default: its latest)");
  app.add_option("--checkpoint-dir", checkpoint_dir,
                 "Where checkpoints go (default: $MUSTER_CHECKPOINT_DIR)");
  app.add_option("--resume", resume,
                 "'latest' or a step (default: $MUSTER_RESUME_STEP; empty starts fresh)");
  app.add_option("--steps", c.steps, "Total optimizer steps")->capture_default_str();
  app.add_option("--batch", c.global_batch, "Global batch, in sequences")->capture_default_str();
  app.add_option("--lr", lr, "Peak learning rate (default 3e-3 pretrain and LoRA, 1e-3 full)");
  app.add_option("--min-lr-ratio", c.min_lr_ratio, "Cosine floor as a fraction of --lr")
      ->capture_default_str();
  app.add_option("--warmup", c.warmup_steps, "Linear warmup steps")->capture_default_str();
  app.add_option("--weight-decay", c.weight_decay, "AdamW weight decay")->capture_default_str();
  app.add_option("--clip", c.clip_norm, "Gradient clipping max norm")->capture_default_str();
  app.add_option("--lora-rank", c.lora_rank, "LoRA rank")->capture_default_str();
  app.add_option("--lora-alpha", c.lora_alpha, "LoRA alpha")->capture_default_str();
  app.add_option("--seed", c.seed, "Seed for init, data order and dropout")->capture_default_str();
  app.add_option("--ckpt-every", c.checkpoint_every, "Checkpoint every K steps (0: end only)")
      ->capture_default_str();
  app.add_option("--log-every", c.log_every, "Progress line every N steps")->capture_default_str();
  app.add_option("--notice-file", notice_file,
                 "Checkpoint and stop when this file appears (default: $MUSTER_PREEMPT_FILE)");
  app.add_option("--device", c.device, "auto, cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--threads", threads, "Intra-op threads (0: libtorch's default)");
  app.add_flag("--deterministic", deterministic,
               "One thread and deterministic algorithms: bit-identical reruns and resumes");
  app.add_option("--d-model", c.model.d_model, "Model width (pretrain)")->capture_default_str();
  app.add_option("--layers", c.model.n_layers, "Transformer blocks (pretrain)")
      ->capture_default_str();
  app.add_option("--heads", c.model.n_heads, "Attention heads (pretrain)")->capture_default_str();
  app.add_option("--seq-len", c.model.seq_len, "Context length in bytes (pretrain)")
      ->capture_default_str();
  app.add_option("--dropout", c.model.dropout, "Dropout (pretrain)")->capture_default_str();
  app.add_option("--bucket-kb", bucket_kb, "Gradient allreduce bucket size, KiB")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  if (auto s = muster::log::InitLogging(log_level); !s.ok()) {
    std::cerr << "muster-finetune: " << s << "\n";
    return kExitUsage;
  }
  auto log = muster::log::Get("examples.finetune");

  // The env contract (common/rank_env.h); the flags above override its defaults.
  auto env = muster::RankEnv::FromProcessEnviron();
  if (!env.ok()) {
    log->error("{}", env.status().ToString());
    return kExitUsage;
  }
  if (checkpoint_dir.empty()) checkpoint_dir = env->checkpoint_dir;
  if (!notice_file.empty()) env->preempt_file = notice_file;
  c.resume = resume ? *resume : (env->resume_step ? std::to_string(*env->resume_step) : "");
  if (checkpoint_dir.empty()) {
    log->error("no checkpoint dir: pass --checkpoint-dir or set MUSTER_CHECKPOINT_DIR");
    return kExitUsage;
  }
  // One store connection (when the rank has a store) for collectives, checkpoints and notices.
  auto ctx = muster::runtime::JobContext::FromEnv(*env);
  if (!ctx.ok()) {
    log->error("{}", ctx.status().ToString());
    return kExitUsage;
  }
  const int world = (*ctx)->world_size();
  c.mode = pretrain ? Mode::kPretrain : (mode == "full" ? Mode::kFull : Mode::kLora);
  c.data = !data.empty() ? data
           : pretrain    ? std::string("/usr/share/common-licenses")
                         : std::string(MUSTER_EXAMPLES_DATA_DIR);
  c.lr = lr.value_or(c.mode == Mode::kFull ? 1e-3 : 3e-3);
  c.bucket_bytes = static_cast<size_t>(std::max<int64_t>(bucket_kb, 1)) * 1024;
  if (c.log_every < 1) c.log_every = 1;

  if (deterministic) {
    threads = 1;
    setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);  // cuBLAS needs it for determinism
    at::globalContext().setDeterministicAlgorithms(true, false);
  }
  if (threads > 0) torch::set_num_threads(threads);

  // World size 1 outside a launcher needs no rendezvous: the identity allreduce and a
  // store-less Checkpointer. Otherwise (and under `muster run -np 1`, so that a one-GPU machine
  // still exercises NCCL) the ranks meet in the attempt's rendezvous store.
  std::unique_ptr<muster::finetune::GradientSync> sync;
  if (world == 1 && !(*ctx)->store()) {
    sync = std::make_unique<muster::finetune::LocalGradientSync>();
  } else {
    if (!(*ctx)->store()) {
      log->error("WORLD_SIZE={} needs the rendezvous store: MUSTER_RDZV_ENDPOINT is not set",
                 world);
      return kExitUsage;
    }
    const bool gpu = c.device == "cuda" || (c.device == "auto" && torch::cuda::is_available());
    muster::collectives::CommConfig cc;
    cc.name = "finetune";
    auto comm = (*ctx)->NewCommunicator(cc, gpu);
    if (!comm.ok()) {
      log->error("cannot join the job's collectives: {}", comm.status().ToString());
      return comm.status().code() == muster::StatusCode::kInvalidArgument ? kExitUsage
                                                                          : kExitFailed;
    }
    sync = std::make_unique<muster::finetune::CommunicatorGradientSync>(std::move(*comm));
  }
  muster::checkpoint::CheckpointerOptions ck_options;
  ck_options.dir = checkpoint_dir;
  ck_options.io_threads = 1;  // the example's checkpoints are a few MB
  auto ck = (*ctx)->NewCheckpointer(ck_options);
  if (!ck.ok()) {
    log->error("{}", ck.status().ToString());
    return kExitUsage;
  }
  auto store = std::make_unique<muster::finetune::CheckpointerStateSink>(std::move(*ck));
  std::unique_ptr<muster::finetune::TrainStateSink> base;
  if (c.mode != Mode::kPretrain && !c.base_dir.empty()) {
    // The base is only read, by every rank on its own: a world of one.
    auto opened = muster::finetune::CheckpointerStateSink::Open(c.base_dir, 0, 1, nullptr);
    if (!opened.ok()) {
      log->error("--base: {}", opened.status().ToString());
      return kExitUsage;
    }
    base = std::move(*opened);
  }
  // In-memory peer snapshots, when the job asks for them (checkpoint.snapshot_every_steps) and
  // the agent holds them.
  std::unique_ptr<muster::finetune::SnapshotSink> snapshots;
  if ((*ctx)->snapshot_every() > 0) {
    if (auto sender = (*ctx)->NewSnapshotSender()) {
      snapshots = std::make_unique<muster::finetune::SnapshotSink>(std::move(sender),
                                                                   (*ctx)->snapshot_every());
    } else {
      log->warn(
          "MUSTER_SNAPSHOT_EVERY={} but no snapshot socket (MUSTER_SNAPSHOT_SOCKET): no "
          "in-memory snapshots",
          (*ctx)->snapshot_every());
    }
  }
  muster::runtime::JobContext::InstallSigtermHandler();  // SIGTERM: checkpoint, then stop
  auto result =
      muster::finetune::Train(c, *sync, *store, base.get(), **ctx, std::cout, snapshots.get());
  if (!result.ok()) {
    log->error("{}", result.status().ToString());
    switch (result.status().code()) {
      case muster::StatusCode::kInvalidArgument:
        return kExitUsage;
      case muster::StatusCode::kAborted:
      case muster::StatusCode::kDeadlineExceeded:
        return world > 1 ? kExitPeerFailed : kExitFailed;
      default:
        return kExitFailed;
    }
  }
  return result->preempted ? kExitPreempted : kExitOk;
}
