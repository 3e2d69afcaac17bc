#pragma once

// SnapshotFrame: one rank's in-memory snapshot of one step, as bytes on the wire. A rank hands
// its frame to its own node's agent, and that agent forwards the same bytes to a peer agent on
// another node (node_agent/snapshots/). Both receivers treat the bytes as untrusted:
// DecodeSnapshotFrame checks every field and the payload's xxh3 before anything is kept.
//
// Layout (little-endian, kSnapshotHeaderBytes of fixed header, then the variable parts):
//
//   0  magic "MSNP"            4 bytes
//   4  version                 u16  (kSnapshotFrameVersion)
//   6  job id length           u16  (1..kMaxPathNameLength; a valid path name)
//   8  step                    i64  (>= 0)
//  16  attempt                 i32  (>= 0)
//  20  rank                    i32  (0 <= rank < world size)
//  24  world size              i32  (1..kMaxSnapshotWorldSize)
//  28  reserved                u32  (0)
//  32  payload length          u64  (<= the receiver's limit)
//  40  payload xxh3-64         u64
//  48  job id, then the payload
//
// The payload is opaque here (the rank's serialized checkpoint state).
//
// Thread-safety: pure functions.

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace muster::checkpoint {

inline constexpr char kSnapshotMagic[4] = {'M', 'S', 'N', 'P'};
inline constexpr uint16_t kSnapshotFrameVersion = 1;
inline constexpr size_t kSnapshotHeaderBytes = 48;
inline constexpr int32_t kMaxSnapshotWorldSize = 1 << 20;

// Which rank's state, for which step of which job attempt.
struct SnapshotKey {
  std::string job;
  int32_t attempt = 0;
  int32_t rank = 0;
  int32_t world_size = 1;
  int64_t step = 0;

  bool operator==(const SnapshotKey&) const = default;
};

// The fixed header, decoded: what the rest of the frame must hold.
struct SnapshotHeader {
  SnapshotKey key;  // key.job is empty until the job id bytes are read
  uint16_t job_length = 0;
  uint64_t payload_length = 0;
  uint64_t payload_xxh3 = 0;
};

struct SnapshotFrame {
  SnapshotKey key;
  uint64_t payload_xxh3 = 0;
  std::string payload;
};

// The frame's bytes. InvalidArgument for a key that DecodeSnapshotFrame would refuse.
StatusOr<std::string> EncodeSnapshotFrame(const SnapshotKey& key, std::string_view payload);
// The same frame without its payload (the header and the job id): a sender writes these bytes,
// then the payload, without copying the payload into one buffer.
StatusOr<std::string> EncodeSnapshotPrefix(const SnapshotKey& key, std::string_view payload);

// The same prefix for a payload of `payload_length` bytes whose xxh3 is already known (a frame
// that was checked when it was received): forwarding it does not hash the payload again.
StatusOr<std::string> EncodeSnapshotPrefix(const SnapshotKey& key, uint64_t payload_length,
                                           uint64_t payload_xxh3);

// The fixed header of a frame (exactly kSnapshotHeaderBytes bytes): lets a stream reader learn
// how many bytes follow before reading them. DataLoss names the field that is wrong: magic,
// version, job id length, step, attempt, rank, world size, reserved, or a payload longer than
// `max_payload` (the receiver's limit; a frame that cannot fit is refused before it is read).
StatusOr<SnapshotHeader> DecodeSnapshotHeader(std::string_view header, uint64_t max_payload);

// A whole frame: the header as above, then the job id (a valid path name) and exactly
// payload_length bytes whose xxh3 matches. DataLoss naming what is wrong.
StatusOr<SnapshotFrame> DecodeSnapshotFrame(std::string_view bytes, uint64_t max_payload);

// The rest of a frame after its header: the job id and the payload, checked as above.
StatusOr<SnapshotFrame> DecodeSnapshotBody(const SnapshotHeader& header, std::string_view body);

// As DecodeSnapshotFrame, but the frame's payload is `bytes` itself, the header and the job id
// moved out of its front in place: no second buffer of the payload's size is allocated (a
// receiver that already holds the frame's bytes keeps them). `bytes` is consumed either way.
StatusOr<SnapshotFrame> DecodeSnapshotFrameInPlace(std::string&& bytes, uint64_t max_payload);

// A frame whose header is decoded and whose job id and payload were read separately (a stream
// reader reads the payload straight into the buffer it keeps): checks the job id and the
// payload's length and xxh3 as DecodeSnapshotBody does, without copying the payload.
StatusOr<SnapshotFrame> DecodeSnapshotParts(const SnapshotHeader& header, std::string_view job,
                                            std::string&& payload);
// The same, without hashing the payload again. REQUIRES: `payload` is a copy of a payload that
// was checked against this same xxh3 (header.payload_xxh3), as a frame held in a store is.
StatusOr<SnapshotFrame> DecodeSnapshotPartsChecked(const SnapshotHeader& header,
                                                   std::string_view job, std::string&& payload);

}  // namespace muster::checkpoint
