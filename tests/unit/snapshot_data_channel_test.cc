// The in-memory snapshot data channel (node_agent/snapshots/data_channel.h, peer_copy.h) over
// real sockets: a session is opened over CURVE with the key admitted for the job, and sealed
// frames on the plain TCP data connection are kept byte-exact. Everything that is not a live
// session's next authentic message is refused, counted (data_refused), and nothing of it is
// kept: a tampered ciphertext, a replayed or lower counter, an unknown session, a session whose
// job was revoked or whose CURVE connection closed, a truncated, over-size or malformed message,
// and a connection that never did the CURVE step.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <optional>
#include <random>

#include "checkpoint/snapshot_channel.h"
#include "common/aead.h"
#include "common/rpc.h"
#include "node_agent/snapshots/data_channel.h"
#include "node_agent/snapshots/peer_copy.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

using checkpoint::SnapshotFrame;
using checkpoint::SnapshotKey;
using node_agent::ChunkDigest;
using node_agent::DataHeader;
using node_agent::DataKind;
using node_agent::DataSessionId;
using node_agent::kSnapshotDataFirstMessageTimeout;
using node_agent::SnapshotPeerServer;
using node_agent::SnapshotStore;
using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::WaitUntil;

constexpr uint64_t kLimit = 16 << 20;

SnapshotKey Key(int rank, int64_t step, const std::string& job = "ft-1") {
  return {.job = job, .attempt = 1, .rank = rank, .world_size = 2, .step = step};
}

SnapshotFrame Frame(const SnapshotKey& k, std::string payload) {
  auto bytes = checkpoint::EncodeSnapshotFrame(k, payload);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  auto f = checkpoint::DecodeSnapshotFrame(*bytes, kLimit);
  EXPECT_TRUE(f.ok()) << f.status();
  return std::move(*f);
}

std::string RandomPayload(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

// A session, opened as a forwarder opens it: over CURVE, with the key admitted for the job.
struct Session {
  std::unique_ptr<RpcClient> curve;
  DataSessionId id{};
  AeadKey key{};
  int port = 0;
  uint64_t dedup_seed = 0;  // of the chunk digests of its offers
};

class SnapshotDataChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = std::make_unique<SnapshotStore>(
        node_agent::SnapshotStoreOptions{.memory_limit = kLimit, .keep_steps = 2});
    auto s = SnapshotPeerServer::Create({.endpoint = "tcp://127.0.0.1:*", .store = store_.get()});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    auto k = GenerateKeyPair();
    ASSERT_TRUE(k.ok());
    gang_key_ = *k;
    ASSERT_TRUE(server_->Allow("ft-1", gang_key_.public_key).ok());
  }
  void TearDown() override {
    for (int fd : fds_) ::close(fd);
    server_.reset();
  }

  StatusOr<Session> Open(const std::string& job = "ft-1", const KeyPair* key = nullptr) {
    Session s;
    RpcClient::Options o{.endpoint = server_->endpoint(),
                         .server_public_key = server_->public_key(),
                         .client_key = key ? *key : gang_key_};
    MUSTER_ASSIGN_OR_RETURN(s.curve, RpcClient::Connect(context_, o));
    proto::Envelope req;
    req.mutable_snapshot_peer_request()->set_op(proto::SnapshotPeerRequest::OPEN_SESSION);
    req.mutable_snapshot_peer_request()->set_job(job);
    MUSTER_ASSIGN_OR_RETURN(proto::Envelope reply, s.curve->Call(std::move(req), seconds(10)));
    const auto& r = reply.snapshot_peer_reply();
    EXPECT_EQ(r.session_id().size(), s.id.size());
    EXPECT_EQ(r.session_key().size(), s.key.size());
    std::memcpy(s.id.data(), r.session_id().data(), s.id.size());
    std::memcpy(s.key.data(), r.session_key().data(), s.key.size());
    s.port = static_cast<int>(r.data_port());
    EXPECT_EQ(s.port, server_->data_port());
    EXPECT_EQ(r.dedup_chunk_bytes(), node_agent::kDedupChunkBytes);
    EXPECT_TRUE(r.whole_offers());
    s.dedup_seed = r.dedup_seed();
    return s;
  }

  // A plain TCP connection to the data channel.
  int Connect() {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(server_->data_port()));
    ::inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    fds_.push_back(fd);
    return fd;
  }

  // The PUT of `f` sealed for `s` with `counter`, as bytes.
  static std::string Sealed(const Session& s, uint64_t counter, const SnapshotFrame& f) {
    std::string out, scratch;
    Status st =
        node_agent::WriteDataPut(s.id, counter, s.key, f, &scratch, [&](std::string_view b) {
          out.append(b);
          return Status::Ok();
        });
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  // The OFFER of `f` for `s` with `counter` (with `digests`; default: its payload's own).
  static std::string Offered(const Session& s, uint64_t counter, const SnapshotFrame& f,
                             std::optional<std::vector<node_agent::ChunkDigest>> digests = {}) {
    std::string out;
    Status st = node_agent::WriteDataOffer(
        s.id, counter, s.key, f,
        digests ? *digests : node_agent::ChunkDigests(f.payload, s.dedup_seed),
        [&](std::string_view b) {
          out.append(b);
          return Status::Ok();
        });
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  // The CHUNKS of `payload` that `need` asks for, sealed for `s` with `counter`.
  static std::string Chunks(const Session& s, uint64_t counter, std::string_view payload,
                            const node_agent::ChunkNeeds& need) {
    std::string out, scratch;
    Status st = node_agent::WriteDataChunks(s.id, counter, s.key, payload, need, &scratch,
                                            [&](std::string_view b) {
                                              out.append(b);
                                              return Status::Ok();
                                            });
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  // The peer's NEED for the OFFER `counter` of a payload of `payload_length` bytes.
  static Status Need(int fd, const Session& s, uint64_t counter, uint64_t payload_length,
                     Status* carried, node_agent::ChunkNeeds* need) {
    const auto deadline = std::chrono::steady_clock::now() + seconds(20);
    auto read = [&](char* out, size_t n) { return checkpoint::RecvAll(fd, out, n, deadline); };
    std::string header(node_agent::kDataHeaderBytes, '\0');
    MUSTER_RETURN_IF_ERROR(read(header.data(), header.size()));
    MUSTER_ASSIGN_OR_RETURN(DataHeader h,
                            node_agent::DecodeDataHeader(header, DataKind::kNeed, payload_length));
    EXPECT_EQ(h.counter, counter);
    return node_agent::ReadDataNeed(h, header, s.key, node_agent::DedupChunkCount(payload_length),
                                    read, carried, need);
  }

  // The peer's answer to the PUT `counter`: Ok and `*carried` set, or the connection's error
  // (Unavailable "closed by the peer" when it was refused and closed).
  static Status Reply(int fd, const Session& s, uint64_t counter, Status* carried) {
    const auto deadline = std::chrono::steady_clock::now() + seconds(20);
    auto read = [&](char* out, size_t n) { return checkpoint::RecvAll(fd, out, n, deadline); };
    std::string header(node_agent::kDataHeaderBytes, '\0');
    MUSTER_RETURN_IF_ERROR(read(header.data(), header.size()));
    MUSTER_ASSIGN_OR_RETURN(DataHeader h,
                            node_agent::DecodeDataHeader(header, DataKind::kReply, 0));
    EXPECT_EQ(h.counter, counter);
    return node_agent::ReadDataReply(h, header, s.key, read, carried);
  }

  // Sends `bytes` and expects the peer to refuse them: the connection is closed without a reply,
  // the refusal counted.
  void ExpectRefused(int fd, std::string_view bytes, const Session& s, uint64_t counter) {
    const int64_t before = server_->data_refused();
    (void)checkpoint::SendAll(fd, bytes);  // the peer may close before it has read them all
    Status carried;
    Status st = Reply(fd, s, counter, &carried);
    EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st << " carried " << carried;
    EXPECT_TRUE(WaitUntil([&] { return server_->data_refused() > before; }, seconds(10)));
  }

  // The peer closes the idle data connection `fd` (not merely: no bytes within the wait).
  static void ExpectClosedByThePeer(int fd) {
    char c;
    Status st = checkpoint::RecvAll(fd, &c, 1, std::chrono::steady_clock::now() + seconds(10));
    EXPECT_NE(st.message().find("closed by the peer"), std::string::npos) << st;
  }

  zmq::context_t context_;
  std::unique_ptr<SnapshotStore> store_;
  std::unique_ptr<SnapshotPeerServer> server_;
  KeyPair gang_key_;
  std::vector<int> fds_;
};

TEST_F(SnapshotDataChannelTest, AFramePutOverTheDataChannelIsKeptByteExact) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  const int fd = Connect();
  // Odd sizes: a payload that is not a whole number of chunks or AES blocks.
  const std::string payload = RandomPayload((1 << 20) + 333, 7);
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 1, Frame(Key(1, 7), payload))).ok());
  Status carried(StatusCode::kInternal, "unset");
  ASSERT_TRUE(Reply(fd, *s, 1, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  auto held = store_->Get("ft-1", 1, 7);
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ((*held)->payload, payload);
  EXPECT_EQ((*held)->key, Key(1, 7));
  // The payload is not on the wire in the clear.
  const std::string wire = Sealed(*s, 2, Frame(Key(1, 8), payload));
  EXPECT_EQ(wire.find(payload.substr(1000, 64)), std::string::npos);
  EXPECT_EQ(wire.find("ft-1"), std::string::npos);
  ASSERT_TRUE(checkpoint::SendAll(fd, wire).ok());
  ASSERT_TRUE(Reply(fd, *s, 2, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  EXPECT_TRUE(store_->Get("ft-1", 1, 8).ok());
  EXPECT_EQ(server_->kept(), 2);
  EXPECT_EQ(server_->data_refused(), 0);
  EXPECT_EQ(server_->sessions_opened(), 1);
}

TEST_F(SnapshotDataChannelTest, ATamperedCiphertextIsRefusedAndEndsTheSession) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  std::string bytes = Sealed(*s, 1, Frame(Key(0, 1), RandomPayload(100000, 1)));
  bytes[node_agent::kDataHeaderBytes + 5000] ^= 0x01;  // one bit of the sealed payload
  ExpectRefused(Connect(), bytes, *s, 1);
  EXPECT_EQ(store_->Jobs().size(), 0u);
  EXPECT_EQ(server_->kept(), 0);
  // The session is over: even an authentic next message is refused.
  ExpectRefused(Connect(), Sealed(*s, 2, Frame(Key(0, 2), "x")), *s, 2);
  EXPECT_EQ(store_->Jobs().size(), 0u);

  // GCM is malleable without its tag: a bit flipped in the sealed step field would open as
  // another step whose payload still matches its xxh3. Refused all the same.
  auto s3 = Open();
  ASSERT_TRUE(s3.ok()) << s3.status();
  bytes = Sealed(*s3, 1, Frame(Key(0, 1), "abc"));
  bytes[node_agent::kDataHeaderBytes + 8] ^= 0x02;  // step 1 -> 3
  ExpectRefused(Connect(), bytes, *s3, 1);
  EXPECT_FALSE(store_->Get("ft-1", 0, 3).ok());
  // And a flipped bit of the tag alone.
  auto s4 = Open();
  ASSERT_TRUE(s4.ok()) << s4.status();
  bytes = Sealed(*s4, 1, Frame(Key(0, 1), "abc"));
  bytes.back() ^= 0x01;
  ExpectRefused(Connect(), bytes, *s4, 1);
  EXPECT_EQ(store_->Jobs().size(), 0u);

  // A tampered header (the associated data) is refused the same way.
  auto s2 = Open();
  ASSERT_TRUE(s2.ok()) << s2.status();
  bytes = Sealed(*s2, 1, Frame(Key(0, 1), "abc"));
  bytes[28] ^= 0x01;  // the counter: 1 -> 1 + 2^32
  ExpectRefused(Connect(), bytes, *s2, 1ull + (1ull << 32));
  EXPECT_EQ(store_->Jobs().size(), 0u);
}

TEST_F(SnapshotDataChannelTest, AReplayedOrLowerCounterIsRefused) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  int fd = Connect();
  const std::string put5 = Sealed(*s, 5, Frame(Key(0, 5), "step five"));
  ASSERT_TRUE(checkpoint::SendAll(fd, put5).ok());
  Status carried;
  ASSERT_TRUE(Reply(fd, *s, 5, &carried).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  store_->DropJob("ft-1");
  // The same bytes again: a replay.
  ExpectRefused(fd, put5, *s, 5);
  EXPECT_FALSE(store_->Get("ft-1", 0, 5).ok());
  // Authentic, but its counter is not past the last one seen (a new connection of the session).
  ExpectRefused(Connect(), Sealed(*s, 4, Frame(Key(0, 6), "step six")), *s, 4);
  EXPECT_FALSE(store_->Get("ft-1", 0, 6).ok());
  // Past it: kept.
  fd = Connect();
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 6, Frame(Key(0, 6), "step six"))).ok());
  ASSERT_TRUE(Reply(fd, *s, 6, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  EXPECT_TRUE(store_->Get("ft-1", 0, 6).ok());
}

TEST_F(SnapshotDataChannelTest, AnUnknownSessionAndAConnectionThatNeverDidTheCurveStepAreRefused) {
  // Sealed with a made-up session and key, as anyone who reaches the port could.
  Session fake;
  fake.id.fill(0x42);
  fake.key.fill(0x17);
  ExpectRefused(Connect(), Sealed(fake, 1, Frame(Key(0, 1), "forged")), fake, 1);
  // A real session's id, but not its key (the id travels in the clear).
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  Session stolen;
  stolen.id = s->id;
  stolen.key.fill(0x17);
  ExpectRefused(Connect(), Sealed(stolen, 1, Frame(Key(0, 1), "forged")), stolen, 1);
  EXPECT_EQ(store_->Jobs().size(), 0u);
  EXPECT_EQ(server_->kept(), 0);
}

TEST_F(SnapshotDataChannelTest, ASessionEndsWhenItsJobIsRevokedOrItsCurveConnectionCloses) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  int fd = Connect();
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 1, Frame(Key(0, 1), "one"))).ok());
  Status carried;
  ASSERT_TRUE(Reply(fd, *s, 1, &carried).ok());
  ASSERT_TRUE(carried.ok()) << carried;

  // Revoke cuts the data path: the open data connection is closed, and the session is gone.
  server_->Revoke("ft-1");
  ExpectClosedByThePeer(fd);
  ExpectRefused(Connect(), Sealed(*s, 2, Frame(Key(0, 2), "two")), *s, 2);
  ASSERT_TRUE(server_->Allow("ft-1", gang_key_.public_key).ok());  // admitted again: still gone
  ExpectRefused(Connect(), Sealed(*s, 3, Frame(Key(0, 3), "three")), *s, 3);
  EXPECT_FALSE(store_->Get("ft-1", 0, 2).ok());
  EXPECT_FALSE(store_->Get("ft-1", 0, 3).ok());

  // A session whose CURVE connection closes ends with it.
  auto s2 = Open();
  ASSERT_TRUE(s2.ok()) << s2.status();
  fd = Connect();
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s2, 1, Frame(Key(0, 4), "four"))).ok());
  ASSERT_TRUE(Reply(fd, *s2, 1, &carried).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  s2->curve.reset();
  ExpectClosedByThePeer(fd);
  ExpectRefused(Connect(), Sealed(*s2, 2, Frame(Key(0, 5), "five")), *s2, 2);
  EXPECT_FALSE(store_->Get("ft-1", 0, 5).ok());
  EXPECT_TRUE(store_->Get("ft-1", 0, 4).ok());
}

TEST_F(SnapshotDataChannelTest, TruncatedOverSizeAndMalformedMessagesAreRefused) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  // Truncated: the connection closes mid-payload (a session of its own: one whose message
  // fails to open ends).
  {
    auto t = Open();
    ASSERT_TRUE(t.ok()) << t.status();
    const int64_t before = server_->data_refused();
    std::string bytes = Sealed(*t, 1, Frame(Key(0, 1), RandomPayload(300000, 3)));
    int fd = Connect();
    ASSERT_TRUE(checkpoint::SendAll(fd, std::string_view(bytes).substr(0, bytes.size() / 2)).ok());
    ::shutdown(fd, SHUT_WR);
    EXPECT_TRUE(WaitUntil([&] { return server_->data_refused() > before; }, seconds(10)));
  }
  // Over-size: a payload past the store's limit is refused from its header, before its bytes.
  {
    DataHeader h{.kind = DataKind::kPut,
                 .session = s->id,
                 .counter = 1,
                 .prefix_length = 60,
                 .payload_length = kLimit + 1};
    ExpectRefused(Connect(), node_agent::EncodeDataHeader(h), *s, 1);
  }
  // Malformed: a bad magic, and a header with a reserved field set.
  {
    std::string bytes = Sealed(*s, 1, Frame(Key(0, 1), "m"));
    bytes[0] = 'X';
    ExpectRefused(Connect(), bytes, *s, 1);
    bytes = Sealed(*s, 1, Frame(Key(0, 1), "m"));
    bytes[37] = 1;
    ExpectRefused(Connect(), bytes, *s, 1);
  }
  EXPECT_EQ(store_->Jobs().size(), 0u);
  EXPECT_EQ(server_->kept(), 0);
  // The session survived what it never authenticated: an authentic message is still kept.
  int fd = Connect();
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 2, Frame(Key(0, 2), "fine"))).ok());
  Status carried;
  ASSERT_TRUE(Reply(fd, *s, 2, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
}

// A connection that sends nothing is closed once kSnapshotDataFirstMessageTimeout has passed:
// anyone can connect, nobody can hold a connection open without a session.
TEST_F(SnapshotDataChannelTest, AConnectionThatSendsNothingIsClosed) {
  const int64_t before = server_->data_refused();
  const auto start = std::chrono::steady_clock::now();
  const int fd = Connect();
  char c;
  Status st = checkpoint::RecvAll(fd, &c, 1, start + seconds(30));
  EXPECT_NE(st.message().find("closed by the peer"), std::string::npos) << st;
  EXPECT_GE(std::chrono::steady_clock::now() - start,
            node_agent::kSnapshotDataFirstMessageTimeout - milliseconds(100));
  EXPECT_TRUE(WaitUntil([&] { return server_->data_refused() > before; }, seconds(10)));
}

TEST_F(SnapshotDataChannelTest, AFrameOfAnotherJobThanTheSessionsIsRefusedWithTheReason) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  int fd = Connect();
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 1, Frame(Key(0, 1, "other"), "o"))).ok());
  Status carried;
  ASSERT_TRUE(Reply(fd, *s, 1, &carried).ok());
  EXPECT_EQ(carried.code(), StatusCode::kFailedPrecondition) << carried;
  EXPECT_NE(carried.message().find("permission denied"), std::string::npos) << carried;
  EXPECT_EQ(store_->Jobs().size(), 0u);
}

TEST_F(SnapshotDataChannelTest, AKeyNotAdmittedFailsTheCurveHandshakeAndGetsNoSession) {
  auto stranger = GenerateKeyPair();
  ASSERT_TRUE(stranger.ok());
  auto s = Open("ft-1", &*stranger);
  EXPECT_EQ(s.status().code(), StatusCode::kUnavailable) << s.status();
  EXPECT_GE(server_->refused_handshakes(), 1u);
  // Admitted for another job: the handshake passes, the session for ft-1 is refused.
  ASSERT_TRUE(server_->Allow("other", stranger->public_key).ok());
  s = Open("ft-1", &*stranger);
  EXPECT_EQ(s.status().code(), StatusCode::kFailedPrecondition) << s.status();
  EXPECT_NE(s.status().message().find("not admitted for snapshots of job ft-1"), std::string::npos);
  EXPECT_EQ(server_->sessions_opened(), 0);
}

// Found in review: a header whose bytes would pass the limit ("busy") was answered with a REPLY
// sealed under its counter before anything of it was authenticated, so a forged header and the
// authentic PUT with the same counter got two replies under one (key, nonce). Now the busy
// header gets no reply at all, and the authentic PUT's reply is the only one sealed for it.
TEST_F(SnapshotDataChannelTest, ABusyHeaderIsClosedWithoutASealedReply) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  // Forged from what the wire shows (the session id is in the clear): a payload of the whole
  // limit, which with its prefix passes it.
  const DataHeader forged{.kind = DataKind::kPut,
                          .session = s->id,
                          .counter = 5,
                          .prefix_length = 60,
                          .payload_length = kLimit};
  const int a = Connect();
  const int64_t before = server_->data_refused();
  ASSERT_TRUE(checkpoint::SendAll(a, node_agent::EncodeDataHeader(forged)).ok());
  ExpectClosedByThePeer(a);  // not one byte of a reply
  EXPECT_TRUE(WaitUntil([&] { return server_->data_refused() > before; }, seconds(10)));
  // The authentic PUT with that counter is kept and answered.
  const int b = Connect();
  ASSERT_TRUE(checkpoint::SendAll(b, Sealed(*s, 5, Frame(Key(0, 5), "x"))).ok());
  Status carried(StatusCode::kInternal, "unset");
  ASSERT_TRUE(Reply(b, *s, 5, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  EXPECT_TRUE(store_->Get("ft-1", 0, 5).ok());
}

// Found in review: the first header only had to start within 5 s, and its other bytes then had
// 10 s more, so a connection trickling a byte a second was held for 15 s. The whole header must
// be in by 5 s after the accept.
TEST_F(SnapshotDataChannelTest, AFirstHeaderTrickledByteByByteIsCutAtItsDeadline) {
  const int fd = Connect();
  const auto t0 = std::chrono::steady_clock::now();
  Status sent = Status::Ok();
  for (int i = 0; i < 40 && sent.ok(); ++i) {  // 40 bytes at 4 a second: 10 s if not cut
    sent = checkpoint::SendAll(fd, "M");
    char c;
    Status st =
        checkpoint::RecvAll(fd, &c, 1, std::chrono::steady_clock::now() + milliseconds(250));
    if (st.message().find("closed by the peer") != std::string::npos) break;
  }
  const auto held = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(held, kSnapshotDataFirstMessageTimeout + seconds(2))
      << std::chrono::duration<double>(held).count() << " s";
  EXPECT_GE(server_->data_refused(), 1);
}

// The deduplicated put on the wire: the peer asks for exactly the chunks it does not hold (the
// frame of another rank of the job at the same step), assembles the frame from both, and keeps
// it byte-exact; the digests, the bitmap and the chunks are sealed like a PUT.
TEST_F(SnapshotDataChannelTest, AnOfferIsAssembledFromHeldChunksAndOnlyTheNeededOnesCross) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  const uint64_t chunk = node_agent::kDedupChunkBytes;
  const std::string held = RandomPayload(10 * chunk + 99, 3);
  ASSERT_TRUE(store_->Put(Frame(Key(0, 5), held)).ok());
  std::string mine = held;
  mine[2 * chunk] ^= 0x40;        // chunk 2 differs
  mine[10 * chunk + 98] ^= 0x01;  // and the short last one, 10
  const int fd = Connect();
  const std::string offer = Offered(*s, 1, Frame(Key(1, 5), mine));
  // The digests are sealed: the offered payload's bytes are not on the wire, nor the job.
  EXPECT_EQ(offer.find("ft-1"), std::string::npos);
  ASSERT_TRUE(checkpoint::SendAll(fd, offer).ok());
  Status carried(StatusCode::kInternal, "unset");
  node_agent::ChunkNeeds need;
  ASSERT_TRUE(Need(fd, *s, 1, mine.size(), &carried, &need).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  ASSERT_EQ(need.size(), 11u);
  for (size_t i = 0; i < need.size(); ++i) EXPECT_EQ(need[i], i == 2 || i == 10) << "chunk " << i;
  const std::string chunks = Chunks(*s, 1, mine, need);
  EXPECT_EQ(chunks.size(), node_agent::kDataHeaderBytes + chunk + 99 + kAeadTagBytes);
  ASSERT_TRUE(checkpoint::SendAll(fd, chunks).ok());
  ASSERT_TRUE(Reply(fd, *s, 1, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  auto kept = store_->Get("ft-1", 1, 5);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ((*kept)->payload, mine);
  EXPECT_EQ(server_->offered_bytes(), mine.size());
  EXPECT_EQ(server_->offered_bytes_received(), chunk + 99);

  // Nothing of step 6 is held. Rank 0 has a frame of an older step, so its frame of step 6 is
  // due: the peer waits briefly for it, then asks for every chunk.
  const std::string fresh = RandomPayload(3 * chunk, 4);
  ASSERT_TRUE(checkpoint::SendAll(fd, Offered(*s, 2, Frame(Key(1, 6), fresh))).ok());
  ASSERT_TRUE(Need(fd, *s, 2, fresh.size(), &carried, &need).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  EXPECT_EQ(need, node_agent::ChunkNeeds(3, true));
  ASSERT_TRUE(checkpoint::SendAll(fd, Chunks(*s, 2, fresh, need)).ok());
  ASSERT_TRUE(Reply(fd, *s, 2, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  kept = store_->Get("ft-1", 1, 6);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ((*kept)->payload, fresh);
  EXPECT_EQ(server_->data_refused(), 0);
}

// A whole-frame offer (WHOLE: no digests) of a frame held here with the same size and xxh3 asks
// for nothing and keeps a copy; of one not held (even one differing in a single byte from a frame
// held) it asks for every chunk. Its header carries no digests: one sized for them is refused.
TEST_F(SnapshotDataChannelTest, AWholeFrameOfferAsksForNothingOrForEveryChunk) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  const uint64_t chunk = node_agent::kDedupChunkBytes;
  const std::string held = RandomPayload(4 * chunk + 7, 5);
  ASSERT_TRUE(store_->Put(Frame(Key(0, 5), held)).ok());
  const int fd = Connect();
  const std::string whole = Offered(*s, 1, Frame(Key(1, 5), held), std::vector<ChunkDigest>{});
  {
    DataHeader h = *node_agent::DecodeDataHeader(
        std::string_view(whole).substr(0, node_agent::kDataHeaderBytes), DataKind::kWhole,
        held.size());
    EXPECT_EQ(h.kind, DataKind::kWhole);
    EXPECT_EQ(h.payload_length, held.size());
  }
  EXPECT_EQ(whole.find("ft-1"), std::string::npos);  // sealed
  ASSERT_TRUE(checkpoint::SendAll(fd, whole).ok());
  Status carried(StatusCode::kInternal, "unset");
  node_agent::ChunkNeeds need;
  ASSERT_TRUE(Need(fd, *s, 1, held.size(), &carried, &need).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  EXPECT_EQ(need, node_agent::ChunkNeeds(5, false));
  ASSERT_TRUE(checkpoint::SendAll(fd, Chunks(*s, 1, held, need)).ok());
  ASSERT_TRUE(Reply(fd, *s, 1, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  auto kept = store_->Get("ft-1", 1, 5);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ((*kept)->payload, held);

  // Step 6: rank 0's frame differs from the offered one in one byte. Every chunk is asked for.
  std::string mine = held;
  mine[chunk + 3] ^= 0x10;
  ASSERT_TRUE(store_->Put(Frame(Key(0, 6), held)).ok());
  ASSERT_TRUE(
      checkpoint::SendAll(fd, Offered(*s, 2, Frame(Key(1, 6), mine), std::vector<ChunkDigest>{}))
          .ok());
  ASSERT_TRUE(Need(fd, *s, 2, mine.size(), &carried, &need).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  EXPECT_EQ(need, node_agent::ChunkNeeds(5, true));
  ASSERT_TRUE(checkpoint::SendAll(fd, Chunks(*s, 2, mine, need)).ok());
  ASSERT_TRUE(Reply(fd, *s, 2, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  kept = store_->Get("ft-1", 1, 6);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ((*kept)->payload, mine);
  EXPECT_EQ(server_->offered_bytes(), 2 * held.size());
  EXPECT_EQ(server_->offered_bytes_received(), mine.size());

  // An OFFER relabelled WHOLE on the way (its sealed body carries digests): the kind is part of
  // the nonce, so it does not authenticate; refused, nothing kept.
  std::string bad = Offered(*s, 3, Frame(Key(1, 7), held));
  bad[6] = static_cast<char>(DataKind::kWhole);
  ExpectRefused(fd, bad, *s, 3);
  EXPECT_EQ(store_->Get("ft-1", 1, 7).status().code(), StatusCode::kNotFound);
}

// A forwarder whose digests do not describe its frame (or a chunk held here that only collides
// with one offered) gets a frame assembled from the wrong bytes: its xxh3, from the forwarder's
// own header, refuses it (DataLoss in the REPLY), nothing is kept, and the session goes on.
TEST_F(SnapshotDataChannelTest, AnOfferWhoseDigestsLieIsAssembledThenRefusedByItsChecksum) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  const uint64_t chunk = node_agent::kDedupChunkBytes;
  const std::string held = RandomPayload(4 * chunk, 5);
  ASSERT_TRUE(store_->Put(Frame(Key(0, 5), held)).ok());
  std::string truth = held;
  truth[chunk + 3] ^= 0x08;
  const int fd = Connect();
  // The frame says `truth` (its xxh3), the digests say `held`.
  ASSERT_TRUE(checkpoint::SendAll(fd, Offered(*s, 1, Frame(Key(1, 5), truth),
                                              node_agent::ChunkDigests(held, s->dedup_seed)))
                  .ok());
  Status carried(StatusCode::kInternal, "unset");
  node_agent::ChunkNeeds need;
  ASSERT_TRUE(Need(fd, *s, 1, truth.size(), &carried, &need).ok());
  ASSERT_TRUE(carried.ok()) << carried;
  EXPECT_EQ(need, node_agent::ChunkNeeds(4, false));
  ASSERT_TRUE(checkpoint::SendAll(fd, Chunks(*s, 1, truth, need)).ok());
  ASSERT_TRUE(Reply(fd, *s, 1, &carried).ok());
  EXPECT_EQ(carried.code(), StatusCode::kDataLoss) << carried;
  EXPECT_NE(carried.message().find("fails its check"), std::string::npos) << carried;
  EXPECT_FALSE(store_->Get("ft-1", 1, 5).ok());
  // The session goes on: the frame put whole is kept.
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 2, Frame(Key(1, 5), truth))).ok());
  ASSERT_TRUE(Reply(fd, *s, 2, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
  auto kept = store_->Get("ft-1", 1, 5);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ((*kept)->payload, truth);
}

// An offer of another job's frame is refused in its NEED (no bitmap, no chunks follow), and the
// session goes on; the held frames of that job were never consulted.
TEST_F(SnapshotDataChannelTest, AnOfferOfAnotherJobIsRefusedInItsNeed) {
  auto s = Open();
  ASSERT_TRUE(s.ok()) << s.status();
  const std::string state = RandomPayload(3 * node_agent::kDedupChunkBytes, 6);
  ASSERT_TRUE(store_->Put(Frame(Key(0, 5, "other"), state)).ok());
  const int fd = Connect();
  ASSERT_TRUE(checkpoint::SendAll(fd, Offered(*s, 1, Frame(Key(1, 5, "other"), state))).ok());
  Status carried;
  node_agent::ChunkNeeds need{true};
  ASSERT_TRUE(Need(fd, *s, 1, state.size(), &carried, &need).ok());
  EXPECT_EQ(carried.code(), StatusCode::kFailedPrecondition) << carried;
  EXPECT_NE(carried.message().find("permission denied"), std::string::npos) << carried;
  EXPECT_TRUE(need.empty());
  EXPECT_FALSE(store_->Get("other", 1, 5).ok());
  ASSERT_TRUE(checkpoint::SendAll(fd, Sealed(*s, 2, Frame(Key(1, 5), state))).ok());
  ASSERT_TRUE(Reply(fd, *s, 2, &carried).ok());
  EXPECT_TRUE(carried.ok()) << carried;
}

// After a NEED, anything but the CHUNKS it asked for, sealed under the offer's counter, is refused
// and ends the session: chunks of another length, a tampered chunk, another counter.
TEST_F(SnapshotDataChannelTest, ChunksThatAreNotTheOnesAskedForAreRefused) {
  const std::string state = RandomPayload(3 * node_agent::kDedupChunkBytes + 5, 8);
  const node_agent::ChunkNeeds all(4, true);
  auto exchange =
      [&](const std::function<std::string(const Session&, const node_agent::ChunkNeeds&)>& chunks) {
        auto s = Open();
        ASSERT_TRUE(s.ok()) << s.status();
        const int fd = Connect();
        ASSERT_TRUE(checkpoint::SendAll(fd, Offered(*s, 1, Frame(Key(1, 9), state))).ok());
        Status carried;
        node_agent::ChunkNeeds need;
        ASSERT_TRUE(Need(fd, *s, 1, state.size(), &carried, &need).ok());
        ASSERT_TRUE(carried.ok()) << carried;
        ExpectRefused(fd, chunks(*s, need), *s, 1);
        EXPECT_FALSE(store_->Get("ft-1", 1, 9).ok());
      };
  // One chunk fewer than asked.
  exchange([&](const Session& s, const node_agent::ChunkNeeds& need) {
    node_agent::ChunkNeeds fewer = need;
    fewer[1] = false;
    return Chunks(s, 1, state, fewer);
  });
  // A flipped bit.
  exchange([&](const Session& s, const node_agent::ChunkNeeds& need) {
    std::string c = Chunks(s, 1, state, need);
    c[node_agent::kDataHeaderBytes + 100] ^= 0x01;
    return c;
  });
  // Sealed under another counter.
  exchange([&](const Session& s, const node_agent::ChunkNeeds& need) {
    return Chunks(s, 2, state, need);
  });
  // A PUT instead.
  exchange([&](const Session& s, const node_agent::ChunkNeeds&) {
    return Sealed(s, 2, Frame(Key(1, 9), state));
  });
  EXPECT_EQ(server_->kept(), 0);
}

}  // namespace
}  // namespace muster
