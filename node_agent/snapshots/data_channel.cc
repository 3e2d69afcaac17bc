#include "node_agent/snapshots/data_channel.h"

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
  if (k != static_cast<uint16_t>(kind)) {
    return DataLossError("snapshot data: message kind " + std::to_string(k) + ", expected " +
                         std::to_string(static_cast<uint16_t>(kind)));
  }
  h.kind = kind;
  std::memcpy(h.session.data(), in.data() + 8, kDataSessionIdBytes);
  h.counter = LoadLe<uint64_t>(in, 24);
  if (h.counter == 0) return DataLossError("snapshot data: counter 0");
  h.prefix_length = LoadLe<uint32_t>(in, 32);
  const uint32_t lo = kind == DataKind::kPut ? kMinPutPrefix : kMinReplyPrefix;
  const uint32_t hi = kind == DataKind::kPut ? kMaxPutPrefix : kMaxReplyPrefix;
  if (h.prefix_length < lo || h.prefix_length > hi) {
    return DataLossError("snapshot data: sealed prefix of " + std::to_string(h.prefix_length) +
                         " bytes is outside " + std::to_string(lo) + ".." + std::to_string(hi));
  }
  if (uint32_t r = LoadLe<uint32_t>(in, 36); r != 0) {
    return DataLossError("snapshot data: reserved field is " + std::to_string(r) + ", not 0");
  }
  h.payload_length = LoadLe<uint64_t>(in, 40);
  const uint64_t max = kind == DataKind::kPut ? max_payload : 0;
  if (h.payload_length > max) {
    return DataLossError("snapshot data: payload of " + std::to_string(h.payload_length) +
                         " bytes exceeds the limit of " + std::to_string(max));
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
  const std::string header = EncodeDataHeader(h);
  MUSTER_ASSIGN_OR_RETURN(AeadStream s,
                          Begin(AeadStream::Mode::kSeal, key, DataKind::kPut, counter, header));
  // The header and the sealed prefix lead the first chunk.
  std::string& buf = *scratch;
  buf.resize(std::max(buf.size(), kDataChunkBytes));
  std::memcpy(buf.data(), header.data(), header.size());
  size_t used = header.size();
  MUSTER_RETURN_IF_ERROR(s.Update(prefix.data(), buf.data() + used, prefix.size()));
  used += prefix.size();
  std::string_view payload = frame.payload;
  while (!payload.empty()) {
    const size_t n = std::min(payload.size(), kDataChunkBytes - used);
    MUSTER_RETURN_IF_ERROR(s.Update(payload.data(), buf.data() + used, n));
    used += n;
    payload.remove_prefix(n);
    if (used == kDataChunkBytes) {
      MUSTER_RETURN_IF_ERROR(write(std::string_view(buf.data(), used)));
      used = 0;
    }
  }
  AeadTag tag;
  MUSTER_RETURN_IF_ERROR(s.FinishSeal(&tag));
  if (used + tag.size() > kDataChunkBytes) {
    MUSTER_RETURN_IF_ERROR(write(std::string_view(buf.data(), used)));
    used = 0;
  }
  std::memcpy(buf.data() + used, tag.data(), tag.size());
  used += tag.size();
  return write(std::string_view(buf.data(), used));
}

StatusOr<checkpoint::SnapshotFrame> ReadDataPut(const DataHeader& h, std::string_view header,
                                                const AeadKey& key, uint64_t max_payload,
                                                const DataReader& read) {
  if (h.kind != DataKind::kPut || header.size() != kDataHeaderBytes) {
    return InvalidArgumentError("snapshot data: not the header of a put");
  }
  MUSTER_ASSIGN_OR_RETURN(AeadStream s,
                          Begin(AeadStream::Mode::kOpen, key, DataKind::kPut, h.counter, header));
  std::string prefix(h.prefix_length, '\0');
  MUSTER_RETURN_IF_ERROR(read(prefix.data(), prefix.size()));
  MUSTER_RETURN_IF_ERROR(s.Update(prefix.data(), prefix.data(), prefix.size()));
  // The payload lands in the buffer the store keeps, and is opened there.
  std::string payload(h.payload_length, '\0');
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

}  // namespace muster::node_agent
