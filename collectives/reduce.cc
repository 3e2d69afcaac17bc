#include "collectives/reduce.h"

#include <algorithm>
#include <cstdint>

#include "common/logging.h"

namespace muster::collectives {
namespace {

template <typename T>
void Apply(ReduceOp op, T* c, const T* a, const T* b, size_t n) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      for (size_t i = 0; i < n; ++i) c[i] = a[i] + b[i];
      return;
    case ReduceOp::kMin:
      for (size_t i = 0; i < n; ++i) c[i] = std::min(a[i], b[i]);
      return;
    case ReduceOp::kMax:
      for (size_t i = 0; i < n; ++i) c[i] = std::max(a[i], b[i]);
      return;
  }
}

template <float (*ToF)(uint16_t), uint16_t (*FromF)(float)>
void Apply16(ReduceOp op, uint16_t* c, const uint16_t* a, const uint16_t* b, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float x = ToF(a[i]), y = ToF(b[i]), r;
    switch (op) {
      case ReduceOp::kMin:
        r = std::min(x, y);
        break;
      case ReduceOp::kMax:
        r = std::max(x, y);
        break;
      default:
        r = x + y;
    }
    c[i] = FromF(r);
  }
}

}  // namespace

void ReduceInto(DType type, ReduceOp op, void* c, const void* a, const void* b, size_t n) {
  switch (type) {
    case DType::kF32:
      return Apply(op, static_cast<float*>(c), static_cast<const float*>(a),
                   static_cast<const float*>(b), n);
    case DType::kF64:
      return Apply(op, static_cast<double*>(c), static_cast<const double*>(a),
                   static_cast<const double*>(b), n);
    case DType::kI32:
      return Apply(op, static_cast<int32_t*>(c), static_cast<const int32_t*>(a),
                   static_cast<const int32_t*>(b), n);
    case DType::kI64:
      return Apply(op, static_cast<int64_t*>(c), static_cast<const int64_t*>(a),
                   static_cast<const int64_t*>(b), n);
    case DType::kF16:
      return Apply16<HalfToFloat, FloatToHalf>(op, static_cast<uint16_t*>(c),
                                               static_cast<const uint16_t*>(a),
                                               static_cast<const uint16_t*>(b), n);
    case DType::kBF16:
      return Apply16<BFloat16ToFloat, FloatToBFloat16>(op, static_cast<uint16_t*>(c),
                                                       static_cast<const uint16_t*>(a),
                                                       static_cast<const uint16_t*>(b), n);
    case DType::kU8:
      return Apply(op, static_cast<uint8_t*>(c), static_cast<const uint8_t*>(a),
                   static_cast<const uint8_t*>(b), n);
    case DType::kI8:
      return Apply(op, static_cast<int8_t*>(c), static_cast<const int8_t*>(a),
                   static_cast<const int8_t*>(b), n);
    case DType::kBool:
      break;
  }
  MUSTER_CHECK(false) << "ReduceInto of " << DTypeName(type);
}

void DivideBy(DType type, void* data, size_t n, int divisor) {
  switch (type) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) static_cast<float*>(data)[i] /= divisor;
      return;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) static_cast<double*>(data)[i] /= divisor;
      return;
    case DType::kI32:
      for (size_t i = 0; i < n; ++i) static_cast<int32_t*>(data)[i] /= divisor;
      return;
    case DType::kI64:
      for (size_t i = 0; i < n; ++i) static_cast<int64_t*>(data)[i] /= divisor;
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t& h = static_cast<uint16_t*>(data)[i];
        h = FloatToHalf(HalfToFloat(h) / divisor);
      }
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t& h = static_cast<uint16_t*>(data)[i];
        h = FloatToBFloat16(BFloat16ToFloat(h) / divisor);
      }
      return;
    case DType::kU8:
      for (size_t i = 0; i < n; ++i) static_cast<uint8_t*>(data)[i] /= divisor;
      return;
    case DType::kI8:
      for (size_t i = 0; i < n; ++i) static_cast<int8_t*>(data)[i] /= divisor;
      return;
    case DType::kBool:
      break;
  }
  MUSTER_CHECK(false) << "DivideBy of " << DTypeName(type);
}

}  // namespace muster::collectives
