#include "common/curve.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "common/logging.h"
#include "common/strings.h"

namespace muster {
namespace fs = std::filesystem;

namespace {

Status WriteFileMode(const fs::path& path, const std::string& content, mode_t mode,
                     bool overwrite) {
  int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL);
  int fd = ::open(path.c_str(), flags, mode);
  if (fd < 0) {
    if (errno == EEXIST) {
      return FailedPreconditionError(path.string() + " exists (use --force to replace it)");
    }
    return ErrnoStatus(errno, "open " + path.string());
  }
  Status st;
  if (::fchmod(fd, mode) != 0) st = ErrnoStatus(errno, "chmod " + path.string());
  size_t off = 0;
  while (st.ok() && off < content.size()) {
    ssize_t n = ::write(fd, content.data() + off, content.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      st = ErrnoStatus(errno, "write " + path.string());
    } else {
      off += static_cast<size_t>(n);
    }
  }
  if (st.ok() && ::fsync(fd) != 0) st = ErrnoStatus(errno, "fsync " + path.string());
  ::close(fd);
  return st;
}

StatusOr<std::string> ReadFile(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return ErrnoStatus(errno ? errno : ENOENT, "open " + path.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

bool IsValidZ85Key(const std::string& z85) {
  if (z85.size() != 40) return false;
  std::array<uint8_t, 32> raw;
  return zmq_z85_decode(raw.data(), z85.c_str()) != nullptr;
}

StatusOr<KeyPair> GenerateKeyPair() {
  char pub[41], sec[41];
  if (zmq_curve_keypair(pub, sec) != 0) {
    return FailedPreconditionError(std::string("zmq_curve_keypair: ") + zmq_strerror(zmq_errno()) +
                                   " (libzmq was built without CURVE support)");
  }
  return KeyPair{pub, sec};
}

StatusOr<std::string> PublicKeyFromSecret(const std::string& secret_z85) {
  if (!IsValidZ85Key(secret_z85)) return InvalidArgumentError("malformed z85 secret key");
  char pub[41];
  if (zmq_curve_public(pub, secret_z85.c_str()) != 0) {
    return InternalError(std::string("zmq_curve_public: ") + zmq_strerror(zmq_errno()));
  }
  return std::string(pub);
}

Status SaveKeyPair(const fs::path& path, const KeyPair& keys, bool overwrite) {
  std::string content;
  if (!keys.secret_key.empty()) {
    content = "# muster CURVE key pair: keep this file secret\n";
  } else {
    content = "# muster CURVE public key\n";
  }
  content += "public-key = " + keys.public_key + "\n";
  if (!keys.secret_key.empty()) content += "secret-key = " + keys.secret_key + "\n";
  return WriteFileMode(path, content, keys.secret_key.empty() ? 0644 : 0600, overwrite);
}

StatusOr<KeyPair> LoadKeyPair(const fs::path& path) {
  MUSTER_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  KeyPair keys;
  std::istringstream in(text);
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    line = TrimCopy(line);
    if (line.empty() || line[0] == '#') continue;
    size_t eq = line.find('=');
    if (eq == std::string::npos) {
      return InvalidArgumentError(path.string() + ":" + std::to_string(lineno) +
                                  ": expected 'public-key = ...' or 'secret-key = ...'");
    }
    std::string k = TrimCopy(line.substr(0, eq)), v = TrimCopy(line.substr(eq + 1));
    if (!IsValidZ85Key(v)) {
      return InvalidArgumentError(path.string() + ":" + std::to_string(lineno) +
                                  ": not a 40-character z85 key");
    }
    if (k == "public-key") {
      keys.public_key = v;
    } else if (k == "secret-key") {
      keys.secret_key = v;
    } else {
      return InvalidArgumentError(path.string() + ":" + std::to_string(lineno) +
                                  ": unknown field '" + k + "'");
    }
  }
  if (!keys.secret_key.empty()) {
    MUSTER_ASSIGN_OR_RETURN(std::string derived, PublicKeyFromSecret(keys.secret_key));
    if (!keys.public_key.empty() && keys.public_key != derived) {
      return InvalidArgumentError(path.string() + ": public-key does not match secret-key");
    }
    keys.public_key = derived;
  }
  if (keys.public_key.empty()) return InvalidArgumentError(path.string() + ": no key found");
  return keys;
}

std::string_view KeyRoleName(KeyRole role) {
  switch (role) {
    case KeyRole::kAdmin:
      return "admin";
    case KeyRole::kClient:
      return "client";
    case KeyRole::kAgent:
      return "agent";
    case KeyRole::kLegacy:
      return "legacy";
    case KeyRole::kNone:
      break;
  }
  return "none";
}

StatusOr<KeyRole> ParseKeyRole(std::string_view name) {
  if (name == "admin") return KeyRole::kAdmin;
  if (name == "client") return KeyRole::kClient;
  if (name == "agent") return KeyRole::kAgent;
  return InvalidArgumentError("unknown key role '" + std::string(name) +
                              "' (want admin, client or agent)");
}

namespace {

// One line of an authorized-keys file, comments stripped; false for a blank line.
StatusOr<bool> ParseAuthorizedLine(std::string line, AuthorizedKey* key, bool* has_role) {
  // '#' is also a z85 character: it starts a comment only at the start of a line or after
  // whitespace.
  line = TrimCopy(line);
  for (size_t i = 0; i < line.size(); ++i) {
    if (line[i] == '#' && (i == 0 || line[i - 1] == ' ' || line[i - 1] == '\t')) {
      line = TrimCopy(line.substr(0, i));
      break;
    }
  }
  if (line.empty()) return false;
  std::istringstream fields(line);
  std::string word;
  fields >> key->public_key;
  if (!IsValidZ85Key(key->public_key)) {
    return InvalidArgumentError("not a 40-character z85 public key");
  }
  *has_role = false;
  key->role = KeyRole::kLegacy;
  std::string name;
  while (fields >> word) {
    if (word.rfind("role=", 0) == 0) {
      if (*has_role) return InvalidArgumentError("role given twice");
      MUSTER_ASSIGN_OR_RETURN(key->role, ParseKeyRole(std::string_view(word).substr(5)));
      *has_role = true;
      continue;
    }
    MUSTER_ASSIGN_OR_RETURN(bool scope_word, ParseKeyScopeWord(word, &key->scope));
    if (scope_word) continue;
    name += (name.empty() ? "" : " ") + word;
  }
  if (!key->scope.empty() && key->role != KeyRole::kAgent) {
    return InvalidArgumentError(fmt::format(
        "a scope ({}) is only for agent keys, and this line has {}", key->scope.LineWords(),
        *has_role ? "role=" + std::string(KeyRoleName(key->role)) : std::string("no role=")));
  }
  key->name = name.empty() ? key->public_key.substr(0, 8) : name;
  return true;
}

Status WriteFileAtomically(const fs::path& path, const std::string& content, mode_t mode) {
  fs::path tmp = path;
  tmp += ".tmp";
  MUSTER_RETURN_IF_ERROR(WriteFileMode(tmp, content, mode, /*overwrite=*/true));
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec)
    return InternalError("rename " + tmp.string() + " to " + path.string() + ": " + ec.message());
  return Status::Ok();
}

}  // namespace

StatusOr<std::vector<AuthorizedKey>> LoadAuthorizedKeys(const fs::path& path) {
  MUSTER_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::vector<AuthorizedKey> out;
  std::map<std::string, int> seen;  // public key -> line
  std::istringstream in(text);
  std::string line;
  int lineno = 0;
  int legacy = 0;
  while (std::getline(in, line)) {
    ++lineno;
    AuthorizedKey key;
    bool has_role = false;
    auto got = ParseAuthorizedLine(line, &key, &has_role);
    if (!got.ok()) {
      return InvalidArgumentError(path.string() + ":" + std::to_string(lineno) + ": " +
                                  got.status().message());
    }
    if (!*got) continue;
    if (auto [it, fresh] = seen.emplace(key.public_key, lineno); !fresh) {
      return InvalidArgumentError(path.string() + ":" + std::to_string(lineno) + ": key " +
                                  key.public_key + " is already listed on line " +
                                  std::to_string(it->second));
    }
    if (!has_role) ++legacy;
    out.push_back(std::move(key));
  }
  if (legacy > 0) {
    log::Get("auth")->warn(
        "{}: {} key(s) without a role (written before keys had roles): each keeps admin AND "
        "agent rights. Give every key a role: run `muster keys migrate --dir {}` (see "
        "docs/security.md)",
        path.string(), legacy, path.parent_path().string());
  }
  return out;
}

Status SaveAuthorizedKeys(const fs::path& path, const std::vector<AuthorizedKey>& keys,
                          bool overwrite) {
  std::string content =
      "# Public keys the muster coordinator accepts: '<z85 public key> <name> role=<admin|client|"
      "agent>' per line.\n";
  for (const auto& k : keys) {
    content += k.public_key + " " + k.name;
    if (k.role == KeyRole::kAdmin || k.role == KeyRole::kClient || k.role == KeyRole::kAgent) {
      content += " role=" + std::string(KeyRoleName(k.role));
    }
    if (!k.scope.empty()) content += " " + k.scope.LineWords();
    content += "\n";
  }
  return WriteFileMode(path, content, 0644, overwrite);
}

fs::path KeysDir::agent_key_or_client_key() const {
  std::error_code ec;
  return fs::exists(agent_key(), ec) ? agent_key() : client_key();
}

KeysDir KeysDir::Resolve(const std::string& flag) {
  if (!flag.empty()) return {flag};
  if (auto env = EnvValue("MUSTER_KEYS")) return {*env};
  return {fs::path(EnvValue("HOME").value_or("/root")) / ".muster"};
}

Status InitKeysDir(const KeysDir& keys, bool force) {
  std::error_code ec;
  fs::create_directories(keys.dir, ec);
  if (ec) return InternalError("create " + keys.dir.string() + ": " + ec.message());
  ::chmod(keys.dir.c_str(), 0700);
  if (!force) {
    for (const fs::path& p : {keys.coordinator_key(), keys.coordinator_pub(), keys.client_key(),
                              keys.authorized_keys()}) {
      if (fs::exists(p)) {
        return FailedPreconditionError(p.string() +
                                       " exists; refusing to overwrite keys (use --force)");
      }
    }
  }
  MUSTER_ASSIGN_OR_RETURN(KeyPair coord, GenerateKeyPair());
  MUSTER_ASSIGN_OR_RETURN(KeyPair client, GenerateKeyPair());
  MUSTER_ASSIGN_OR_RETURN(KeyPair agent, GenerateKeyPair());
  MUSTER_RETURN_IF_ERROR(SaveKeyPair(keys.coordinator_key(), coord, force));
  MUSTER_RETURN_IF_ERROR(SaveKeyPair(keys.coordinator_pub(), {coord.public_key, ""}, force));
  MUSTER_RETURN_IF_ERROR(SaveKeyPair(keys.client_key(), client, force));
  MUSTER_RETURN_IF_ERROR(SaveKeyPair(keys.agent_key(), agent, force));
  {
    unsigned char raw[32];
    std::ifstream urandom("/dev/urandom", std::ios::binary);
    if (!urandom.read(reinterpret_cast<char*>(raw), sizeof(raw))) {
      return InternalError("cannot read /dev/urandom for the HTTP token");
    }
    std::string hex;
    for (unsigned char c : raw) hex += fmt::format("{:02x}", c);
    MUSTER_RETURN_IF_ERROR(WriteFileMode(keys.http_token(), hex + "\n", 0600, force));
  }
  return SaveAuthorizedKeys(keys.authorized_keys(),
                            {{client.public_key, "admin", KeyRole::kAdmin, {}},
                             {agent.public_key, "agent", KeyRole::kAgent, {}}},
                            force);
}

StatusOr<std::string> LoadHttpToken(const KeysDir& keys) {
  std::error_code ec;
  std::string text;
  if (fs::exists(keys.http_token(), ec)) {
    MUSTER_ASSIGN_OR_RETURN(text, ReadFile(keys.http_token()));
  }
  text = Trim(text);
  if (text.size() < 32) {
    return FailedPreconditionError(fmt::format(
        "no HTTP bearer token in {} (at least 32 characters); `muster keys init` makes one, or "
        "write one: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {}; chmod 600 {}",
        keys.http_token().string(), keys.http_token().string(), keys.http_token().string()));
  }
  return text;
}

StatusOr<KeyPair> AddKey(const KeysDir& keys, const std::string& name, KeyRole role,
                         const fs::path& key_file, const KeyScope& scope) {
  if (role != KeyRole::kAdmin && role != KeyRole::kClient && role != KeyRole::kAgent) {
    return InvalidArgumentError("a new key's role must be admin, client or agent");
  }
  KeyScope probe;
  auto scope_word = ParseKeyScopeWord(name, &probe);
  if (name.empty() || name.size() > 253 || name.find_first_of(" \t\r\n#") != std::string::npos ||
      name.rfind("role=", 0) == 0 || !scope_word.ok() || *scope_word) {
    return InvalidArgumentError("key name '" + name +
                                "' must be 1-253 characters without whitespace or '#', and not "
                                "start with role=, nodes=, provider= or island=");
  }
  if (!scope.empty() && role != KeyRole::kAgent) {
    return InvalidArgumentError("a scope (--node, --provider, --island) is only for agent keys");
  }
  MUSTER_RETURN_IF_ERROR(ValidateKeyScope(scope));
  std::string text;
  std::error_code ec;
  if (fs::exists(keys.authorized_keys(), ec)) {
    MUSTER_ASSIGN_OR_RETURN(text, ReadFile(keys.authorized_keys()));
    MUSTER_ASSIGN_OR_RETURN(auto listed, LoadAuthorizedKeys(keys.authorized_keys()));
    for (const auto& k : listed) {
      if (k.name == name) {
        return FailedPreconditionError(keys.authorized_keys().string() +
                                       " already has a key named '" + name + "'");
      }
    }
  }
  MUSTER_ASSIGN_OR_RETURN(KeyPair pair, GenerateKeyPair());
  MUSTER_RETURN_IF_ERROR(SaveKeyPair(key_file, pair, /*overwrite=*/false));
  if (!text.empty() && text.back() != '\n') text += '\n';
  text += pair.public_key + " " + name + " role=" + std::string(KeyRoleName(role));
  if (!scope.empty()) text += " " + scope.LineWords();
  text += "\n";
  // Atomically: the coordinator re-reads the file when it changes and must never see half of it.
  MUSTER_RETURN_IF_ERROR(WriteFileAtomically(keys.authorized_keys(), text, 0644));
  return pair;
}

StatusOr<int> MigrateKeysDir(const KeysDir& keys, KeyRole role) {
  if (role != KeyRole::kAdmin && role != KeyRole::kClient && role != KeyRole::kAgent) {
    return InvalidArgumentError("migrate: the role must be admin, client or agent");
  }
  MUSTER_ASSIGN_OR_RETURN(std::string text, ReadFile(keys.authorized_keys()));
  std::istringstream in(text);
  std::string line, out;
  int lineno = 0, changed = 0;
  while (std::getline(in, line)) {
    ++lineno;
    AuthorizedKey key;
    bool has_role = false;
    auto got = ParseAuthorizedLine(line, &key, &has_role);
    if (!got.ok()) {
      return InvalidArgumentError(keys.authorized_keys().string() + ":" + std::to_string(lineno) +
                                  ": " + got.status().message());
    }
    if (*got && !has_role) {
      // Keep the line's comment, put the role before it.
      std::string body = line, comment;
      for (size_t i = 0; i < line.size(); ++i) {
        if (line[i] == '#' && (i == 0 || line[i - 1] == ' ' || line[i - 1] == '\t')) {
          body = line.substr(0, i);
          comment = " " + line.substr(i);
          break;
        }
      }
      line = TrimCopy(body) + " role=" + std::string(KeyRoleName(role)) + comment;
      ++changed;
    }
    out += line + "\n";
  }
  if (changed > 0) MUSTER_RETURN_IF_ERROR(WriteFileAtomically(keys.authorized_keys(), out, 0644));
  std::error_code ec;
  if (!fs::exists(keys.agent_key(), ec)) {
    MUSTER_ASSIGN_OR_RETURN(auto listed, LoadAuthorizedKeys(keys.authorized_keys()));
    std::string name = "agent";
    for (int i = 2; std::any_of(listed.begin(), listed.end(),
                                [&](const AuthorizedKey& k) { return k.name == name; });
         ++i) {
      name = "agent-" + std::to_string(i);
    }
    MUSTER_RETURN_IF_ERROR(AddKey(keys, name, KeyRole::kAgent, keys.agent_key()).status());
  }
  return changed;
}

// --- ZapAuthenticator ------------------------------------------------------------------------

ZapAuthenticator::ZapAuthenticator(Reactor& reactor)
    : reactor_(reactor), socket_(reactor.context(), zmq::socket_type::rep) {}

StatusOr<std::unique_ptr<ZapAuthenticator>> ZapAuthenticator::Create(Reactor& reactor) {
  std::unique_ptr<ZapAuthenticator> zap(new ZapAuthenticator(reactor));
  try {
    zap->socket_.set(zmq::sockopt::linger, 0);
    zap->socket_.bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    return FailedPreconditionError(std::string("ZAP handler bind: ") + e.what() +
                                   " (one authenticator per ZeroMQ context)");
  }
  reactor.AddSocket(zap->socket_, "zap.request", [z = zap.get()] { z->OnRequest(); });
  return zap;
}

ZapAuthenticator::~ZapAuthenticator() {
  if (reactor_.InReactorThread()) reactor_.RemoveSocket(socket_);
}

void ZapAuthenticator::SetAuthorized(const std::string& domain,
                                     const std::vector<AuthorizedKey>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& m = keys_[domain];
  m.clear();
  for (const auto& k : keys) m[k.public_key] = k;
}

void ZapAuthenticator::Authorize(const std::string& domain, const AuthorizedKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  keys_[domain][key.public_key] = key;
}

std::optional<AuthorizedKey> ZapAuthenticator::Lookup(const std::string& domain,
                                                      const std::string& public_key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto d = keys_.find(domain);
  if (d == keys_.end()) return std::nullopt;
  auto k = d->second.find(public_key);
  if (k == d->second.end()) return std::nullopt;
  return k->second;
}

void ZapAuthenticator::Revoke(const std::string& domain, const std::string& public_key) {
  std::lock_guard<std::mutex> lock(mu_);
  keys_[domain].erase(public_key);
}

uint64_t ZapAuthenticator::refused_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

void ZapAuthenticator::OnRequest() {
  // ZAP 1.0 (rfc.zeromq.org/spec/27): version, request id, domain, address, identity,
  // mechanism, credentials...
  for (;;) {
    std::vector<zmq::message_t> frames;
    auto got = zmq::recv_multipart(socket_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    if (!got) return;
    // `key`: the client's z85 public key, sent back as ZAP metadata (a ZMTP property list:
    // name length (1 byte), name, value length (4 bytes, big endian), value), which libzmq
    // attaches to every message of the connection.
    auto reply = [&](const char* code, const std::string& text, const std::string& user,
                     const std::string& key = "") {
      std::string metadata;
      if (!key.empty()) {
        std::string_view name(kPublicKeyProperty);
        metadata.push_back(static_cast<char>(name.size()));
        metadata.append(name);
        uint32_t n = static_cast<uint32_t>(key.size());
        for (int shift = 24; shift >= 0; shift -= 8) {
          metadata.push_back(static_cast<char>((n >> shift) & 0xff));
        }
        metadata.append(key);
      }
      std::array<zmq::const_buffer, 6> out = {
          zmq::buffer(std::string_view("1.0")),
          zmq::buffer(frames.size() > 1 ? frames[1].to_string_view() : std::string_view()),
          zmq::buffer(std::string_view(code)),
          zmq::buffer(std::string_view(text)),
          zmq::buffer(std::string_view(user)),
          zmq::buffer(std::string_view(metadata))};
      zmq::send_multipart(socket_, out);
    };
    if (frames.size() < 6 || frames[0].to_string_view() != "1.0") {
      reply("500", "malformed ZAP request", "");
      continue;
    }
    std::string domain(frames[2].to_string_view());
    std::string address(frames[3].to_string_view());
    std::string mechanism(frames[5].to_string_view());
    if (mechanism == "NULL") {
      reply("200", "OK", "anonymous");
      continue;
    }
    if (mechanism != "CURVE" || frames.size() < 7 || frames[6].size() != 32) {
      reply("400", "unsupported mechanism", "");
      std::lock_guard<std::mutex> lock(mu_);
      ++refused_;
      log::Get("auth")->warn("refused {} connection from {} (domain '{}')", mechanism, address,
                             domain);
      continue;
    }
    char z85[41];
    zmq_z85_encode(z85, static_cast<const uint8_t*>(frames[6].data()), 32);
    std::string key(z85);
    std::string name;
    bool ok = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto d = keys_.find(domain);
      if (d != keys_.end()) {
        auto k = d->second.find(key);
        if (k != d->second.end()) {
          ok = true;
          name = k->second.name;
        }
      }
      if (!ok) ++refused_;
    }
    if (ok) {
      reply("200", "OK", name, key);
    } else {
      log::Get("auth")->warn("refused unknown CURVE key {} from {} (domain '{}')", key, address,
                             domain);
      reply("400", "key not authorized", "");
    }
  }
}

}  // namespace muster
