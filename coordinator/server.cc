#include "coordinator/server.h"

#include <fmt/format.h>

#include <fstream>

#include "common/curve.h"
#include "common/logging.h"
#include "common/rpc.h"
#include "coordinator/agent_connections.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {

namespace fs = std::filesystem;

struct CoordinatorServer::Impl {
  ServerOptions options;
  Reactor reactor{"coordinator"};
  std::unique_ptr<ZapAuthenticator> zap;
  std::unique_ptr<RpcServer> rpc;
  std::unique_ptr<Coordinator> coord;
  std::vector<std::unique_ptr<ServerExtension>> extensions;
  KeysDir keys;
  fs::file_time_type keys_mtime{};
  int ticks = 0;
  bool stopped = false;
  std::unique_ptr<AgentConnections> agents;  // null: dead agents are not told from silent ones

  static int64_t SteadyMs() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void OnConnection(const ConnectionEvent& e) {
    if (e.kind == ConnectionEvent::Kind::kAccepted) return agents->OnAccepted(e.fd);
    agents->OnClosed(e.fd, SteadyMs());
    if (auto next = agents->NextDue()) {
      reactor.PostAfter(std::chrono::milliseconds(std::max<int64_t>(0, *next - SteadyMs())),
                        "coord.agent_gone", [this] { DeclareGone(); });
    }
  }
  void DeclareGone() {
    for (const auto& a : agents->Due(SteadyMs())) {
      coord->AgentGone(a.node, a.session,
                       fmt::format("its agent's connections closed and it did not come back "
                                   "within {} ms: the agent process is gone, its ranks with it",
                                   options.agent_gone_grace.count()));
    }
  }
  // An agent's request over `peer`: which agent that connection belongs to.
  void NoteAgent(const PeerInfo& peer, const Caller& caller, const proto::Envelope& req) {
    const std::string* node = nullptr;
    const std::string* session = nullptr;
    switch (req.payload_case()) {
      case proto::Envelope::kAgentHeartbeat:
        node = &req.agent_heartbeat().node();
        session = &req.agent_heartbeat().session_id();
        break;
      case proto::Envelope::kAgentPoll:
        node = &req.agent_poll().node();
        session = &req.agent_poll().session_id();
        break;
      case proto::Envelope::kAgentReport:
        node = &req.agent_report().node();
        session = &req.agent_report().session_id();
        break;
      default:
        return;
    }
    if (coord->IsAgentSession(caller, *node, *session))
      agents->OnRequest(peer.fd, {*node, *session});
  }

  void ReloadKeysIfChanged(bool force = false) {
    std::error_code ec;
    auto mtime = fs::last_write_time(keys.authorized_keys(), ec);
    if (ec || (mtime == keys_mtime && !force)) return;
    auto list = LoadAuthorizedKeys(keys.authorized_keys());
    if (!list.ok()) {
      log::Get("coord")->error("authorized keys not reloaded: {}", list.status().ToString());
      return;
    }
    keys_mtime = mtime;
    zap->SetAuthorized(kDefaultZapDomain, *list);
    log::Get("coord")->info("{} authorized key(s) from {}", list->size(),
                            keys.authorized_keys().string());
  }

  void Tick() {
    coord->Tick();
    for (auto& x : extensions) x->OnTick();
    if (zap && ++ticks % 20 == 0) ReloadKeysIfChanged();
    reactor.PostAfter(options.tick, "coord.tick", [this] { Tick(); });
  }
};

CoordinatorServer::CoordinatorServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CoordinatorServer::~CoordinatorServer() { Stop(); }

void CoordinatorServer::ReloadKeys() {
  if (!impl_ || impl_->stopped || !impl_->zap) return;
  Impl* raw = impl_.get();
  raw->reactor.Post("coord.reload_keys", [raw] { raw->ReloadKeysIfChanged(/*force=*/true); });
}

void CoordinatorServer::Stop() {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  // Extensions live on the reactor thread: its closures may hold them until it stops.
  impl_->reactor.Stop();
  impl_->extensions.clear();
  impl_->coord.reset();
  impl_->rpc.reset();
  impl_->zap.reset();
}

StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(ServerOptions options) {
  auto logger = log::Get("coord");
  if (options.data_dir.empty()) return InvalidArgumentError("--data-dir is required");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  std::optional<providers::ProvidersConfig> providers_config;
  if (!options.providers_file.empty()) {
    MUSTER_ASSIGN_OR_RETURN(providers_config,
                            providers::LoadProvidersConfig(options.providers_file));
  }
  MUSTER_ASSIGN_OR_RETURN(auto store, CoordinatorDb::Open(options.data_dir, options.db_flush));
  // Finished attempts' rank logs are kept under the data dir (coordinator/log_keeper.h).
  if (options.keep_logs && options.coordinator.log_keep_dir.empty()) {
    options.coordinator.log_keep_dir = options.data_dir / "logs";
  }
  Impl* self = impl.get();
  if (!options.insecure) {
    options.coordinator.current_role = [self](const std::string& key) {
      auto k = self->zap ? self->zap->Lookup(kDefaultZapDomain, key) : std::nullopt;
      return k ? k->role : KeyRole::kNone;
    };
    options.coordinator.current_scope = [self](const std::string& key) {
      auto k = self->zap ? self->zap->Lookup(kDefaultZapDomain, key) : std::nullopt;
      return k ? k->scope : KeyScope{};
    };
  }
  MUSTER_ASSIGN_OR_RETURN(impl->coord, Coordinator::Create(std::move(store), options.coordinator));

  RpcServer::Options ro;
  ro.name = "coordinator";
  ro.endpoint = options.listen;
  ro.insecure = options.insecure;
  if (options.insecure) {
    logger->warn(
        "INSECURE: --insecure was given: the coordinator accepts unauthenticated, unencrypted "
        "connections from anyone who can reach {}. Never use this outside a test.",
        options.listen);
  } else {
    impl->keys = KeysDir::Resolve(options.keys_dir);
    auto kp = LoadKeyPair(impl->keys.coordinator_key());
    if (!kp.ok()) {
      return FailedPreconditionError(fmt::format(
          "no coordinator key ({}); run `muster keys init --dir {}` first, or pass --insecure "
          "for a test",
          kp.status().message(), impl->keys.dir.string()));
    }
    if (kp->secret_key.empty()) {
      return FailedPreconditionError(impl->keys.coordinator_key().string() +
                                     " holds no secret key");
    }
    MUSTER_ASSIGN_OR_RETURN(impl->zap, ZapAuthenticator::Create(impl->reactor));
    auto list = LoadAuthorizedKeys(impl->keys.authorized_keys());
    if (!list.ok()) {
      return FailedPreconditionError(
          fmt::format("cannot load authorized keys: {}", list.status().message()));
    }
    impl->zap->SetAuthorized(kDefaultZapDomain, *list);
    std::error_code ec;
    impl->keys_mtime = fs::last_write_time(impl->keys.authorized_keys(), ec);
    logger->info("{} authorized key(s) from {}", list->size(),
                 impl->keys.authorized_keys().string());
    ro.server_key = *kp;
    ro.authenticator = impl->zap.get();
  }
  Impl* raw = impl.get();
  if (options.agent_gone_grace.count() >= 0) {
    if (options.agent_gone_grace.count() == 0) {
      impl->options.agent_gone_grace =
          options.coordinator.heartbeat_interval + std::chrono::milliseconds(200);
    }
    impl->agents = std::make_unique<AgentConnections>(impl->options.agent_gone_grace.count());
    ro.on_connection = [raw](const ConnectionEvent& e) { raw->OnConnection(e); };
  }
  MUSTER_ASSIGN_OR_RETURN(
      impl->rpc,
      RpcServer::Create(impl->reactor, ro,
                        [raw](const PeerInfo& peer, proto::Envelope&& req, RpcServer::Reply reply) {
                          Caller caller{peer.user_id, peer.public_key, peer.role, peer.address};
                          if (raw->agents) raw->NoteAgent(peer, caller, req);
                          raw->coord->Handle(caller, std::move(req), std::move(reply));
                        }));
  std::string endpoint = impl->rpc->endpoint();
  {
    auto tmp = options.data_dir / "endpoint.tmp";
    std::ofstream out(tmp);
    out << endpoint << "\n";
    out.close();
    std::error_code ec;
    fs::rename(tmp, options.data_dir / "endpoint", ec);
  }
  if (providers_config) {
    providers::AgentLaunch launch;
    std::error_code ec;
    launch.muster_bin = !options.muster_bin.empty()
                            ? options.muster_bin
                            : fs::read_symlink("/proc/self/exe", ec).string();
    // Agents started by a provider reach us on the address we bound (a wildcard: loopback).
    launch.coordinator = endpoint;
    if (auto at = launch.coordinator.find("://0.0.0.0:"); at != std::string::npos)
      launch.coordinator.replace(at + 3, 7, "127.0.0.1");
    if (options.insecure) {
      launch.args = {"--insecure"};
    } else {
      launch.args = {"--keys", impl->keys.dir.string()};
    }
    MUSTER_ASSIGN_OR_RETURN(auto manager,
                            providers::ProviderManager::Create(*providers_config, launch));
    impl->coord->SetProviders(std::move(manager));
    logger->info("{} provider(s) from {}", providers_config->providers.size(),
                 options.providers_file.string());
  }
  impl->reactor.Start();
  if (!options.extensions.empty()) {
    Status st = impl->reactor.Call("coord.extensions", [raw, &options]() -> Status {
      for (auto& make : options.extensions) {
        MUSTER_ASSIGN_OR_RETURN(auto x, make(raw->reactor, *raw->coord));
        raw->extensions.push_back(std::move(x));
      }
      return Status::Ok();
    });
    if (!st.ok()) {
      impl->reactor.Stop();
      return st;
    }
  }
  impl->reactor.Post("coord.tick", [raw] { raw->Tick(); });
  logger->info("coordinator serving on {} (data dir {})", endpoint, options.data_dir.string());
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer(std::move(impl)));
  server->endpoint_ = endpoint;
  return server;
}

}  // namespace muster::coordinator
