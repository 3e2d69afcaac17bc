// libFuzzer target: a compressed gather result as the store sends it to a node agent's relay
// (collectives/rendezvous_codec.h: StoreReply.gathered_zstd), inflated by the relay. Each run
// checks that InflateGathered never allocates past its limit (it refuses a frame whose stated
// size is over it) and that what inflates compresses and inflates back to the same bytes.
// Built by `make fuzz` with clang++-14 -fsanitize=fuzzer,address.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "collectives/rendezvous_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  constexpr int64_t kLimit = 1 << 20;
  std::string_view frame(reinterpret_cast<const char*>(data), size);
  auto plain = muster::collectives::InflateGathered(frame, kLimit);
  if (!plain.ok()) return 0;
  if (static_cast<int64_t>(plain->size()) > kLimit) std::abort();
  auto again =
      muster::collectives::InflateGathered(muster::collectives::CompressGathered(*plain), kLimit);
  if (!again.ok() || *again != *plain) std::abort();
  return 0;
}
