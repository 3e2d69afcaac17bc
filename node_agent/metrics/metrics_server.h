#pragma once

// AgentMetricsServer: the agent's own /metrics (`muster agent --http ADDR:PORT`), in the
// Prometheus text format (agent_metrics.h lists the series).
//
// Publication: on the agent's reactor, every `publish_interval` it calls `collect` (which reads
// the reactor-owned state: ranks, and the thread-safe rest) and swaps the result into its hub.
// Requests are answered on the HTTP server's threads (http/http_server.h) from the newest
// snapshot only: serving never waits for, nor blocks, the reactor.
//
// Access is the coordinator dashboard's rule: on a loopback address (the default) anyone on the
// host; elsewhere only with `Authorization: Bearer <token>` (<keys>/http_token), 401 and a log
// line otherwise. GET /metrics only: any query parameter is 400, any other path 404, any other
// method 405, each with a JSON error.
//
// Ownership: owns its HTTP server and hub; borrows the reactor, which must outlive it.
// Thread-safety: Start, Stop and the destructor on the reactor's thread (or, for the
// destructor, once the reactor has stopped).

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/reactor.h"
#include "common/status.h"
#include "http/http_server.h"
#include "node_agent/metrics/agent_metrics.h"

namespace muster::node_agent {

struct AgentMetricsOptions {
  std::string listen = "127.0.0.1:8781";  // HOST:PORT; port 0 picks a free one
  std::string token;                      // required beyond loopback
  std::chrono::milliseconds publish_interval{500};
  int threads = 2;
};

class AgentMetricsServer {
 public:
  using Collect = std::function<AgentMetricsSnapshot()>;

  // Listens, publishes a first snapshot and schedules the next. `collect` runs on the reactor.
  // REQUIRES: on `reactor`'s thread.
  static StatusOr<std::unique_ptr<AgentMetricsServer>> Start(Reactor& reactor,
                                                             AgentMetricsOptions options,
                                                             Collect collect);
  ~AgentMetricsServer();  // stops serving

  // No more publications (`collect` is not called again). REQUIRES: on the reactor's thread.
  void Stop();

  const std::string& url() const { return url_; }
  int port() const { return server_->port(); }

 private:
  AgentMetricsServer(Reactor& reactor, AgentMetricsOptions options, Collect collect);
  void Publish();
  void Serve(::muster::http::Request& req);

  Reactor& reactor_;
  const AgentMetricsOptions options_;
  Collect collect_;
  AgentMetricsHub hub_;
  uint64_t version_ = 0;        // reactor-only
  Reactor::TimerId timer_ = 0;  // reactor-only
  bool stopped_ = false;        // reactor-only
  std::unique_ptr<::muster::http::HttpServer> server_;
  std::string url_;
};

}  // namespace muster::node_agent
