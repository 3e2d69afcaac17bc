#include "common/rpc.h"

#include <gtest/gtest.h>

#include <atomic>
#include <optional>
#include <thread>

#include "common/wire.h"
#include "tests/testing/log_capture.h"
#include "tests/testing/reactor_fixture.h"
#include "tests/testing/wait_until.h"

namespace muster {
namespace {

using namespace std::chrono_literals;

// A CURVE server with our ZAP handler, answering Ping with Pong.
class RpcTest : public testing::ReactorZapTest {
 protected:
  void SetUp() override { StartServer(kDefaultMaxMessageBytes); }

  void StartServer(int64_t max_bytes) {
    server_key_ = *GenerateKeyPair();
    client_key_ = *GenerateKeyPair();
    CreateReactor("rpc-test");
    if (HasFatalFailure()) return;
    zap_->SetAuthorized(kDefaultZapDomain, {{client_key_.public_key, "alice"}});
    RpcServer::Options o;
    o.name = "test";
    o.endpoint = "tcp://127.0.0.1:*";
    o.server_key = server_key_;
    o.authenticator = zap_.get();
    o.max_message_bytes = max_bytes;
    o.on_connection = [this](const ConnectionEvent& e) {
      std::lock_guard<std::mutex> l(mu_);
      events_.push_back(e);
    };
    auto server = RpcServer::Create(
        *reactor_, o, [this](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
          handled_++;
          last_user_ = peer.user_id;
          {
            std::lock_guard<std::mutex> l(mu_);
            request_fds_.push_back(peer.fd);
            events_before_request_.push_back(events_.size());
          }
          proto::Envelope out;
          out.mutable_pong()->set_data(req.ping().data());
          reply(std::move(out));
        });
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    reactor_->Start();
  }

  void ReleaseOnReactor() override { server_.reset(); }

  std::unique_ptr<RpcClient> Client(const KeyPair& key) {
    RpcClient::Options o;
    o.endpoint = server_->endpoint();
    o.server_public_key = server_key_.public_key;
    o.client_key = key;
    auto c = RpcClient::Connect(ctx_, o);
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }

  static proto::Envelope Ping(const std::string& data) {
    proto::Envelope e;
    e.mutable_ping()->set_data(data);
    return e;
  }

  zmq::context_t ctx_;
  KeyPair server_key_, client_key_;
  std::unique_ptr<RpcServer> server_;
  std::atomic<int> handled_{0};
  std::string last_user_;  // written on the reactor, read after a reply
  std::mutex mu_;
  std::vector<ConnectionEvent> events_;        // GUARDED_BY(mu_)
  std::vector<int> request_fds_;               // GUARDED_BY(mu_)
  std::vector<size_t> events_before_request_;  // GUARDED_BY(mu_)
};

// The server's connection events (on_connection) and each request's fd: the accept is handed
// out before the connection's first request, and the close when the client goes away, both
// with the fd the request carried (what the coordinator tells dead agents by).
TEST_F(RpcTest, ConnectionEventsCarryTheFdOfTheirRequests) {
  auto client = Client(client_key_);
  ASSERT_TRUE(client->Call(Ping("x"), 5s).ok());
  int fd;
  {
    std::lock_guard<std::mutex> l(mu_);
    ASSERT_EQ(request_fds_.size(), 1u);
    fd = request_fds_[0];
    ASSERT_GE(fd, 0) << "a request carries its connection's fd";
    ASSERT_GE(events_before_request_[0], 1u);
    EXPECT_EQ(events_[0].kind, ConnectionEvent::Kind::kAccepted);
    EXPECT_EQ(events_[0].fd, fd);
  }
  client.reset();  // closes its connection
  EXPECT_TRUE(testing::WaitUntil(
      [&] {
        std::lock_guard<std::mutex> l(mu_);
        for (const auto& e : events_)
          if (e.kind == ConnectionEvent::Kind::kClosed && e.fd == fd) return true;
        return false;
      },
      10s))
      << "the server sees the client's connection close";
}

// A key removed from the authorized set stops being served on the connection it already opened:
// the next request gets a permission error and never reaches the handler.
TEST_F(RpcTest, ARevokedKeyIsRefusedOnItsOpenConnection) {
  auto client = Client(client_key_);
  ASSERT_TRUE(client->Call(Ping("before"), 5s).ok());
  int handled = handled_;
  zap_->Revoke(kDefaultZapDomain, client_key_.public_key);
  auto reply = client->Call(Ping("after"), 5s);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(reply.status().message().find("permission denied: key 'alice'"), std::string::npos)
      << reply.status();
  EXPECT_EQ(handled_, handled);
  // Authorized again (with another role): served again, and the handler sees the new role.
  zap_->Authorize(kDefaultZapDomain, {client_key_.public_key, "alice", KeyRole::kClient});
  EXPECT_TRUE(client->Call(Ping("again"), 5s).ok());
}

TEST_F(RpcTest, AuthorizedClientIsServed) {
  auto client = Client(client_key_);
  auto reply = client->Call(Ping("hello"), 5s);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->pong().data(), "hello");
  EXPECT_EQ(last_user_, "alice");
}

TEST_F(RpcTest, UnknownKeyIsRefusedBeforeTheHandlerAndLogged) {
  testing::LogCapture capture;
  KeyPair stranger = *GenerateKeyPair();
  auto client = Client(stranger);
  auto start = std::chrono::steady_clock::now();
  auto reply = client->Call(Ping("let me in"), 10s);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kUnavailable) << reply.status();
  // Refused at the handshake, not by waiting out the timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_EQ(handled_.load(), 0);
  EXPECT_TRUE(capture.WaitFor("refused unknown CURVE key " + stranger.public_key, 5s));
  EXPECT_GE(zap_->refused_count(), 1u);
  // The authorized client is still served.
  EXPECT_TRUE(Client(client_key_)->Call(Ping("ok"), 5s).ok());
}

TEST_F(RpcTest, RevokedKeyIsRefusedOnItsNextConnection) {
  zap_->Revoke(kDefaultZapDomain, client_key_.public_key);
  auto reply = Client(client_key_)->Call(Ping("x"), 10s);
  EXPECT_EQ(reply.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(handled_.load(), 0);
}

TEST_F(RpcTest, GarbageBytesGetAnErrorReplyAndTheServerKeepsServing) {
  zmq::socket_t raw(ctx_, zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.set(zmq::sockopt::curve_serverkey, server_key_.public_key);
  raw.set(zmq::sockopt::curve_publickey, client_key_.public_key);
  raw.set(zmq::sockopt::curve_secretkey, client_key_.secret_key);
  raw.connect(server_->endpoint());
  const char garbage[] = "\xff\xff\xff\x07 this is not protobuf";
  raw.send(zmq::buffer(garbage, sizeof(garbage)));
  raw.set(zmq::sockopt::rcvtimeo, 5000);
  zmq::message_t msg;
  ASSERT_TRUE(raw.recv(msg));
  auto reply = ParseEnvelope(msg.data(), msg.size());
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->request_id(), 0u);
  ASSERT_TRUE(reply->has_error());
  EXPECT_EQ(ErrorToStatus(reply->error()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(handled_.load(), 0);

  // A well-formed envelope without a payload is refused the same way.
  proto::Envelope empty;
  empty.set_request_id(9);
  std::string bytes = empty.SerializeAsString();
  raw.send(zmq::buffer(bytes));
  ASSERT_TRUE(raw.recv(msg));
  reply = ParseEnvelope(msg.data(), msg.size());
  ASSERT_TRUE(reply.ok());
  EXPECT_TRUE(reply->has_error());

  EXPECT_TRUE(Client(client_key_)->Call(Ping("still here"), 5s).ok());
}

class RpcSizeLimitTest : public RpcTest {
 protected:
  void SetUp() override { StartServer(64 * 1024); }
};

TEST_F(RpcSizeLimitTest, OversizedMessageIsRefusedAndTheServerKeepsServing) {
  // A client without its own limit sends 1 MiB to a server that takes 64 KiB.
  RpcClient::Options o;
  o.endpoint = server_->endpoint();
  o.server_public_key = server_key_.public_key;
  o.client_key = client_key_;
  auto big = RpcClient::Connect(ctx_, o);
  ASSERT_TRUE(big.ok());
  auto reply = (*big)->Call(Ping(std::string(1 << 20, 'x')), 1500ms);
  EXPECT_FALSE(reply.ok());
  EXPECT_EQ(handled_.load(), 0);

  auto small = Client(client_key_);
  auto ok = small->Call(Ping("small"), 5s);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->pong().data(), "small");
}

TEST_F(RpcTest, ClientRefusesToSendOverItsOwnLimit) {
  RpcClient::Options o;
  o.endpoint = server_->endpoint();
  o.server_public_key = server_key_.public_key;
  o.client_key = client_key_;
  o.max_message_bytes = 1024;
  auto c = RpcClient::Connect(ctx_, o);
  auto reply = (*c)->Call(Ping(std::string(4096, 'x')), 1s);
  EXPECT_EQ(reply.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(RpcTest, NoServerGivesDeadlineExceeded) {
  RpcClient::Options o;
  o.endpoint = "tcp://127.0.0.1:1";  // nothing listens on port 1
  o.server_public_key = server_key_.public_key;
  o.client_key = client_key_;
  auto c = RpcClient::Connect(ctx_, o);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->Call(Ping("x"), 200ms).status().code(), StatusCode::kDeadlineExceeded);
}

// A reply serialized once carries each request's own id: the bytes plus the appended field
// parse as the envelope with that id, for ids of every varint length.
TEST(SerializedReplyTest, EachCopyCarriesItsOwnRequestId) {
  proto::Envelope env;
  env.set_request_id(99);  // not kept
  env.mutable_pong()->set_data(std::string(300, 'p'));
  SerializedReply serialized(env);
  for (uint64_t id : {uint64_t{0}, uint64_t{1}, uint64_t{127}, uint64_t{128}, uint64_t{300},
                      uint64_t{1} << 35, ~uint64_t{0}}) {
    std::string wire(serialized.size(id), '\0');
    serialized.WriteTo(id, wire.data());
    auto parsed = ParseEnvelope(wire.data(), wire.size());
    ASSERT_TRUE(parsed.ok()) << id << ": " << parsed.status();
    EXPECT_EQ(parsed->request_id(), id);
    EXPECT_EQ(parsed->pong().data(), env.pong().data()) << id;
  }
}

// One SerializedReply answers several parked requests, from clients of their own: each gets it
// as the answer to its own call (a reply with another request's id would be discarded by the
// client as stale, and its call would time out).
TEST_F(RpcTest, OneSerializedReplyAnswersSeveralRequestsEachWithItsOwnId) {
  std::vector<RpcServer::Reply> parked;  // reactor thread only
  reactor_->Call("swap", [&] {
    server_.reset();
    RpcServer::Options o;
    o.name = "shared";
    o.endpoint = "tcp://127.0.0.1:*";
    o.server_key = server_key_;
    o.authenticator = zap_.get();
    server_ = std::move(*RpcServer::Create(
        *reactor_, o, [&parked](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply reply) {
          if (req.ping().data() == "warm") {
            proto::Envelope out;
            out.mutable_pong()->set_data("warm");
            return reply(std::move(out));
          }
          parked.push_back(std::move(reply));
          if (parked.size() != 3) return;
          proto::Envelope out;
          out.mutable_pong()->set_data("for all three");
          auto serialized = std::make_shared<const SerializedReply>(out);
          for (auto& r : parked) RpcServer::ReplyWith(r, serialized);
        }));
  });
  std::vector<std::unique_ptr<RpcClient>> clients;
  for (int i = 0; i < 3; ++i) clients.push_back(Client(client_key_));
  // Different ids on the wire: the second client has made one call before, the third 200
  // (ids past one varint byte).
  ASSERT_TRUE(clients[1]->Call(Ping("warm"), 5s).ok());
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(clients[2]->Call(Ping("warm"), 5s).ok());
  std::vector<std::thread> threads;
  std::vector<StatusOr<proto::Envelope>> got(3, InternalError("not called"));
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] { got[i] = clients[i]->Call(Ping("x"), 10s); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(got[i].ok()) << i << ": " << got[i].status();
    EXPECT_EQ(got[i]->pong().data(), "for all three") << i;
  }
}

// A Reply that is not the server's own (a wrapper, a test's lambda) gets the envelope parsed
// back from the bytes.
TEST(SerializedReplyTest, AnotherReplyGetsTheEnvelope) {
  proto::Envelope out;
  out.mutable_pong()->set_data("plain");
  std::optional<proto::Envelope> got;
  RpcServer::Reply reply = [&](proto::Envelope e) { got = std::move(e); };
  RpcServer::ReplyWith(reply, std::make_shared<const SerializedReply>(out));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->pong().data(), "plain");
}

TEST_F(RpcTest, ReplyFromAnotherThreadArrives) {
  // Handlers may answer later from a worker: the reply is posted back to the reactor.
  reactor_->Call("swap", [&] {
    server_.reset();
    RpcServer::Options o;
    o.name = "async";
    o.endpoint = "tcp://127.0.0.1:*";
    o.server_key = server_key_;
    o.authenticator = zap_.get();
    server_ = std::move(*RpcServer::Create(
        *reactor_, o, [](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply reply) {
          std::thread([req = std::move(req), reply = std::move(reply)] {
            proto::Envelope out;
            out.mutable_pong()->set_data("late " + req.ping().data());
            reply(std::move(out));
          }).detach();
        }));
  });
  auto reply = Client(client_key_)->Call(Ping("x"), 5s);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->pong().data(), "late x");
}

}  // namespace
}  // namespace muster
