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
// The deduplicated put. Data-parallel ranks hold the same state, so the frame a forwarder sends
// for a rank is most often, byte for byte, the frame the peer's own rank of the same job has just
// handed the peer for the same step. When the session allows it (its CURVE reply carries
// dedup_chunk_bytes equal to kDedupChunkBytes, and a seed), a forwarder sends instead of a PUT:
//   OFFER   (kind 3, client to server; payload length: the frame's payload): sealed, the frame's
//           header and job id as in a PUT, then one digest per kDedupChunkBytes of the payload
//           (the last chunk may be shorter): XXH3-128 seeded with the session's seed, 16 bytes
//           each, big-endian (XXH128_canonical_t). Sealed prefix length: the frame's header and
//           job id plus 16 x the chunk count, exactly.
//   NEED    (kind 4, server to client, same counter): sealed, a status as in a REPLY, then, when
//           it is Ok, a bitmap of the chunks the server does not hold (chunk i is bit i % 8 of
//           byte i / 8; the bits past the last chunk are 0), ceil(chunks / 8) bytes. A status
//           other than Ok refuses the frame (not admitted, the wrong job) and ends the exchange.
//   CHUNKS  (kind 5, client to server, same counter; sealed prefix length 0; payload length: the
//           needed chunks' bytes): the needed chunks' bytes in order, sealed as one message.
//   REPLY   (same counter): as for a PUT.
// The server fills the chunks it did not ask for from frames it holds of the same job, attempt
// and step (another rank's; digests under the same seed), then checks the assembled frame as any
// frame, against the xxh3 the forwarder's own header carries: a chunk of the server's that only
// collided with the forwarder's digest fails there (DataLoss in the REPLY, and the forwarder
// sends the frame again as a PUT). The kinds are part of the nonce, so the four messages of one
// counter never share one.
//
// The whole-frame offer. When the peer held the whole of this rank's last frame (it asked for no
// chunk), the next frame is most likely held whole too, and its digests are a pass over the
// payload for nothing. When the session allows it (its CURVE reply carries whole_offers), a
// forwarder may send instead of an OFFER:
//   WHOLE   (kind 6, client to server; payload length: the frame's payload): sealed, the frame's
//           header and job id as in a PUT, and nothing else (no digests).
// The peer answers with a NEED as to an OFFER: no chunk when it holds a frame of the same job,
// attempt and step with the offered size and xxh3 (copied whole, as for an OFFER), else every
// chunk. Then CHUNKS and REPLY as for an OFFER. A forwarder whose whole-frame offer had to send
// chunks offers the rank's next frame with digests again.
//
// Thread-safety: pure functions; the reader and writer passed in are called on the caller's
// thread.

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

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

// The deduplicated put's chunk, and its digest's size.
inline constexpr size_t kDedupChunkBytes = 64 << 10;
inline constexpr size_t kChunkDigestBytes = 16;

using DataSessionId = std::array<uint8_t, kDataSessionIdBytes>;
using ChunkDigest = std::array<uint8_t, kChunkDigestBytes>;
// Bit i set: chunk i is needed (sent in CHUNKS).
using ChunkNeeds = std::vector<bool>;

// kOffer, kNeed and kChunks: the deduplicated put (below).
// kWhole: the whole-frame offer (below).
enum class DataKind : uint16_t {
  kPut = 1,
  kReply = 2,
  kOffer = 3,
  kNeed = 4,
  kChunks = 5,
  kWhole = 6
};

struct DataHeader {
  DataKind kind = DataKind::kPut;
  DataSessionId session{};
  uint64_t counter = 0;
  uint32_t prefix_length = 0;
  uint64_t payload_length = 0;
};

std::string EncodeDataHeader(const DataHeader& h);
// Exactly kDataHeaderBytes of a message of `kind` (or of one of `kinds`). DataLoss naming the
// field that is wrong: magic, version, kind, counter 0, a prefix length outside the kind's range
// (an OFFER's must be exact for its payload's chunk count), reserved, or a payload longer than
// `max_payload` (checked before any of it is read). A NEED has no payload; its `max_payload` is
// the payload length of the frame offered, which bounds its bitmap.
StatusOr<DataHeader> DecodeDataHeader(std::string_view bytes, DataKind kind, uint64_t max_payload);
StatusOr<DataHeader> DecodeDataHeader(std::string_view bytes, std::initializer_list<DataKind> kinds,
                                      uint64_t max_payload);

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
// `buffer`, when given, makes the payload's buffer (its bytes are all overwritten: the store's
// recycled ones, SnapshotStore::TakeBuffer).
StatusOr<checkpoint::SnapshotFrame> ReadDataPut(
    const DataHeader& h, std::string_view header, const AeadKey& key, uint64_t max_payload,
    const DataReader& read, const std::function<std::string(uint64_t n)>& buffer = nullptr);

// The REPLY with `counter` carrying `status` (its message cut to kMaxDataReplyMessage).
StatusOr<std::string> EncodeDataReply(const DataSessionId& session, uint64_t counter,
                                      const AeadKey& key, const Status& status);
// Opens the REPLY's body after its header `h` (its `header` bytes) into `*carried`: the status
// the peer answered. DataLoss when it does not authenticate or does not parse; the reader's
// error if it fails.
Status ReadDataReply(const DataHeader& h, std::string_view header, const AeadKey& key,
                     const DataReader& read, Status* carried);

// --- The deduplicated put (see the top).

// The chunks of a payload of `payload_length` bytes.
uint64_t DedupChunkCount(uint64_t payload_length);
// The bytes of the chunks set in `need` of a payload of `payload_length` bytes.
uint64_t NeededBytes(uint64_t payload_length, const ChunkNeeds& need);
// The digest of each chunk of `payload`, under `seed`.
std::vector<ChunkDigest> ChunkDigests(std::string_view payload, uint64_t seed);

// An OFFER opened: the frame's header and job id, checked, and its payload's chunk digests.
struct DataOffer {
  checkpoint::SnapshotHeader header;
  std::string job;
  // DedupChunkCount(header.payload_length) for an OFFER; none for a whole-frame offer (WHOLE).
  std::vector<ChunkDigest> digests;
  bool whole = false;
};

// Seals the OFFER of `frame` with `counter` (its digests: ChunkDigests of its payload) and writes
// it; with no digests, the whole-frame offer (WHOLE). REQUIRES: digests.size() ==
// DedupChunkCount(frame.payload.size()), or digests empty.
Status WriteDataOffer(const DataSessionId& session, uint64_t counter, const AeadKey& key,
                      const checkpoint::SnapshotFrame& frame,
                      const std::vector<ChunkDigest>& digests, const DataWriter& write);
// Opens the rest of the OFFER or WHOLE whose header `h` (its `header` bytes) was just read, and
// checks the frame's header (DecodeSnapshotHeader with `max_payload`), its job id and its lengths
// against the message's. DataLoss naming what is wrong; the reader's error if it fails.
StatusOr<DataOffer> ReadDataOffer(const DataHeader& h, std::string_view header, const AeadKey& key,
                                  uint64_t max_payload, const DataReader& read);

// The NEED with `counter`: `status` and, when it is Ok, `need` (one bit per chunk).
StatusOr<std::string> EncodeDataNeed(const DataSessionId& session, uint64_t counter,
                                     const AeadKey& key, const Status& status,
                                     const ChunkNeeds& need);
// Opens the NEED's body after its header `h`: the status into `*carried` and, when it is Ok,
// the bitmap of the `chunks` chunks into `*need`. DataLoss when it does not authenticate or
// parse (a bitmap of another length, bits set past the last chunk).
Status ReadDataNeed(const DataHeader& h, std::string_view header, const AeadKey& key,
                    uint64_t chunks, const DataReader& read, Status* carried, ChunkNeeds* need);

// Seals the chunks of `payload` set in `need` as the CHUNKS with `counter` and writes them, a
// kDataChunkBytes piece at a time through `scratch`, then the tag.
Status WriteDataChunks(const DataSessionId& session, uint64_t counter, const AeadKey& key,
                       std::string_view payload, const ChunkNeeds& need, std::string* scratch,
                       const DataWriter& write);
// Opens the CHUNKS whose header `h` (its `header` bytes) was just read into `*payload` (sized
// already): each needed chunk is read into its place and opened there. DataLoss when its
// lengths are not the needed chunks' or its tag does not authenticate; the reader's error if it
// fails. The bytes written must be thrown away unless it returns Ok.
Status ReadDataChunks(const DataHeader& h, std::string_view header, const AeadKey& key,
                      const ChunkNeeds& need, std::string* payload, const DataReader& read);

}  // namespace muster::node_agent
