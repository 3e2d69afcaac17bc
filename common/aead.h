#pragma once

// AES-256-GCM sealing and opening (OpenSSL's EVP, which uses AES-NI and PCLMUL where the CPU has
// them), for bulk data whose key was agreed over an authenticated channel (the in-memory snapshot
// data channel, node_agent/snapshots/peer_copy.h). CURVE (libsodium's crypto_box) stays what
// authenticates peers; this only seals the bytes once a key is shared. On this project's 2-core
// machine, sealing 1608 KiB takes 0.53 ms here against 2.35 ms with crypto_box and 1.77 ms with
// libsodium's own AES-256-GCM.
//
// Streaming: AeadStream seals or opens one message in pieces (Update, then Finish), so a sender
// can seal straight into the buffer it sends and a receiver can open in place, in the buffer it
// keeps. In and out may be the same buffer; otherwise they must not overlap.
//
// Rules for callers: a (key, nonce) pair must never seal two messages (GCM then leaks the
// key stream and the authentication key); a message's plaintext must not be used until Finish
// has returned Ok for it (the tag is only checked there).
//
// Thread-safety: an AeadStream is used by one thread at a time; the free functions are
// thread-safe.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"

namespace muster {

inline constexpr size_t kAeadKeyBytes = 32;
inline constexpr size_t kAeadNonceBytes = 12;
inline constexpr size_t kAeadTagBytes = 16;

using AeadKey = std::array<uint8_t, kAeadKeyBytes>;
using AeadNonce = std::array<uint8_t, kAeadNonceBytes>;
using AeadTag = std::array<uint8_t, kAeadTagBytes>;

// `n` bytes from OpenSSL's CSPRNG. Internal when it fails.
StatusOr<std::string> RandomBytes(size_t n);

class AeadStream {
 public:
  enum class Mode { kSeal, kOpen };
  // Starts one message under `key` and `nonce`, authenticating `aad` with it.
  static StatusOr<AeadStream> Begin(Mode mode, const AeadKey& key, const AeadNonce& nonce,
                                    std::string_view aad);
  AeadStream(AeadStream&&) noexcept;
  AeadStream& operator=(AeadStream&&) noexcept;
  ~AeadStream();

  // Seals or opens the next `n` bytes of the message from `in` into `out` (may be `in`).
  Status Update(const void* in, void* out, size_t n);
  // Seal: the tag, written to `*tag`. REQUIRES: Mode::kSeal.
  Status FinishSeal(AeadTag* tag);
  // Open: Ok when `tag` authenticates the aad and every byte given to Update; DataLoss
  // otherwise (the plaintext written must then be thrown away). REQUIRES: Mode::kOpen.
  Status FinishOpen(const AeadTag& tag);

 private:
  struct Ctx;
  AeadStream(Mode mode, std::unique_ptr<Ctx> ctx);
  Mode mode_;
  std::unique_ptr<Ctx> ctx_;
  bool finished_ = false;
};

// One-shot forms for small messages: `plaintext` sealed, followed by its tag; and the plaintext
// of such bytes (DataLoss when shorter than a tag or when the tag does not match).
StatusOr<std::string> AeadSeal(const AeadKey& key, const AeadNonce& nonce, std::string_view aad,
                               std::string_view plaintext);
StatusOr<std::string> AeadOpen(const AeadKey& key, const AeadNonce& nonce, std::string_view aad,
                               std::string_view sealed);

}  // namespace muster
