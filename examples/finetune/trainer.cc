#include "examples/finetune/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/logging.h"
#include "examples/finetune/data.h"

namespace muster::finetune {
namespace {

using json = nlohmann::json;
constexpr char kFormat[] = "muster.finetune/1";
constexpr char kModelPrefix[] = "model.";
constexpr char kOptimizerKey[] = "optimizer";
// In a snapshot the AdamW state is raw tensors, not torch::save's archive: per trainable
// parameter "adamw.<name>.exp_avg" and ".exp_avg_sq", and "adamw.step" (i64, one per parameter;
// 0: the optimizer holds no state for it yet). Copying them costs one memcpy; serializing the
// archive every step would cost more than the rest of the snapshot.
constexpr char kAdamPrefix[] = "adamw.";
constexpr char kAdamSteps[] = "adamw.step";
constexpr char kSnapshotOptimizer[] = "adamw-tensors/1";

uint64_t Mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

json ModelJson(const ModelConfig& m) {
  return {{"d_model", m.d_model},
          {"n_layers", m.n_layers},
          {"n_heads", m.n_heads},
          {"seq_len", m.seq_len},
          {"dropout", m.dropout}};
}

ModelConfig ModelFromJson(const json& j) {
  ModelConfig m;
  m.d_model = j.at("d_model");
  m.n_layers = j.at("n_layers");
  m.n_heads = j.at("n_heads");
  m.seq_len = j.at("seq_len");
  m.dropout = j.at("dropout");
  return m;
}

Status CopyInto(const NamedTensors& into, const NamedTensors& from, std::string_view what) {
  std::map<std::string, torch::Tensor> by_name;
  for (const auto& [n, t] : from) {
    if (n.rfind(kModelPrefix, 0) == 0) by_name[n.substr(sizeof(kModelPrefix) - 1)] = t;
  }
  torch::NoGradGuard no_grad;
  for (const auto& [n, p] : into) {
    auto it = by_name.find(n);
    if (it == by_name.end()) {
      return DataLossError(std::string(what) + " has no tensor for parameter " + n);
    }
    if (it->second.sizes() != p.sizes()) {
      return DataLossError(std::string(what) + ": parameter " + n + " has another shape");
    }
    p.copy_(it->second);
  }
  return Status::Ok();
}

StatusOr<json> ParseMetadata(const SavedState& s, std::string_view what) {
  try {
    json j = json::parse(s.metadata);
    if (j.value("format", "") != kFormat) {
      return DataLossError(std::string(what) + " is not a " + kFormat + " checkpoint");
    }
    return j;
  } catch (const std::exception& e) {
    return DataLossError(std::string(what) + ": bad metadata: " + e.what());
  }
}

torch::Device PickDevice(const std::string& want, int local) {
  if (want == "cpu" || (want == "auto" && !torch::cuda::is_available())) return torch::kCPU;
  const int count = static_cast<int>(torch::cuda::device_count());
  return torch::Device(torch::kCUDA, count > 0 ? local % count : 0);
}

double EvalLoss(CharLM& model, const Corpus& corpus, torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  auto [x, y] = corpus.EvalBatch(16);
  torch::Tensor logits = model->forward(x.to(device));
  double loss = torch::nn::functional::cross_entropy(logits.reshape({-1, ModelConfig::kVocab}),
                                                     y.to(device).reshape({-1}))
                    .item<double>();
  model->train();
  return loss;
}

class Run {
 public:
  Run(const TrainConfig& c, GradientSync& sync, TrainStateSink& store, TrainStateSink* base,
      runtime::JobContext& ctx, std::ostream& out, SnapshotSink* snapshots)
      : c_(c),
        sync_(sync),
        store_(store),
        base_store_(base),
        ctx_(ctx),
        out_(out),
        snapshots_(snapshots),
        log_(log::Get("examples.finetune")),
        device_(PickDevice(c.device, ctx.local_rank())) {}

  StatusOr<TrainResult> Go();

 private:
  Status Validate();
  Status LoadBase(ModelConfig* model_config);
  Status Build(const ModelConfig& mc);
  // Refuses a checkpoint's or snapshot's metadata written by another kind of run.
  Status CheckResumable(const json& meta, const std::string& what);
  Status ResumeFrom(int64_t step);
  // Resumes from the in-memory snapshot of ctx_.resume_snapshot_step().
  Status ResumeFromSnapshot();
  // The metadata a checkpoint or snapshot of `step` carries.
  json Metadata(int64_t step, double loss);
  Status Checkpoint(int64_t step, double loss);
  // Hands the whole train state of `step` to snapshots_.
  Status Snapshot(int64_t step, double loss);
  // Waits for the save in flight, if any, and announces its commit.
  Status WaitForCommit();
  std::optional<int64_t> pending_save_;
  NamedTensors Trainable() { return NamedParams(*model_, trainable_set_); }
  void Say(const std::string& line) {
    if (sync_.rank() == 0) out_ << line << std::endl;
  }

  const TrainConfig& c_;
  GradientSync& sync_;
  TrainStateSink& store_;
  TrainStateSink* base_store_;
  runtime::JobContext& ctx_;
  std::ostream& out_;
  SnapshotSink* snapshots_;
  std::shared_ptr<spdlog::logger> log_;
  torch::Device device_;

  ParamSet trainable_set_ = ParamSet::kAll;
  std::optional<Corpus> corpus_;
  CharLM model_{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  NamedTensors base_tensors_;  // the loaded base checkpoint (fine-tunes)
  json base_ref_;              // {dir, step, digest}
  int64_t start_step_ = 0;
  int64_t local_batch_ = 0;
};

Status Run::Validate() {
  const int w = sync_.world_size();
  if (c_.steps < 1) return InvalidArgumentError("--steps must be at least 1");
  if (c_.global_batch < 1 || c_.global_batch % w != 0) {
    return InvalidArgumentError("--batch " + std::to_string(c_.global_batch) +
                                " must be a positive multiple of WORLD_SIZE " + std::to_string(w));
  }
  if (c_.lr <= 0 || c_.clip_norm <= 0 || c_.warmup_steps < 0 || c_.checkpoint_every < 0) {
    return InvalidArgumentError("--lr and --clip must be positive; --warmup, --ckpt-every >= 0");
  }
  if (c_.mode == Mode::kLora && c_.lora_rank < 1) {
    return InvalidArgumentError("--lora-rank must be at least 1");
  }
  if (c_.mode != Mode::kPretrain && c_.base_dir.empty()) {
    return InvalidArgumentError("fine-tuning needs --base DIR (a --pretrain checkpoint dir)");
  }
  if (c_.mode == Mode::kPretrain && c_.model.d_model % c_.model.n_heads != 0) {
    return InvalidArgumentError("--d-model must be a multiple of --heads");
  }
  local_batch_ = c_.global_batch / w;
  return Status::Ok();
}

Status Run::LoadBase(ModelConfig* model_config) {
  if (base_store_ == nullptr) return InvalidArgumentError("fine-tuning needs a base store");
  TrainStateSink& base = *base_store_;
  int64_t step;
  if (c_.base_step) {
    step = *c_.base_step;
  } else {
    MUSTER_ASSIGN_OR_RETURN(auto latest, base.LatestStep());
    if (!latest) {
      return NotFoundError("base dir " + c_.base_dir.string() +
                           " holds no committed checkpoint (run --pretrain first)");
    }
    step = *latest;
  }
  MUSTER_ASSIGN_OR_RETURN(SavedState s, base.Restore(step));
  MUSTER_ASSIGN_OR_RETURN(json meta, ParseMetadata(s, "base " + c_.base_dir.string()));
  if (meta.at("mode") == "lora") {
    return InvalidArgumentError("base " + c_.base_dir.string() +
                                " is a LoRA checkpoint; a base must hold full weights");
  }
  *model_config = ModelFromJson(meta.at("model"));
  base_tensors_ = std::move(s.tensors);
  base_ref_ = {{"dir", std::filesystem::absolute(c_.base_dir).string()}, {"step", step}};
  return Status::Ok();
}

Status Run::Build(const ModelConfig& mc) {
  torch::manual_seed(c_.seed);
  model_ = CharLM(mc);
  if (!base_tensors_.empty()) {
    MUSTER_RETURN_IF_ERROR(CopyInto(NamedParams(*model_, ParamSet::kAll), base_tensors_,
                                    "base " + c_.base_dir.string()));
    base_ref_["digest"] = DigestTensors(NamedParams(*model_, ParamSet::kAll));
    base_tensors_.clear();
  }
  if (c_.mode == Mode::kLora) {
    model_->EnableLora(c_.lora_rank, c_.lora_alpha);
    for (auto& [n, p] : NamedParams(*model_, ParamSet::kBase)) p.set_requires_grad(false);
    trainable_set_ = ParamSet::kLora;
  }
  model_->to(device_);
  std::vector<torch::Tensor> params;
  for (auto& [n, p] : Trainable()) params.push_back(p);
  optimizer_ = std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(c_.lr)
                                                                 .betas(std::make_tuple(0.9, 0.95))
                                                                 .weight_decay(c_.weight_decay));
  return Status::Ok();
}

Status Run::CheckResumable(const json& meta, const std::string& what) {
  if (meta.at("mode") != ModeName(c_.mode)) {
    return FailedPreconditionError(what + " was written in mode " +
                                   meta.at("mode").get<std::string>() + ", not " +
                                   std::string(ModeName(c_.mode)));
  }
  if (meta.at("global_batch") != c_.global_batch) {
    return FailedPreconditionError(what + " was trained with global batch " +
                                   meta.at("global_batch").dump() + "; pass --batch " +
                                   meta.at("global_batch").dump());
  }
  if (c_.mode == Mode::kLora) {
    const std::string want = meta.at("base").at("digest");
    if (base_ref_.at("digest") != want) {
      return FailedPreconditionError(
          what + " holds LoRA adapters for a base with parameter digest " + want + ", but --base " +
          c_.base_dir.string() + " has digest " + base_ref_.at("digest").get<std::string>());
    }
  }
  return Status::Ok();
}

Status Run::ResumeFrom(int64_t step) {
  MUSTER_ASSIGN_OR_RETURN(SavedState s, store_.Restore(step));
  const std::string what = "checkpoint step " + std::to_string(step);
  MUSTER_ASSIGN_OR_RETURN(json meta, ParseMetadata(s, what));
  MUSTER_RETURN_IF_ERROR(CheckResumable(meta, what));
  MUSTER_RETURN_IF_ERROR(CopyInto(Trainable(), s.tensors, what));
  for (const auto& [n, t] : s.tensors) {
    if (n != kOptimizerKey) continue;
    std::string bytes(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()));
    std::istringstream in(bytes);
    torch::load(*optimizer_, in, device_);
  }
  start_step_ = step;
  log_->info("resumed from step {} (data position {} sequences, param digest {})", step,
             step * c_.global_batch, DigestTensors(NamedParams(*model_, ParamSet::kAll)));
  return Status::Ok();
}

Status Run::ResumeFromSnapshot() {
  const int64_t want = *ctx_.resume_snapshot_step();
  const std::string what = "the in-memory snapshot of step " + std::to_string(want);
  // Exits 1 (not 2, "usage"): a snapshot that does not fit this run is not a bad flag.
  auto fail = [&](const Status& s) {
    Status c = s.WithContext("cannot resume from " + what +
                             " (the other ranks resume from it; this rank must not train on "
                             "from another step)");
    return c.code() == StatusCode::kInvalidArgument
               ? Status(StatusCode::kFailedPrecondition, c.message())
               : c;
  };
  const NamedTensors trainable = Trainable();
  NamedTensors into;
  for (const auto& [n, p] : trainable) into.emplace_back(kModelPrefix + n, p.detach());
  std::vector<torch::Tensor> avg, avg_sq;
  for (const auto& [n, p] : trainable) {
    avg.push_back(torch::empty_like(p, torch::MemoryFormat::Contiguous));
    avg_sq.push_back(torch::empty_like(p, torch::MemoryFormat::Contiguous));
    into.emplace_back(kAdamPrefix + n + ".exp_avg", avg.back());
    into.emplace_back(kAdamPrefix + n + ".exp_avg_sq", avg_sq.back());
  }
  torch::Tensor steps = torch::empty({static_cast<int64_t>(trainable.size())}, torch::kInt64);
  into.emplace_back(kAdamSteps, steps);
  SavedState s;
  auto restored = RestoreSnapshotInto(ctx_, into, &s.metadata);
  if (!restored.ok()) return fail(restored.status());
  auto meta = ParseMetadata(s, what);
  if (!meta.ok()) return fail(meta.status());
  if (Status st = CheckResumable(*meta, what); !st.ok()) return fail(st);
  if (meta->value("step", int64_t{-1}) != want ||
      meta->value("world_size", -1) != sync_.world_size() ||
      meta->value("optimizer", "") != kSnapshotOptimizer) {
    return fail(DataLossError("its metadata says step " + meta->value("step", json()).dump() +
                              ", world size " + meta->value("world_size", json()).dump() +
                              ", optimizer " + meta->value("optimizer", json()).dump() +
                              "; expected step " + std::to_string(want) + ", world size " +
                              std::to_string(sync_.world_size()) + ", " + kSnapshotOptimizer));
  }
  auto& state = optimizer_->state();
  for (size_t i = 0; i < trainable.size(); ++i) {
    const std::string key = c10::guts::to_string(trainable[i].second.unsafeGetTensorImpl());
    const int64_t step = steps[static_cast<int64_t>(i)].item<int64_t>();
    if (step == 0) {
      state.erase(key);
      continue;
    }
    auto ps = std::make_unique<torch::optim::AdamWParamState>();
    ps->step(step);
    ps->exp_avg(avg[i]);
    ps->exp_avg_sq(avg_sq[i]);
    state[key] = std::move(ps);
  }
  // Bit-exact, or not at all: the restored parameters (base and trainable) must hash to the
  // digest the snapshot was taken with.
  const std::string digest = DigestTensors(NamedParams(*model_, ParamSet::kAll));
  if (digest != meta->value("param_digest", "")) {
    return fail(DataLossError("the restored parameters have digest " + digest + ", the snapshot " +
                              "was taken with " + meta->value("param_digest", json()).dump()));
  }
  start_step_ = want;
  log_->info(
      "resumed from the in-memory snapshot of step {} (data position {} sequences, param "
      "digest {})",
      want, want * c_.global_batch, digest);
  return Status::Ok();
}

json Run::Metadata(int64_t step, double loss) {
  json meta = {{"format", kFormat},
               {"mode", ModeName(c_.mode)},
               {"step", step},
               {"total_steps", c_.steps},
               {"seed", c_.seed},
               {"world_size", sync_.world_size()},
               {"global_batch", c_.global_batch},
               {"model", ModelJson(model_->config())},
               {"loss", loss},
               {"data",
                {{"path", std::filesystem::absolute(c_.data).string()},
                 {"digest", corpus_->digest()},
                 {"position_sequences", step * c_.global_batch}}},
               {"rng", "per step: torch::manual_seed(mix(seed, step, rank))"},
               {"param_digest", DigestTensors(NamedParams(*model_, ParamSet::kAll))}};
  if (c_.mode == Mode::kLora) meta["lora"] = {{"rank", c_.lora_rank}, {"alpha", c_.lora_alpha}};
  if (!base_ref_.is_null()) meta["base"] = base_ref_;
  return meta;
}

Status Run::Checkpoint(int64_t step, double loss) {
  NamedTensors tensors;
  for (auto& [n, p] : Trainable()) tensors.emplace_back(kModelPrefix + n, p.detach().cpu());
  std::ostringstream os;
  torch::save(*optimizer_, os);
  const std::string blob = os.str();
  torch::Tensor bytes = torch::empty({static_cast<int64_t>(blob.size())}, torch::kUInt8);
  std::memcpy(bytes.data_ptr(), blob.data(), blob.size());
  tensors.emplace_back(kOptimizerKey, bytes);
  const json meta = Metadata(step, loss);
  MUSTER_RETURN_IF_ERROR(WaitForCommit());
  MUSTER_RETURN_IF_ERROR(store_.Save(step, tensors, meta.dump(2)));
  pending_save_ = step;
  return Status::Ok();
}

Status Run::Snapshot(int64_t step, double loss) {
  // Views of the live tensors: the sink copies them before returning (the training stall, timed
  // from here), and the next optimizer step changes them only after that.
  const auto began = std::chrono::steady_clock::now();
  const NamedTensors trainable = Trainable();
  NamedTensors tensors;
  tensors.reserve(3 * trainable.size() + 1);
  for (const auto& [n, p] : trainable) tensors.emplace_back(kModelPrefix + n, p.detach());
  torch::Tensor steps = torch::zeros({static_cast<int64_t>(trainable.size())}, torch::kInt64);
  auto* step_data = steps.data_ptr<int64_t>();
  const auto& state = optimizer_->state();
  for (size_t i = 0; i < trainable.size(); ++i) {
    const torch::Tensor& p = trainable[i].second;
    auto it = state.find(c10::guts::to_string(p.unsafeGetTensorImpl()));
    torch::Tensor avg, avg_sq;
    if (it != state.end()) {
      const auto& ps = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      avg = ps.exp_avg();
      avg_sq = ps.exp_avg_sq();
      step_data[i] = ps.step();
    } else {  // no update yet: what AdamW starts such a parameter from
      avg = torch::zeros_like(p);
      avg_sq = torch::zeros_like(p);
    }
    tensors.emplace_back(kAdamPrefix + trainable[i].first + ".exp_avg", avg);
    tensors.emplace_back(kAdamPrefix + trainable[i].first + ".exp_avg_sq", avg_sq);
  }
  tensors.emplace_back(kAdamSteps, steps);
  json meta = Metadata(step, loss);
  meta["optimizer"] = kSnapshotOptimizer;
  return snapshots_->Save(step, tensors, meta.dump(), began);
}

Status Run::WaitForCommit() {
  if (!pending_save_) return Status::Ok();
  const int64_t step = *pending_save_;
  pending_save_.reset();
  auto s = store_.Wait();
  if (!s.ok()) return s.WithContext("checkpoint at step " + std::to_string(step));
  // The checkpointer announced the commit itself (JobContext::NewCheckpointer).
  log_->info("checkpoint committed at step {}", step);
  return Status::Ok();
}

StatusOr<TrainResult> Run::Go() {
  MUSTER_RETURN_IF_ERROR(Validate());
  ModelConfig mc = c_.model;
  if (c_.mode != Mode::kPretrain) MUSTER_RETURN_IF_ERROR(LoadBase(&mc));
  MUSTER_ASSIGN_OR_RETURN(Corpus corpus, Corpus::Load(c_.data, mc.seq_len));
  corpus_ = std::move(corpus);
  MUSTER_RETURN_IF_ERROR(Build(mc));

  std::optional<int64_t> resume_step;
  MUSTER_ASSIGN_OR_RETURN(auto latest, store_.LatestStep());
  if (c_.resume == "latest") {
    resume_step = latest;
    if (!latest) log_->info("no checkpoint to resume from; starting fresh");
  } else if (!c_.resume.empty()) {
    char* end = nullptr;
    long long s = std::strtoll(c_.resume.c_str(), &end, 10);
    if (*end != '\0' || s < 0) {
      return InvalidArgumentError("resume step '" + c_.resume + "' is not 'latest' or a number");
    }
    resume_step = s;
  } else {
    resume_step = latest;  // an empty MUSTER_RESUME_STEP: the latest checkpoint, if any
  }
  if (ctx_.resume_snapshot_step()) {
    // The agent resumes the gang from its memory: that step, on every rank, or none.
    if (resume_step) {
      log_->info("resuming from the in-memory snapshot of step {}, not the volume's step {}",
                 *ctx_.resume_snapshot_step(), *resume_step);
    }
    MUSTER_RETURN_IF_ERROR(ResumeFromSnapshot());
  } else if (resume_step) {
    MUSTER_RETURN_IF_ERROR(ResumeFrom(*resume_step));
  }

  int64_t trainable = 0, total = 0;
  for (auto& [n, p] : Trainable()) trainable += p.numel();
  for (auto& [n, p] : NamedParams(*model_, ParamSet::kAll)) total += p.numel();
  log_->info(
      "{}: {} params ({} trainable), {} ranks x {} seqs of {} bytes, {} train bytes from "
      "{} files, device {}",
      ModeName(c_.mode), total, trainable, sync_.world_size(), local_batch_, mc.seq_len,
      corpus_->train_bytes(), corpus_->files(), device_.str());
  const double eval_before = EvalLoss(model_, *corpus_, device_);
  log_->info("held-out loss at step {}: {:.4f}", start_step_, eval_before);

  std::vector<torch::Tensor> params;
  for (auto& [n, p] : Trainable()) params.push_back(p);
  TrainResult result;
  const int64_t tokens_per_step = c_.global_batch * mc.seq_len;
  auto window_start = std::chrono::steady_clock::now();
  int64_t window_steps = 0;
  double loss_value = 0.0;
  int64_t last_saved = start_step_;
  for (int64_t step = start_step_; step < c_.steps; ++step) {
    torch::manual_seed(Mix(c_.seed ^ Mix(static_cast<uint64_t>(step) * 1000003ULL +
                                         static_cast<uint64_t>(sync_.rank()))));
    auto [x, y] = corpus_->TrainBatch(c_.seed, step, sync_.rank() * local_batch_, local_batch_);
    torch::Tensor logits = model_->forward(x.to(device_));
    torch::Tensor loss = torch::nn::functional::cross_entropy(
        logits.reshape({-1, ModelConfig::kVocab}), y.to(device_).reshape({-1}));
    optimizer_->zero_grad();
    loss.backward();
    MUSTER_RETURN_IF_ERROR(AllreduceGradients(sync_, params, c_.bucket_bytes));
    torch::nn::utils::clip_grad_norm_(params, c_.clip_norm);
    const double lr = LearningRate(c_, step);
    for (auto& group : optimizer_->param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    }
    // The last snapshot's tensors change now: the agent has read them (nearly always long
    // since; SnapshotSink::Release).
    if (snapshots_) MUSTER_RETURN_IF_ERROR(snapshots_->Release());
    optimizer_->step();

    // One small collective carries the loss and whether any rank has a notice, so every rank
    // agrees on the step at which to checkpoint and stop (JobContext::AgreeToStop's decision,
    // folded into the allreduce this loop does anyway).
    torch::Tensor stats =
        torch::tensor({loss.item<float>(), ctx_.NoticeSeen() ? 1.0f : 0.0f}, torch::kFloat32);
    MUSTER_RETURN_IF_ERROR(sync_.AllreduceSum(stats));
    loss_value = stats[0].item<double>() / sync_.world_size();
    const bool stop = stats[1].item<float>() > 0;
    const int64_t done = step + 1;
    ++window_steps;
    // Announce the last checkpoint as soon as it is committed, not at the next one: the
    // scheduler resumes a job from the newest step it has heard of.
    if (pending_save_ && !store_.Saving()) MUSTER_RETURN_IF_ERROR(WaitForCommit());
    // The snapshot of this step goes to the agent before the step is announced, so that a step
    // the job reports done is (once the sender's thread hands it over) one it can resume from.
    if (snapshots_ && snapshots_->Due(done)) MUSTER_RETURN_IF_ERROR(Snapshot(done, loss_value));

    if (done % c_.log_every == 0 || done == c_.steps || stop) {
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start).count();
      const double tps = secs > 0 ? window_steps * tokens_per_step / secs : 0.0;
      // On the control channel under muster (stdout otherwise); rank 0 only.
      if (Status s = ctx_.Progress(done, c_.steps, loss_value, {{"tokens_per_s", tps}, {"lr", lr}});
          !s.ok()) {
        log_->warn("progress: {}", s.ToString());
      }
      if (snapshots_ && snapshots_->stats().snapshots > 0) {
        const SnapshotSink::Stats& ss = snapshots_->stats();
        log_->info(
            "step {}/{}  loss {:.4f}  lr {:.3g}  {:.0f} tok/s  snapshot stall mean {:.3f} ms max "
            "{:.3f} ms over {} of {} KiB (release mean {:.3f} ms)",
            done, c_.steps, loss_value, lr, tps, ss.mean_ms(), ss.stall_ms_max, ss.snapshots,
            ss.bytes / 1024, ss.release_mean_ms());
      } else {
        log_->info("step {}/{}  loss {:.4f}  lr {:.3g}  {:.0f} tok/s", done, c_.steps, loss_value,
                   lr, tps);
      }
      window_start = std::chrono::steady_clock::now();
      window_steps = 0;
    }
    if ((c_.checkpoint_every > 0 && done % c_.checkpoint_every == 0) || done == c_.steps || stop) {
      MUSTER_RETURN_IF_ERROR(Checkpoint(done, loss_value));
      last_saved = done;
    }
    result.step = done;
    if (stop) {
      MUSTER_RETURN_IF_ERROR(WaitForCommit());
      log_->warn("preemption notice ({}): checkpointed step {} and stopping",
                 ctx_.NoticeReason().empty() ? "another rank" : ctx_.NoticeReason(), done);
      Say("MUSTER_PREEMPTED step=" + std::to_string(done));
      result.preempted = true;
      break;
    }
  }
  MUSTER_RETURN_IF_ERROR(WaitForCommit());
  if (snapshots_) {
    // Hand the last snapshot over before exiting (the sender drops one still queued).
    if (Status s = snapshots_->Flush(std::chrono::seconds(10)); !s.ok()) {
      log_->warn("the last in-memory snapshot was not handed to the agent: {}", s.ToString());
    }
  }
  if (result.step == 0) result.step = start_step_;
  (void)last_saved;
  result.param_digest = DigestTensors(NamedParams(*model_, ParamSet::kAll));
  result.eval_loss = EvalLoss(model_, *corpus_, device_);
  log_->info("held-out loss at step {}: {:.4f} (was {:.4f})", result.step, result.eval_loss,
             eval_before);
  char line[256];
  std::snprintf(line, sizeof(line),
                "MUSTER_DONE step=%lld preempted=%d eval_loss=%.4f "
                "param_digest=%s",
                static_cast<long long>(result.step), result.preempted ? 1 : 0, result.eval_loss,
                result.param_digest.c_str());
  Say(line);
  return result;
}

}  // namespace

std::string_view ModeName(Mode m) {
  switch (m) {
    case Mode::kPretrain:
      return "pretrain";
    case Mode::kFull:
      return "full";
    case Mode::kLora:
      return "lora";
  }
  return "?";
}

double LearningRate(const TrainConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / c.warmup_steps;
  const double span = std::max<int64_t>(1, c.steps - c.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
  const double min_lr = c.lr * c.min_lr_ratio;
  return min_lr + 0.5 * (c.lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

StatusOr<TrainResult> Train(const TrainConfig& c, GradientSync& sync, TrainStateSink& store,
                            TrainStateSink* base, runtime::JobContext& ctx, std::ostream& out,
                            SnapshotSink* snapshots) {
  try {
    Run run(c, sync, store, base, ctx, out, snapshots);
    return run.Go();
  } catch (const c10::Error& e) {
    return InternalError(std::string("libtorch: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InternalError(std::string("training failed: ") + e.what());
  }
}

}  // namespace muster::finetune
