#pragma once

// The compressed form of a gather result between the rendezvous store and the node agents'
// relays (StoreGather.accept_zstd, StoreReply.gathered_zstd): one zstd frame of the serialized
// StoreGathered, made once by the store for every relay and inflated once by each relay for
// its node's ranks. Ranks never see it. The frame goes through the relay's CURVE connection
// like any reply: compression only cuts the bytes the store encrypts and sends once per relay.
//
// Thread-safety: free functions without shared state.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace muster::collectives {

// Gather results smaller than this go uncompressed.
inline constexpr size_t kZstdMinBytes = 4096;

// One zstd frame of `raw` (level 1, its size in the frame header); empty if zstd failed.
std::string CompressGathered(std::string_view raw);

// The bytes of one zstd frame made by CompressGathered. DataLoss naming what is wrong when
// `frame` is not one such frame, does not state its size, or would inflate past `max_bytes`
// (checked before anything is allocated).
StatusOr<std::string> InflateGathered(std::string_view frame, int64_t max_bytes);

}  // namespace muster::collectives
