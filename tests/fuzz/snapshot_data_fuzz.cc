// The snapshot data channel's messages (node_agent/snapshots/data_channel.h), as a peer agent's
// data connection reads them from anyone who reaches its port. Never crashes, and:
//  - raw input read as a PUT or a REPLY under a fixed key never opens (it would need a forged
//    AES-GCM tag);
//  - input sealed correctly as a PUT's plaintext (any frame prefix and payload) opens only to a
//    frame that re-encodes to exactly those bytes;
//  - a frame from the input, sealed, with one byte flipped anywhere (header, ciphertext or tag)
//    is always refused;
//  - a reply carrying a status from the input opens to that status;
//  - the deduplicated put's messages (OFFER, NEED, CHUNKS): raw input never opens; an OFFER's or
//    a NEED's plaintext from the input, sealed correctly, opens only to what re-encodes to
//    exactly those bytes; CHUNKS of a payload from the input, for a bitmap from the input, open
//    to exactly the chunks asked for, and with one byte flipped are refused.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "checkpoint/manifest.h"  // Xxh3
#include "checkpoint/snapshot_frame.h"
#include "common/aead.h"
#include "node_agent/snapshots/data_channel.h"

namespace {

using muster::AeadKey;
using muster::Status;
using muster::StatusCode;
using muster::checkpoint::SnapshotFrame;
using muster::node_agent::DataHeader;
using muster::node_agent::DataKind;
using muster::node_agent::DataSessionId;
using muster::node_agent::kDataHeaderBytes;

constexpr uint64_t kLimit = 1 << 16;

AeadKey FixedKey() {
  AeadKey k;
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<uint8_t>(i * 29 + 3);
  return k;
}

// Reads from `in`, failing once it is used up.
muster::node_agent::DataReader ReaderOf(std::string_view& in) {
  return [&in](char* out, size_t n) {
    if (n > in.size()) return muster::UnavailableError("input used up");
    std::memcpy(out, in.data(), n);
    in.remove_prefix(n);
    return Status::Ok();
  };
}

void RawInput(std::string_view data) {
  if (data.size() < kDataHeaderBytes) return;
  const std::string_view header = data.substr(0, kDataHeaderBytes);
  for (DataKind kind : {DataKind::kPut, DataKind::kReply, DataKind::kOffer, DataKind::kNeed,
                        DataKind::kChunks, DataKind::kWhole}) {
    auto h = muster::node_agent::DecodeDataHeader(header, kind, kLimit);
    if (!h.ok()) continue;
    std::string_view rest = data.substr(kDataHeaderBytes);
    Status carried;
    bool opened = false;  // a forged tag
    switch (kind) {
      case DataKind::kPut:
        opened =
            muster::node_agent::ReadDataPut(*h, header, FixedKey(), kLimit, ReaderOf(rest)).ok();
        break;
      case DataKind::kReply:
        opened = muster::node_agent::ReadDataReply(*h, header, FixedKey(), ReaderOf(rest), &carried)
                     .ok();
        break;
      case DataKind::kOffer:
      case DataKind::kWhole:
        opened =
            muster::node_agent::ReadDataOffer(*h, header, FixedKey(), kLimit, ReaderOf(rest)).ok();
        break;
      case DataKind::kNeed: {
        muster::node_agent::ChunkNeeds need;
        opened = muster::node_agent::ReadDataNeed(*h, header, FixedKey(),
                                                  muster::node_agent::DedupChunkCount(kLimit),
                                                  ReaderOf(rest), &carried, &need)
                     .ok();
        break;
      }
      case DataKind::kChunks: {
        std::string payload(h->payload_length, '\0');
        muster::node_agent::ChunkNeeds all(muster::node_agent::DedupChunkCount(payload.size()),
                                           true);
        opened = muster::node_agent::ReadDataChunks(*h, header, FixedKey(), all, &payload,
                                                    ReaderOf(rest))
                     .ok();
        break;
      }
    }
    if (opened) std::abort();
  }
}

// The input as a PUT's plaintext (the first bytes its frame prefix), sealed correctly.
void SealedPlaintext(std::string_view data) {
  if (data.size() < 2) return;
  const size_t prefix_len =
      std::min<size_t>(49 + static_cast<uint8_t>(data[0]) % 128, data.size() - 1);
  if (prefix_len < 49) return;
  const std::string_view prefix = data.substr(1, prefix_len);
  const std::string_view payload = data.substr(1 + prefix_len);
  DataHeader h{.kind = DataKind::kPut,
               .counter = 7,
               .prefix_length = static_cast<uint32_t>(prefix.size()),
               .payload_length = payload.size()};
  const std::string header = muster::node_agent::EncodeDataHeader(h);
  auto s = muster::AeadStream::Begin(muster::AeadStream::Mode::kSeal, FixedKey(),
                                     muster::node_agent::DataNonce(DataKind::kPut, 7), header);
  if (!s.ok()) std::abort();
  std::string body(prefix);
  body.append(payload);
  if (!s->Update(body.data(), body.data(), body.size()).ok()) std::abort();
  muster::AeadTag tag;
  if (!s->FinishSeal(&tag).ok()) std::abort();
  body.append(reinterpret_cast<const char*>(tag.data()), tag.size());
  std::string_view in = body;
  auto f = muster::node_agent::ReadDataPut(h, header, FixedKey(), kLimit, ReaderOf(in));
  if (!f.ok()) return;
  auto again = muster::checkpoint::EncodeSnapshotPrefix(f->key, f->payload.size(), f->payload_xxh3);
  if (!again.ok() || *again != prefix || f->payload != payload) std::abort();
}

// A frame from the input, sealed by WriteDataPut, then one byte flipped.
void FlippedFrame(std::string_view data) {
  if (data.size() < 4) return;
  const uint16_t at =
      static_cast<uint16_t>(static_cast<uint8_t>(data[0]) | (static_cast<uint8_t>(data[1]) << 8));
  const uint8_t mask = static_cast<uint8_t>(data[2]) | 1;
  muster::checkpoint::SnapshotKey key{.job = "fuzz-job",
                                      .attempt = 1,
                                      .rank = 0,
                                      .world_size = 1,
                                      .step = static_cast<uint8_t>(data[3])};
  SnapshotFrame f{.key = key, .payload = std::string(data.substr(4))};
  f.payload_xxh3 = muster::checkpoint::Xxh3(f.payload.data(), f.payload.size());
  DataSessionId session;
  session.fill(0x5a);
  std::string wire, scratch;
  Status st = muster::node_agent::WriteDataPut(session, 3, FixedKey(), f, &scratch,
                                               [&](std::string_view b) {
                                                 wire.append(b);
                                                 return Status::Ok();
                                               });
  if (!st.ok()) std::abort();
  // Unflipped, it opens to the same frame.
  {
    auto h = muster::node_agent::DecodeDataHeader(std::string_view(wire).substr(0, 48),
                                                  DataKind::kPut, kLimit);
    if (!h.ok()) std::abort();
    std::string_view rest = std::string_view(wire).substr(kDataHeaderBytes);
    auto g = muster::node_agent::ReadDataPut(*h, std::string_view(wire).substr(0, 48), FixedKey(),
                                             kLimit, ReaderOf(rest));
    if (!g.ok() || !(g->key == f.key) || g->payload != f.payload) std::abort();
  }
  wire[at % wire.size()] ^= static_cast<char>(mask);
  const std::string_view header = std::string_view(wire).substr(0, kDataHeaderBytes);
  auto h = muster::node_agent::DecodeDataHeader(header, DataKind::kPut, kLimit);
  if (!h.ok()) return;
  std::string_view rest = std::string_view(wire).substr(kDataHeaderBytes);
  auto g = muster::node_agent::ReadDataPut(*h, header, FixedKey(), kLimit, ReaderOf(rest));
  if (g.ok()) std::abort();  // a flipped byte was not noticed
}

void ReplyRoundTrip(std::string_view data) {
  if (data.empty()) return;
  const auto code = static_cast<StatusCode>(static_cast<uint8_t>(data[0]) % 9);
  const Status sent =
      code == StatusCode::kOk ? Status::Ok() : Status(code, std::string(data.substr(1)));
  DataSessionId session;
  session.fill(0x11);
  auto wire = muster::node_agent::EncodeDataReply(session, 9, FixedKey(), sent);
  if (!wire.ok()) std::abort();
  const std::string_view header = std::string_view(*wire).substr(0, kDataHeaderBytes);
  auto h = muster::node_agent::DecodeDataHeader(header, DataKind::kReply, 0);
  if (!h.ok()) std::abort();
  std::string_view rest = std::string_view(*wire).substr(kDataHeaderBytes);
  Status got;
  if (!muster::node_agent::ReadDataReply(*h, header, FixedKey(), ReaderOf(rest), &got).ok())
    std::abort();
  if (got.code() != sent.code() ||
      got.message() != sent.message().substr(0, muster::node_agent::kMaxDataReplyMessage))
    std::abort();
}

// Seals `plain` as a message of `kind` with header `h` (its prefix_length set here), correctly.
std::string SealAs(DataHeader h, std::string_view plain, std::string* header) {
  h.prefix_length = static_cast<uint32_t>(plain.size());
  *header = muster::node_agent::EncodeDataHeader(h);
  auto sealed = muster::AeadSeal(FixedKey(), muster::node_agent::DataNonce(h.kind, h.counter),
                                 *header, plain);
  if (!sealed.ok()) std::abort();
  return *sealed;
}

// The input as an OFFER's plaintext (a frame prefix, then digests) or a whole-frame offer's (the
// prefix alone), sealed correctly: it opens only to an offer whose prefix and digests re-encode
// to exactly those bytes, with no digests for a whole-frame offer.
void SealedOffer(std::string_view data) {
  if (data.size() < 3) return;
  const DataKind kind =
      (static_cast<uint8_t>(data[1]) & 0x80) ? DataKind::kWhole : DataKind::kOffer;
  const uint64_t payload_length =
      static_cast<uint8_t>(data[0]) | (uint64_t{static_cast<uint8_t>(data[1]) & 0x7fu} << 8);
  const std::string_view plain = data.substr(2);
  std::string header;
  const std::string sealed =
      SealAs({.kind = kind, .counter = 4, .payload_length = payload_length}, plain, &header);
  auto h = muster::node_agent::DecodeDataHeader(header, kind, kLimit);
  if (!h.ok()) return;  // a prefix length outside the offer's range
  std::string_view in = sealed;
  auto offer = muster::node_agent::ReadDataOffer(*h, header, FixedKey(), kLimit, ReaderOf(in));
  if (!offer.ok()) return;
  auto again = muster::checkpoint::EncodeSnapshotPrefix(offer->header.key, payload_length,
                                                        offer->header.payload_xxh3);
  if (!again.ok() || offer->job != offer->header.key.job) std::abort();
  if (offer->whole != (kind == DataKind::kWhole) || (offer->whole && !offer->digests.empty())) {
    std::abort();
  }
  std::string re = *again;
  for (const auto& d : offer->digests) re.append(reinterpret_cast<const char*>(d.data()), d.size());
  if (re != plain) std::abort();
}

// The input as a NEED's plaintext for a payload of up to kLimit bytes, sealed correctly: it opens
// only to a status and bitmap that EncodeDataNeed turns into exactly that message.
void SealedNeed(std::string_view data) {
  if (data.size() < 2) return;
  const uint64_t chunks = static_cast<uint8_t>(data[0]) % 3;  // kLimit is one chunk; 0..2 tried
  const std::string_view plain = data.substr(1);
  std::string header;
  const std::string sealed = SealAs({.kind = DataKind::kNeed, .counter = 6}, plain, &header);
  auto h = muster::node_agent::DecodeDataHeader(header, DataKind::kNeed,
                                                chunks * muster::node_agent::kDedupChunkBytes);
  if (!h.ok()) return;
  std::string_view in = sealed;
  Status carried;
  muster::node_agent::ChunkNeeds need;
  if (!muster::node_agent::ReadDataNeed(*h, header, FixedKey(), chunks, ReaderOf(in), &carried,
                                        &need)
           .ok())
    return;
  DataSessionId session{};
  auto again = muster::node_agent::EncodeDataNeed(session, 6, FixedKey(), carried, need);
  if (!again.ok() || *again != header + sealed) std::abort();
}

// CHUNKS of a payload from the input, for a bitmap from the input: they open to exactly the
// chunks asked for (the rest of the buffer untouched); with one byte flipped, never.
void ChunksRoundTrip(std::string_view data) {
  if (data.size() < 4) return;
  const uint16_t at =
      static_cast<uint16_t>(static_cast<uint8_t>(data[0]) | (static_cast<uint8_t>(data[1]) << 8));
  const uint8_t bits = static_cast<uint8_t>(data[2]);
  // Small chunks would need a smaller kDedupChunkBytes; the payload is repeated past one chunk so
  // the bitmap has two or three bits.
  std::string payload;
  while (payload.size() < muster::node_agent::kDedupChunkBytes + 1) payload.append(data.substr(3));
  payload.resize(muster::node_agent::kDedupChunkBytes + (bits >> 3) * 97 + 1);
  const uint64_t chunks = muster::node_agent::DedupChunkCount(payload.size());
  muster::node_agent::ChunkNeeds need(chunks);
  for (uint64_t i = 0; i < chunks; ++i) need[i] = (bits >> i) & 1;
  DataSessionId session;
  session.fill(0x33);
  std::string wire, scratch;
  if (!muster::node_agent::WriteDataChunks(session, 8, FixedKey(), payload, need, &scratch,
                                           [&](std::string_view b) {
                                             wire.append(b);
                                             return Status::Ok();
                                           })
           .ok())
    std::abort();
  const uint64_t limit = payload.size();
  auto open = [&](const std::string& bytes, std::string* into) {
    const std::string_view header = std::string_view(bytes).substr(0, kDataHeaderBytes);
    auto h = muster::node_agent::DecodeDataHeader(header, DataKind::kChunks, limit);
    if (!h.ok()) return false;
    std::string_view rest = std::string_view(bytes).substr(kDataHeaderBytes);
    return muster::node_agent::ReadDataChunks(*h, header, FixedKey(), need, into, ReaderOf(rest))
        .ok();
  };
  std::string got(payload.size(), '#');
  if (!open(wire, &got)) std::abort();
  for (uint64_t i = 0; i < chunks; ++i) {
    const uint64_t from = i * muster::node_agent::kDedupChunkBytes;
    const uint64_t len =
        std::min<uint64_t>(muster::node_agent::kDedupChunkBytes, payload.size() - from);
    const std::string_view want =
        need[i] ? std::string_view(payload).substr(from, len) : std::string_view();
    if (need[i] ? std::string_view(got).substr(from, len) != want
                : std::string_view(got).substr(from, len) != std::string(len, '#'))
      std::abort();
  }
  wire[at % wire.size()] ^= static_cast<char>(static_cast<uint8_t>(data[2]) | 1);
  std::string again(payload.size(), '#');
  if (open(wire, &again)) std::abort();  // a flipped byte was not noticed
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  RawInput(in);
  SealedPlaintext(in);
  FlippedFrame(in);
  ReplyRoundTrip(in);
  SealedOffer(in);
  SealedNeed(in);
  ChunksRoundTrip(in);
  return 0;
}
