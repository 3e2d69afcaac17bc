// The frames of a local socket (common/local_rpc.h: a 4-byte little-endian length, then the
// message), as LocalRpcServer reads what any process of the agent's user writes to a relay's
// socket and LocalRpcClient reads its replies. Whatever the bytes and however they are cut into
// reads, LocalFrameReader yields exactly the frames a direct reading of the whole stream gives,
// none over the limit, and stops at the first header past it; `missing` never asks for 0 bytes
// while it needs more. Every frame is also parsed as an Envelope (refused or parsed, never a
// crash). Input: a byte for the limit, a byte for the read sizes, then the stream.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "common/local_rpc.h"
#include "common/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int64_t limit = 1 + data[0] * 4;  // 1..1021: small, so that headers often exceed it
  const uint8_t cut = data[1];
  std::string_view stream(reinterpret_cast<const char*>(data) + 2, size - 2);

  // The stream read directly.
  std::vector<std::string> want;
  bool want_too_large = false;
  for (size_t at = 0;;) {
    if (stream.size() - at < muster::kLocalFrameHeader) break;
    const auto* b = reinterpret_cast<const unsigned char*>(stream.data() + at);
    const uint64_t len = b[0] | b[1] << 8 | b[2] << 16 | static_cast<uint64_t>(b[3]) << 24;
    if (static_cast<int64_t>(len) > limit) {
      want_too_large = true;
      break;
    }
    if (stream.size() - at - muster::kLocalFrameHeader < len) break;
    want.emplace_back(stream.substr(at + muster::kLocalFrameHeader, len));
    at += muster::kLocalFrameHeader + len;
  }

  // The same through the reader, in reads of 1..16 bytes as `cut` says, alternating between
  // Append and Prepare/Commit.
  muster::LocalFrameReader in(limit);
  std::vector<std::string> got;
  bool too_large = false;
  size_t at = 0;
  for (int step = 0; at < stream.size() && !too_large; ++step) {
    const size_t n = std::min<size_t>(1 + ((cut >> (step % 4)) + step) % 16, stream.size() - at);
    if (step % 2 == 0) {
      in.Append(stream.data() + at, n);
    } else {
      char* into = in.Prepare(n + 7);
      std::copy(stream.data() + at, stream.data() + at + n, into);
      in.Commit(n);
    }
    at += n;
    for (;;) {
      std::string_view frame;
      uint64_t announced = 0;
      auto r = in.Next(&frame, &announced);
      if (r == muster::LocalFrameReader::Result::kNeedMore) {
        if (in.missing() == 0) std::abort();
        break;
      }
      if (r == muster::LocalFrameReader::Result::kTooLarge) {
        if (static_cast<int64_t>(announced) <= limit) std::abort();
        too_large = true;
        break;
      }
      if (static_cast<int64_t>(frame.size()) > limit) std::abort();
      (void)muster::ParseEnvelope(frame.data(), frame.size());
      got.emplace_back(frame);
    }
  }
  if (got != want || too_large != want_too_large) std::abort();
  return 0;
}
