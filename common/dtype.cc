#include "common/dtype.h"

#include <array>
#include <string>

namespace muster {
namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
};

// In enum order, so DTypeInfo lookups are an index.
constexpr std::array<DTypeInfo, 9> kDTypes = {{
    {DType::kF32, "f32", 4},
    {DType::kF64, "f64", 8},
    {DType::kF16, "f16", 2},
    {DType::kBF16, "bf16", 2},
    {DType::kI32, "i32", 4},
    {DType::kI64, "i64", 8},
    {DType::kU8, "u8", 1},
    {DType::kI8, "i8", 1},
    {DType::kBool, "bool", 1},
}};

constexpr bool InEnumOrder() {
  for (size_t i = 0; i < kDTypes.size(); ++i) {
    if (static_cast<size_t>(kDTypes[i].type) != i) return false;
  }
  return true;
}
static_assert(InEnumOrder(), "kDTypes must list DType's values in order");

const DTypeInfo* Info(DType d) {
  auto i = static_cast<size_t>(d);
  return i < kDTypes.size() ? &kDTypes[i] : nullptr;
}

}  // namespace

size_t DTypeSize(DType d) {
  const DTypeInfo* info = Info(d);
  return info ? info->size : 0;
}

std::string_view DTypeName(DType d) {
  const DTypeInfo* info = Info(d);
  return info ? info->name : "?";
}

StatusOr<DType> ParseDType(std::string_view name) {
  std::string known;
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) return info.type;
    known += (known.empty() ? "" : ", ") + std::string(info.name);
  }
  return InvalidArgumentError("unknown dtype '" + std::string(name) + "' (known: " + known + ")");
}

}  // namespace muster
