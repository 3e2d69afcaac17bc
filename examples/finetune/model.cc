#include "examples/finetune/model.h"

#include <cmath>

namespace muster::finetune {

LoraLinearImpl::LoraLinearImpl(int64_t in, int64_t out) {
  // The same initialisation as torch::nn::Linear: U(-1/sqrt(in), 1/sqrt(in)).
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight_ = register_parameter("weight", torch::empty({out, in}).uniform_(-bound, bound));
  bias_ = register_parameter("bias", torch::empty({out}).uniform_(-bound, bound));
}

void LoraLinearImpl::EnableLora(int64_t rank, double alpha) {
  const int64_t out = weight_.size(0), in = weight_.size(1);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  lora_a_ = register_parameter("lora_a", torch::empty({rank, in}).uniform_(-bound, bound));
  lora_b_ = register_parameter("lora_b", torch::zeros({out, rank}));
  scale_ = alpha / static_cast<double>(rank);
}

torch::Tensor LoraLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor y = torch::nn::functional::linear(x, weight_, bias_);
  if (lora_a_.defined()) {
    y = y +
        torch::nn::functional::linear(torch::nn::functional::linear(x, lora_a_), lora_b_) * scale_;
  }
  return y;
}

BlockImpl::BlockImpl(const ModelConfig& c) : c_(c) {
  const int64_t d = c.d_model;
  ln1_ = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  q_ = register_module("q", LoraLinear(d, d));
  k_ = register_module("k", LoraLinear(d, d));
  v_ = register_module("v", LoraLinear(d, d));
  o_ = register_module("o", LoraLinear(d, d));
  ln2_ = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  fc1_ = register_module("fc1", torch::nn::Linear(d, 4 * d));
  fc2_ = register_module("fc2", torch::nn::Linear(4 * d, d));
  drop_ = register_module("drop", torch::nn::Dropout(c.dropout));
}

void BlockImpl::EnableLora(int64_t rank, double alpha) {
  for (auto* p : {&q_, &k_, &v_, &o_}) (*p)->EnableLora(rank, alpha);
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& causal_mask) {
  const int64_t b = x.size(0), t = x.size(1), h = c_.n_heads, dh = c_.d_model / c_.n_heads;
  torch::Tensor a = ln1_(x);
  auto heads = [&](const torch::Tensor& y) { return y.view({b, t, h, dh}).transpose(1, 2); };
  torch::Tensor q = heads(q_(a)), k = heads(k_(a)), v = heads(v_(a));
  torch::Tensor att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
  att = att.masked_fill(causal_mask.narrow(0, 0, t).narrow(1, 0, t).logical_not(),
                        -std::numeric_limits<float>::infinity());
  att = drop_(torch::softmax(att, -1));
  torch::Tensor y = torch::matmul(att, v).transpose(1, 2).contiguous().view({b, t, c_.d_model});
  torch::Tensor x1 = x + drop_(o_(y));
  return x1 + drop_(fc2_(torch::gelu(fc1_(ln2_(x1)))));
}

CharLMImpl::CharLMImpl(const ModelConfig& c) : c_(c) {
  tok_ = register_module("tok", torch::nn::Embedding(ModelConfig::kVocab, c.d_model));
  pos_ = register_module("pos", torch::nn::Embedding(c.seq_len, c.d_model));
  blocks_ = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.n_layers; ++i) blocks_->push_back(Block(c));
  ln_f_ = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
  head_ = register_module("head", torch::nn::Linear(c.d_model, ModelConfig::kVocab));
  causal_mask_ = register_buffer("causal_mask",
                                 torch::tril(torch::ones({c.seq_len, c.seq_len}, torch::kBool)));
}

void CharLMImpl::EnableLora(int64_t rank, double alpha) {
  for (auto& m : *blocks_) m->as<BlockImpl>()->EnableLora(rank, alpha);
}

torch::Tensor CharLMImpl::forward(const torch::Tensor& tokens) {
  const int64_t t = tokens.size(1);
  torch::Tensor positions = torch::arange(t, tokens.options().dtype(torch::kInt64));
  torch::Tensor x = tok_(tokens) + pos_(positions).unsqueeze(0);
  for (auto& m : *blocks_) x = m->as<BlockImpl>()->forward(x, causal_mask_);
  return head_(ln_f_(x));
}

bool IsLoraParameter(const std::string& name) {
  return name.find("lora_a") != std::string::npos || name.find("lora_b") != std::string::npos;
}

NamedTensors NamedParams(torch::nn::Module& m, ParamSet which) {
  NamedTensors out;
  for (const auto& item : m.named_parameters(/*recurse=*/true)) {
    const bool lora = IsLoraParameter(item.key());
    if (which == ParamSet::kBase && lora) continue;
    if (which == ParamSet::kLora && !lora) continue;
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

}  // namespace muster::finetune
