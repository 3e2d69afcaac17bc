#include "tests/collectives/conformance_checks.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "collectives/reduce.h"

namespace muster::collectives::testing {

void StoreElement(DType t, void* buf, size_t i, double v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(buf)[i] = static_cast<float>(v);
      return;
    case DType::kF64:
      static_cast<double*>(buf)[i] = v;
      return;
    case DType::kF16:
      static_cast<uint16_t*>(buf)[i] = FloatToHalf(static_cast<float>(v));
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(buf)[i] = FloatToBFloat16(static_cast<float>(v));
      return;
    case DType::kI32:
      static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v);
      return;
    case DType::kI64:
      static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v);
      return;
    case DType::kU8:  // negatives wrap, as the sums of every backend do
      static_cast<uint8_t*>(buf)[i] = static_cast<uint8_t>(static_cast<int>(v));
      return;
    case DType::kI8:
      static_cast<int8_t*>(buf)[i] = static_cast<int8_t>(v);
      return;
    case DType::kBool:
      static_cast<uint8_t*>(buf)[i] = v > 0 ? 1 : 0;
      return;
  }
}

double LoadElement(DType t, const void* buf, size_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(buf)[i];
    case DType::kF64:
      return static_cast<const double*>(buf)[i];
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(buf)[i]);
    case DType::kBF16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(buf)[i]);
    case DType::kI32:
      return static_cast<const int32_t*>(buf)[i];
    case DType::kI64:
      return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    case DType::kU8:
    case DType::kBool:
      return static_cast<const uint8_t*>(buf)[i];
    case DType::kI8:
      return static_cast<const int8_t*>(buf)[i];
  }
  return NAN;
}

namespace {

// Every DType: kBool is only moved; its reductions must be refused (IsReducible).
constexpr DType kTypes[] = {DType::kF32, DType::kF64, DType::kF16, DType::kBF16, DType::kI32,
                            DType::kI64, DType::kU8,  DType::kI8,  DType::kBool};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax};
constexpr auto kWait = std::chrono::seconds(60);

// Small integers (|v| <= 12), so sums over 8 ranks are exact even in f16, bf16 and i8 and the
// order in which a backend adds cannot change the result.
double Value(int rank, size_t i, int salt) {
  return static_cast<double>(static_cast<int>((rank + 1) * (i % 7 + 1) + salt * 3) % 25 - 12);
}

std::vector<char> Fill(DType t, int rank, size_t n, int salt) {
  std::vector<char> b(n * DTypeSize(t));
  for (size_t i = 0; i < n; ++i) StoreElement(t, b.data(), i, Value(rank, i, salt));
  return b;
}

// The reference: rank 0's data reduced with every other rank's, in rank order, with the same
// kernels a CPU backend uses (exact for these values, whatever the order).
std::vector<char> Reference(DType t, ReduceOp op, int size, size_t n, int salt) {
  std::vector<char> acc = Fill(t, 0, n, salt);
  for (int r = 1; r < size; ++r) {
    std::vector<char> other = Fill(t, r, n, salt);
    ReduceInto(t, op, acc.data(), acc.data(), other.data(), n);
  }
  if (op == ReduceOp::kAvg) DivideBy(t, acc.data(), n, size);
  return acc;
}

Status Compare(const std::string& what, DType t, const void* got, const void* want, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    double g = LoadElement(t, got, i), w = LoadElement(t, want, i);
    if (!(g == w)) {
      return DataLossError(what + " " + std::string(DTypeName(t)) + " count " + std::to_string(n) +
                           ": element " + std::to_string(i) + " is " + std::to_string(g) +
                           ", want " + std::to_string(w));
    }
  }
  return Status::Ok();
}

Status Run(std::unique_ptr<Work> w, const std::string& what) {
  Status s = w->Wait(std::chrono::steady_clock::now() + kWait);
  return s.ok() ? s : s.WithContext(what);
}

}  // namespace

StatusOr<ConformanceReport> RunConformance(Communicator& comm) {
  ConformanceReport report;
  const int rank = comm.rank(), size = comm.size();
  int salt = 0;
  for (DType t : kTypes) {
    for (size_t n : {size_t{1}, size_t{1023}}) {
      if (!IsReducible(t)) {
        // Refused at once, naming the type, and the communicator stays usable (the broadcast
        // and allgather below run on it).
        std::vector<char> buf = Fill(t, rank, n, salt), send = Fill(t, rank, n * size, salt);
        std::vector<char> recv(n * DTypeSize(t));
        for (Status s : {Run(comm.AllReduce(buf.data(), n, t, ReduceOp::kMax), "allreduce"),
                         Run(comm.ReduceScatter(send.data(), recv.data(), n, t, ReduceOp::kMax),
                             "reduce_scatter")}) {
          if (s.code() != StatusCode::kInvalidArgument ||
              s.message().find(DTypeName(t)) == std::string::npos) {
            return InternalError("a reduction of " + std::string(DTypeName(t)) + " gave " +
                                 s.ToString() + ", want InvalidArgument naming it");
          }
        }
        ++report.checks;
      }
      for (ReduceOp op : kOps) {
        if (!IsReducible(t)) break;
        ++salt;
        std::string what = "allreduce " + std::string(ReduceOpName(op));
        std::vector<char> buf = Fill(t, rank, n, salt);
        MUSTER_RETURN_IF_ERROR(Run(comm.AllReduce(buf.data(), n, t, op), what));
        MUSTER_RETURN_IF_ERROR(
            Compare(what, t, buf.data(), Reference(t, op, size, n, salt).data(), n));
        ++report.checks;

        // reduce_scatter: `n` elements per rank.
        what = "reduce_scatter " + std::string(ReduceOpName(op));
        std::vector<char> send = Fill(t, rank, n * size, salt);
        std::vector<char> recv(n * DTypeSize(t));
        MUSTER_RETURN_IF_ERROR(Run(comm.ReduceScatter(send.data(), recv.data(), n, t, op), what));
        std::vector<char> full = Reference(t, op, size, n * size, salt);
        MUSTER_RETURN_IF_ERROR(
            Compare(what, t, recv.data(), full.data() + rank * n * DTypeSize(t), n));
        ++report.checks;
      }
      // broadcast from the last rank.
      ++salt;
      int root = size - 1;
      std::vector<char> buf = Fill(t, rank, n, salt);
      MUSTER_RETURN_IF_ERROR(Run(comm.Broadcast(buf.data(), n, t, root), "broadcast"));
      MUSTER_RETURN_IF_ERROR(Compare("broadcast", t, buf.data(), Fill(t, root, n, salt).data(), n));
      ++report.checks;

      // allgather: rank r's block at r*n.
      std::vector<char> mine = Fill(t, rank, n, salt);
      std::vector<char> all(n * size * DTypeSize(t));
      MUSTER_RETURN_IF_ERROR(Run(comm.AllGather(mine.data(), all.data(), n, t), "allgather"));
      for (int r = 0; r < size; ++r) {
        MUSTER_RETURN_IF_ERROR(Compare("allgather block " + std::to_string(r), t,
                                       all.data() + r * n * DTypeSize(t),
                                       Fill(t, r, n, salt).data(), n));
      }
      ++report.checks;
    }
  }
  MUSTER_RETURN_IF_ERROR(Run(comm.Barrier(), "barrier"));
  ++report.checks;
  return report;
}

}  // namespace muster::collectives::testing
