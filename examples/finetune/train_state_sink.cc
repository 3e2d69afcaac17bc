#include "examples/finetune/train_state_sink.h"

#include <xxhash.h>

#include <cstdio>

namespace muster::finetune {
namespace {

// The dtype's code in the digest (stable across libtorch versions).
int DtypeCode(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return 0;
    case torch::kFloat64:
      return 1;
    case torch::kInt64:
      return 2;
    case torch::kUInt8:
      return 3;
    case torch::kBFloat16:
      return 4;
    case torch::kFloat16:
      return 5;
    default:
      return -1;
  }
}

std::string Hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

std::string DigestTensors(const NamedTensors& tensors) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  for (const auto& [name, tensor] : tensors) {
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    XXH3_64bits_update(st, name.data(), name.size());
    int64_t code = DtypeCode(t.scalar_type());
    XXH3_64bits_update(st, &code, sizeof(code));
    for (int64_t d : t.sizes()) XXH3_64bits_update(st, &d, sizeof(d));
    XXH3_64bits_update(st, t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  }
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return Hex64(h);
}

}  // namespace muster::finetune
