#include "examples/finetune/data.h"

#include <xxhash.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

namespace muster::finetune {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

std::pair<torch::Tensor, torch::Tensor> Windows(const torch::Tensor& text,
                                                const std::vector<int64_t>& starts,
                                                int64_t seq_len) {
  std::vector<torch::Tensor> xs, ys;
  for (int64_t s : starts) {
    xs.push_back(text.narrow(0, s, seq_len));
    ys.push_back(text.narrow(0, s + 1, seq_len));
  }
  return {torch::stack(xs), torch::stack(ys)};
}

}  // namespace

StatusOr<Corpus> Corpus::Load(const std::filesystem::path& path, int64_t seq_len,
                              double eval_fraction) {
  namespace fs = std::filesystem;
  std::vector<fs::path> files;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    std::set<fs::path> seen;
    std::vector<fs::path> all;
    for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
      if (it->is_regular_file(ec)) all.push_back(it->path());
    }
    if (ec) return InvalidArgumentError("cannot list " + path.string() + ": " + ec.message());
    std::sort(all.begin(), all.end());
    for (const auto& f : all) {
      if (seen.insert(fs::canonical(f, ec)).second) files.push_back(f);
    }
  } else if (fs::is_regular_file(path, ec)) {
    files.push_back(path);
  } else {
    return InvalidArgumentError("training data " + path.string() +
                                " is neither a file nor a directory");
  }
  std::string bytes;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) return InvalidArgumentError("cannot read " + f.string());
    std::ostringstream ss;
    ss << in.rdbuf();
    bytes += ss.str();
    bytes += '\n';
  }
  const int64_t eval_bytes = static_cast<int64_t>(bytes.size() * eval_fraction);
  const int64_t train_bytes = static_cast<int64_t>(bytes.size()) - eval_bytes;
  if (train_bytes < 4 * (seq_len + 1) || eval_bytes < seq_len + 1) {
    return InvalidArgumentError(
        "training data " + path.string() + " has " + std::to_string(bytes.size()) +
        " bytes; need at least " +
        std::to_string(static_cast<int64_t>((4 * (seq_len + 1)) / (1 - eval_fraction)) + 1));
  }
  Corpus c;
  torch::Tensor all = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
  std::memcpy(all.data_ptr(), bytes.data(), bytes.size());
  all = all.to(torch::kInt64);
  c.train_ = all.narrow(0, 0, train_bytes).clone();
  c.eval_ = all.narrow(0, train_bytes, eval_bytes).clone();
  c.seq_len_ = seq_len;
  c.files_ = static_cast<int64_t>(files.size());
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx",
                static_cast<unsigned long long>(XXH3_64bits(bytes.data(), bytes.size())));
  c.digest_ = hex;
  return c;
}

std::pair<torch::Tensor, torch::Tensor> Corpus::TrainBatch(uint64_t seed, int64_t step,
                                                           int64_t first, int64_t count) const {
  const uint64_t span = static_cast<uint64_t>(train_.numel() - seq_len_ - 1);
  std::vector<int64_t> starts;
  for (int64_t j = first; j < first + count; ++j) {
    uint64_t h = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(step) * 0x100000001B3ULL +
                                              static_cast<uint64_t>(j)));
    starts.push_back(static_cast<int64_t>(h % span));
  }
  return Windows(train_, starts, seq_len_);
}

std::pair<torch::Tensor, torch::Tensor> Corpus::EvalBatch(int64_t count) const {
  const int64_t span = eval_.numel() - seq_len_ - 1;
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < count; ++i) starts.push_back(span * i / std::max<int64_t>(count, 1));
  return Windows(eval_, starts, seq_len_);
}

}  // namespace muster::finetune
