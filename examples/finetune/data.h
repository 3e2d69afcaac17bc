#pragma once

// Corpus: the training text as bytes, with a held-out tail for evaluation, and a sampler whose
// batches are a pure function of (seed, step, sample index). That makes the data position of a
// run exactly its step: resuming at step N, at any world size, reads the windows an
// uninterrupted run would have read, and the global batch is the same whichever ranks hold it.

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>

#include "common/status.h"

namespace muster::finetune {

class Corpus {
 public:
  // Reads `path`: a file, or every regular file under a directory (sorted by path, each real
  // file once even when reached through several symlinks). The last `eval_fraction` of the
  // bytes is held out for evaluation. InvalidArgument when there is too little text.
  static StatusOr<Corpus> Load(const std::filesystem::path& path, int64_t seq_len,
                               double eval_fraction = 0.1);

  // Windows for global samples [first, first + count) of `step`: inputs and next-byte targets,
  // both [count, seq_len] int64.
  std::pair<torch::Tensor, torch::Tensor> TrainBatch(uint64_t seed, int64_t step, int64_t first,
                                                     int64_t count) const;
  // `count` fixed, evenly spaced windows of the held-out text.
  std::pair<torch::Tensor, torch::Tensor> EvalBatch(int64_t count) const;

  int64_t train_bytes() const { return train_.numel(); }
  int64_t files() const { return files_; }
  const std::string& digest() const { return digest_; }  // xxh3-64 of all bytes, hex

 private:
  torch::Tensor train_, eval_;  // int64 bytes
  int64_t seq_len_ = 0;
  int64_t files_ = 0;
  std::string digest_;
};

}  // namespace muster::finetune
