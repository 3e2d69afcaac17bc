// AES-256-GCM (common/aead.h): the NIST test vector, streaming in pieces and in place equal to
// one shot, and anything changed (a ciphertext bit, the tag, the associated data, the nonce, the
// key) fails to open with DataLoss.

#include "common/aead.h"

#include <gtest/gtest.h>

#include <set>

namespace muster {
namespace {

std::string Hex(std::string_view h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(std::string(h.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

template <typename A>
A Arr(std::string_view hex) {
  const std::string b = Hex(hex);
  A a{};
  std::copy(b.begin(), b.end(), a.begin());
  return a;
}

// GCM spec test case 16 (AES-256, 60-byte plaintext, 20-byte associated data).
const AeadKey kKey =
    Arr<AeadKey>("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
const AeadNonce kNonce = Arr<AeadNonce>("cafebabefacedbaddecaf888");
const std::string kAad = Hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
const std::string kPlain = Hex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6"
    "b525b16aedf5aa0de657ba637b39");
const std::string kSealed = Hex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b105682"
    "8838c5f61e6393ba7a0abcc9f662"
    "76fc6ece0f4e1768cddf8853bb2d551b");

TEST(AeadTest, MatchesTheGcmTestVector) {
  auto sealed = AeadSeal(kKey, kNonce, kAad, kPlain);
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  EXPECT_EQ(*sealed, kSealed);
  auto opened = AeadOpen(kKey, kNonce, kAad, kSealed);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, kPlain);
}

TEST(AeadTest, StreamingInPiecesAndInPlaceEqualsOneShot) {
  std::string plain(100003, '\0');
  for (size_t i = 0; i < plain.size(); ++i) plain[i] = static_cast<char>(i * 7 + i / 251);
  auto one = AeadSeal(kKey, kNonce, "aad", plain);
  ASSERT_TRUE(one.ok());
  // Sealed in place, in uneven pieces.
  std::string buf = plain;
  auto s = AeadStream::Begin(AeadStream::Mode::kSeal, kKey, kNonce, "aad");
  ASSERT_TRUE(s.ok()) << s.status();
  for (size_t at = 0, n = 1; at < buf.size(); at += n, n = n * 3 + 1) {
    n = std::min(n, buf.size() - at);
    ASSERT_TRUE(s->Update(buf.data() + at, buf.data() + at, n).ok());
  }
  AeadTag tag;
  ASSERT_TRUE(s->FinishSeal(&tag).ok());
  EXPECT_EQ(buf + std::string(tag.begin(), tag.end()), *one);
  // Opened in place, in pieces.
  auto o = AeadStream::Begin(AeadStream::Mode::kOpen, kKey, kNonce, "aad");
  ASSERT_TRUE(o.ok());
  ASSERT_TRUE(o->Update(buf.data(), buf.data(), 17).ok());
  ASSERT_TRUE(o->Update(buf.data() + 17, buf.data() + 17, buf.size() - 17).ok());
  EXPECT_TRUE(o->FinishOpen(tag).ok());
  EXPECT_EQ(buf, plain);
}

TEST(AeadTest, AnythingChangedFailsToOpen) {
  auto check = [](const AeadKey& k, const AeadNonce& n, std::string_view aad, std::string sealed) {
    auto got = AeadOpen(k, n, aad, sealed);
    EXPECT_EQ(got.status().code(), StatusCode::kDataLoss) << got.status();
  };
  std::string bad = kSealed;
  bad[3] ^= 0x20;
  check(kKey, kNonce, kAad, bad);  // a ciphertext bit
  bad = kSealed;
  bad.back() ^= 0x01;
  check(kKey, kNonce, kAad, bad);  // the tag
  check(kKey, kNonce, kAad.substr(1), kSealed);
  AeadNonce n = kNonce;
  n[11] ^= 1;
  check(kKey, n, kAad, kSealed);
  AeadKey k = kKey;
  k[0] ^= 1;
  check(k, kNonce, kAad, kSealed);
  check(kKey, kNonce, kAad, kSealed.substr(0, 10));  // shorter than a tag
  check(kKey, kNonce, kAad, kSealed.substr(1));      // truncated
}

TEST(AeadTest, RandomBytesDiffer) {
  std::set<std::string> seen;
  for (int i = 0; i < 16; ++i) {
    auto r = RandomBytes(32);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->size(), 32u);
    seen.insert(*r);
  }
  EXPECT_EQ(seen.size(), 16u);
}

}  // namespace
}  // namespace muster
