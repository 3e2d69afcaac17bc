#pragma once

// CoordinatorServer: `muster coordinator` as a library. One reactor thread owns the RpcServer
// (ROUTER, CURVE with the coordinator's key, ZAP accepting only the keys in
// <keys>/authorized_keys, re-read within 2 s of a change to the file and on ReloadKeys (SIGHUP
// to `muster coordinator`)) and runs the Coordinator on it, with a tick every 100 ms. Every
// request is checked against the keys as last read, so removing a key ends the sessions it
// opened too. The bound endpoint is written to <data-dir>/endpoint.
//
// Thread-safety: Start/Stop/endpoint from any one thread.

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/reactor.h"
#include "common/status.h"
#include "coordinator/coordinator.h"

namespace muster::coordinator {

// Something run beside the Coordinator on the server's reactor (coordinator/http: the
// dashboard). Created on the reactor thread after the Coordinator, ticked with it, and destroyed
// on the reactor before it.
class ServerExtension {
 public:
  virtual ~ServerExtension() = default;
  virtual void OnTick() = 0;  // on the reactor, after every Coordinator::Tick
};
using ServerExtensionFactory =
    std::function<StatusOr<std::unique_ptr<ServerExtension>>(Reactor&, Coordinator&)>;

struct ServerOptions {
  std::filesystem::path data_dir;
  std::string listen = "tcp://0.0.0.0:7070";
  std::string keys_dir;  // "" : $MUSTER_KEYS, else ~/.muster
  bool insecure = false;
  std::chrono::milliseconds tick{100};
  // On-demand node providers (docs/providers.md): a YAML file read at start; empty: every node
  // is static. Their agents run `muster_bin` (default: this process's executable).
  std::filesystem::path providers_file;
  std::string muster_bin;
  CoordinatorOptions coordinator;
  // Dead or silent (docs/protocol.md): an agent whose every connection closed (its process
  // ended) and that says nothing for this long is lost at once, without the heartbeat timeout
  // and the lease fence. Negative: off (every lost node waits for both). Default (0): the
  // heartbeat interval + 200 ms (a live agent whose connection alone dropped reconnects and
  // heartbeats within that).
  std::chrono::milliseconds agent_gone_grace{0};
  std::vector<ServerExtensionFactory> extensions;  // Start fails if one of them fails
  // Keep finished attempts' rank logs in <data_dir>/logs (coordinator.log_keep has the caps).
  bool keep_logs = true;
  // How often the state database's log is synced, off the reactor (coordinator_db.h). 0: at
  // every change, on the reactor (a slow disk then delays heartbeats' answers).
  std::chrono::milliseconds db_flush{100};
};

class CoordinatorServer {
 public:
  static StatusOr<std::unique_ptr<CoordinatorServer>> Start(ServerOptions options);
  ~CoordinatorServer();  // stops

  const std::string& endpoint() const { return endpoint_; }
  // Re-reads authorized_keys now (a malformed file is logged and the old set kept).
  void ReloadKeys();
  void Stop();

 private:
  struct Impl;
  explicit CoordinatorServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::string endpoint_;
};

}  // namespace muster::coordinator
