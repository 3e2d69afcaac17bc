// The local snapshot channel over a real Unix socket: a rank's SnapshotSender hands its state to
// the agent's SnapshotServer, which keeps it in the bounded SnapshotStore; the rank gets it back
// with SnapshotClient::Get and restores it (checkpoint/snapshot_state.h).

#include "checkpoint/snapshot_channel.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "checkpoint/snapshot_state.h"
#include "node_agent/snapshots/snapshot_server.h"

namespace muster {
namespace {

using checkpoint::DType;
using checkpoint::RestoreRequest;
using checkpoint::SaveState;
using checkpoint::SnapshotClient;
using checkpoint::SnapshotKey;
using checkpoint::SnapshotSender;
using checkpoint::TensorRef;
using node_agent::SnapshotServer;
using node_agent::SnapshotStore;
using std::chrono::seconds;

class SnapshotChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = "/tmp/snapshots-test-" + std::to_string(::getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    path_ = dir_ + "/s.sock";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  sockaddr_un Address() const {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.data(), path_.size());
    return addr;
  }
  // A stand-in agent's listening socket at path_ (what the test does with it is its own), or -1.
  int Listen(int backlog) {
    std::filesystem::create_directories(dir_);
    int lfd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr = Address();
    if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(lfd, backlog) != 0) {
      ::close(lfd);
      return -1;
    }
    return lfd;
  }
  std::string dir_, path_;
};

SnapshotKey Key(int rank, int64_t step = 0) {
  return {.job = "ft-1", .attempt = 0, .rank = rank, .world_size = 2, .step = step};
}

TEST_F(SnapshotChannelTest, ARanksStateGoesToTheAgentAndComesBackBitForBit) {
  SnapshotStore store({.memory_limit = 1 << 20});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  EXPECT_EQ(std::filesystem::status(dir_).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_all);

  std::vector<float> w(6 * 4);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.5f * static_cast<float>(i);
  std::vector<int64_t> bias = {7, -3};
  SaveState state;
  state.tensors.push_back(TensorRef::RowShard("w", DType::kF32, {12, 4}, 6, 6, w.data()));
  state.tensors.push_back(TensorRef::Replicated("b", DType::kI64, {2}, bias.data()));
  state.metadata = std::string("pos=42\0rng", 10);
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(1)});
  ASSERT_TRUE(sender->Snapshot(30, state).ok());
  ASSERT_TRUE(sender->Flush(seconds(10)).ok());
  EXPECT_EQ(sender->sent(), 1);
  ASSERT_EQ(store.Held("ft-1").size(), 1u);
  EXPECT_EQ(store.Held("ft-1")[0].step, 30);

  auto client = SnapshotClient::Connect(path_);
  ASSERT_TRUE(client.ok());
  auto f = (*client)->Get(Key(1, 30), 1 << 20);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::vector<float> w2(w.size(), -1);
  std::vector<int64_t> bias2(2, 0);
  std::string meta;
  ASSERT_TRUE(checkpoint::RestoreSnapshotState(
                  f->payload,
                  {RestoreRequest::RowShard("w", DType::kF32, {12, 4}, 6, 6, w2.data()),
                   RestoreRequest::Whole("b", DType::kI64, bias2.data())},
                  &meta)
                  .ok());
  EXPECT_EQ(w2, w);
  EXPECT_EQ(bias2, bias);
  EXPECT_EQ(meta, state.metadata);
  // Asked for a step it does not hold, the agent says so.
  EXPECT_EQ((*client)->Get(Key(1, 40), 1 << 20).status().code(), StatusCode::kNotFound);
  // A slice other than the one saved, or another dtype, is refused before any byte is copied.
  std::vector<float> other(4 * 4, -1);
  Status s = checkpoint::RestoreSnapshotState(
      f->payload, {RestoreRequest::RowShard("w", DType::kF32, {12, 4}, 4, 4, other.data())});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(other, std::vector<float>(16, -1));
  EXPECT_EQ(checkpoint::RestoreSnapshotState(
                f->payload, {RestoreRequest::Whole("b", DType::kI32, bias2.data())})
                .code(),
            StatusCode::kInvalidArgument);
  // A whole tensor of another size than the destination says it holds (the program's tensor
  // shrank between attempts) is refused before a byte is copied.
  std::vector<int64_t> one(2, 7);
  s = checkpoint::RestoreSnapshotState(
      f->payload, {RestoreRequest::Whole("b", DType::kI64, one.data(), sizeof(int64_t))});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("holds 16 bytes, the destination 8 bytes"), std::string::npos) << s;
  EXPECT_EQ(one, std::vector<int64_t>(2, 7));
  EXPECT_TRUE(checkpoint::RestoreSnapshotState(
                  f->payload, {RestoreRequest::Whole("b", DType::kI64, one.data(), 16)})
                  .ok());
  EXPECT_EQ(one, bias);
}

TEST_F(SnapshotChannelTest, TheAgentsRefusalReachesTheRankAndNothingIsKept) {
  SnapshotStore store({.memory_limit = 1000});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok());
  std::vector<char> big(600);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("x", DType::kU8, {600}, big.data()));
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(0)});
  ASSERT_TRUE(sender->Snapshot(10, state).ok());
  Status s = sender->Flush(seconds(10));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("do not fit"), std::string::npos) << s.ToString();
  EXPECT_EQ(store.used_bytes(), 0u);
  EXPECT_EQ(sender->sent(), 0);
}

TEST_F(SnapshotChannelTest, WithoutAnAgentTheRankIsNotHeldUp) {
  std::vector<float> w(1000);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("w", DType::kF32, {1000}, w.data()));
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(0)});
  ASSERT_TRUE(sender->Snapshot(1, state).ok());
  EXPECT_EQ(sender->Flush(seconds(10)).code(), StatusCode::kUnavailable);
  // Once the agent is up, the next snapshot reaches it.
  SnapshotStore store({.memory_limit = 1 << 20});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE(sender->Snapshot(2, state).ok());
  EXPECT_TRUE(sender->Flush(seconds(10)).ok());
  EXPECT_EQ(store.Held("ft-1").size(), 1u);
}

TEST_F(SnapshotChannelTest, AMalformedRequestGetsAnErrorAndTheServerKeepsServing) {
  SnapshotStore store({.memory_limit = 1 << 20});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok());
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  std::string junk = "P" + std::string(checkpoint::kSnapshotHeaderBytes, 'x');
  ASSERT_TRUE(checkpoint::SendAll(fd, junk).ok());
  char head[5];
  ASSERT_TRUE(
      checkpoint::RecvAll(fd, head, 5, std::chrono::steady_clock::now() + seconds(10)).ok());
  EXPECT_EQ(head[0], static_cast<char>(StatusCode::kDataLoss));
  char more;
  uint32_t len = 0;
  std::memcpy(&len, head + 1, 4);
  std::string msg(len, '\0');
  ASSERT_TRUE(checkpoint::RecvAll(fd, msg.data(), len).ok());
  EXPECT_NE(msg.find("magic"), std::string::npos) << msg;
  EXPECT_EQ(::recv(fd, &more, 1, 0), 0);  // closed
  ::close(fd);
  // A payload larger than the whole limit is refused from its header, unread.
  auto client = SnapshotClient::Connect(path_);
  ASSERT_TRUE(client.ok());
  auto frame = checkpoint::EncodeSnapshotFrame(Key(0, 1), std::string((1 << 20) + 1, 'z'));
  ASSERT_TRUE(frame.ok());
  Status s = (*client)->Put(frame->substr(0, checkpoint::kSnapshotHeaderBytes));
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_NE(s.message().find("exceeds the limit"), std::string::npos) << s.ToString();
  // Others are still served.
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(0)});
  std::vector<char> x(10);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("x", DType::kU8, {10}, x.data()));
  ASSERT_TRUE(sender->Snapshot(5, state).ok());
  EXPECT_TRUE(sender->Flush(seconds(10)).ok());
}

// The put in place: the agent reads the tensors out of the rank's memory (process_vm_readv) and
// keeps exactly the payload a copying put would have sent; nothing is copied in the rank.
TEST_F(SnapshotChannelTest, AnInPlaceSnapshotIsReadByTheAgentAndKeptAsACopyWouldBe) {
  SnapshotStore store({.memory_limit = 4 << 20});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  std::vector<float> w(300000);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.25f * static_cast<float>(i);
  std::vector<int64_t> bias = {7, -3};
  std::vector<char> empty;
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("w", DType::kF32, {300000}, w.data()));
  state.tensors.push_back(TensorRef::Replicated("b", DType::kI64, {2}, bias.data()));
  state.tensors.push_back(TensorRef::Replicated("e", DType::kU8, {0}, empty.data()));
  state.metadata = "step=30";
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(1)});
  ASSERT_TRUE(sender->SnapshotInPlace(30, state).ok());
  // A second one before the first is released is refused: its tensors are still lent.
  EXPECT_EQ(sender->SnapshotInPlace(31, state).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(sender->Release(seconds(10)).ok());
  EXPECT_TRUE(sender->in_place());
  w[0] = -1;  // after Release: not in the snapshot
  ASSERT_TRUE(sender->Flush(seconds(10)).ok());
  EXPECT_EQ(sender->sent(), 1);
  auto held = store.Get("ft-1", 1, 30);
  ASSERT_TRUE(held.ok()) << held.status();
  w[0] = 0;
  auto want = checkpoint::EncodeSnapshotState(state);
  ASSERT_TRUE(want.ok());
  EXPECT_TRUE((*held)->payload == *want);
  EXPECT_EQ((*held)->key, Key(1, 30));
  // Release with nothing lent returns at once.
  EXPECT_TRUE(sender->Release(std::chrono::milliseconds(0)).ok());
}

// An agent that does not read in place (it cannot, or must not) answers so; the sender's thread
// copies the state instead (Release waits for that copy) and keeps copying from then on.
TEST_F(SnapshotChannelTest, WhereTheAgentCannotReadInPlaceTheSenderCopies) {
  SnapshotStore store({.memory_limit = 1 << 20});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  (*server)->DisableInPlace();
  std::vector<int32_t> v(1000, 5);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("v", DType::kI32, {1000}, v.data()));
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(0)});
  for (int64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE(sender->SnapshotInPlace(step, state).ok());
    ASSERT_TRUE(sender->Release(seconds(10)).ok());
    const std::vector<int32_t> was = v;
    std::fill(v.begin(), v.end(), static_cast<int32_t>(step * 100));  // after Release
    ASSERT_TRUE(sender->Flush(seconds(10)).ok());
    auto held = store.Get("ft-1", 0, step);
    ASSERT_TRUE(held.ok()) << held.status();
    std::vector<int32_t> got(1000);
    ASSERT_TRUE(checkpoint::RestoreSnapshotState(
                    (*held)->payload, {RestoreRequest::Whole("v", DType::kI32, got.data())})
                    .ok());
    EXPECT_EQ(got, was) << "step " << step;
    EXPECT_FALSE(sender->in_place());
  }
  EXPECT_EQ(sender->sent(), 3);
}

// An agent that does not answer a put in place: Release gives it up after its timeout, shuts the
// connection down (an agent checks it after reading and keeps nothing read from a rank that gave
// up), and training goes on; the next snapshot opens a new connection.
TEST_F(SnapshotChannelTest, ReleaseCutsAnInPlaceReadThatTakesTooLong) {
  int lfd = Listen(4);
  ASSERT_GE(lfd, 0);
  std::atomic<bool> saw_eof{false};
  std::thread silent([&] {  // reads the request, never answers, waits for the close
    int fd = ::accept(lfd, nullptr, nullptr);
    char buf[4096];
    while (true) {
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n == 0) {
        saw_eof = true;
        break;
      }
      if (n < 0) break;
    }
    ::close(fd);
  });
  std::vector<float> w(1000, 1.5f);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("w", DType::kF32, {1000}, w.data()));
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(0)});
  ASSERT_TRUE(sender->SnapshotInPlace(4, state).ok());
  const auto t0 = std::chrono::steady_clock::now();
  Status s = sender->Release(std::chrono::milliseconds(200));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s;
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(200));
  silent.join();
  EXPECT_TRUE(saw_eof);
  EXPECT_EQ(sender->sent(), 0);
  ::close(lfd);
}

// An agent that accepts no connection (frozen, its backlog full) holds the sender's connect;
// Release frees the tensors after its timeout anyway, without waiting for the connect to give
// up (10 s), and nothing of that snapshot is sent.
TEST_F(SnapshotChannelTest, ReleaseDoesNotWaitForAConnectToAFrozenAgent) {
  int lfd = Listen(0);
  ASSERT_GE(lfd, 0);
  sockaddr_un addr = Address();
  std::vector<int> fillers;  // never accepted: the backlog fills up
  for (int i = 0; i < 64; ++i) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd);
      break;
    }
    fillers.push_back(fd);
  }
  ASSERT_FALSE(fillers.empty());
  std::vector<float> w(1000, 1.5f);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("w", DType::kF32, {1000}, w.data()));
  auto sender = SnapshotSender::Create({.socket_path = path_, .key = Key(0)});
  ASSERT_TRUE(sender->SnapshotInPlace(4, state).ok());
  const auto t0 = std::chrono::steady_clock::now();
  Status s = sender->Release(std::chrono::milliseconds(200));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s;
  EXPECT_LT(took, seconds(5)) << "waited for the connect to give up";
  // The next in-place snapshot may be queued at once.
  EXPECT_TRUE(sender->SnapshotInPlace(5, state).ok());
  ::close(lfd);  // the held connect fails now, and the sender moves on
  for (int fd : fillers) ::close(fd);
  sender.reset();
}

// Put-in-place requests that are malformed or name memory the rank does not have are refused
// with the reason, and nothing is kept; the part list's codec round-trips.
TEST_F(SnapshotChannelTest, AMalformedOrUnreadablePutInPlaceIsRefused) {
  SnapshotStore store({.memory_limit = 1 << 20});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok());
  auto ask = [&](const std::string& parts, uint64_t payload_length) -> Status {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.data(), path_.size());
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    auto prefix = checkpoint::EncodeSnapshotPrefix(Key(0, 9), payload_length, 0);
    EXPECT_TRUE(prefix.ok());
    EXPECT_TRUE(checkpoint::SendAll(fd, "V" + *prefix + parts).ok());
    char head[5];
    const auto deadline = std::chrono::steady_clock::now() + seconds(10);
    Status st = checkpoint::RecvAll(fd, head, 1, deadline);
    // The read acknowledgement comes first when the agent has read the memory.
    if (st.ok() && head[0] == checkpoint::kSnapshotReadAck) {
      st = checkpoint::RecvAll(fd, head, 1, deadline);
    }
    if (st.ok()) st = checkpoint::RecvAll(fd, head + 1, 4, deadline);
    if (!st.ok()) {
      ::close(fd);
      return st;
    }
    uint32_t len = 0;
    std::memcpy(&len, head + 1, 4);
    std::string msg(len, '\0');
    EXPECT_TRUE(checkpoint::RecvAll(fd, msg.data(), len).ok());
    ::close(fd);
    return Status(static_cast<StatusCode>(head[0]), msg);
  };
  using checkpoint::SnapshotPart;
  const std::string bytes = "0123456789";
  // No parts; a part past the payload; parts short of it; an unknown kind.
  EXPECT_EQ(ask(std::string(4, '\0'), 10).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ask(checkpoint::EncodeSnapshotParts({SnapshotPart::Here(bytes)}), 5).code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(ask(checkpoint::EncodeSnapshotParts({SnapshotPart::Here(bytes)}), 20).code(),
            StatusCode::kDataLoss);
  std::string bad_kind = checkpoint::EncodeSnapshotParts({SnapshotPart::Here(bytes)});
  bad_kind[4] = 7;
  EXPECT_EQ(ask(bad_kind, 10).code(), StatusCode::kDataLoss);
  // Memory this process does not have mapped: refused with the reason.
  Status unreadable = ask(checkpoint::EncodeSnapshotParts(
                              {SnapshotPart::InMemory(reinterpret_cast<void*>(0x10), 4096)}),
                          4096);
  EXPECT_EQ(unreadable.code(), StatusCode::kInvalidArgument) << unreadable;
  EXPECT_NE(unreadable.message().find("not readable"), std::string::npos) << unreadable;
  EXPECT_TRUE(store.Held("ft-1").empty());
  // A byte past the request, sent with it (the agent's reader has it buffered, not waiting on
  // the socket): refused after the read, nothing kept.
  Status extra = ask(checkpoint::EncodeSnapshotParts(
                         {SnapshotPart::Here(bytes), SnapshotPart::InMemory(bytes.data() + 2, 3)}) +
                         "x",
                     13);
  EXPECT_EQ(extra.code(), StatusCode::kInvalidArgument) << extra;
  EXPECT_NE(extra.message().find("more bytes"), std::string::npos) << extra;
  EXPECT_TRUE(store.Held("ft-1").empty());
  // Well formed: kept, inline and in-memory parts in their order.
  Status good = ask(checkpoint::EncodeSnapshotParts(
                        {SnapshotPart::Here(bytes), SnapshotPart::InMemory(bytes.data() + 2, 3)}),
                    13);
  EXPECT_TRUE(good.ok()) << good;
  auto held = store.Get("ft-1", 0, 9);
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ((*held)->payload, "0123456789234");
  // The codec alone.
  std::string payload(13, '.');
  std::string wire = checkpoint::EncodeSnapshotParts(
      {SnapshotPart::Here(bytes), SnapshotPart::InMemory(bytes.data(), 3)});
  std::string_view in = wire;
  auto parts = checkpoint::ReadSnapshotParts(
      [&](char* out, size_t n) {
        if (n > in.size()) return UnavailableError("short");
        std::memcpy(out, in.data(), n);
        in.remove_prefix(n);
        return Status::Ok();
      },
      &payload);
  ASSERT_TRUE(parts.ok()) << parts.status();
  ASSERT_EQ(parts->size(), 1u);
  EXPECT_EQ((*parts)[0].at, 10u);
  EXPECT_EQ((*parts)[0].address, reinterpret_cast<uint64_t>(bytes.data()));
  EXPECT_EQ(payload.substr(0, 10), bytes);
}

// BufferedReader: small reads come out of one recv of what has arrived, a large one goes past
// the buffer straight to its destination, bytes beyond what was read are counted, and errors
// are RecvAll's (the peer gone, a deadline passed).
TEST(BufferedReaderTest, ReadsFieldsAndPayloadsInOrderAndReportsWhatIsLeft) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  std::string big(200 << 10, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 + 3);
  std::thread writer([&] { EXPECT_TRUE(checkpoint::SendAll(sv[1], "ab" + big + "xyz").ok()); });
  checkpoint::BufferedReader in(sv[0], 4096);
  char c[2];
  ASSERT_TRUE(in.Read(c, 1).ok());
  ASSERT_TRUE(in.Read(c + 1, 1).ok());
  EXPECT_EQ(std::string(c, 2), "ab");
  std::string got(big.size(), '\0');
  ASSERT_TRUE(in.Read(got.data(), got.size(), std::chrono::steady_clock::now() + seconds(10)).ok());
  EXPECT_EQ(got, big);
  writer.join();
  char x = 0;
  ASSERT_TRUE(in.Read(&x, 1, std::chrono::steady_clock::now() + seconds(10)).ok());
  EXPECT_EQ(x, 'x');
  EXPECT_EQ(in.buffered(), 2u);  // "yz" came with it
  char yz[2];
  ASSERT_TRUE(in.Read(yz, 2).ok());
  EXPECT_EQ(in.buffered(), 0u);
  // Nothing more before the deadline.
  Status late = in.Read(&x, 1, std::chrono::steady_clock::now() + std::chrono::milliseconds(50));
  EXPECT_EQ(late.code(), StatusCode::kUnavailable) << late;
  EXPECT_NE(late.message().find("timed out"), std::string::npos) << late;
  // The writer gone mid-field.
  ASSERT_TRUE(checkpoint::SendAll(sv[1], "p").ok());
  ::close(sv[1]);
  char two[2];
  Status gone = in.Read(two, 2, std::chrono::steady_clock::now() + seconds(10));
  EXPECT_EQ(gone.code(), StatusCode::kUnavailable) << gone;
  EXPECT_NE(gone.message().find("closed"), std::string::npos) << gone;
  ::close(sv[0]);
}

// ReadRegions calls the reader again past a short count (the kernel reads at most ~2 GiB per
// process_vm_readv call, and stops before a region it cannot read): every byte lands in its
// place across region boundaries; a call that reads nothing more, or fails, ends it with -errno.
TEST(ReadRegionsTest, ShortReadsAreContinuedAndAFaultEndsIt) {
  std::string src = "abcdefghijklmnopqrstuvwxyz0123456789";
  std::string dst(src.size(), '.');
  std::vector<iovec> local = {{dst.data(), 10}, {dst.data() + 10, 0}, {dst.data() + 10, 26}};
  std::vector<iovec> remote = {{src.data(), 10}, {src.data() + 10, 0}, {src.data() + 10, 26}};
  int calls = 0;
  // At most 7 bytes per call, like a kernel that stops short.
  auto seven = [&](const iovec* l, size_t n, const iovec* r) -> ssize_t {
    ++calls;
    size_t done = 0;
    for (size_t k = 0; k < n && done < 7; ++k) {
      const size_t take = std::min(r[k].iov_len, 7 - done);
      std::memcpy(l[k].iov_base, r[k].iov_base, take);
      done += take;
      if (take < r[k].iov_len) break;
    }
    return static_cast<ssize_t>(done);
  };
  EXPECT_EQ(node_agent::ReadRegions(seven, local, remote), 36);
  EXPECT_EQ(dst, src);
  EXPECT_EQ(calls, 6);
  // A reader that stops for good (a region not mapped) and one that fails.
  auto nothing = [](const iovec*, size_t, const iovec*) -> ssize_t { return 0; };
  EXPECT_EQ(node_agent::ReadRegions(nothing, local, remote), -EFAULT);
  auto fails = [](const iovec*, size_t, const iovec*) -> ssize_t {
    errno = EPERM;
    return -1;
  };
  EXPECT_EQ(node_agent::ReadRegions(fails, local, remote), -EPERM);
  // Regions of unequal lengths are refused before any read.
  EXPECT_EQ(node_agent::ReadRegions(seven, {{dst.data(), 3}}, {{src.data(), 4}}), -EINVAL);
}

// A rank that stalls in the middle of a frame loses its connection after the frame timeout, and
// the bytes it had reserved against the limit are free again: a frame as large as the whole
// limit is then kept. (Without the timeout the stalled connection holds them for ever.)
TEST_F(SnapshotChannelTest, AFrameStalledMidwayIsDroppedAndItsReservationFreed) {
  const uint64_t limit = 64 << 10;
  SnapshotStore store({.memory_limit = 2 * limit, .keep_steps = 1});
  auto server = SnapshotServer::Start(path_, &store, nullptr, std::chrono::milliseconds(300));
  ASSERT_TRUE(server.ok());
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  auto frame = checkpoint::EncodeSnapshotFrame(Key(0, 1), std::string(limit + (limit / 2), 's'));
  ASSERT_TRUE(frame.ok());
  // The header and a little of the body, then nothing.
  ASSERT_TRUE(
      checkpoint::SendAll(fd, "P" + frame->substr(0, checkpoint::kSnapshotHeaderBytes + 100)).ok());
  // Another rank's frame of the same size would not fit beside the stalled one's reservation.
  auto other = SnapshotClient::Connect(path_);
  ASSERT_TRUE(other.ok());
  auto big = checkpoint::EncodeSnapshotFrame(Key(1, 1), std::string(limit + (limit / 2), 'b'));
  ASSERT_TRUE(big.ok());
  // The stalled connection is closed by the server.
  char c;
  pollfd p{fd, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 10000), 1);
  EXPECT_EQ(::recv(fd, &c, 1, 0), 0);
  ::close(fd);
  Status put = (*other)->Put(*big);
  EXPECT_TRUE(put.ok()) << put.ToString();
  EXPECT_TRUE(store.Get("ft-1", 1, 1).ok());
}

TEST(SnapshotStateTest, AMalformedPayloadIsDataLoss) {
  std::vector<float> w(8, 1.0f);
  SaveState state;
  state.tensors.push_back(TensorRef::Replicated("w", DType::kF32, {8}, w.data()));
  auto p = checkpoint::EncodeSnapshotState(state);
  ASSERT_TRUE(p.ok());
  std::vector<float> out(8);
  std::vector<RestoreRequest> req = {RestoreRequest::Whole("w", DType::kF32, out.data())};
  EXPECT_TRUE(checkpoint::RestoreSnapshotState(*p, req).ok());
  EXPECT_EQ(checkpoint::RestoreSnapshotState(p->substr(0, p->size() - 1), req).code(),
            StatusCode::kDataLoss);
  std::string bad = *p;
  bad[0] = '\xff';
  EXPECT_EQ(checkpoint::RestoreSnapshotState(bad, req).code(), StatusCode::kDataLoss);
  bad = *p;
  bad[6] = '!';  // inside the JSON index
  EXPECT_EQ(checkpoint::RestoreSnapshotState(bad, req).code(), StatusCode::kDataLoss);
  EXPECT_EQ(
      checkpoint::RestoreSnapshotState(*p, {RestoreRequest::Whole("nope", DType::kF32, out.data())})
          .code(),
      StatusCode::kNotFound);
  state.tensors[0].memory = checkpoint::MemoryKind::kCuda;
  EXPECT_EQ(checkpoint::EncodeSnapshotState(state).status().code(),
            StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

TEST_F(SnapshotChannelTest, AFrameRefusedFromItsHeaderReportsTheAgentsReason) {
  // Larger than the agent's whole limit: refused before its bytes are read, and the connection
  // closed while the rank still sends. The rank gets the agent's reason, not a broken pipe.
  SnapshotStore store({.memory_limit = 4096});
  auto server = SnapshotServer::Start(path_, &store);
  ASSERT_TRUE(server.ok());
  auto client = SnapshotClient::Connect(path_);
  ASSERT_TRUE(client.ok());
  Status s = (*client)->Put(Key(0, 1), std::string(8 << 20, 'x'));
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_NE(s.message().find("exceeds the limit of 4096"), std::string::npos) << s.ToString();
  EXPECT_TRUE(store.Held("ft-1").empty());
}

TEST(SnapshotStateTest, TheIndexDescribesEachTensorAndTheMetadata) {
  std::vector<float> w(6 * 4, 1.0f);
  std::vector<int64_t> b = {1, 2};
  SaveState state;
  state.tensors.push_back(TensorRef::RowShard("w", DType::kF32, {12, 4}, 6, 6, w.data()));
  state.tensors.push_back(TensorRef::Replicated("b", DType::kI64, {2}, b.data()));
  state.metadata = "meta";
  auto p = checkpoint::EncodeSnapshotState(state);
  ASSERT_TRUE(p.ok());
  std::string meta;
  auto index = checkpoint::ReadSnapshotIndex(*p, &meta);
  ASSERT_TRUE(index.ok()) << index.status().ToString();
  ASSERT_EQ(index->size(), 2u);
  const auto& t = (*index)[0];
  EXPECT_EQ(t.name, "w");
  EXPECT_EQ(t.dtype, DType::kF32);
  EXPECT_EQ(t.shape, (std::vector<int64_t>{12, 4}));
  EXPECT_EQ(t.offsets, (std::vector<int64_t>{6, 0}));
  EXPECT_EQ(t.lengths, (std::vector<int64_t>{6, 4}));
  EXPECT_FALSE(t.replicated);
  EXPECT_EQ(t.bytes, 6u * 4 * 4);
  EXPECT_EQ((*index)[1].name, "b");
  EXPECT_TRUE((*index)[1].replicated);
  EXPECT_EQ((*index)[1].lengths, (std::vector<int64_t>{2}));
  EXPECT_EQ(meta, "meta");
  EXPECT_EQ(checkpoint::ReadSnapshotIndex(p->substr(0, p->size() - 1)).status().code(),
            StatusCode::kDataLoss);
}

// The index cache: a state with the last call's layout gets the index an uncached call builds,
// with the new data pointers; any change in the layout or the metadata's size builds it again;
// a state refused is refused with a cache too (and leaves none to reuse).
TEST(SnapshotStateTest, TheCachedIndexIsTheOneBuiltAndFollowsEveryLayoutChange) {
  std::vector<float> w(6 * 4, 1.0f), w2(6 * 4, 2.0f);
  std::vector<int64_t> b = {1, 2};
  SaveState state;
  state.tensors.push_back(TensorRef::RowShard("w", DType::kF32, {12, 4}, 6, 6, w.data()));
  state.tensors.push_back(TensorRef::Replicated("b", DType::kI64, {2}, b.data()));
  state.metadata = "meta";
  checkpoint::SnapshotIndexCache cache;
  auto encode = [&](checkpoint::SnapshotIndexCache* c) {
    std::string out;
    EXPECT_TRUE(checkpoint::EncodeSnapshotStateInto(state, &out, c).ok());
    return out;
  };
  auto same_as_uncached = [&](const std::string& what) {
    std::string head, uncached_head;
    std::vector<checkpoint::SnapshotSpan> spans, uncached_spans;
    ASSERT_TRUE(checkpoint::EncodeSnapshotStateParts(state, &head, &spans, &cache).ok()) << what;
    ASSERT_TRUE(checkpoint::EncodeSnapshotStateParts(state, &uncached_head, &uncached_spans).ok());
    EXPECT_EQ(head, uncached_head) << what;
    ASSERT_EQ(spans.size(), uncached_spans.size()) << what;
    for (size_t i = 0; i < spans.size(); ++i) {
      EXPECT_EQ(spans[i].data, uncached_spans[i].data) << what;
      EXPECT_EQ(spans[i].bytes, uncached_spans[i].bytes) << what;
    }
    EXPECT_EQ(encode(&cache), encode(nullptr)) << what;
  };
  same_as_uncached("first");
  EXPECT_TRUE(cache.valid);
  state.tensors[0].data = w2.data();
  same_as_uncached("new data pointer");
  state.metadata = "metadata";
  same_as_uncached("longer metadata");
  state.tensors[0] = TensorRef::RowShard("w", DType::kF32, {12, 4}, 0, 6, w.data());
  same_as_uncached("another box");
  state.tensors[1].name = "c";
  same_as_uncached("renamed");
  state.tensors[1].dtype = DType::kF64;
  same_as_uncached("another dtype");
  state.tensors[1].replicated = false;
  same_as_uncached("not replicated");
  state.tensors.pop_back();
  same_as_uncached("one fewer");
  // Refused with the cache as without, and nothing left to reuse.
  state.tensors.push_back(state.tensors[0]);
  std::string head;
  std::vector<checkpoint::SnapshotSpan> spans;
  Status twice = checkpoint::EncodeSnapshotStateParts(state, &head, &spans, &cache);
  EXPECT_EQ(twice.code(), StatusCode::kInvalidArgument) << twice;
  EXPECT_FALSE(cache.valid);
  state.tensors.pop_back();
  same_as_uncached("after a refusal");
  state.tensors[0].data = nullptr;
  EXPECT_EQ(checkpoint::EncodeSnapshotStateParts(state, &head, &spans, &cache).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace muster
