#pragma once

// DType: the element type of a tensor, the one enum shared by the collectives (what a
// collective reduces or moves) and the checkpoint (what a MANIFEST records). Its names ("f32",
// "bf16", ...) are part of the on-disk checkpoint format (docs/checkpoint-format.md) and of the
// Python API: never rename one; a new type gets a new name at the end.
//
// Thread-safety: pure functions.

#include <cstddef>
#include <string_view>

#include "common/status.h"

namespace muster {

// kBool is one byte, 0 or 1.
enum class DType { kF32, kF64, kF16, kBF16, kI32, kI64, kU8, kI8, kBool };

// Bytes per element: 4, 8, 2, 2, 4, 8, 1, 1, 1.
size_t DTypeSize(DType d);
// "f32", "f64", "f16", "bf16", "i32", "i64", "u8", "i8", "bool"; "?" for a value outside the
// enum.
std::string_view DTypeName(DType d);
// The inverse of DTypeName; InvalidArgument naming `name` and the known names otherwise.
StatusOr<DType> ParseDType(std::string_view name);

}  // namespace muster
