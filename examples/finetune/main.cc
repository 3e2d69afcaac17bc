// muster-finetune: pretrain a tiny byte-level transformer LM, then fully fine-tune it or train
// LoRA adapters on it, data-parallel over the torchrun env contract. See examples/README.md.

#include <ATen/Context.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "collectives/communicator.h"
#include "collectives/local_address.h"
#include "collectives/store_client.h"
#include "common/logging.h"
#include "examples/finetune/checkpointer_state_store.h"
#include "examples/finetune/gradient_sync.h"
#include "examples/finetune/preemption.h"
#include "examples/finetune/state_store.h"
#include "examples/finetune/trainer.h"

namespace {

// Exit codes a supervisor can act on.
constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitPreempted = 3;  // checkpointed on a notice and stopped; resume later
// A collective failed because a peer died or stopped answering: not this rank's fault.
constexpr int kExitPeerFailed = muster::collectives::kPeerFailureExitCode;

std::string Env(const char* name, std::string fallback = "") {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

int EnvInt(const char* name, int fallback, bool* ok) {
  std::string v = Env(name);
  if (v.empty()) return fallback;
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (*end != '\0') *ok = false;
  return static_cast<int>(n);
}

}  // namespace

int main(int argc, char** argv) {
  using muster::finetune::Mode;
  muster::finetune::TrainConfig c;
  CLI::App app{
      "muster-finetune: a byte-level transformer LM, pretrained and fine-tuned (full or "
      "LoRA), data-parallel, checkpointed, resumable"};
  bool pretrain = false, deterministic = false;
  std::string mode = "lora", checkpoint_dir = Env("MUSTER_CHECKPOINT_DIR");
  std::string notice_file = Env("MUSTER_PREEMPT_FILE"), log_level;
  std::string data;
  int threads = 0;
  int64_t bucket_kb = 256;
  c.resume = Env("MUSTER_RESUME_STEP");
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
  app.add_option("--resume", c.resume,
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

  bool env_ok = true;
  const int rank = EnvInt("RANK", 0, &env_ok);
  const int world = EnvInt("WORLD_SIZE", 1, &env_ok);
  if (!env_ok) {
    log->error("RANK and WORLD_SIZE must be integers");
    return kExitUsage;
  }
  muster::log::SetContext(Env("MUSTER_JOB_ID"), "", std::to_string(rank));
  if (checkpoint_dir.empty()) {
    log->error("no checkpoint dir: pass --checkpoint-dir or set MUSTER_CHECKPOINT_DIR");
    return kExitUsage;
  }
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
  std::shared_ptr<muster::collectives::Store> rdzv;
  std::unique_ptr<muster::finetune::GradientSync> sync;
  if (world == 1 && Env("MUSTER_RDZV_ENDPOINT").empty()) {
    sync = std::make_unique<muster::finetune::LocalGradientSync>();
  } else {
    auto client = muster::collectives::ConnectStoreFromEnv();
    if (!client.ok()) {
      log->error("WORLD_SIZE={} needs the rendezvous store: {}", world, client.status().ToString());
      return kExitUsage;
    }
    rdzv = std::move(*client);
    const bool gpu = c.device == "cuda" || (c.device == "auto" && torch::cuda::is_available());
    muster::collectives::CommConfig cc;
    cc.rank = rank;
    cc.size = world;
    cc.name = "finetune";
    cc.device = std::atoi(Env("LOCAL_RANK", "0").c_str());
    // Peers on other hosts reach this rank at the address that routes to MASTER_ADDR.
    cc.host = muster::collectives::LocalAddressToward(Env("MASTER_ADDR"));
    auto backend = gpu ? muster::collectives::Backend::kNccl : muster::collectives::Backend::kGloo;
    if (std::string forced = Env("MUSTER_COLL_BACKEND"); !forced.empty()) {
      auto parsed = muster::collectives::ParseBackend(forced);
      if (!parsed.ok()) {
        log->error("{}", parsed.status().ToString());
        return kExitUsage;
      }
      backend = *parsed;
    }
    auto comm = muster::collectives::CreateCommunicator(backend, rdzv, cc);
    if (!comm.ok()) {
      log->error("cannot join the job's collectives: {}", comm.status().ToString());
      return kExitFailed;
    }
    sync = std::make_unique<muster::finetune::CommunicatorGradientSync>(std::move(*comm));
  }
  auto store =
      muster::finetune::CheckpointerStateStore::Open(checkpoint_dir, rank, world, rdzv.get());
  if (!store.ok()) {
    log->error("{}", store.status().ToString());
    return kExitUsage;
  }
  std::unique_ptr<muster::finetune::StateStore> base;
  if (c.mode != Mode::kPretrain && !c.base_dir.empty()) {
    // The base is only read, by every rank on its own: a world of one.
    auto opened = muster::finetune::CheckpointerStateStore::Open(c.base_dir, 0, 1, nullptr);
    if (!opened.ok()) {
      log->error("--base: {}", opened.status().ToString());
      return kExitUsage;
    }
    base = std::move(*opened);
  }
  muster::finetune::LocalNotice local_notice(notice_file);
  muster::finetune::LocalNotice::InstallSigtermHandler();
  // Rank 0 also watches the job's store for the agent's checkpoint request, on a connection of
  // its own.
  std::unique_ptr<muster::collectives::StoreClient> notice_store;
  if (rdzv && rank == 0) {
    auto client = muster::collectives::ConnectStoreFromEnv();
    if (client.ok()) {
      notice_store = std::move(*client);
    } else {
      log->warn("not watching the store for notices: {}", client.status().ToString());
    }
  }
  muster::finetune::StoreNotice notice(&local_notice, notice_store.get());

  auto result = muster::finetune::Train(c, *sync, **store, base.get(), notice, std::cout);
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
