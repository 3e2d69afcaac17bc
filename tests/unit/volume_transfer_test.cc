// Agent-to-agent checkpoint transfer against hostile peers, over real sockets:
//   - a lying source (a real RpcServer) answering a small read with a large reply, a wrong
//     offset, an impossible size or a bad entry name: the copy fails with DataLoss, the process
//     lives, nothing is copied past a buffer;
//   - hostile job ids ("../x", an absolute path) refused by a real Agent asked to replicate
//     them, with nothing written outside its volume;
//   - a FIFO in a job's directory does not stall the volume server; symbolic links are not
//     followed;
//   - a revoked or expired transfer key reads nothing more, on an open connection too.

#include "node_agent/volume_transfer.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <optional>
#include <thread>

#include "checkpoint/checkpointer.h"
#include "checkpoint/replicate.h"
#include "common/path_name.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "common/wire.h"
#include "node_agent/agent.h"
#include "node_agent/replication_worker.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using node_agent::RemoteVolume;
using node_agent::VolumeServer;
using Clock = std::chrono::steady_clock;

using testing::WaitUntil;

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A fresh directory, removed at the end.
struct TempDir {
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "muster-xfer-XXXXXX").string();
    path = ::mkdtemp(tmpl.data()) ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path path;
};

// ---- names

TEST(PathNameTest, NamesAndRelativePaths) {
  for (const char* ok : {"job-1", "finetune-12", "step-000000010", "MANIFEST", "a.b_c-D", "..a"}) {
    EXPECT_TRUE(ValidatePathName(ok, "name").ok()) << ok;
  }
  for (std::string bad :
       {std::string(""), std::string("."), std::string(".."), std::string("../x"),
        std::string("/abs"), std::string("a/b"), std::string("a b"), std::string("a\0b", 3),
        std::string("é"), std::string(kMaxPathNameLength + 1, 'a')}) {
    Status st = ValidatePathName(bad, "job id");
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << QuoteForError(bad);
    EXPECT_NE(st.message().find("job id"), std::string::npos) << st.message();
  }
  EXPECT_TRUE(ValidateRelativePath("job/step-000000010/shard-00000.bin", "path").ok());
  for (const char* bad : {"", "/job", "job/", "job//x", "job/../x", "job/./x", "..", "j\\..x"}) {
    EXPECT_FALSE(ValidateRelativePath(bad, "path").ok()) << bad;
  }
  std::string deep = "a";
  for (size_t i = 0; i < kMaxRelativePathDepth; ++i) deep += "/a";
  EXPECT_FALSE(ValidateRelativePath(deep, "path").ok());
  EXPECT_EQ(QuoteForError(std::string("a\0\n", 3)), "\"a\\x00\\x0a\"");
}

// ---- D1: a lying source

// A volume "server" that answers every request with `lie(request)`.
class LyingSource {
 public:
  using Lie = std::function<proto::VolumeReply(const proto::VolumeRequest&)>;
  explicit LyingSource(Lie lie) : lie_(std::move(lie)), reactor_("liar") {
    RpcServer::Options o;
    o.name = "liar";
    o.endpoint = "tcp://127.0.0.1:*";
    o.insecure = true;
    auto s = RpcServer::Create(reactor_, o,
                               [this](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply r) {
                                 proto::Envelope e;
                                 e.set_request_id(req.request_id());
                                 *e.mutable_volume_reply() = lie_(req.volume_request());
                                 r(std::move(e));
                               });
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_.Start();
  }
  ~LyingSource() {
    reactor_.Call("stop", [&] { server_.reset(); });
    reactor_.Stop();
  }
  std::unique_ptr<RemoteVolume> Connect() {
    auto v = RemoteVolume::Connect(server_->endpoint(), "", {}, /*insecure=*/true, "ckpt");
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? std::move(*v) : nullptr;
  }

 private:
  Lie lie_;
  Reactor reactor_;
  std::unique_ptr<RpcServer> server_;
};

// An honest STAT of a 16-byte file; READ answered by `read`.
LyingSource::Lie SmallFile(
    std::function<void(const proto::VolumeRequest&, proto::VolumeReply*)> read) {
  return [read](const proto::VolumeRequest& req) {
    proto::VolumeReply r;
    if (req.op() == proto::VolumeRequest::STAT) {
      r.set_exists(true);
      r.set_size(16);
    } else if (req.op() == proto::VolumeRequest::READ) {
      r.set_offset(req.offset());
      r.set_size(16);
      read(req, &r);
    }
    return r;
  };
}

TEST(LyingSourceTest, ALargeReplyToASmallReadIsDataLossNotAnOverflow) {
  LyingSource liar(SmallFile([](const proto::VolumeRequest&, proto::VolumeReply* r) {
    r->set_data(std::string(1 << 20, 'x'));  // 1 MiB for a 16-byte read
  }));
  auto v = liar.Connect();
  ASSERT_TRUE(v);
  auto f = v->NewReadableFile("job/step-000000010/MANIFEST", false);
  ASSERT_TRUE(f.ok()) << f.status();
  auto buf = std::make_unique<char[]>(16);
  auto n = (*f)->ReadAt(0, buf.get(), 16);
  ASSERT_FALSE(n.ok()) << "accepted " << *n << " bytes into a 16-byte buffer";
  EXPECT_EQ(n.status().code(), StatusCode::kDataLoss) << n.status();
  EXPECT_NE(n.status().message().find("more than the 16 asked for"), std::string::npos)
      << n.status();
  auto whole = checkpoint::ReadFileToString(v.get(), "job/step-000000010/MANIFEST");
  EXPECT_EQ(whole.status().code(), StatusCode::kDataLoss) << whole.status();
  // A whole copy from that source fails cleanly too, and writes no step.
  TempDir dst;
  auto rep = checkpoint::Replicate(v.get(), "job", checkpoint::LocalVolume(),
                                   (dst.path / "job").string(), 10);
  EXPECT_FALSE(rep.ok());
  EXPECT_FALSE(fs::exists(dst.path / "job" / "step-000000010"));
}

TEST(LyingSourceTest, EveryFieldOfEveryReplyIsChecked) {
  struct Case {
    const char* what;
    LyingSource::Lie lie;
    std::function<Status(RemoteVolume*)> use;
  };
  auto read16 = [](RemoteVolume* v) -> Status {
    auto s = checkpoint::ReadFileToString(v, "job/f");
    return s.status();
  };
  auto list = [](RemoteVolume* v) -> Status { return v->ListDir("job").status(); };
  auto size = [](RemoteVolume* v) -> Status { return v->FileSize("job/f").status(); };
  auto age = [](RemoteVolume* v) -> Status { return v->AgeSeconds("job/f").status(); };
  std::vector<Case> cases = {
      {"a wrong offset", SmallFile([](const proto::VolumeRequest& q, proto::VolumeReply* r) {
         r->set_offset(q.offset() + 8);
         r->set_data(std::string(q.length(), 'x'));
       }),
       read16},
      {"a short read before the end",
       SmallFile([](const proto::VolumeRequest&, proto::VolumeReply* r) { r->set_data("abc"); }),
       read16},
      {"an empty read before the end",
       SmallFile([](const proto::VolumeRequest&, proto::VolumeReply*) {}), read16},
      {"a file size that disagrees with STAT",
       SmallFile([](const proto::VolumeRequest& q, proto::VolumeReply* r) {
         r->set_size(1 << 20);
         r->set_data(std::string(q.length(), 'x'));
       }),
       read16},
      {"a READ reply carrying entries",
       SmallFile([](const proto::VolumeRequest& q, proto::VolumeReply* r) {
         r->set_data(std::string(q.length(), 'x'));
         r->add_entries("x");
       }),
       read16},
      {"a huge STAT size",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.set_exists(true);
         r.set_size(~uint64_t{0});  // -1 as an int64
         return r;
       },
       size},
      {"a STAT carrying data",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.set_exists(true);
         r.set_size(3);
         r.set_data("abc");
         return r;
       },
       size},
      {"a missing entry with a size",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.set_size(3);
         return r;
       },
       size},
      {"a NaN age",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.set_exists(true);
         r.set_age_s(std::nan(""));
         return r;
       },
       age},
      {"a directory with a size",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.set_exists(true);
         r.set_is_dir(true);
         r.set_size(12);
         return r;
       },
       age},
      {"an entry that climbs out",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.add_entries("step-000000010");
         r.add_entries("../../etc");
         return r;
       },
       list},
      {"an absolute entry",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.add_entries("/etc/passwd");
         return r;
       },
       list},
      {"a LIST carrying a size",
       [](const proto::VolumeRequest&) {
         proto::VolumeReply r;
         r.set_size(5);
         r.add_entries("a");
         return r;
       },
       list},
  };
  for (auto& c : cases) {
    LyingSource liar(c.lie);
    auto v = liar.Connect();
    ASSERT_TRUE(v);
    Status st = c.use(v.get());
    EXPECT_EQ(st.code(), StatusCode::kDataLoss) << c.what << ": " << st;
  }
  // An honest reply passes, and a request for a path that climbs out is never sent.
  LyingSource honest(SmallFile([](const proto::VolumeRequest& q, proto::VolumeReply* r) {
    r->set_data(std::string(std::min<uint64_t>(q.length(), 16 - q.offset()), 'x'));
  }));
  auto v = honest.Connect();
  auto s = checkpoint::ReadFileToString(v.get(), "job/f");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, std::string(16, 'x'));
  EXPECT_EQ(v->FileSize("job/../x").status().code(), StatusCode::kInvalidArgument);
}

// ---- the volume server

// A volume server on its own reactor over `root` ("ckpt"), with CURVE unless insecure.
class ServerFixture {
 public:
  ServerFixture(const fs::path& root, bool insecure) : reactor_("vol-test") {
    if (!insecure) {
      auto z = ZapAuthenticator::Create(reactor_);
      EXPECT_TRUE(z.ok());
      zap_ = std::move(*z);
    }
    auto s = VolumeServer::Create(reactor_, zap_.get(), insecure, "tcp://127.0.0.1:*",
                                  {{"ckpt", root.string()}});
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_.Start();
  }
  ~ServerFixture() {
    reactor_.Call("stop", [&] {
      server_.reset();
      zap_.reset();
    });
    reactor_.Stop();
  }
  VolumeServer& server() { return *server_; }
  Reactor& reactor() { return reactor_; }
  std::unique_ptr<RemoteVolume> Connect(const KeyPair& key = {}) {
    auto v = RemoteVolume::Connect(server_->endpoint(), server_->public_key(), key,
                                   /*insecure=*/zap_ == nullptr, "ckpt");
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? std::move(*v) : nullptr;
  }

 private:
  Reactor reactor_;
  std::unique_ptr<ZapAuthenticator> zap_;
  std::unique_ptr<VolumeServer> server_;
};

// A FIFO in the job's directory: reading it is an error at once, and the server answers
// other requests meanwhile (its reactor never waits for a writer that never comes).
TEST(VolumeServerTest, AFifoIsRefusedPromptlyAndTheServerKeepsAnswering) {
  TempDir root;
  fs::create_directories(root.path / "job" / "step-000000010");
  std::ofstream(root.path / "job" / "step-000000010" / "MANIFEST") << "manifest bytes";
  const fs::path fifo = root.path / "job" / "step-000000010" / "shard-00000.bin";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ServerFixture f(root.path, /*insecure=*/true);
  auto blocked = f.Connect();
  auto other = f.Connect();
  ASSERT_TRUE(blocked && other);
  auto fifo_read = std::async(std::launch::async, [&] {
    proto::VolumeRequest r;
    r.set_op(proto::VolumeRequest::READ);
    r.set_path("job/step-000000010/shard-00000.bin");
    r.set_length(16);
    return blocked->Call(r).status();
  });
  bool answered = fifo_read.wait_for(5s) == std::future_status::ready;
  if (!answered) {
    // The server is stuck in open(2) waiting for a writer: be that writer so the test ends.
    int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) ::close(fd);
  }
  ASSERT_TRUE(answered) << "a read of a FIFO blocked the volume server";
  Status st = fifo_read.get();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("FIFO"), std::string::npos) << st;
  auto data = checkpoint::ReadFileToString(other.get(), "job/step-000000010/MANIFEST");
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(*data, "manifest bytes");
  // STAT names it too, and LIST leaves it out.
  EXPECT_FALSE(other->FileSize("job/step-000000010/shard-00000.bin").ok());
  auto list = other->ListDir("job/step-000000010");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(*list, std::vector<std::string>{"MANIFEST"});
}

// Symbolic links are never followed: not to a file outside the job's directory, not as the
// job directory itself, not in the middle of a path.
TEST(VolumeServerTest, SymlinksAnywhereInThePathAreRefused) {
  TempDir root, outside;
  std::ofstream(outside.path / "secret") << "outside the volume";
  fs::create_directories(outside.path / "dir");
  std::ofstream(outside.path / "dir" / "MANIFEST") << "outside too";
  fs::create_directories(root.path / "job" / "step-000000010");
  std::ofstream(root.path / "job" / "step-000000010" / "MANIFEST") << "inside";
  fs::create_symlink(outside.path / "secret", root.path / "job" / "step-000000010" / "shard.bin");
  fs::create_symlink(outside.path / "dir", root.path / "job" / "step-000000020");
  fs::create_symlink(outside.path / "dir", root.path / "linked-job");
  ServerFixture f(root.path, /*insecure=*/true);
  auto v = f.Connect();
  ASSERT_TRUE(v);
  for (const char* path :
       {"job/step-000000010/shard.bin", "job/step-000000020/MANIFEST", "linked-job/MANIFEST"}) {
    auto r = checkpoint::ReadFileToString(v.get(), path);
    ASSERT_FALSE(r.ok()) << path << " served: " << *r;
    EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << path << ": " << r.status();
    EXPECT_NE(r.status().message().find("symbolic link"), std::string::npos) << r.status();
  }
  EXPECT_FALSE(v->ListDir("linked-job").ok());
  auto list = v->ListDir("job");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(*list, std::vector<std::string>{"step-000000010"}) << "the link is not listed";
  auto inside = checkpoint::ReadFileToString(v.get(), "job/step-000000010/MANIFEST");
  ASSERT_TRUE(inside.ok()) << inside.status();
  EXPECT_EQ(*inside, "inside");
}

TEST(VolumeServerTest, RequestsAreCheckedBeforeTheDiskIsTouched) {
  proto::VolumeRequest r;
  r.set_op(proto::VolumeRequest::READ);
  r.set_volume("ckpt");
  r.set_path("job/x");
  r.set_length(node_agent::kMaxVolumeRead);
  EXPECT_TRUE(node_agent::CheckVolumeRequest(r, "job").ok());
  EXPECT_FALSE(node_agent::CheckVolumeRequest(r, "other").ok()) << "another job's key";
  r.set_length(node_agent::kMaxVolumeRead + 1);
  EXPECT_EQ(node_agent::CheckVolumeRequest(r, "job").code(), StatusCode::kInvalidArgument);
  r.set_length(1);
  r.set_offset(~uint64_t{0});
  EXPECT_EQ(node_agent::CheckVolumeRequest(r, "job").code(), StatusCode::kInvalidArgument);
  r.set_offset(0);
  for (const char* bad : {"../x", "/abs", "job/../x", "job//x", ""}) {
    r.set_path(bad);
    EXPECT_FALSE(node_agent::CheckVolumeRequest(r, "job").ok()) << bad;
  }
  r.set_path("job/x");
  r.set_volume("../ckpt");
  EXPECT_FALSE(node_agent::CheckVolumeRequest(r, "job").ok());
}

// A transfer key reads until its grant is revoked (the copy ended) or expires, and not after:
// on the connection already open too.
TEST(VolumeServerTest, RevokedAndExpiredGrantsReadNothingMore) {
  TempDir root;
  fs::create_directories(root.path / "job-1");
  std::ofstream(root.path / "job-1" / "a") << "one";
  ServerFixture f(root.path, /*insecure=*/false);
  auto key = GenerateKeyPair();
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(f.server().Allow("../x", key->public_key, UnixMs() + 60000).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(f.server().Allow("/abs", key->public_key, UnixMs() + 60000).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(f.server().active_grants(), 0u);
  ASSERT_TRUE(f.server().Allow("job-1", key->public_key, UnixMs() + 60000).ok());
  auto v = f.Connect(*key);
  ASSERT_TRUE(v);
  auto a = checkpoint::ReadFileToString(v.get(), "job-1/a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, "one");
  f.server().Revoke("job-2", key->public_key);  // another job's revoke leaves it alone
  EXPECT_TRUE(checkpoint::ReadFileToString(v.get(), "job-1/a").ok());
  f.server().Revoke("job-1", key->public_key);
  EXPECT_EQ(f.server().active_grants(), 0u);
  auto after = checkpoint::ReadFileToString(v.get(), "job-1/a");
  EXPECT_FALSE(after.ok()) << "read on the open connection after revoke";
  EXPECT_NE(after.status().message().find("permission denied"), std::string::npos)
      << after.status();
  auto fresh = f.Connect(*key);
  EXPECT_FALSE(checkpoint::ReadFileToString(fresh.get(), "job-1/a").ok());

  // A grant that expires is dropped by itself.
  auto key2 = GenerateKeyPair();
  ASSERT_TRUE(f.server().Allow("job-1", key2->public_key, UnixMs() + 400).ok());
  auto v2 = f.Connect(*key2);
  ASSERT_TRUE(checkpoint::ReadFileToString(v2.get(), "job-1/a").ok());
  EXPECT_TRUE(WaitUntil([&] { return f.server().active_grants() == 0; }, 5s));
  EXPECT_FALSE(checkpoint::ReadFileToString(v2.get(), "job-1/a").ok());
}

// ---- D2: a real agent asked to replicate hostile job ids

// Plays the coordinator for one agent: its registration reply carries `actions`; it records
// the agent's reports.
class FakeCoordinator {
 public:
  explicit FakeCoordinator(std::vector<proto::AgentAction> actions)
      : actions_(std::move(actions)), reactor_("fake-coord") {
    RpcServer::Options o;
    o.name = "fake-coord";
    o.endpoint = "tcp://127.0.0.1:*";
    o.insecure = true;
    auto s = RpcServer::Create(
        reactor_, o, [this](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply reply) {
          proto::Envelope e;
          e.set_request_id(req.request_id());
          if (req.has_agent_register()) {
            auto* r = e.mutable_agent_registered();
            r->set_session_id("s1");
            r->set_heartbeat_interval_ms(200);
            r->set_heartbeat_timeout_ms(60000);
            r->set_lease_ms(600000);
            if (!sent_.exchange(true)) {
              for (const auto& a : actions_) *r->add_actions() = a;
            }
          } else if (req.has_agent_heartbeat()) {
            e.mutable_agent_heartbeat_reply();
          } else if (req.has_agent_poll()) {
            e.mutable_agent_actions();
            int64_t wait = std::min<int64_t>(req.agent_poll().wait_ms(), 300);
            reactor_.PostAfter(std::chrono::milliseconds(wait), "poll", [reply, e] { reply(e); });
            return;
          } else if (req.has_agent_report()) {
            std::lock_guard<std::mutex> l(mu_);
            reports_.push_back(req.agent_report());
            e.mutable_agent_report_reply();
          } else {
            e = ErrorEnvelope(req.request_id(), InvalidArgumentError("unexpected"));
          }
          reply(std::move(e));
        });
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_.Start();
  }
  ~FakeCoordinator() {
    reactor_.Call("stop", [&] { server_.reset(); });
    reactor_.Stop();
  }
  std::string endpoint() const { return server_->endpoint(); }
  // The replication outcome reported for `job`, if any.
  std::optional<proto::AgentReport> Outcome(const std::string& job) {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& r : reports_) {
      if (r.job_id() == job && (r.checkpoint_replica() || !r.replicate_error().empty())) return r;
    }
    return std::nullopt;
  }

 private:
  std::vector<proto::AgentAction> actions_;
  std::atomic<bool> sent_{false};
  Reactor reactor_;
  std::unique_ptr<RpcServer> server_;
  std::mutex mu_;
  std::vector<proto::AgentReport> reports_;  // GUARDED_BY(mu_)
};

// A source that serves the committed checkpoint of "good" for whatever job id it is asked:
// what a hostile source (or a forged report) would make the target copy.
class AnyJobSource {
 public:
  explicit AnyJobSource(fs::path root, std::vector<std::string> jobs)
      : root_(std::move(root)), jobs_(std::move(jobs)), reactor_("any-job") {
    RpcServer::Options o;
    o.name = "any-job";
    o.endpoint = "tcp://127.0.0.1:*";
    o.insecure = true;
    auto s = RpcServer::Create(reactor_, o,
                               [this](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply r) {
                                 proto::VolumeRequest q = req.volume_request();
                                 for (const auto& j : jobs_) {
                                   if (q.path().rfind(j, 0) == 0) {
                                     q.set_path("good" + q.path().substr(j.size()));
                                     break;
                                   }
                                 }
                                 auto served = node_agent::ServeVolumeRequest(root_.string(), q);
                                 if (!served.ok()) {
                                   return r(ErrorEnvelope(req.request_id(), served.status()));
                                 }
                                 proto::Envelope e;
                                 e.set_request_id(req.request_id());
                                 *e.mutable_volume_reply() = std::move(*served);
                                 r(std::move(e));
                               });
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_.Start();
  }
  ~AnyJobSource() {
    reactor_.Call("stop", [&] { server_.reset(); });
    reactor_.Stop();
  }
  std::string endpoint() const { return server_->endpoint(); }

 private:
  fs::path root_;
  std::vector<std::string> jobs_;
  Reactor reactor_;
  std::unique_ptr<RpcServer> server_;
};

// A source that serves `root` but holds every READ at or past `stall_from` until Release: a
// copy caught in the middle.
class StallingSource {
 public:
  StallingSource(fs::path root, uint64_t stall_from)
      : root_(std::move(root)), stall_from_(stall_from), reactor_("stalling") {
    RpcServer::Options o;
    o.name = "stalling";
    o.endpoint = "tcp://127.0.0.1:*";
    o.insecure = true;
    auto s = RpcServer::Create(
        reactor_, o, [this](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply r) {
          const proto::VolumeRequest& q = req.volume_request();
          if (q.op() == proto::VolumeRequest::READ && q.offset() >= stall_from_) {
            std::unique_lock<std::mutex> l(mu_);
            stalled_ = true;
            cv_.notify_all();
            cv_.wait(l, [&] { return released_; });
          }
          auto served = node_agent::ServeVolumeRequest(root_.string(), q);
          if (!served.ok()) return r(ErrorEnvelope(req.request_id(), served.status()));
          proto::Envelope e;
          e.set_request_id(req.request_id());
          *e.mutable_volume_reply() = std::move(*served);
          r(std::move(e));
        });
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    reactor_.Start();
  }
  ~StallingSource() {
    Release();
    reactor_.Call("stop", [&] { server_.reset(); });
    reactor_.Stop();
  }
  std::string endpoint() const { return server_->endpoint(); }
  bool stalled() {
    std::lock_guard<std::mutex> l(mu_);
    return stalled_;
  }
  void Release() {
    std::lock_guard<std::mutex> l(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  fs::path root_;
  uint64_t stall_from_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stalled_ = false;   // GUARDED_BY(mu_)
  bool released_ = false;  // GUARDED_BY(mu_)
  Reactor reactor_;
  std::unique_ptr<RpcServer> server_;
};

// A copy in flight is listed for the agent's /metrics with the bytes it has written into the
// local volume so far; once done it is reported with the replica's size and leaves the list.
TEST(AgentReplicationTest, ACopyInFlightShowsItsBytesUntilItIsReported) {
  TempDir dir;
  const fs::path src = dir.path / "src", vol = dir.path / "vol";
  fs::create_directories(vol);
  constexpr uint64_t kBytes = uint64_t{33} << 20;  // past one 32 MiB copy chunk
  {
    checkpoint::CheckpointerOptions o;
    o.dir = (src / "job").string();
    o.block_size = 1 << 20;
    o.direct_io = false;
    auto ck = checkpoint::Checkpointer::Create(o);
    ASSERT_TRUE(ck.ok()) << ck.status();
    std::vector<float> w(kBytes / 4, 1.5f);
    checkpoint::SaveState s;
    s.tensors.push_back(checkpoint::TensorRef::Replicated(
        "w", checkpoint::DType::kF32, {static_cast<int64_t>(w.size())}, w.data()));
    ASSERT_TRUE((*ck)->Save(10, s).ok());
    ASSERT_TRUE((*ck)->Wait().ok());
  }
  StallingSource source(src, uint64_t{32} << 20);
  std::mutex mu;
  std::optional<proto::AgentReport> report;
  node_agent::ReplicationWorker::Outputs out;
  out.report = [&](proto::AgentReport r) {
    std::lock_guard<std::mutex> l(mu);
    report = std::move(r);
  };
  out.prune = [](const std::string&, int) {};
  proto::NodeLabels labels;
  labels.set_name("target");
  auto* v = labels.add_volumes();
  v->set_name("ckpt");
  v->set_path(vol.string());
  node_agent::ReplicationWorker worker(labels, /*insecure=*/true, out);
  EXPECT_TRUE(worker.CopiesInFlight().empty());
  proto::ReplicateCheckpoint r;
  r.set_job_id("job");
  r.set_step(10);
  r.set_volume("ckpt");
  r.set_source_node("src");
  r.set_source_endpoint(source.endpoint());
  worker.Offer(r);
  ASSERT_TRUE(WaitUntil([&] { return source.stalled(); }, 20s));
  auto copies = worker.CopiesInFlight();
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].job_id, "job");
  EXPECT_EQ(copies[0].step, 10);
  EXPECT_EQ(copies[0].volume, "ckpt");
  EXPECT_EQ(copies[0].source_node, "src");
  EXPECT_EQ(copies[0].bytes, uint64_t{32} << 20) << "the first chunk is written, the next held";
  EXPECT_GT(copies[0].seconds, 0);
  source.Release();
  ASSERT_TRUE(WaitUntil(
      [&] {
        std::lock_guard<std::mutex> l(mu);
        return report.has_value();
      },
      20s));
  EXPECT_TRUE(report->checkpoint_replica()) << report->replicate_error();
  EXPECT_EQ(report->checkpoint_bytes(), kBytes);
  EXPECT_TRUE(worker.CopiesInFlight().empty());
  worker.Stop();
}

TEST(AgentReplicationTest, HostileJobIdsAreRefusedAndNothingIsWrittenOutsideTheVolume) {
  TempDir dir;
  const fs::path src = dir.path / "src", vol = dir.path / "area" / "vol";
  fs::create_directories(vol);
  // A real committed checkpoint of "good", step 10, on the source.
  {
    checkpoint::CheckpointerOptions o;
    o.dir = (src / "good").string();
    o.block_size = 4096;
    auto ck = checkpoint::Checkpointer::Create(o);
    ASSERT_TRUE(ck.ok()) << ck.status();
    std::vector<int32_t> w(1000, 7);
    checkpoint::SaveState s;
    s.tensors.push_back(
        checkpoint::TensorRef::Replicated("w", checkpoint::DType::kI32, {1000}, w.data()));
    ASSERT_TRUE((*ck)->Save(10, s).ok());
    ASSERT_TRUE((*ck)->Wait().ok());
  }
  const std::string abs_job = (dir.path / "abs-target").string();  // an absolute "job id"
  const std::vector<std::string> jobs = {"good", "../escaped", abs_job};
  AnyJobSource source(src, {"../escaped", abs_job});
  std::vector<proto::AgentAction> actions;
  for (const auto& j : jobs) {
    proto::AgentAction a;
    auto* r = a.mutable_replicate();
    r->set_job_id(j);
    r->set_step(10);
    r->set_volume("ckpt");
    r->set_source_node("src");
    r->set_source_endpoint(source.endpoint());
    actions.push_back(a);
  }
  FakeCoordinator coord(actions);
  node_agent::AgentOptions o;
  o.coordinator = coord.endpoint();
  o.insecure = true;
  o.labels.set_name("target");
  o.labels.set_provider("gcp");
  o.labels.set_address("127.0.0.1");
  auto* v = o.labels.add_volumes();
  v->set_name("ckpt");
  v->set_path(vol.string());
  o.work_dir = dir.path / "work";
  o.stop_grace = 500ms;
  o.call_timeout = 1000ms;
  auto agent = node_agent::Agent::Start(o);
  ASSERT_TRUE(agent.ok()) << agent.status();
  ASSERT_TRUE(WaitUntil(
      [&] {
        for (const auto& j : jobs) {
          if (!coord.Outcome(j)) return false;
        }
        return true;
      },
      30s))
      << "no outcome reported for every job";
  auto good = coord.Outcome("good");
  EXPECT_TRUE(good->checkpoint_replica()) << good->replicate_error();
  EXPECT_TRUE(fs::exists(vol / "good" / "step-000000010" / "MANIFEST"));
  for (const auto& j : {std::string("../escaped"), abs_job}) {
    auto r = coord.Outcome(j);
    EXPECT_FALSE(r->checkpoint_replica()) << j << " was replicated";
    EXPECT_NE(r->replicate_error().find("job id"), std::string::npos) << r->replicate_error();
  }
  (*agent)->Shutdown(500ms);
  EXPECT_FALSE(fs::exists(dir.path / "area" / "escaped")) << "written outside the volume";
  EXPECT_FALSE(fs::exists(abs_job)) << "written at an absolute path";
}

}  // namespace
}  // namespace muster
