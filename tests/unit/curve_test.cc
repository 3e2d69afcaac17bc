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

}  // namespace
}  // namespace muster
