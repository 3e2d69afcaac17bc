#pragma once

// DashboardServer: the coordinator's read-only HTTP side (`muster coordinator --http ADDR:PORT`):
// /metrics (Prometheus text format), the JSON API under /api/ and the embedded page at /.
// docs/dashboard.md describes every route.
//
// It is a ServerExtension: created on the coordinator's reactor, it owns a FleetRecorder that
// publishes a snapshot at most every `publish_interval_ms` from OnTick, and a civetweb server
// (http/http_server.h: libcivetweb) whose threads answer requests from the newest snapshot only.
// The one request that needs the reactor, a rank's log tail, is posted to it as an ordinary
// LogsRequest (the agent is asked; the reactor never waits) and its HTTP thread waits for the reply
// with a deadline.
//
// Access: bound to a loopback address it serves anyone on the host. Bound elsewhere, Start
// requires a bearer token (`muster keys init` writes it to <keys>/http_token) and every data
// route (/metrics, /api/...) answers 401 without `Authorization: Bearer <token>`, and logs it.
// The page and its script hold no data and are served to anyone.
//
// Thread-safety: constructed, ticked and destroyed on the reactor thread (ServerExtension);
// the request handlers run on civetweb's threads and touch only the SnapshotHub and Post.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "common/reactor.h"
#include "common/status.h"
#include "coordinator/coordinator.h"
#include "coordinator/http/fleet_recorder.h"
#include "coordinator/http/fleet_snapshot.h"
#include "coordinator/server.h"
#include "http/http_server.h"

namespace muster::coordinator::http {

struct HttpOptions {
  // HOST:PORT (IPv4 address or "localhost"); port 0 picks a free port.
  std::string listen = "127.0.0.1:8780";
  // Required when `listen` is not a loopback address; ignored otherwise.
  std::string token;
  int64_t publish_interval_ms = 250;
  int threads = 4;
  std::chrono::milliseconds log_timeout{5000};
};

// The address rules are the shared HTTP server's (http/http_server.h).
using ::muster::http::IsLoopbackHost;
using ::muster::http::ParseListen;

class DashboardServer : public ServerExtension {
 public:
  // REQUIRES: on `reactor`'s thread; `coord` runs on it and outlives the server.
  static StatusOr<std::unique_ptr<DashboardServer>> Start(Reactor& reactor, Coordinator& coord,
                                                          HttpOptions options);
  // A factory for ServerOptions::extensions; `on_started` gets the page's URL.
  static ServerExtensionFactory Factory(HttpOptions options,
                                        std::function<void(const std::string& url)> on_started);
  ~DashboardServer() override;  // stops serving (waiting requests are answered 503)

  void OnTick() override;

  int port() const { return port_; }
  // The version of the snapshot served now (increases with every publication).
  uint64_t snapshot_version() const { return hub_.Get()->version; }
  std::string url() const;

 private:
  DashboardServer(Reactor& reactor, Coordinator& coord, HttpOptions options);
  void Serve(::muster::http::Request& req);
  void ServeLogs(::muster::http::Request& http_req, const std::string& job,
                 const std::string& query);

  Reactor& reactor_;
  Coordinator& coord_;
  HttpOptions options_;
  int port_ = 0;
  SnapshotHub hub_;
  std::unique_ptr<FleetRecorder> recorder_;  // reactor-only
  std::unique_ptr<::muster::http::HttpServer> server_;
  // Log fetches waiting for the reactor's reply. Shared with the reply closures, which the
  // Coordinator may hold (and call) after this server is gone.
  struct Waits {
    std::mutex mu;
    std::condition_variable cv;
    bool stopping = false;  // GUARDED_BY(mu): wakes every waiter at shutdown
  };
  std::shared_ptr<Waits> waits_ = std::make_shared<Waits>();
  std::atomic<uint64_t> requests_{0};
};

}  // namespace muster::coordinator::http
