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
// `<z85 public key> [name] role=<admin|client|agent> [nodes=a,b] [provider=P] [island=I]` per
// line; `#` starts a comment. The last three are an agent key's scope (key_scope.h): only on
// role=agent lines. A line
// without `role=` is a legacy entry (written before keys had roles): it keeps the rights every
// key had then (admin and agent), and loading it logs a loud warning; `muster keys migrate`
// gives such entries a role (docs/security.md).

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/key_scope.h"
#include "common/reactor.h"
#include "common/status.h"

namespace muster {

// The connection property (ZAP metadata) holding the client's z85 public key.
inline constexpr char kPublicKeyProperty[] = "X-Muster-Key";

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

// What a key may ask of the coordinator (docs/security.md has the table).
enum class KeyRole {
  kNone,    // authorized on a server other than the coordinator (store scopes, transfer grants)
  kAdmin,   // every job and node; no agent requests
  kClient,  // its own jobs only
  kAgent,   // agent requests only, for the nodes bound to it
  kLegacy,  // an authorized-keys line without a role, or an insecure coordinator: admin + agent
};
std::string_view KeyRoleName(KeyRole role);
// "admin", "client" or "agent"; InvalidArgument naming the valid roles otherwise.
StatusOr<KeyRole> ParseKeyRole(std::string_view name);

struct AuthorizedKey {
  std::string public_key;
  std::string name;
  KeyRole role = KeyRole::kNone;
  KeyScope scope{};  // what an agent key may register as; empty: anything
};
// Refuses (InvalidArgument, naming file and line) malformed keys, unknown roles, a key listed
// twice, a malformed scope or a scope on a line that is not role=agent. Legacy lines (no role) load
// as kLegacy with a warning per file load.
StatusOr<std::vector<AuthorizedKey>> LoadAuthorizedKeys(const std::filesystem::path& path);
Status SaveAuthorizedKeys(const std::filesystem::path& path, const std::vector<AuthorizedKey>& keys,
                          bool overwrite);

// The files of a keys directory (`muster keys init`; `--keys DIR` or $MUSTER_KEYS elsewhere).
struct KeysDir {
  std::filesystem::path dir;
  std::filesystem::path coordinator_key() const { return dir / "coordinator.key"; }
  std::filesystem::path coordinator_pub() const { return dir / "coordinator.pub"; }
  std::filesystem::path client_key() const { return dir / "client.key"; }
  std::filesystem::path agent_key() const { return dir / "agent.key"; }
  // The key a node agent uses by default: agent.key, or client.key in a directory made before
  // keys had roles.
  std::filesystem::path agent_key_or_client_key() const;
  std::filesystem::path authorized_keys() const { return dir / "authorized_keys"; }
  // The bearer token of the coordinator's HTTP side when bound beyond loopback (64 hex chars).
  std::filesystem::path http_token() const { return dir / "http_token"; }

  // `flag` if non-empty, else $MUSTER_KEYS, else ~/.muster.
  static KeysDir Resolve(const std::string& flag);
};

// Writes a coordinator key pair, an admin key pair for the local CLI (client.key), an agent key
// pair for the agents of this directory (agent.key), an authorized-keys list holding both
// public keys with their roles, and a random bearer token for the HTTP side (http_token, 0600).
// Refuses (FailedPrecondition, naming the file) if any exists, unless `force`. Directory made 0700.
Status InitKeysDir(const KeysDir& keys, bool force);

// The HTTP bearer token of `keys` (trimmed). FailedPrecondition when there is none or it is
// shorter than 32 characters, saying how to make one.
StatusOr<std::string> LoadHttpToken(const KeysDir& keys);

// Makes a key pair, writes it to `key_file` (0600; refuses to replace one) and appends its public
// key with `name`, `role` and `scope` to the directory's authorized_keys. Refuses a name or key
// already listed, a name with whitespace or '#' (or that reads as a role or scope word), a bad
// scope (ValidateKeyScope), and a scope for a role other than agent.
StatusOr<KeyPair> AddKey(const KeysDir& keys, const std::string& name, KeyRole role,
                         const std::filesystem::path& key_file, const KeyScope& scope = {});

// Gives every legacy (role-less) line of authorized_keys the role `role` and writes the file back
// (atomically). If the directory has no agent.key yet, also makes one with role agent, so that
// agents sharing the old client key can move to it. Returns how many lines changed.
StatusOr<int> MigrateKeysDir(const KeysDir& keys, KeyRole role);

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
  // becomes the connection's User-Id (zmq_msg_gets(msg, "User-Id")), and its z85 public key the
  // connection's "X-Muster-Key" property (kPublicKeyProperty), so a server can check each
  // message against the current set (Lookup): a key removed here stops being served on the
  // connections it already opened, not only on new ones.
  void SetAuthorized(const std::string& domain, const std::vector<AuthorizedKey>& keys);
  void Authorize(const std::string& domain, const AuthorizedKey& key);
  void Revoke(const std::string& domain, const std::string& public_key);
  // The key as authorized now for `domain`; nullopt if it is not (any more).
  std::optional<AuthorizedKey> Lookup(const std::string& domain,
                                      const std::string& public_key) const;

  // Connections without CURVE (NULL mechanism) reach only servers that were started insecure;
  // ZAP sees them too and lets them through.
  uint64_t refused_count() const;

 private:
  explicit ZapAuthenticator(Reactor& reactor);
  void OnRequest();

  Reactor& reactor_;
  zmq::socket_t socket_;
  mutable std::mutex mu_;
  std::map<std::string, std::map<std::string, AuthorizedKey>> keys_;  // GUARDED_BY(mu_)
  uint64_t refused_ = 0;                                              // GUARDED_BY(mu_)
};

}  // namespace muster
