#include "common/curve.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

namespace muster {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/muster-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

int Mode(const fs::path& p) {
  struct stat st;
  EXPECT_EQ(stat(p.c_str(), &st), 0);
  return st.st_mode & 0777;
}

TEST(CurveTest, KeyPairSavesSecretFilesOwnerOnlyAndLoadsBack) {
  TempDir dir;
  auto keys = GenerateKeyPair();
  ASSERT_TRUE(keys.ok());
  EXPECT_TRUE(IsValidZ85Key(keys->public_key));
  ASSERT_TRUE(SaveKeyPair(dir.path() / "a.key", *keys, false).ok());
  EXPECT_EQ(Mode(dir.path() / "a.key"), 0600);
  auto loaded = LoadKeyPair(dir.path() / "a.key");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->public_key, keys->public_key);
  EXPECT_EQ(loaded->secret_key, keys->secret_key);
}

TEST(CurveTest, SaveRefusesToOverwriteUnlessAsked) {
  TempDir dir;
  auto a = GenerateKeyPair(), b = GenerateKeyPair();
  ASSERT_TRUE(SaveKeyPair(dir.path() / "k", *a, false).ok());
  Status st = SaveKeyPair(dir.path() / "k", *b, false);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(LoadKeyPair(dir.path() / "k")->secret_key, a->secret_key);
  ASSERT_TRUE(SaveKeyPair(dir.path() / "k", *b, true).ok());
  EXPECT_EQ(LoadKeyPair(dir.path() / "k")->secret_key, b->secret_key);
}

TEST(CurveTest, LoadRejectsMismatchedAndMalformedKeys) {
  TempDir dir;
  auto a = GenerateKeyPair(), b = GenerateKeyPair();
  std::ofstream(dir.path() / "mismatch") << "public-key = " << a->public_key << "\n"
                                         << "secret-key = " << b->secret_key << "\n";
  EXPECT_EQ(LoadKeyPair(dir.path() / "mismatch").status().code(), StatusCode::kInvalidArgument);
  std::ofstream(dir.path() / "short") << "public-key = abc\n";
  auto st = LoadKeyPair(dir.path() / "short").status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("short:1"), std::string::npos) << st;
  EXPECT_EQ(LoadKeyPair(dir.path() / "missing").status().code(), StatusCode::kNotFound);
}

TEST(CurveTest, AuthorizedKeysParseWithNamesAndComments) {
  TempDir dir;
  auto a = GenerateKeyPair(), b = GenerateKeyPair();
  std::ofstream(dir.path() / "auth") << "# users\n"
                                     << a->public_key << " alice\n\n"
                                     << b->public_key << "   # no name\n";
  auto keys = LoadAuthorizedKeys(dir.path() / "auth");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 2u);
  EXPECT_EQ((*keys)[0].name, "alice");
  EXPECT_EQ((*keys)[1].public_key, b->public_key);
  EXPECT_EQ((*keys)[0].role, KeyRole::kLegacy) << "a line without a role is a legacy entry";
  std::ofstream(dir.path() / "bad") << "not-a-key alice\n";
  EXPECT_EQ(LoadAuthorizedKeys(dir.path() / "bad").status().code(), StatusCode::kInvalidArgument);
}

TEST(CurveTest, AuthorizedKeysCarryRolesAndRefuseBadOnes) {
  TempDir dir;
  auto a = GenerateKeyPair(), b = GenerateKeyPair(), c = GenerateKeyPair();
  std::ofstream(dir.path() / "auth") << a->public_key << " ops team role=admin\n"
                                     << b->public_key << " role=client alice # a user\n"
                                     << c->public_key << " node-1 role=agent\n";
  auto keys = LoadAuthorizedKeys(dir.path() / "auth");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 3u);
  EXPECT_EQ((*keys)[0].name, "ops team");
  EXPECT_EQ((*keys)[0].role, KeyRole::kAdmin);
  EXPECT_EQ((*keys)[1].name, "alice");
  EXPECT_EQ((*keys)[1].role, KeyRole::kClient);
  EXPECT_EQ((*keys)[2].role, KeyRole::kAgent);

  std::ofstream(dir.path() / "unknown") << a->public_key << " x role=root\n";
  auto st = LoadAuthorizedKeys(dir.path() / "unknown").status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("unknown:1: unknown key role 'root'"), std::string::npos) << st;
  std::ofstream(dir.path() / "twice") << a->public_key << " x role=admin role=agent\n";
  EXPECT_EQ(LoadAuthorizedKeys(dir.path() / "twice").status().code(), StatusCode::kInvalidArgument);
  std::ofstream(dir.path() / "dup") << a->public_key << " x role=client\n"
                                    << a->public_key << " y role=admin\n";
  st = LoadAuthorizedKeys(dir.path() / "dup").status();
  EXPECT_NE(st.message().find("dup:2: key " + a->public_key + " is already listed on line 1"),
            std::string::npos)
      << st;
}

TEST(CurveTest, AddKeyAndMigrateALegacyKeysDir) {
  TempDir dir;
  KeysDir kd{dir.path() / "keys"};
  fs::create_directories(kd.dir);
  // A keys directory from before roles: one client key, used by the CLI and the agents.
  auto old = GenerateKeyPair();
  ASSERT_TRUE(SaveKeyPair(kd.client_key(), *old, false).ok());
  std::ofstream(kd.authorized_keys()) << "# users\n" << old->public_key << " client # the CLI\n";
  EXPECT_EQ(kd.agent_key_or_client_key(), kd.client_key());
  EXPECT_EQ((*LoadAuthorizedKeys(kd.authorized_keys()))[0].role, KeyRole::kLegacy);

  auto carol = AddKey(kd, "carol", KeyRole::kClient, kd.dir / "carol.key");
  ASSERT_TRUE(carol.ok()) << carol.status();
  EXPECT_EQ(LoadKeyPair(kd.dir / "carol.key")->public_key, carol->public_key);
  EXPECT_EQ(Mode(kd.dir / "carol.key"), 0600);
  EXPECT_EQ(AddKey(kd, "carol", KeyRole::kAgent, kd.dir / "other.key").status().code(),
            StatusCode::kFailedPrecondition)
      << "a name is listed once";
  EXPECT_EQ(AddKey(kd, "bad name", KeyRole::kAgent, kd.dir / "x.key").status().code(),
            StatusCode::kInvalidArgument);

  auto changed = MigrateKeysDir(kd, KeyRole::kAdmin);
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_EQ(*changed, 1);
  auto keys = LoadAuthorizedKeys(kd.authorized_keys());
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 3u);
  EXPECT_EQ((*keys)[0].public_key, old->public_key);
  EXPECT_EQ((*keys)[0].name, "client");
  EXPECT_EQ((*keys)[0].role, KeyRole::kAdmin);
  EXPECT_EQ((*keys)[1].role, KeyRole::kClient);
  EXPECT_EQ((*keys)[2].role, KeyRole::kAgent);
  EXPECT_EQ((*keys)[2].public_key, LoadKeyPair(kd.agent_key())->public_key);
  EXPECT_EQ(kd.agent_key_or_client_key(), kd.agent_key());
  EXPECT_EQ(*MigrateKeysDir(kd, KeyRole::kAdmin), 0) << "idempotent";
}

TEST(CurveTest, InitKeysDirWritesAllFilesAndRefusesToOverwrite) {
  TempDir dir;
  KeysDir kd{dir.path() / "keys"};
  ASSERT_TRUE(InitKeysDir(kd, false).ok());
  EXPECT_EQ(Mode(kd.coordinator_key()), 0600);
  EXPECT_EQ(Mode(kd.client_key()), 0600);
  EXPECT_EQ(Mode(kd.dir), 0700);
  auto coord = LoadKeyPair(kd.coordinator_key());
  auto coord_pub = LoadKeyPair(kd.coordinator_pub());
  auto client = LoadKeyPair(kd.client_key());
  auto auth = LoadAuthorizedKeys(kd.authorized_keys());
  ASSERT_TRUE(coord.ok() && coord_pub.ok() && client.ok() && auth.ok());
  EXPECT_EQ(coord->public_key, coord_pub->public_key);
  EXPECT_TRUE(coord_pub->secret_key.empty());
  auto agent = LoadKeyPair(kd.agent_key());
  ASSERT_TRUE(agent.ok()) << agent.status();
  EXPECT_EQ(Mode(kd.agent_key()), 0600);
  ASSERT_EQ(auth->size(), 2u);
  EXPECT_EQ((*auth)[0].public_key, client->public_key);
  EXPECT_EQ((*auth)[0].role, KeyRole::kAdmin) << "the local CLI's key is an admin key";
  EXPECT_EQ((*auth)[1].public_key, agent->public_key);
  EXPECT_EQ((*auth)[1].role, KeyRole::kAgent);
  EXPECT_EQ(kd.agent_key_or_client_key(), kd.agent_key());

  Status again = InitKeysDir(kd, false);
  EXPECT_EQ(again.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(LoadKeyPair(kd.coordinator_key())->secret_key, coord->secret_key);
  ASSERT_TRUE(InitKeysDir(kd, true).ok());
  EXPECT_NE(LoadKeyPair(kd.coordinator_key())->secret_key, coord->secret_key);
}

TEST(CurveTest, InitKeysDirWritesAnHttpBearerTokenOwnerOnly) {
  TempDir dir;
  KeysDir kd{dir.path() / "keys"};
  EXPECT_EQ(LoadHttpToken(kd).status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(InitKeysDir(kd, false).ok());
  EXPECT_EQ(Mode(kd.http_token()), 0600);
  auto token = LoadHttpToken(kd);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->size(), 64u);
  EXPECT_EQ(token->find_first_not_of("0123456789abcdef"), std::string::npos);
  ASSERT_TRUE(InitKeysDir(kd, true).ok());
  EXPECT_NE(*LoadHttpToken(kd), *token) << "a new one with --force";
}

TEST(CurveTest, AgentKeyScopesParseAndOldLinesStayUnscoped) {
  TempDir dir;
  auto a = GenerateKeyPair(), b = GenerateKeyPair(), c = GenerateKeyPair();
  std::ofstream(dir.path() / "auth")
      << a->public_key << " gpu-key role=agent nodes=gcp-0,gcp-1 provider=gcp island=eu # x\n"
      << b->public_key << " agent role=agent\n"
      << c->public_key << " prov role=agent provider=aws\n";
  auto keys = LoadAuthorizedKeys(dir.path() / "auth");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 3u);
  const KeyScope& s = (*keys)[0].scope;
  EXPECT_EQ((*keys)[0].name, "gpu-key") << "scope words are not part of the name";
  EXPECT_EQ(s.nodes, (std::vector<std::string>{"gcp-0", "gcp-1"}));
  EXPECT_EQ(s.provider, "gcp");
  EXPECT_EQ(s.island, "eu");
  EXPECT_EQ(s.ToString(), "nodes=gcp-0,gcp-1 provider=gcp island=eu");
  EXPECT_TRUE((*keys)[1].scope.empty());
  EXPECT_EQ((*keys)[1].scope.ToString(), "unscoped");
  EXPECT_TRUE((*keys)[2].scope.nodes.empty());
  EXPECT_EQ((*keys)[2].scope.provider, "aws");

  // Written back, the scope survives.
  ASSERT_TRUE(SaveAuthorizedKeys(dir.path() / "again", *keys, false).ok());
  auto again = LoadAuthorizedKeys(dir.path() / "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)[0].scope.LineWords(), s.LineWords());

  // Malformed scopes: a clear error naming file, line and what is wrong.
  auto bad = [&](const std::string& name, const std::string& rest) {
    std::ofstream(dir.path() / name) << "# first\n" << a->public_key << " k " << rest << "\n";
    return LoadAuthorizedKeys(dir.path() / name).status();
  };
  Status st = bad("empty-node", "role=agent nodes=gcp-0,,gcp-1");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("empty-node:2: key scope: node name ''"), std::string::npos) << st;
  st = bad("no-nodes", "role=agent nodes=");
  EXPECT_NE(st.message().find("no-nodes:2: key scope: node name ''"), std::string::npos) << st;
  st = bad("twice", "role=agent provider=a provider=b");
  EXPECT_NE(st.message().find("twice:2: key scope: provider= given twice"), std::string::npos)
      << st;
  st = bad("same-node", "role=agent nodes=n,n");
  EXPECT_NE(st.message().find("same-node:2: key scope: node 'n' listed twice"), std::string::npos)
      << st;
  st = bad("client", "role=client provider=aws");
  EXPECT_NE(st.message().find("client:2: a scope (provider=aws) is only for agent keys, and this "
                              "line has role=client"),
            std::string::npos)
      << st;
  st = bad("legacy", "island=x");
  EXPECT_NE(st.message().find("legacy:2: a scope (island=x) is only for agent keys, and this line "
                              "has no role="),
            std::string::npos)
      << st;
}

TEST(CurveTest, AddKeyWritesAnAgentKeysScopeAndRefusesABadOne) {
  TempDir dir;
  KeysDir kd{dir.path() / "keys"};
  ASSERT_TRUE(InitKeysDir(kd, false).ok());
  KeyScope scope;
  scope.nodes = {"gcp-0"};
  scope.provider = "gcp";
  ASSERT_TRUE(AddKey(kd, "gcp-0", KeyRole::kAgent, kd.dir / "gcp-0.key", scope).ok());
  auto keys = LoadAuthorizedKeys(kd.authorized_keys());
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->back().name, "gcp-0");
  EXPECT_EQ(keys->back().scope.ToString(), "nodes=gcp-0 provider=gcp");
  for (const auto& k : *keys) {
    if (k.name == "agent") EXPECT_TRUE(k.scope.empty()) << "the shared agent.key stays unscoped";
  }
  EXPECT_EQ(AddKey(kd, "c", KeyRole::kClient, kd.dir / "c.key", scope).status().code(),
            StatusCode::kInvalidArgument);
  KeyScope comma;
  comma.nodes = {"a,b"};
  EXPECT_EQ(AddKey(kd, "d", KeyRole::kAgent, kd.dir / "d.key", comma).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(AddKey(kd, "nodes=x", KeyRole::kAgent, kd.dir / "e.key").status().code(),
            StatusCode::kInvalidArgument);
}

TEST(CurveTest, ARegistrationOutsideTheScopeOrMovingANodeIsNamed) {
  proto::NodeLabels l;
  l.set_name("gcp-0");
  l.set_provider("gcp");
  l.set_island("eu");
  EXPECT_FALSE(OutsideKeyScope(KeyScope{}, l));
  KeyScope s{{"gcp-0"}, "gcp", "eu"};
  EXPECT_FALSE(OutsideKeyScope(s, l));
  proto::NodeLabels other = l;
  other.set_name("aws-0");
  EXPECT_EQ(OutsideKeyScope(s, other).value_or(""),
            "node name 'aws-0' is outside the key's scope (nodes=gcp-0 provider=gcp island=eu)");
  other = l;
  other.set_provider("aws");
  EXPECT_NE(OutsideKeyScope(s, other).value_or("").find("provider 'aws' is outside"),
            std::string::npos);
  other = l;
  other.set_island("us");
  EXPECT_NE(OutsideKeyScope(s, other).value_or("").find("island 'us' is outside"),
            std::string::npos);
  EXPECT_FALSE(MovesNode(l, l));
  EXPECT_TRUE(MovesNode(l, other));
}

}  // namespace
}  // namespace muster
