#include "collectives/rendezvous_codec.h"

#include <zstd.h>

namespace muster::collectives {

std::string CompressGathered(std::string_view raw) {
  std::string out(ZSTD_compressBound(raw.size()), '\0');
  size_t n = ZSTD_compress(out.data(), out.size(), raw.data(), raw.size(), 1);
  if (ZSTD_isError(n)) return {};
  out.resize(n);
  return out;
}

StatusOr<std::string> InflateGathered(std::string_view frame, int64_t max_bytes) {
  const unsigned long long size = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (size == ZSTD_CONTENTSIZE_ERROR) {
    return DataLossError("rendezvous gather: the store's compressed result (" +
                         std::to_string(frame.size()) + " bytes) is not a zstd frame");
  }
  if (size == ZSTD_CONTENTSIZE_UNKNOWN) {
    return DataLossError(
        "rendezvous gather: the store's compressed result does not state its size");
  }
  if (max_bytes < 0 || size > static_cast<unsigned long long>(max_bytes)) {
    return DataLossError("rendezvous gather: the store's compressed result would inflate to " +
                         std::to_string(size) + " bytes, over the limit of " +
                         std::to_string(max_bytes));
  }
  const size_t whole = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
  if (ZSTD_isError(whole) || whole != frame.size()) {
    return DataLossError(
        "rendezvous gather: the store's compressed result is not exactly one "
        "zstd frame (" +
        std::string(ZSTD_isError(whole) ? ZSTD_getErrorName(whole) : "bytes after the frame") +
        ")");
  }
  std::string out(static_cast<size_t>(size), '\0');
  const size_t got = ZSTD_decompress(out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(got)) {
    return DataLossError(std::string("rendezvous gather: the store's compressed result does not "
                                     "inflate: ") +
                         ZSTD_getErrorName(got));
  }
  if (got != out.size()) {
    return DataLossError("rendezvous gather: the store's compressed result inflated to " +
                         std::to_string(got) + " bytes, not the " + std::to_string(size) +
                         " its header states");
  }
  return out;
}

}  // namespace muster::collectives
