#include "tests/collectives/conformance_checks.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "collectives/reduce.h"

namespace muster::collectives::testing {

void StoreElement(DataType t, void* buf, size_t i, double v) {
  switch (t) {
    case DataType::kF32:
      static_cast<float*>(buf)[i] = static_cast<float>(v);
      return;
    case DataType::kF64:
      static_cast<double*>(buf)[i] = v;
      return;
    case DataType::kF16:
      static_cast<uint16_t*>(buf)[i] = FloatToHalf(static_cast<float>(v));
      return;
    case DataType::kBF16:
      static_cast<uint16_t*>(buf)[i] = FloatToBFloat16(static_cast<float>(v));
      return;
    case DataType::kI32:
      static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v);
      return;
    case DataType::kI64:
      static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v);
      return;
  }
}

double LoadElement(DataType t, const void* buf, size_t i) {
  switch (t) {
    case DataType::kF32:
      return static_cast<const float*>(buf)[i];
    case DataType::kF64:
      return static_cast<const double*>(buf)[i];
    case DataType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(buf)[i]);
    case DataType::kBF16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(buf)[i]);
    case DataType::kI32:
      return static_cast<const int32_t*>(buf)[i];
    case DataType::kI64:
      return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
  }
  return NAN;
}

namespace {

constexpr DataType kTypes[] = {DataType::kF32,  DataType::kF64, DataType::kF16,
                               DataType::kBF16, DataType::kI32, DataType::kI64};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax};
constexpr auto kWait = std::chrono::seconds(60);

// Small integers (|v| <= 12), so sums over 8 ranks are exact even in f16 and bf16 and the
// order in which a backend adds cannot change the result.
double Value(int rank, size_t i, int salt) {
  return static_cast<double>(static_cast<int>((rank + 1) * (i % 7 + 1) + salt * 3) % 25 - 12);
}

std::vector<char> Fill(DataType t, int rank, size_t n, int salt) {
  std::vector<char> b(n * DataTypeSize(t));
  for (size_t i = 0; i < n; ++i) StoreElement(t, b.data(), i, Value(rank, i, salt));
  return b;
}

// The reference: rank 0's data reduced with every other rank's, in rank order, with the same
// kernels a CPU backend uses (exact for these values, whatever the order).
std::vector<char> Reference(DataType t, ReduceOp op, int size, size_t n, int salt) {
  std::vector<char> acc = Fill(t, 0, n, salt);
  for (int r = 1; r < size; ++r) {
    std::vector<char> other = Fill(t, r, n, salt);
    ReduceInto(t, op, acc.data(), acc.data(), other.data(), n);
  }
  if (op == ReduceOp::kAvg) DivideBy(t, acc.data(), n, size);
  return acc;
}

Status Compare(const std::string& what, DataType t, const void* got, const void* want, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    double g = LoadElement(t, got, i), w = LoadElement(t, want, i);
    if (!(g == w)) {
      return DataLossError(what + " " + std::string(DataTypeName(t)) + " count " +
                           std::to_string(n) + ": element " + std::to_string(i) + " is " +
                           std::to_string(g) + ", want " + std::to_string(w));
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
  for (DataType t : kTypes) {
    for (size_t n : {size_t{1}, size_t{1023}}) {
      for (ReduceOp op : kOps) {
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
        std::vector<char> recv(n * DataTypeSize(t));
        MUSTER_RETURN_IF_ERROR(Run(comm.ReduceScatter(send.data(), recv.data(), n, t, op), what));
        std::vector<char> full = Reference(t, op, size, n * size, salt);
        MUSTER_RETURN_IF_ERROR(
            Compare(what, t, recv.data(), full.data() + rank * n * DataTypeSize(t), n));
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
      std::vector<char> all(n * size * DataTypeSize(t));
      MUSTER_RETURN_IF_ERROR(Run(comm.AllGather(mine.data(), all.data(), n, t), "allgather"));
      for (int r = 0; r < size; ++r) {
        MUSTER_RETURN_IF_ERROR(Compare("allgather block " + std::to_string(r), t,
                                       all.data() + r * n * DataTypeSize(t),
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
