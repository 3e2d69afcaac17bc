// The snapshot data channel's messages (node_agent/snapshots/data_channel.h), as a peer agent's
// data connection reads them from anyone who reaches its port. Never crashes, and:
//  - raw input read as a PUT or a REPLY under a fixed key never opens (it would need a forged
//    AES-GCM tag);
//  - input sealed correctly as a PUT's plaintext (any frame prefix and payload) opens only to a
//    frame that re-encodes to exactly those bytes;
//  - a frame from the input, sealed, with one byte flipped anywhere (header, ciphertext or tag)
//    is always refused;
//  - a reply carrying a status from the input opens to that status.

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
  for (DataKind kind : {DataKind::kPut, DataKind::kReply}) {
    auto h = muster::node_agent::DecodeDataHeader(header, kind, kLimit);
    if (!h.ok()) continue;
    std::string_view rest = data.substr(kDataHeaderBytes);
    if (kind == DataKind::kPut) {
      auto f = muster::node_agent::ReadDataPut(*h, header, FixedKey(), kLimit, ReaderOf(rest));
      if (f.ok()) std::abort();  // a forged tag
    } else {
      Status carried;
      if (muster::node_agent::ReadDataReply(*h, header, FixedKey(), ReaderOf(rest), &carried).ok())
        std::abort();
    }
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  RawInput(in);
  SealedPlaintext(in);
  FlippedFrame(in);
  ReplyRoundTrip(in);
  return 0;
}
