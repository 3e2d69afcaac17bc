// muster-bench rpc: request/reply round trips through muster's RpcServer/RpcClient (CURVE,
// protobuf envelope, reactor) beside raw ZeroMQ REQ/REP on the same machine, plain and CURVE.

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "bench/bench.h"
#include "common/rpc.h"

namespace muster::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  std::string name;
  double p50_us, p99_us, per_sec;
};

Result Summarize(std::string name, std::vector<double> us) {
  std::sort(us.begin(), us.end());
  double total = 0;
  for (double v : us) total += v;
  return {std::move(name), us[us.size() / 2], us[us.size() * 99 / 100], 1e6 * us.size() / total};
}

Result RawZmq(int n, size_t bytes, bool curve) {
  zmq::context_t ctx;
  zmq::socket_t rep(ctx, zmq::socket_type::rep), req(ctx, zmq::socket_type::req);
  KeyPair s = *GenerateKeyPair(), c = *GenerateKeyPair();
  if (curve) {
    rep.set(zmq::sockopt::curve_server, 1);
    rep.set(zmq::sockopt::curve_secretkey, s.secret_key);
    req.set(zmq::sockopt::curve_serverkey, s.public_key);
    req.set(zmq::sockopt::curve_publickey, c.public_key);
    req.set(zmq::sockopt::curve_secretkey, c.secret_key);
  }
  rep.set(zmq::sockopt::linger, 0);
  req.set(zmq::sockopt::linger, 0);
  rep.bind("tcp://127.0.0.1:*");
  std::string ep = rep.get(zmq::sockopt::last_endpoint);
  std::thread server([&] {
    for (int i = 0; i < n + 10; ++i) {
      zmq::message_t m;
      (void)rep.recv(m);
      rep.send(m, zmq::send_flags::none);
    }
  });
  req.connect(ep);
  std::string payload(bytes, 'x');
  std::vector<double> us;
  for (int i = 0; i < n + 10; ++i) {
    auto t0 = Clock::now();
    req.send(zmq::buffer(payload));
    zmq::message_t m;
    (void)req.recv(m);
    if (i >= 10) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  server.join();
  return Summarize(curve ? "raw zmq REQ/REP, CURVE" : "raw zmq REQ/REP, plain", us);
}

Result Muster(int n, size_t bytes) {
  Reactor reactor("bench");
  KeyPair s = *GenerateKeyPair(), c = *GenerateKeyPair();
  auto zap = *ZapAuthenticator::Create(reactor);
  zap->SetAuthorized(kDefaultZapDomain, {{c.public_key, "bench"}});
  RpcServer::Options so;
  so.endpoint = "tcp://127.0.0.1:*";
  so.server_key = s;
  so.authenticator = zap.get();
  auto server = *RpcServer::Create(
      reactor, so, [](const PeerInfo&, proto::Envelope&& req, RpcServer::Reply reply) {
        proto::Envelope out;
        out.mutable_pong()->set_data(std::move(*req.mutable_ping()->mutable_data()));
        reply(std::move(out));
      });
  reactor.Start();
  zmq::context_t ctx;
  RpcClient::Options co;
  co.endpoint = server->endpoint();
  co.server_public_key = s.public_key;
  co.client_key = c;
  auto client = *RpcClient::Connect(ctx, co);
  proto::Envelope ping;
  ping.mutable_ping()->set_data(std::string(bytes, 'x'));
  std::vector<double> us;
  for (int i = 0; i < n + 10; ++i) {
    auto t0 = Clock::now();
    auto r = client->Call(ping, std::chrono::seconds(10));
    if (!r.ok()) {
      std::cerr << "muster rpc failed: " << r.status() << "\n";
      break;
    }
    if (i >= 10) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  reactor.Call("stop", [&] {
    server.reset();
    zap.reset();
  });
  reactor.Stop();
  return Summarize("muster RpcClient -> RpcServer, CURVE", us);
}

}  // namespace

void AddRpcBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand("rpc", "Request/reply latency: muster RPC vs raw ZeroMQ");
  auto n = std::make_shared<int>(2000);
  auto bytes = std::make_shared<size_t>(64);
  auto json = std::make_shared<bool>(false);
  cmd->add_option("--iterations", *n, "Round trips per row")->check(CLI::PositiveNumber);
  cmd->add_option("--bytes", *bytes, "Payload bytes");
  cmd->add_flag("--json", *json, "Print JSON instead of a table");
  cmd->callback([=] {
    *runner = [=] {
      std::vector<Result> rows = {RawZmq(*n, *bytes, false), RawZmq(*n, *bytes, true),
                                  Muster(*n, *bytes)};
      if (*json) {
        nlohmann::json out = nlohmann::json::array();
        for (auto& r : rows)
          out.push_back({{"name", r.name},
                         {"p50_us", r.p50_us},
                         {"p99_us", r.p99_us},
                         {"calls_per_s", r.per_sec},
                         {"bytes", *bytes}});
        std::cout << out.dump(2) << "\n";
        return 0;
      }
      std::cout << "round trips of " << *bytes << " bytes on loopback, " << *n << " each\n";
      Table t({"path", "p50 us", "p99 us", "calls/s"});
      for (auto& r : rows) t.Row({r.name, Fmt(r.p50_us, 1), Fmt(r.p99_us, 1), Fmt(r.per_sec, 0)});
      t.Print();
      return 0;
    };
  });
}

}  // namespace muster::bench
