#pragma once

// CharLM: a small decoder-only transformer over bytes (vocabulary 256), pre-LayerNorm, learned
// positions, causal self-attention written with plain matmuls so the same source builds against
// libtorch 1.13 and 2.x. Every attention projection is a LoraLinear, which can grow a low-rank
// adapter (LoRA: W x + (alpha/r) B A x, with B starting at zero so the adapted model starts
// equal to the base).
//
// Parameter names are stable ("blocks.1.attn.q.weight", "blocks.1.attn.q.lora_a"), in
// registration order; checkpoints and digests rely on both.

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "examples/finetune/train_state_sink.h"

namespace muster::finetune {

struct ModelConfig {
  int64_t d_model = 64;
  int64_t n_layers = 2;
  int64_t n_heads = 4;
  int64_t seq_len = 64;
  double dropout = 0.1;
  static constexpr int64_t kVocab = 256;
};

class LoraLinearImpl : public torch::nn::Module {
 public:
  LoraLinearImpl(int64_t in, int64_t out);
  torch::Tensor forward(const torch::Tensor& x);
  // Adds lora_a (rank x in, small random) and lora_b (out x rank, zeros). REQUIRES: not yet
  // enabled.
  void EnableLora(int64_t rank, double alpha);
  bool has_lora() const { return lora_a_.defined(); }

 private:
  torch::Tensor weight_, bias_, lora_a_, lora_b_;
  double scale_ = 0.0;
};
TORCH_MODULE(LoraLinear);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const ModelConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& causal_mask);
  void EnableLora(int64_t rank, double alpha);

 private:
  ModelConfig c_;
  torch::nn::LayerNorm ln1_{nullptr}, ln2_{nullptr};
  LoraLinear q_{nullptr}, k_{nullptr}, v_{nullptr}, o_{nullptr};
  torch::nn::Linear fc1_{nullptr}, fc2_{nullptr};
  torch::nn::Dropout drop_{nullptr};
};
TORCH_MODULE(Block);

class CharLMImpl : public torch::nn::Module {
 public:
  explicit CharLMImpl(const ModelConfig& c);
  // tokens: [batch, time] int64 bytes; returns logits [batch, time, 256].
  torch::Tensor forward(const torch::Tensor& tokens);
  // Adds LoRA adapters to every attention projection.
  void EnableLora(int64_t rank, double alpha);
  const ModelConfig& config() const { return c_; }

 private:
  ModelConfig c_;
  torch::nn::Embedding tok_{nullptr}, pos_{nullptr};
  torch::nn::ModuleList blocks_;
  torch::nn::LayerNorm ln_f_{nullptr};
  torch::nn::Linear head_{nullptr};
  torch::Tensor causal_mask_;
};
TORCH_MODULE(CharLM);

// True for the parameters LoRA adds.
bool IsLoraParameter(const std::string& name);

// Parameters by name, optionally only the base (non-LoRA) or only the LoRA ones.
enum class ParamSet { kAll, kBase, kLora };
NamedTensors NamedParams(torch::nn::Module& m, ParamSet which);

}  // namespace muster::finetune
