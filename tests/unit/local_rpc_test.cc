// Request/reply over a Unix socket (common/local_rpc.h): real sockets, a real reactor. Frames
// whole whatever the chunks, the kernel-reported peer, replies from any thread and serialized
// once, a lazy connect, timeouts, a server that goes away, and what a peer that misbehaves
// costs (too large a frame, replies it never reads, too many connections).

#include "common/local_rpc.h"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "common/wire.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

using namespace std::chrono_literals;
using testing::WaitUntil;

TEST(LocalFrameReaderTest, FramesAreWholeWhateverTheChunksAndTooLargeIsSaidAtTheHeader) {
  std::string stream = LocalFrame("one") + LocalFrame("") + LocalFrame(std::string(5000, 'x'));
  for (size_t chunk : {size_t{1}, size_t{3}, size_t{4}, size_t{7}, size_t{4096}, stream.size()}) {
    LocalFrameReader in(8192);
    std::vector<std::string> got;
    for (size_t at = 0; at < stream.size(); at += chunk) {
      const size_t n = std::min(chunk, stream.size() - at);
      EXPECT_GT(in.missing(), 0u);
      in.Append(stream.data() + at, n);
      std::string_view f;
      while (in.Next(&f) == LocalFrameReader::Result::kFrame) got.emplace_back(f);
    }
    ASSERT_EQ(got.size(), 3u) << "chunk " << chunk;
    EXPECT_EQ(got[0], "one");
    EXPECT_EQ(got[1], "");
    EXPECT_EQ(got[2], std::string(5000, 'x'));
    EXPECT_EQ(in.buffered(), 0u);
  }
  LocalFrameReader small(10);
  std::string big = LocalFrame(std::string(11, 'y'));
  small.Append(big.data(), 4);  // the header alone says it
  std::string_view f;
  uint64_t announced = 0;
  EXPECT_EQ(small.Next(&f, &announced), LocalFrameReader::Result::kTooLarge);
  EXPECT_EQ(announced, 11u);
}

// A server on a reactor in a private directory, answering Ping with Pong (its data echoed);
// "park" in the data keeps the reply for the test to send.
class LocalRpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/muster-local-rpc-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
    path_ = dir_ + "/s";
    reactor_ = std::make_unique<Reactor>("local-rpc-test");
    reactor_->Start();
  }
  void TearDown() override {
    reactor_->Call("stop", [&] { server_.reset(); });
    reactor_->Stop();
    std::filesystem::remove_all(dir_);
  }

  Status StartServer(LocalRpcServer::Options o = {}) {
    o.path = path_;
    return reactor_->Call("start", [&]() -> Status {
      auto s = LocalRpcServer::Create(
          *reactor_, o, [this](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply r) {
            {
              std::lock_guard<std::mutex> l(mu_);
              peers_.push_back(peer);
            }
            if (req.ping().data() == "park") {
              std::lock_guard<std::mutex> l(mu_);
              parked_.push_back(std::move(r));
              return;
            }
            proto::Envelope out;
            const std::string& data = req.ping().data();
            if (data.rfind("size:", 0) == 0) {  // a reply of that many bytes
              out.mutable_pong()->set_data(std::string(std::stoul(data.substr(5)), 's'));
            } else {
              out.mutable_pong()->set_data(data);
            }
            r(std::move(out));
          });
      if (!s.ok()) return s.status();
      server_ = std::move(*s);
      return Status::Ok();
    });
  }
  std::unique_ptr<LocalRpcClient> Client() {
    LocalRpcClient::Options o;
    o.endpoint = "unix://" + path_;
    auto c = LocalRpcClient::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }
  static proto::Envelope Ping(const std::string& data) {
    proto::Envelope e;
    e.mutable_ping()->set_data(data);
    return e;
  }
  int RawConnect() {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.data(), path_.size());
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << errno;
    return fd;
  }
  size_t Connections() {
    return reactor_->Call("connections", [&] { return server_ ? server_->connections() : 0; });
  }
  size_t Parked() {
    std::lock_guard<std::mutex> l(mu_);
    return parked_.size();
  }

  std::string dir_, path_;
  std::unique_ptr<Reactor> reactor_;
  std::unique_ptr<LocalRpcServer> server_;
  std::mutex mu_;
  std::vector<PeerInfo> peers_;
  std::vector<RpcServer::Reply> parked_;
};

TEST_F(LocalRpcTest, ARequestGetsItsReplyAndTheServerKnowsThePeerFromTheKernel) {
  ASSERT_TRUE(StartServer().ok());
  EXPECT_EQ(server_->endpoint(), "unix://" + path_);
  auto c = Client();
  for (int i = 0; i < 3; ++i) {
    auto r = c->Call(Ping("hello " + std::to_string(i)), 5s);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->pong().data(), "hello " + std::to_string(i));
  }
  std::lock_guard<std::mutex> l(mu_);
  ASSERT_EQ(peers_.size(), 3u);
  // "unix:uid:gid:pid": this process, as the kernel saw it at connect.
  EXPECT_EQ(peers_[0].address, "unix:" + std::to_string(getuid()) + ":" + std::to_string(getgid()) +
                                   ":" + std::to_string(getpid()));
  EXPECT_EQ(peers_[0].routing_id, peers_[2].routing_id) << "one connection for the three calls";
}

TEST_F(LocalRpcTest, RepliesComeFromAnyThreadAndSerializedRepliesCarryEachRequestsId) {
  ASSERT_TRUE(StartServer().ok());
  constexpr int kCallers = 4;
  std::vector<std::unique_ptr<LocalRpcClient>> clients;
  for (int i = 0; i < kCallers; ++i) clients.push_back(Client());
  std::vector<StatusOr<proto::Envelope>> got(kCallers, InternalError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kCallers; ++i) {
    // Different first request ids, so that each reply must carry its own.
    for (int k = 0; k < i; ++k) ASSERT_TRUE(clients[i]->Call(Ping("warm"), 5s).ok());
    threads.emplace_back([&, i] { got[i] = clients[i]->Call(Ping("park"), 10s); });
  }
  ASSERT_TRUE(WaitUntil([&] { return Parked() == kCallers; }, 10s));
  proto::Envelope answer;
  answer.mutable_pong()->set_data("all of you");
  auto shared = std::make_shared<const SerializedReply>(answer);
  std::vector<RpcServer::Reply> parked;
  {
    std::lock_guard<std::mutex> l(mu_);
    parked = parked_;
  }
  // Half from this thread (posted to the reactor), half on the reactor itself.
  for (int i = 0; i < kCallers; i += 2) RpcServer::ReplyWith(parked[i], shared);
  reactor_->Call("reply", [&] {
    for (int i = 1; i < kCallers; i += 2) RpcServer::ReplyWith(parked[i], shared);
  });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kCallers; ++i) {
    ASSERT_TRUE(got[i].ok()) << i << ": " << got[i].status();
    EXPECT_EQ(got[i]->pong().data(), "all of you");
  }
  // A second answer to the same request is dropped.
  parked[0](Ping("again"));
  EXPECT_EQ(clients[0]->Call(Ping("next"), 5s)->pong().data(), "next");
}

TEST_F(LocalRpcTest, AClientConnectsWhenTheServerComesUpAndNamesItWhenItNeverDoes) {
  auto c = Client();
  auto none = c->Call(Ping("x"), 200ms);
  EXPECT_EQ(none.status().code(), StatusCode::kDeadlineExceeded) << none.status();
  EXPECT_NE(none.status().message().find("unix://" + path_), std::string::npos) << none.status();
  std::thread later([&] {
    std::this_thread::sleep_for(200ms);
    EXPECT_TRUE(StartServer().ok());
  });
  auto r = c->Call(Ping("late"), 10s);
  later.join();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->pong().data(), "late");
  // Not an endpoint of this transport at all.
  LocalRpcClient::Options bad;
  bad.endpoint = "ipc://" + path_;
  EXPECT_EQ(LocalRpcClient::Connect(bad).status().code(), StatusCode::kInvalidArgument);
  bad.endpoint = "unix://relative/s";
  EXPECT_EQ(LocalRpcClient::Connect(bad).status().code(), StatusCode::kInvalidArgument);
  bad.endpoint = "unix:///" + std::string(200, 'a');
  EXPECT_EQ(LocalRpcClient::Connect(bad).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(LocalRpcTest, ACallThatTimesOutLeavesTheClientUsableAndAServerThatGoesIsUnavailable) {
  ASSERT_TRUE(StartServer().ok());
  auto c = Client();
  auto parked = c->Call(Ping("park"), 300ms);
  EXPECT_EQ(parked.status().code(), StatusCode::kDeadlineExceeded) << parked.status();
  // The late reply goes to a connection the client has closed: dropped.
  {
    std::lock_guard<std::mutex> l(mu_);
    ASSERT_EQ(parked_.size(), 1u);
    parked_[0](Ping("late"));
  }
  auto next = c->Call(Ping("next"), 5s);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->pong().data(), "next");
  // A call waiting when the server closes hears it at once, not at its timeout.
  std::thread closer([&] {
    WaitUntil([&] { return Parked() == 2; }, 10s);
    reactor_->Call("close", [&] { server_.reset(); });
  });
  auto start = std::chrono::steady_clock::now();
  auto gone = c->Call(Ping("park"), 30s);
  closer.join();
  EXPECT_EQ(gone.status().code(), StatusCode::kUnavailable) << gone.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
  EXPECT_FALSE(std::filesystem::exists(path_)) << "the socket file goes with the server";
  // A reply to a request of a server that has gone is dropped, from any thread.
  {
    std::lock_guard<std::mutex> l(mu_);
    parked_[1](Ping("too late"));
  }
  // A new server at the same path: the client's next call reaches it.
  ASSERT_TRUE(StartServer().ok());
  auto again = c->Call(Ping("again"), 5s);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->pong().data(), "again");
}

TEST_F(LocalRpcTest, LargeMessagesGoThroughWholeAndTheLimitHoldsBothWays) {
  LocalRpcServer::Options o;
  o.max_message_bytes = 16 << 20;
  ASSERT_TRUE(StartServer(o).ok());
  LocalRpcClient::Options co;
  co.endpoint = "unix://" + path_;
  co.max_message_bytes = 16 << 20;
  auto c = std::move(*LocalRpcClient::Connect(co));
  // Far more than a socket buffer: the server writes it in pieces as the client reads.
  std::string big(12 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 % 251);
  auto r = c->Call(Ping(big), 30s);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->pong().data() == big);
  // Over the limit: refused before it leaves.
  auto over = c->Call(Ping(std::string(17 << 20, 'z')), 5s);
  EXPECT_EQ(over.status().code(), StatusCode::kInvalidArgument) << over.status();
  // A client with a smaller limit refuses a reply past it, and opens a new connection after.
  co.max_message_bytes = 1 << 20;
  auto small = std::move(*LocalRpcClient::Connect(co));
  auto refused = small->Call(Ping("size:" + std::to_string(2 << 20)), 30s);
  EXPECT_EQ(refused.status().code(), StatusCode::kInternal) << refused.status();
  EXPECT_NE(refused.status().message().find("over the message limit"), std::string::npos)
      << refused.status();
  auto next = small->Call(Ping("size:1000"), 30s);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->pong().data().size(), 1000u);
}

TEST_F(LocalRpcTest, APeerThatNeverReadsItsRepliesIsDisconnectedAndOthersAreServed) {
  LocalRpcServer::Options o;
  o.max_queued_bytes = 1 << 20;
  ASSERT_TRUE(StartServer(o).ok());
  int fd = RawConnect();
  // Many requests whose replies it never reads: the kernel's buffers fill, then the server's
  // queue, and then the server closes the connection.
  proto::Envelope e = Ping(std::string(64 << 10, 'q'));
  e.set_request_id(1);
  const std::string frame = LocalFrame(SerializeEnvelope(e));
  timeval tv{2, 0};  // a blocking send that the server stopped reading fails after 2 s
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  int sent = 0;
  for (; sent < 400; ++sent) {
    if (send(fd, frame.data(), frame.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(frame.size())) {
      break;  // EPIPE: the server closed the connection
    }
  }
  EXPECT_TRUE(WaitUntil([&] { return Connections() == 0; }, 10s))
      << Connections() << " connections after " << sent << " requests";
  close(fd);
  auto c = Client();
  EXPECT_EQ(c->Call(Ping("fine"), 5s)->pong().data(), "fine");
}

TEST_F(LocalRpcTest, ConnectionsPastTheLimitAreClosedAndTheRestServed) {
  LocalRpcServer::Options o;
  o.max_connections = 2;
  ASSERT_TRUE(StartServer(o).ok());
  auto a = Client(), b = Client(), extra = Client();
  ASSERT_TRUE(a->Call(Ping("a"), 5s).ok());
  ASSERT_TRUE(b->Call(Ping("b"), 5s).ok());
  auto refused = extra->Call(Ping("c"), 5s);
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status();
  EXPECT_NE(refused.status().message().find("2 connections are open, the most it serves"),
            std::string::npos)
      << refused.status();
  EXPECT_TRUE(a->Call(Ping("a2"), 5s).ok());
  a.reset();
  ASSERT_TRUE(WaitUntil([&] { return Connections() == 1; }, 5s));
  auto now = extra->Call(Ping("c2"), 5s);
  EXPECT_TRUE(now.ok()) << now.status();
}

TEST_F(LocalRpcTest, MalformedFramesGetErrorsAndSixteenInARowCloseTheConnection) {
  ASSERT_TRUE(StartServer().ok());
  int fd = RawConnect();
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  const std::string junk = LocalFrame("\xff\xff not an envelope");
  std::string stream;
  for (int i = 0; i < 40; ++i) stream += junk;
  ASSERT_EQ(send(fd, stream.data(), stream.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(stream.size()));
  // Error replies, the last one saying why the connection closes; then the end of the stream.
  LocalFrameReader in(kDefaultMaxMessageBytes);
  std::vector<proto::Envelope> replies;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) {
    in.Append(buf, static_cast<size_t>(n));
    std::string_view f;
    while (in.Next(&f) == LocalFrameReader::Result::kFrame) {
      replies.push_back(*ParseEnvelope(f.data(), f.size()));
    }
  }
  close(fd);
  ASSERT_EQ(replies.size(), 16u);
  for (const auto& r : replies) EXPECT_EQ(r.error().code(), proto::INVALID_ARGUMENT);
  EXPECT_NE(replies.back().error().message().find("16 malformed messages in a row"),
            std::string::npos)
      << replies.back().error().message();
  // Other connections are served throughout.
  auto c = Client();
  EXPECT_EQ(c->Call(Ping("fine"), 5s)->pong().data(), "fine");
}

TEST_F(LocalRpcTest, AFileAlreadyAtThePathIsNotReplaced) {
  { std::ofstream(path_) << "someone's"; }
  auto s = StartServer();
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find(path_), std::string::npos) << s;
  EXPECT_TRUE(std::filesystem::is_regular_file(path_));
}

// The kernel refuses to pass a descriptor (ETOOMANYREFS) once the sending user has more in
// flight than its open-file limit, unless it holds CAP_SYS_RESOURCE or CAP_SYS_ADMIN. The
// server then sends the reply's fallback, without a descriptor. Real: a child process that runs
// as an unprivileged user of its own (no capabilities) with a limit of 64 open files, a server that
// answers each request with a memfd and a fallback, and a client that reads nothing until 100
// replies are queued. Root only (to become nobody); skipped elsewhere. The child of the test below:
// returns its exit code (0: as expected). A user of its own (the kernel counts descriptors in
// flight per user, so no other process's may count against it): a uid in 40000..49999 that no
// account needs to exist for.
uid_t UnprivilegedUid() { return static_cast<uid_t>(40000 + getpid() % 10000); }

bool BecomeUnprivileged() {
  const uid_t uid = UnprivilegedUid();
  return setgroups(0, nullptr) == 0 && setgid(uid) == 0 && setuid(uid) == 0;
}

int RefusedDescriptorChild() {
  if (!BecomeUnprivileged()) return 10;
  rlimit lim{64, 64};
  if (setrlimit(RLIMIT_NOFILE, &lim) != 0) return 11;
  char templ[] = "/tmp/muster-local-rpc-refs-XXXXXX";
  if (mkdtemp(templ) == nullptr) return 12;
  const std::string path = std::string(templ) + "/s";
  int memfd = memfd_create("reply", MFD_CLOEXEC);
  if (memfd < 0) return 13;
  auto file = std::make_shared<const ScopedFd>(memfd);
  auto answered = std::make_shared<std::atomic<int>>(0);
  Reactor reactor("refs");
  reactor.Start();
  std::unique_ptr<LocalRpcServer> server;
  Status started = reactor.Call("start", [&]() -> Status {
    LocalRpcServer::Options o;
    o.path = path;
    auto s = LocalRpcServer::Create(
        reactor, o, [file, answered](const PeerInfo&, proto::Envelope&&, RpcServer::Reply r) {
          proto::Envelope named;
          named.mutable_pong()->set_data("with a descriptor");
          auto fallback = std::make_shared<proto::Envelope>();
          fallback->mutable_pong()->set_data("plain");
          if (!ReplyWithDescriptor(r, std::make_shared<const SerializedReply>(named), file,
                                   fallback)) {
            _exit(14);
          }
          ++*answered;  // the reply was written (or queued) before ReplyWithDescriptor returned
        });
    if (!s.ok()) return s.status();
    server = std::move(*s);
    return Status::Ok();
  });
  if (!started.ok()) return 15;
  auto conn = ConnectUnixSocket("unix://" + path, std::chrono::steady_clock::now() + 5s);
  if (!conn.ok()) return 16;
  const int fd = conn->get();
  constexpr int kRequests = 100;
  for (int i = 1; i <= kRequests; ++i) {
    proto::Envelope e;
    e.set_request_id(i);
    e.mutable_ping()->set_data("x");
    const std::string frame = LocalFrame(SerializeEnvelope(e));
    if (send(fd, frame.data(), frame.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(frame.size())) {
      return 17;
    }
  }
  // Every reply written (nothing read yet, so their descriptors stay in flight): the handler
  // writes each before it returns.
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (answered->load() < kRequests && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  if (answered->load() < kRequests) return 23;
  LocalFrameReader in(1 << 20);
  int with_fd = 0, plain = 0, descriptors = 0;
  std::vector<uint64_t> ids;
  char buf[4096];
  const int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  while (static_cast<int>(ids.size()) < kRequests) {
    std::vector<ScopedFd> fds;
    bool truncated = false;
    ssize_t n = RecvWithDescriptors(fd, buf, sizeof(buf), &fds, &truncated);
    if (n <= 0) break;
    descriptors += static_cast<int>(fds.size());
    in.Append(buf, static_cast<size_t>(n));
    std::string_view f;
    while (in.Next(&f) == LocalFrameReader::Result::kFrame) {
      auto e = ParseEnvelope(f.data(), f.size());
      if (!e.ok()) return 18;
      ids.push_back(e->request_id());
      if (e->pong().data() == "with a descriptor") ++with_fd;
      if (e->pong().data() == "plain") ++plain;
    }
  }
  std::fprintf(stderr, "replies %zu: %d with a descriptor (%d descriptors), %d plain\n", ids.size(),
               with_fd, descriptors, plain);
  reactor.Call("stop", [&] { server.reset(); });
  reactor.Stop();
  std::filesystem::remove_all(templ);
  if (static_cast<int>(ids.size()) != kRequests) return 19;
  for (int i = 0; i < kRequests; ++i) {
    if (ids[i] != static_cast<uint64_t>(i + 1)) return 20;  // each its own id, in order
  }
  if (with_fd + plain != kRequests || with_fd != descriptors) return 21;
  if (plain == 0 || with_fd == 0) return 22;  // the limit was reached, and not at once
  return 0;
}

TEST(LocalRpcDescriptorTest, ADescriptorTheKernelRefusesToPassGoesAsTheFallbackReply) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to run the server as an unprivileged user";
  // Where this process may not change its user (a container without the mapping), skip.
  pid_t probe = fork();
  if (probe == 0) _exit(BecomeUnprivileged() ? 0 : 1);
  int status = 0;
  ASSERT_EQ(waitpid(probe, &status, 0), probe);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    GTEST_SKIP() << "cannot switch to uid " << UnprivilegedUid() << " here";
  }
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(_exit(RefusedDescriptorChild()), ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace muster
