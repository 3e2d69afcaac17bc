#include "node_agent/snapshots/data_channel.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "common/little_endian.h"
#include "common/path_name.h"

namespace muster::node_agent {
namespace {

constexpr uint32_t kMinPutPrefix = checkpoint::kSnapshotHeaderBytes + 1;
constexpr uint32_t kMaxPutPrefix = checkpoint::kSnapshotHeaderBytes + kMaxPathNameLength;
constexpr uint32_t kMinReplyPrefix = 5;
constexpr uint32_t kMaxReplyPrefix = 5 + kMaxDataReplyMessage;

StatusOr<AeadStream> Begin(AeadStream::Mode mode, const AeadKey& key, DataKind kind,
                           uint64_t counter, std::string_view header) {
  return AeadStream::Begin(mode, key, DataNonce(kind, counter), header);
}

// One sealed message written a kDataChunkBytes piece at a time through `scratch` (reused between
// messages): its header in the clear, then every run of bytes given to Seal, sealed in order,
// then the tag (Finish). Each full piece is written as it fills; nothing else is copied.
class SealedWriter {
 public:
  static StatusOr<SealedWriter> Start(const AeadKey& key, DataKind kind, uint64_t counter,
                                      const std::string& header, std::string* scratch,
                                      const DataWriter& write) {
    MUSTER_ASSIGN_OR_RETURN(AeadStream s,
                            Begin(AeadStream::Mode::kSeal, key, kind, counter, header));
    scratch->resize(std::max(scratch->size(), kDataChunkBytes));
    std::memcpy(scratch->data(), header.data(), header.size());
    return SealedWriter(std::move(s), scratch, header.size(), write);
  }

  Status Seal(std::string_view bytes) {
    while (!bytes.empty()) {
      const size_t n = std::min(bytes.size(), kDataChunkBytes - used_);
      MUSTER_RETURN_IF_ERROR(stream_.Update(bytes.data(), buf_->data() + used_, n));
      used_ += n;
      bytes.remove_prefix(n);
      if (used_ == kDataChunkBytes) MUSTER_RETURN_IF_ERROR(Flush());
    }
    return Status::Ok();
  }

  Status Finish() {
    AeadTag tag;
    MUSTER_RETURN_IF_ERROR(stream_.FinishSeal(&tag));
    if (used_ + tag.size() > kDataChunkBytes) MUSTER_RETURN_IF_ERROR(Flush());
    std::memcpy(buf_->data() + used_, tag.data(), tag.size());
    used_ += tag.size();
    return Flush();
  }

 private:
  SealedWriter(AeadStream s, std::string* buf, size_t used, const DataWriter& write)
      : stream_(std::move(s)), buf_(buf), used_(used), write_(write) {}
  Status Flush() {
    Status st = write_(std::string_view(buf_->data(), used_));
    used_ = 0;
    return st;
  }
  AeadStream stream_;
  std::string* buf_;
  size_t used_;
  const DataWriter& write_;
};

}  // namespace

std::string EncodeDataHeader(const DataHeader& h) {
  std::string out;
  out.reserve(kDataHeaderBytes);
  out.append(kDataMagic, 4);
  AppendLe<uint16_t>(out, kDataVersion);
  AppendLe<uint16_t>(out, static_cast<uint16_t>(h.kind));
  out.append(reinterpret_cast<const char*>(h.session.data()), h.session.size());
  AppendLe<uint64_t>(out, h.counter);
  AppendLe<uint32_t>(out, h.prefix_length);
  AppendLe<uint32_t>(out, 0);
  AppendLe<uint64_t>(out, h.payload_length);
  return out;
}

StatusOr<DataHeader> DecodeDataHeader(std::string_view in, DataKind kind, uint64_t max_payload) {
  return DecodeDataHeader(in, {kind}, max_payload);
}

StatusOr<DataHeader> DecodeDataHeader(std::string_view in, std::initializer_list<DataKind> kinds,
                                      uint64_t max_payload) {
  if (in.size() != kDataHeaderBytes) {
    return DataLossError("snapshot data: header is " + std::to_string(in.size()) + " bytes, not " +
                         std::to_string(kDataHeaderBytes));
  }
  if (std::memcmp(in.data(), kDataMagic, 4) != 0) {
    return DataLossError("snapshot data: bad magic " + QuoteForError(in.substr(0, 4)));
  }
  if (uint16_t v = LoadLe<uint16_t>(in, 4); v != kDataVersion) {
    return DataLossError("snapshot data: unknown version " + std::to_string(v));
  }
  DataHeader h;
  const uint16_t k = LoadLe<uint16_t>(in, 6);
  bool expected = false;
  std::string names;
  for (DataKind want : kinds) {
    expected = expected || k == static_cast<uint16_t>(want);
    names += (names.empty() ? "" : " or ") + std::to_string(static_cast<uint16_t>(want));
  }
  if (!expected) {
    return DataLossError("snapshot data: message kind " + std::to_string(k) + ", expected " +
                         names);
  }
  h.kind = static_cast<DataKind>(k);
  std::memcpy(h.session.data(), in.data() + 8, kDataSessionIdBytes);
  h.counter = LoadLe<uint64_t>(in, 24);
  if (h.counter == 0) return DataLossError("snapshot data: counter 0");
  h.prefix_length = LoadLe<uint32_t>(in, 32);
  if (uint32_t r = LoadLe<uint32_t>(in, 36); r != 0) {
    return DataLossError("snapshot data: reserved field is " + std::to_string(r) + ", not 0");
  }
  h.payload_length = LoadLe<uint64_t>(in, 40);
  const bool carries_payload = h.kind == DataKind::kPut || h.kind == DataKind::kOffer ||
                               h.kind == DataKind::kWhole || h.kind == DataKind::kChunks;
  const uint64_t max = carries_payload ? max_payload : 0;
  if (h.payload_length > max) {
    return DataLossError("snapshot data: payload of " + std::to_string(h.payload_length) +
                         " bytes exceeds the limit of " + std::to_string(max));
  }
  // The sealed prefix's range for the kind (64-bit: an OFFER's digests of a huge payload).
  uint64_t lo = 0, hi = 0;
  switch (h.kind) {
    case DataKind::kPut:
    case DataKind::kWhole:
      lo = kMinPutPrefix;
      hi = kMaxPutPrefix;
      break;
    case DataKind::kReply:
      lo = kMinReplyPrefix;
      hi = kMaxReplyPrefix;
      break;
    case DataKind::kOffer: {
      const uint64_t digests = DedupChunkCount(h.payload_length) * kChunkDigestBytes;
      lo = kMinPutPrefix + digests;
      hi = kMaxPutPrefix + digests;
      break;
    }
    case DataKind::kNeed:
      lo = kMinReplyPrefix;
      hi = kMaxReplyPrefix + (DedupChunkCount(max_payload) + 7) / 8;
      break;
    case DataKind::kChunks:
      break;  // nothing but the chunks
  }
  if (h.prefix_length < lo || h.prefix_length > hi) {
    return DataLossError("snapshot data: sealed prefix of " + std::to_string(h.prefix_length) +
                         " bytes is outside " + std::to_string(lo) + ".." + std::to_string(hi));
  }
  return h;
}

AeadNonce DataNonce(DataKind kind, uint64_t counter) {
  AeadNonce n{};
  const uint32_t dir = static_cast<uint16_t>(kind);
  for (size_t i = 0; i < 4; ++i) n[i] = static_cast<uint8_t>((dir >> (8 * i)) & 0xff);
  for (size_t i = 0; i < 8; ++i) n[4 + i] = static_cast<uint8_t>((counter >> (8 * i)) & 0xff);
  return n;
}

Status WriteDataPut(const DataSessionId& session, uint64_t counter, const AeadKey& key,
                    const checkpoint::SnapshotFrame& frame, std::string* scratch,
                    const DataWriter& write) {
  MUSTER_ASSIGN_OR_RETURN(
      std::string prefix,
      checkpoint::EncodeSnapshotPrefix(frame.key, frame.payload.size(), frame.payload_xxh3));
  DataHeader h{.kind = DataKind::kPut,
               .session = session,
               .counter = counter,
               .prefix_length = static_cast<uint32_t>(prefix.size()),
               .payload_length = frame.payload.size()};
  // The header and the sealed prefix lead the first piece.
  MUSTER_ASSIGN_OR_RETURN(SealedWriter w, SealedWriter::Start(key, DataKind::kPut, counter,
                                                              EncodeDataHeader(h), scratch, write));
  MUSTER_RETURN_IF_ERROR(w.Seal(prefix));
  MUSTER_RETURN_IF_ERROR(w.Seal(frame.payload));
  return w.Finish();
}

StatusOr<checkpoint::SnapshotFrame> ReadDataPut(
    const DataHeader& h, std::string_view header, const AeadKey& key, uint64_t max_payload,
    const DataReader& read, const std::function<std::string(uint64_t n)>& buffer) {
  if (h.kind != DataKind::kPut || header.size() != kDataHeaderBytes) {
    return InvalidArgumentError("snapshot data: not the header of a put");
  }
  MUSTER_ASSIGN_OR_RETURN(AeadStream s,
                          Begin(AeadStream::Mode::kOpen, key, DataKind::kPut, h.counter, header));
  std::string prefix(h.prefix_length, '\0');
  MUSTER_RETURN_IF_ERROR(read(prefix.data(), prefix.size()));
  MUSTER_RETURN_IF_ERROR(s.Update(prefix.data(), prefix.data(), prefix.size()));
  // The payload lands in the buffer the store keeps, and is opened there.
  std::string payload = buffer ? buffer(h.payload_length) : std::string(h.payload_length, '\0');
  for (size_t at = 0; at < payload.size();) {
    const size_t n = std::min(payload.size() - at, kDataChunkBytes);
    MUSTER_RETURN_IF_ERROR(read(payload.data() + at, n));
    MUSTER_RETURN_IF_ERROR(s.Update(payload.data() + at, payload.data() + at, n));
    at += n;
  }
  AeadTag tag;
  MUSTER_RETURN_IF_ERROR(read(reinterpret_cast<char*>(tag.data()), tag.size()));
  if (Status st = s.FinishOpen(tag); !st.ok()) {
    return DataLossError("snapshot data: put " + std::to_string(h.counter) + ": " + st.message());
  }
  // Authentic: now the frame's own checks.
  std::string_view p(prefix);
  MUSTER_ASSIGN_OR_RETURN(
      checkpoint::SnapshotHeader fh,
      checkpoint::DecodeSnapshotHeader(p.substr(0, checkpoint::kSnapshotHeaderBytes), max_payload));
  if (fh.job_length != p.size() - checkpoint::kSnapshotHeaderBytes ||
      fh.payload_length != h.payload_length) {
    return DataLossError("snapshot data: the frame's header says " + std::to_string(fh.job_length) +
                         " + " + std::to_string(fh.payload_length) +
                         " bytes, the message carries " +
                         std::to_string(p.size() - checkpoint::kSnapshotHeaderBytes) + " + " +
                         std::to_string(h.payload_length));
  }
  return checkpoint::DecodeSnapshotParts(fh, p.substr(checkpoint::kSnapshotHeaderBytes),
                                         std::move(payload));
}

StatusOr<std::string> EncodeDataReply(const DataSessionId& session, uint64_t counter,
                                      const AeadKey& key, const Status& status) {
  const std::string msg = status.message().substr(0, kMaxDataReplyMessage);
  std::string body;
  body.push_back(static_cast<char>(status.code()));
  AppendLe<uint32_t>(body, static_cast<uint32_t>(msg.size()));
  body += msg;
  DataHeader h{.kind = DataKind::kReply,
               .session = session,
               .counter = counter,
               .prefix_length = static_cast<uint32_t>(body.size()),
               .payload_length = 0};
  std::string out = EncodeDataHeader(h);
  MUSTER_ASSIGN_OR_RETURN(std::string sealed,
                          AeadSeal(key, DataNonce(DataKind::kReply, counter), out, body));
  return out + sealed;
}

Status ReadDataReply(const DataHeader& h, std::string_view header, const AeadKey& key,
                     const DataReader& read, Status* carried) {
  if (h.kind != DataKind::kReply || header.size() != kDataHeaderBytes) {
    return InvalidArgumentError("snapshot data: not the header of a reply");
  }
  std::string sealed(h.prefix_length + kAeadTagBytes, '\0');
  MUSTER_RETURN_IF_ERROR(read(sealed.data(), sealed.size()));
  auto body = AeadOpen(key, DataNonce(DataKind::kReply, h.counter), header, sealed);
  if (!body.ok()) return DataLossError("snapshot data: reply: " + body.status().message());
  const std::string_view b = *body;
  const uint8_t code = static_cast<uint8_t>(b[0]);
  const uint32_t n = LoadLe<uint32_t>(b, 1);
  if (b.size() != 5 + uint64_t{n} || code > static_cast<uint8_t>(StatusCode::kInternal)) {
    return DataLossError("snapshot data: reply does not parse");
  }
  *carried =
      code == 0 ? Status::Ok() : Status(static_cast<StatusCode>(code), std::string(b.substr(5)));
  return Status::Ok();
}

// --- The deduplicated put.

uint64_t DedupChunkCount(uint64_t payload_length) {
  return payload_length / kDedupChunkBytes + (payload_length % kDedupChunkBytes != 0 ? 1 : 0);
}

namespace {

// Where chunk `i` of a payload of `length` bytes starts, and its length.
std::pair<uint64_t, uint64_t> ChunkSpan(uint64_t length, uint64_t i) {
  const uint64_t at = i * kDedupChunkBytes;
  return {at, std::min<uint64_t>(kDedupChunkBytes, length - at)};
}

}  // namespace

uint64_t NeededBytes(uint64_t payload_length, const ChunkNeeds& need) {
  uint64_t n = 0;
  for (uint64_t i = 0; i < need.size() && i < DedupChunkCount(payload_length); ++i) {
    if (need[i]) n += ChunkSpan(payload_length, i).second;
  }
  return n;
}

std::vector<ChunkDigest> ChunkDigests(std::string_view payload, uint64_t seed) {
  const uint64_t n = DedupChunkCount(payload.size());
  std::vector<ChunkDigest> out(n);
  for (uint64_t i = 0; i < n; ++i) {
    const auto [at, len] = ChunkSpan(payload.size(), i);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_withSeed(payload.data() + at, len, seed));
    static_assert(sizeof(c.digest) == kChunkDigestBytes);
    std::memcpy(out[i].data(), c.digest, kChunkDigestBytes);
  }
  return out;
}

Status WriteDataOffer(const DataSessionId& session, uint64_t counter, const AeadKey& key,
                      const checkpoint::SnapshotFrame& frame,
                      const std::vector<ChunkDigest>& digests, const DataWriter& write) {
  if (!digests.empty() && digests.size() != DedupChunkCount(frame.payload.size())) {
    return InvalidArgumentError("snapshot data: an offer needs a digest per chunk, or none");
  }
  const DataKind kind = digests.empty() ? DataKind::kWhole : DataKind::kOffer;
  MUSTER_ASSIGN_OR_RETURN(
      std::string body,
      checkpoint::EncodeSnapshotPrefix(frame.key, frame.payload.size(), frame.payload_xxh3));
  if (body.size() + digests.size() * kChunkDigestBytes > UINT32_MAX) {
    return InvalidArgumentError("snapshot data: too many chunks to offer");
  }
  body.reserve(body.size() + digests.size() * kChunkDigestBytes);
  for (const ChunkDigest& d : digests)
    body.append(reinterpret_cast<const char*>(d.data()), d.size());
  DataHeader h{.kind = kind,
               .session = session,
               .counter = counter,
               .prefix_length = static_cast<uint32_t>(body.size()),
               .payload_length = frame.payload.size()};
  std::string out = EncodeDataHeader(h);
  MUSTER_ASSIGN_OR_RETURN(std::string sealed, AeadSeal(key, DataNonce(kind, counter), out, body));
  return write(out + sealed);
}

StatusOr<DataOffer> ReadDataOffer(const DataHeader& h, std::string_view header, const AeadKey& key,
                                  uint64_t max_payload, const DataReader& read) {
  if ((h.kind != DataKind::kOffer && h.kind != DataKind::kWhole) ||
      header.size() != kDataHeaderBytes) {
    return InvalidArgumentError("snapshot data: not the header of an offer");
  }
  const bool whole = h.kind == DataKind::kWhole;
  const uint64_t chunks = whole ? 0 : DedupChunkCount(h.payload_length);
  const uint64_t digest_bytes = chunks * kChunkDigestBytes;
  if (h.payload_length > max_payload || h.prefix_length < kMinPutPrefix + digest_bytes) {
    return InvalidArgumentError("snapshot data: an offer's header out of its ranges");
  }
  std::string sealed(uint64_t{h.prefix_length} + kAeadTagBytes, '\0');
  MUSTER_RETURN_IF_ERROR(read(sealed.data(), sealed.size()));
  auto body = AeadOpen(key, DataNonce(h.kind, h.counter), header, sealed);
  if (!body.ok()) {
    return DataLossError("snapshot data: offer " + std::to_string(h.counter) + ": " +
                         body.status().message());
  }
  const std::string_view b = *body;
  const std::string_view prefix = b.substr(0, b.size() - digest_bytes);
  DataOffer offer;
  offer.whole = whole;
  MUSTER_ASSIGN_OR_RETURN(offer.header,
                          checkpoint::DecodeSnapshotHeader(
                              prefix.substr(0, checkpoint::kSnapshotHeaderBytes), max_payload));
  if (offer.header.job_length != prefix.size() - checkpoint::kSnapshotHeaderBytes ||
      offer.header.payload_length != h.payload_length) {
    return DataLossError("snapshot data: the offered frame's header says " +
                         std::to_string(offer.header.job_length) + " + " +
                         std::to_string(offer.header.payload_length) +
                         " bytes, the message carries " +
                         std::to_string(prefix.size() - checkpoint::kSnapshotHeaderBytes) + " + " +
                         std::to_string(h.payload_length));
  }
  offer.job = std::string(prefix.substr(checkpoint::kSnapshotHeaderBytes));
  if (Status st = ValidatePathName(offer.job, "snapshot job id"); !st.ok()) {
    return DataLossError(st.message());
  }
  offer.digests.resize(chunks);
  for (uint64_t i = 0; i < chunks; ++i) {
    std::memcpy(offer.digests[i].data(), b.data() + prefix.size() + i * kChunkDigestBytes,
                kChunkDigestBytes);
  }
  return offer;
}

StatusOr<std::string> EncodeDataNeed(const DataSessionId& session, uint64_t counter,
                                     const AeadKey& key, const Status& status,
                                     const ChunkNeeds& need) {
  const std::string msg = status.message().substr(0, kMaxDataReplyMessage);
  std::string body;
  body.push_back(static_cast<char>(status.code()));
  AppendLe<uint32_t>(body, static_cast<uint32_t>(msg.size()));
  body += msg;
  if (status.ok()) {
    std::string bits((need.size() + 7) / 8, '\0');
    for (size_t i = 0; i < need.size(); ++i) {
      if (need[i]) bits[i / 8] = static_cast<char>(bits[i / 8] | (1 << (i % 8)));
    }
    body += bits;
  }
  DataHeader h{.kind = DataKind::kNeed,
               .session = session,
               .counter = counter,
               .prefix_length = static_cast<uint32_t>(body.size()),
               .payload_length = 0};
  std::string out = EncodeDataHeader(h);
  MUSTER_ASSIGN_OR_RETURN(std::string sealed,
                          AeadSeal(key, DataNonce(DataKind::kNeed, counter), out, body));
  return out + sealed;
}

Status ReadDataNeed(const DataHeader& h, std::string_view header, const AeadKey& key,
                    uint64_t chunks, const DataReader& read, Status* carried, ChunkNeeds* need) {
  if (h.kind != DataKind::kNeed || header.size() != kDataHeaderBytes) {
    return InvalidArgumentError("snapshot data: not the header of a need");
  }
  std::string sealed(uint64_t{h.prefix_length} + kAeadTagBytes, '\0');
  MUSTER_RETURN_IF_ERROR(read(sealed.data(), sealed.size()));
  auto body = AeadOpen(key, DataNonce(DataKind::kNeed, h.counter), header, sealed);
  if (!body.ok()) return DataLossError("snapshot data: need: " + body.status().message());
  const std::string_view b = *body;
  if (b.size() < 5) return DataLossError("snapshot data: need does not parse");
  const uint8_t code = static_cast<uint8_t>(b[0]);
  const uint32_t n = LoadLe<uint32_t>(b, 1);
  if (code > static_cast<uint8_t>(StatusCode::kInternal) || n > b.size() - 5 ||
      n > kMaxDataReplyMessage || (code == 0 && n != 0)) {
    return DataLossError("snapshot data: need does not parse");
  }
  const std::string_view bits = b.substr(5 + n);
  if (code != 0) {
    if (!bits.empty()) return DataLossError("snapshot data: a refusing need carries a bitmap");
    *carried = Status(static_cast<StatusCode>(code), std::string(b.substr(5, n)));
    need->clear();
    return Status::Ok();
  }
  if (bits.size() != (chunks + 7) / 8) {
    return DataLossError("snapshot data: need's bitmap is " + std::to_string(bits.size()) +
                         " bytes for " + std::to_string(chunks) + " chunks");
  }
  need->assign(chunks, false);
  for (size_t byte = 0; byte < bits.size(); ++byte) {
    const auto v = static_cast<unsigned char>(bits[byte]);
    for (size_t bit = 0; bit < 8; ++bit) {
      if (!(v & (1u << bit))) continue;
      const uint64_t i = byte * 8 + bit;
      if (i >= chunks) return DataLossError("snapshot data: need asks for a chunk past the last");
      (*need)[i] = true;
    }
  }
  *carried = Status::Ok();
  return Status::Ok();
}

Status WriteDataChunks(const DataSessionId& session, uint64_t counter, const AeadKey& key,
                       std::string_view payload, const ChunkNeeds& need, std::string* scratch,
                       const DataWriter& write) {
  const uint64_t chunks = DedupChunkCount(payload.size());
  if (need.size() != chunks) {
    return InvalidArgumentError("snapshot data: a need of " + std::to_string(need.size()) +
                                " chunks for a payload of " + std::to_string(chunks));
  }
  DataHeader h{.kind = DataKind::kChunks,
               .session = session,
               .counter = counter,
               .prefix_length = 0,
               .payload_length = NeededBytes(payload.size(), need)};
  MUSTER_ASSIGN_OR_RETURN(SealedWriter w, SealedWriter::Start(key, DataKind::kChunks, counter,
                                                              EncodeDataHeader(h), scratch, write));
  for (uint64_t i = 0; i < chunks; ++i) {
    if (!need[i]) continue;
    const auto [at, len] = ChunkSpan(payload.size(), i);
    MUSTER_RETURN_IF_ERROR(w.Seal(payload.substr(at, len)));
  }
  return w.Finish();
}

Status ReadDataChunks(const DataHeader& h, std::string_view header, const AeadKey& key,
                      const ChunkNeeds& need, std::string* payload, const DataReader& read) {
  if (h.kind != DataKind::kChunks || header.size() != kDataHeaderBytes) {
    return InvalidArgumentError("snapshot data: not the header of chunks");
  }
  const uint64_t chunks = DedupChunkCount(payload->size());
  if (need.size() != chunks) {
    return InvalidArgumentError("snapshot data: a need of " + std::to_string(need.size()) +
                                " chunks for a payload of " + std::to_string(chunks));
  }
  const uint64_t want = NeededBytes(payload->size(), need);
  if (h.prefix_length != 0 || h.payload_length != want) {
    return DataLossError("snapshot data: chunks " + std::to_string(h.counter) + " carry " +
                         std::to_string(h.prefix_length) + " + " +
                         std::to_string(h.payload_length) + " bytes, " + std::to_string(want) +
                         " were asked for");
  }
  MUSTER_ASSIGN_OR_RETURN(
      AeadStream s, Begin(AeadStream::Mode::kOpen, key, DataKind::kChunks, h.counter, header));
  for (uint64_t i = 0; i < chunks; ++i) {
    if (!need[i]) continue;
    const auto [at, len] = ChunkSpan(payload->size(), i);
    char* to = payload->data() + at;
    MUSTER_RETURN_IF_ERROR(read(to, len));
    MUSTER_RETURN_IF_ERROR(s.Update(to, to, len));
  }
  AeadTag tag;
  MUSTER_RETURN_IF_ERROR(read(reinterpret_cast<char*>(tag.data()), tag.size()));
  if (Status st = s.FinishOpen(tag); !st.ok()) {
    return DataLossError("snapshot data: chunks " + std::to_string(h.counter) + ": " +
                         st.message());
  }
  return Status::Ok();
}

}  // namespace muster::node_agent
