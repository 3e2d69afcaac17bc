// The compressed form of a gather result between the store and the relays
// (collectives/rendezvous_codec.h): it round-trips, and every frame it must not trust (not zstd,
// no stated size, too large, truncated, trailing bytes, a size that lies) is a DataLoss naming
// what is wrong, never a crash or an unbounded allocation.

#include "collectives/rendezvous_codec.h"

#include <gtest/gtest.h>
#include <zstd.h>

#include <string>

namespace muster::collectives {
namespace {

std::string Entries() {
  std::string s;
  for (int i = 0; i < 4096; ++i) {
    std::string e = "tcp://198.18.0.1:" + std::to_string(20000 + i);
    e.resize(64, ' ');
    s += e;
  }
  return s;
}

void ExpectDataLoss(const StatusOr<std::string>& r, const std::string& words) {
  ASSERT_FALSE(r.ok()) << words;
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status();
  EXPECT_NE(r.status().message().find(words), std::string::npos) << r.status();
}

TEST(RendezvousCodecTest, AGatherResultRoundTripsThroughOneSmallerFrame) {
  const std::string raw = Entries();
  const std::string z = CompressGathered(raw);
  ASSERT_FALSE(z.empty());
  EXPECT_LT(z.size(), raw.size() / 8);
  EXPECT_EQ(ZSTD_getFrameContentSize(z.data(), z.size()), raw.size());
  auto back = InflateGathered(z, static_cast<int64_t>(raw.size()));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, raw);
  auto empty = InflateGathered(CompressGathered(""), 0);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->empty());
}

TEST(RendezvousCodecTest, FramesThatCannotBeTrustedAreDataLoss) {
  const std::string raw = Entries();
  const std::string z = CompressGathered(raw);
  ExpectDataLoss(InflateGathered("not a zstd frame at all", 1 << 20), "is not a zstd frame");
  ExpectDataLoss(InflateGathered("", 1 << 20), "is not a zstd frame");
  // Bounded before anything is allocated: the header's size is checked against the limit.
  ExpectDataLoss(InflateGathered(z, static_cast<int64_t>(raw.size()) - 1),
                 "would inflate to 262144 bytes, over the limit of 262143");
  ExpectDataLoss(InflateGathered(z.substr(0, z.size() - 3), 1 << 20), "not exactly one zstd frame");
  ExpectDataLoss(InflateGathered(z + "x", 1 << 20), "not exactly one zstd frame");
  ExpectDataLoss(InflateGathered(z + z, 1 << 20), "not exactly one zstd frame");
  // A frame that does not state its size (made by the streaming API without it).
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 0);
  std::string unsized(ZSTD_compressBound(raw.size()), '\0');
  ZSTD_outBuffer out{unsized.data(), unsized.size(), 0};
  ZSTD_inBuffer in{raw.data(), raw.size(), 0};
  ASSERT_EQ(ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end), 0u);
  ZSTD_freeCCtx(cctx);
  unsized.resize(out.pos);
  ExpectDataLoss(InflateGathered(unsized, 1 << 20), "does not state its size");
  // A header whose size lies: a corrupted block after a valid header.
  std::string corrupt = z;
  for (size_t i = corrupt.size() / 2; i < corrupt.size() - 4; ++i) corrupt[i] ^= 0x5a;
  auto r = InflateGathered(corrupt, 1 << 20);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status();
}

}  // namespace
}  // namespace muster::collectives
