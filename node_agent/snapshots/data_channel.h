#pragma once

// The snapshot data channel's messages: how a forwarding agent seals a snapshot frame for a peer
// agent, and how the peer opens it, without CURVE encrypting the bytes a second time
// (peer_copy.h has the session that keys them; docs/protocol.md and docs/security.md describe
// the channel).
//
// Every message is a fixed 48-byte header in the clear, then a sealed body and its 16-byte
// AES-256-GCM tag (common/aead.h):
//
//   0  magic "MSDC"             4 bytes
//   4  version                  u16 (kDataVersion)
//   6  kind                     u16 (1: PUT, client to server; 2: REPLY, server to client)
//   8  session id               16 bytes (from the session's CURVE reply)
//  24  counter                  u64 (>= 1; the nonce, see below)
//  32  sealed prefix length     u32 (PUT: the frame's header and job id, 49..48+128 bytes;
//                                    REPLY: the status, 5..5+kMaxDataReplyMessage bytes)
//  36  reserved                 u32 (0)
//  40  payload length           u64 (PUT: the frame's payload; REPLY: 0)
//  48  sealed prefix, then the sealed payload, then the tag
//
// The nonce is the direction (u32: 1 for PUT, 2 for REPLY) and the counter (u64),
// little-endian; the associated data is the 48-byte header. A PUT's plaintext is the snapshot
// frame itself (checkpoint/snapshot_frame.h: its header with the job, attempt, rank, world size,
// step, payload length and xxh3, the job id, then the payload), so the tag binds all of them to
// the session and the counter, and they are as hidden on the wire as they were under CURVE.
// A REPLY answers the PUT with the same counter (the direction keeps the nonces apart): its
// plaintext is a status code (u8) and a message (u32 length, then bytes).
//
// Nothing of a message is used before its tag is checked. A frame opened is then checked as any
// frame (every field and the payload's xxh3).
//
// Thread-safety: pure functions; the reader and writer passed in are called on the caller's
// thread.

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "checkpoint/snapshot_frame.h"
#include "common/aead.h"
#include "common/status.h"

namespace muster::node_agent {

inline constexpr char kDataMagic[4] = {'M', 'S', 'D', 'C'};
inline constexpr uint16_t kDataVersion = 1;
inline constexpr size_t kDataHeaderBytes = 48;
inline constexpr size_t kDataSessionIdBytes = 16;
inline constexpr size_t kMaxDataReplyMessage = 4096;
// A sealed payload is sealed and opened in pieces of this size (in cache while they are).
inline constexpr size_t kDataChunkBytes = 256 << 10;

using DataSessionId = std::array<uint8_t, kDataSessionIdBytes>;

enum class DataKind : uint16_t { kPut = 1, kReply = 2 };

struct DataHeader {
  DataKind kind = DataKind::kPut;
  DataSessionId session{};
  uint64_t counter = 0;
  uint32_t prefix_length = 0;
  uint64_t payload_length = 0;
};

std::string EncodeDataHeader(const DataHeader& h);
// Exactly kDataHeaderBytes of a message of `kind`. DataLoss naming the field that is wrong:
// magic, version, kind, counter 0, a prefix length outside the kind's range, reserved, or a
// payload longer than `max_payload` (checked before any of it is read).
StatusOr<DataHeader> DecodeDataHeader(std::string_view bytes, DataKind kind, uint64_t max_payload);

AeadNonce DataNonce(DataKind kind, uint64_t counter);

// Reads exactly `n` bytes into `out`, or fails (the connection's error).
using DataReader = std::function<Status(char* out, size_t n)>;
// Writes `bytes` whole, or fails.
using DataWriter = std::function<Status(std::string_view bytes)>;

// Seals `frame` as the PUT with `counter` and writes it: the header and sealed prefix first, then
// the payload sealed a chunk at a time into `scratch` (reused between calls; grows to
// kDataChunkBytes) and written from there, then the tag. The payload is read once and not copied
// besides. `frame` must be a frame that was checked (its payload_xxh3 matches).
Status WriteDataPut(const DataSessionId& session, uint64_t counter, const AeadKey& key,
                    const checkpoint::SnapshotFrame& frame, std::string* scratch,
                    const DataWriter& write);

// Opens the rest of the PUT whose header `h` (its `header` bytes) was just read: reads the
// sealed prefix and payload (the payload straight into the buffer that becomes the frame's,
// opened there in place, a chunk at a time as it arrives), then the tag; checks the tag, then
// the frame (DecodeSnapshotHeader with `max_payload`, the job id, the lengths against the
// header's, the xxh3). DataLoss naming what is wrong; the reader's error if it fails.
StatusOr<checkpoint::SnapshotFrame> ReadDataPut(const DataHeader& h, std::string_view header,
                                                const AeadKey& key, uint64_t max_payload,
                                                const DataReader& read);

// The REPLY with `counter` carrying `status` (its message cut to kMaxDataReplyMessage).
StatusOr<std::string> EncodeDataReply(const DataSessionId& session, uint64_t counter,
                                      const AeadKey& key, const Status& status);
// Opens the REPLY's body after its header `h` (its `header` bytes) into `*carried`: the status
// the peer answered. DataLoss when it does not authenticate or does not parse; the reader's
// error if it fails.
Status ReadDataReply(const DataHeader& h, std::string_view header, const AeadKey& key,
                     const DataReader& read, Status* carried);

}  // namespace muster::node_agent
