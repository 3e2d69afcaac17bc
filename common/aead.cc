#include "common/aead.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <climits>

namespace muster {
namespace {

std::string OpenSslError(const char* what) {
  unsigned long e = ERR_get_error();
  char buf[256] = "unknown error";
  if (e != 0) ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return std::string("aes-256-gcm: ") + what + ": " + buf;
}

}  // namespace

StatusOr<std::string> RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (n > static_cast<size_t>(INT_MAX) ||
      RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    return InternalError(OpenSslError("random bytes"));
  }
  return out;
}

struct AeadStream::Ctx {
  EVP_CIPHER_CTX* ctx = nullptr;
  ~Ctx() {
    if (ctx != nullptr) EVP_CIPHER_CTX_free(ctx);
  }
};

AeadStream::AeadStream(Mode mode, std::unique_ptr<Ctx> ctx) : mode_(mode), ctx_(std::move(ctx)) {}
AeadStream::AeadStream(AeadStream&&) noexcept = default;
AeadStream& AeadStream::operator=(AeadStream&&) noexcept = default;
AeadStream::~AeadStream() = default;

StatusOr<AeadStream> AeadStream::Begin(Mode mode, const AeadKey& key, const AeadNonce& nonce,
                                       std::string_view aad) {
  auto c = std::make_unique<Ctx>();
  c->ctx = EVP_CIPHER_CTX_new();
  if (c->ctx == nullptr) return InternalError(OpenSslError("new context"));
  const int enc = mode == Mode::kSeal ? 1 : 0;
  // The default GCM nonce length is 12 bytes (kAeadNonceBytes).
  if (EVP_CipherInit_ex(c->ctx, EVP_aes_256_gcm(), nullptr, key.data(), nonce.data(), enc) != 1) {
    return InternalError(OpenSslError("init"));
  }
  while (!aad.empty()) {
    const int n = static_cast<int>(std::min<size_t>(aad.size(), INT_MAX));
    int out = 0;
    if (EVP_CipherUpdate(c->ctx, nullptr, &out, reinterpret_cast<const unsigned char*>(aad.data()),
                         n) != 1) {
      return InternalError(OpenSslError("associated data"));
    }
    aad.remove_prefix(static_cast<size_t>(n));
  }
  return AeadStream(mode, std::move(c));
}

Status AeadStream::Update(const void* in, void* out, size_t n) {
  if (finished_) return FailedPreconditionError("aes-256-gcm: update after finish");
  auto* i = static_cast<const unsigned char*>(in);
  auto* o = static_cast<unsigned char*>(out);
  while (n > 0) {
    // Multiples of the block size keep GCM's partial block state empty between pieces; OpenSSL
    // handles any size, this only bounds the int.
    const int chunk = static_cast<int>(std::min<size_t>(n, size_t{1} << 30));
    int done = 0;
    if (EVP_CipherUpdate(ctx_->ctx, o, &done, i, chunk) != 1 || done != chunk) {
      return InternalError(OpenSslError("update"));
    }
    i += chunk;
    o += chunk;
    n -= static_cast<size_t>(chunk);
  }
  return Status::Ok();
}

Status AeadStream::FinishSeal(AeadTag* tag) {
  if (mode_ != Mode::kSeal || finished_) {
    return FailedPreconditionError("aes-256-gcm: not a seal in progress");
  }
  finished_ = true;
  int out = 0;
  unsigned char none[16];
  if (EVP_EncryptFinal_ex(ctx_->ctx, none, &out) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx_->ctx, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kAeadTagBytes),
                          tag->data()) != 1) {
    return InternalError(OpenSslError("final"));
  }
  return Status::Ok();
}

Status AeadStream::FinishOpen(const AeadTag& tag) {
  if (mode_ != Mode::kOpen || finished_) {
    return FailedPreconditionError("aes-256-gcm: not an open in progress");
  }
  finished_ = true;
  AeadTag t = tag;  // the ctrl takes a non-const pointer
  if (EVP_CIPHER_CTX_ctrl(ctx_->ctx, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kAeadTagBytes),
                          t.data()) != 1) {
    return InternalError(OpenSslError("set tag"));
  }
  int out = 0;
  unsigned char none[16];
  if (EVP_DecryptFinal_ex(ctx_->ctx, none, &out) != 1) {
    ERR_clear_error();
    return DataLossError("aes-256-gcm: the tag does not authenticate the message");
  }
  return Status::Ok();
}

StatusOr<std::string> AeadSeal(const AeadKey& key, const AeadNonce& nonce, std::string_view aad,
                               std::string_view plaintext) {
  MUSTER_ASSIGN_OR_RETURN(AeadStream s,
                          AeadStream::Begin(AeadStream::Mode::kSeal, key, nonce, aad));
  std::string out(plaintext.size() + kAeadTagBytes, '\0');
  MUSTER_RETURN_IF_ERROR(s.Update(plaintext.data(), out.data(), plaintext.size()));
  AeadTag tag;
  MUSTER_RETURN_IF_ERROR(s.FinishSeal(&tag));
  std::copy(tag.begin(), tag.end(), out.begin() + static_cast<std::ptrdiff_t>(plaintext.size()));
  return out;
}

StatusOr<std::string> AeadOpen(const AeadKey& key, const AeadNonce& nonce, std::string_view aad,
                               std::string_view sealed) {
  if (sealed.size() < kAeadTagBytes) {
    return DataLossError("aes-256-gcm: " + std::to_string(sealed.size()) +
                         " bytes are shorter than a tag");
  }
  const size_t n = sealed.size() - kAeadTagBytes;
  MUSTER_ASSIGN_OR_RETURN(AeadStream s,
                          AeadStream::Begin(AeadStream::Mode::kOpen, key, nonce, aad));
  std::string out(n, '\0');
  MUSTER_RETURN_IF_ERROR(s.Update(sealed.data(), out.data(), n));
  AeadTag tag;
  std::copy(sealed.begin() + static_cast<std::ptrdiff_t>(n), sealed.end(), tag.begin());
  MUSTER_RETURN_IF_ERROR(s.FinishOpen(tag));
  return out;
}

}  // namespace muster
