#pragma once

// CURVE keys and the ZAP handler that decides which keys a server accepts.
//
// Without a ZAP handler, a ZeroMQ CURVE server accepts any client key: encryption without
// authentication. ZapAuthenticator closes that hole: it answers the context's ZAP requests
// (inproc://zeromq.zap.01) and accepts a CURVE client only if its public key is in the
// authorized set of the server socket's ZAP domain. Each refusal is logged with the peer's
// address and key.
//
// Key files are text, written 0600:
//   # muster CURVE key pair: keep this file secret
//   public-key = <40 z85 chars>
//   secret-key = <40 z85 chars>
// Public key files hold the `public-key` line only. An authorized-keys file has one
// `<z85 public key> [name]` per line; `#` starts a comment.

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/reactor.h"
#include "common/status.h"

namespace muster {

struct KeyPair {
  std::string public_key;  // z85, 40 chars
  std::string secret_key;  // z85, 40 chars; empty for a public-only key
};

StatusOr<KeyPair> GenerateKeyPair();
// Derives the public key from a z85 secret key.
StatusOr<std::string> PublicKeyFromSecret(const std::string& secret_z85);
// True if `z85` is a well-formed 40-character z85 CURVE key.
bool IsValidZ85Key(const std::string& z85);

// Writes `keys` to `path` with mode 0600 (the secret key only if present). Refuses to replace
// an existing file unless `overwrite`.
Status SaveKeyPair(const std::filesystem::path& path, const KeyPair& keys, bool overwrite);
// Reads a key pair (or a public-only key file, leaving secret_key empty).
StatusOr<KeyPair> LoadKeyPair(const std::filesystem::path& path);

struct AuthorizedKey {
  std::string public_key;
  std::string name;
};
StatusOr<std::vector<AuthorizedKey>> LoadAuthorizedKeys(const std::filesystem::path& path);
Status SaveAuthorizedKeys(const std::filesystem::path& path, const std::vector<AuthorizedKey>& keys,
                          bool overwrite);

// The files of a keys directory (`muster keys init`; `--keys DIR` or $MUSTER_KEYS elsewhere).
struct KeysDir {
  std::filesystem::path dir;
  std::filesystem::path coordinator_key() const { return dir / "coordinator.key"; }
  std::filesystem::path coordinator_pub() const { return dir / "coordinator.pub"; }
  std::filesystem::path client_key() const { return dir / "client.key"; }
  std::filesystem::path authorized_keys() const { return dir / "authorized_keys"; }

  // `flag` if non-empty, else $MUSTER_KEYS, else ~/.muster.
  static KeysDir Resolve(const std::string& flag);
};

// Writes a coordinator key pair, a client key pair and an authorized-keys list holding the
// client's public key. Refuses (FailedPrecondition, naming the file) if any exists, unless
// `force`. Directory made 0700.
Status InitKeysDir(const KeysDir& keys, bool force);

// Answers ZAP requests for every server socket in one ZeroMQ context. Runs on a reactor, which
// owns its socket.
//
// Thread-safety: Authorize/Revoke/SetAuthorized are thread-safe; the rest runs on the reactor.
class ZapAuthenticator {
 public:
  // Binds inproc://zeromq.zap.01 in reactor.context() and registers with the reactor. Only one
  // authenticator may exist per context. REQUIRES: called on the reactor thread or before
  // reactor.Start().
  static StatusOr<std::unique_ptr<ZapAuthenticator>> Create(Reactor& reactor);
  // REQUIRES: called on the reactor thread, or after the reactor stopped.
  ~ZapAuthenticator();

  // The keys accepted by server sockets whose ZMQ_ZAP_DOMAIN is `domain`. The key's name
  // becomes the connection's User-Id (zmq_msg_gets(msg, "User-Id")).
  void SetAuthorized(const std::string& domain, const std::vector<AuthorizedKey>& keys);
  void Authorize(const std::string& domain, const AuthorizedKey& key);
  void Revoke(const std::string& domain, const std::string& public_key);

  // Connections without CURVE (NULL mechanism) reach only servers that were started insecure;
  // ZAP sees them too and lets them through.
  uint64_t refused_count() const;

 private:
  explicit ZapAuthenticator(Reactor& reactor);
  void OnRequest();

  Reactor& reactor_;
  zmq::socket_t socket_;
  mutable std::mutex mu_;
  std::map<std::string, std::map<std::string, std::string>> keys_;  // GUARDED_BY(mu_)
  uint64_t refused_ = 0;                                            // GUARDED_BY(mu_)
};

}  // namespace muster
