#include "node_agent/metrics/metrics_server.h"

#include "common/logging.h"

namespace muster::node_agent {

AgentMetricsServer::AgentMetricsServer(Reactor& reactor, AgentMetricsOptions options,
                                       Collect collect)
    : reactor_(reactor), options_(std::move(options)), collect_(std::move(collect)) {}

StatusOr<std::unique_ptr<AgentMetricsServer>> AgentMetricsServer::Start(Reactor& reactor,
                                                                        AgentMetricsOptions options,
                                                                        Collect collect) {
  if (options.publish_interval.count() <= 0) {
    return InvalidArgumentError("agent metrics: the publication interval must be positive");
  }
  std::unique_ptr<AgentMetricsServer> s(
      new AgentMetricsServer(reactor, std::move(options), std::move(collect)));
  ::muster::http::HttpServerOptions ho;
  ho.listen = s->options_.listen;
  ho.token = s->options_.token;
  ho.threads = s->options_.threads;
  ho.what = "agent metrics";
  ho.logger = "agent.http";
  AgentMetricsServer* self = s.get();
  MUSTER_ASSIGN_OR_RETURN(
      s->server_, ::muster::http::HttpServer::Start(
                      std::move(ho), [self](::muster::http::Request& r) { self->Serve(r); }));
  s->url_ = s->server_->url() + "metrics";
  s->Publish();
  log::Get("agent.http")
      ->info("agent metrics on {}{}", s->url_,
             s->server_->token_required() ? " (bearer token required)" : " (loopback: no token)");
  return s;
}

AgentMetricsServer::~AgentMetricsServer() {
  server_.reset();  // waits for requests in progress; they only read the hub
  if (!stopped_ && timer_ != 0 && reactor_.running()) reactor_.CancelTimer(timer_);
}

void AgentMetricsServer::Stop() {
  stopped_ = true;
  if (timer_ != 0) reactor_.CancelTimer(timer_);
  timer_ = 0;
}

void AgentMetricsServer::Publish() {
  if (stopped_) return;
  auto snap = std::make_shared<AgentMetricsSnapshot>(collect_());
  snap->version = ++version_;
  hub_.Publish(std::move(snap));
  timer_ = reactor_.PostAfter(options_.publish_interval, "agent.metrics", [this] { Publish(); });
}

void AgentMetricsServer::Serve(::muster::http::Request& req) {
  if (req.path() != "/metrics") {
    req.SendError(NotFoundError("no route " + req.path() + " (the agent serves /metrics)"));
    return;
  }
  if (req.query() != nullptr && *req.query() != '\0') {
    req.SendError(InvalidArgumentError(std::string("/metrics takes no query parameters, got '") +
                                       req.query() + "'"));
    return;
  }
  auto snap = hub_.Get();
  req.Send(200, "text/plain; version=0.0.4; charset=utf-8", RenderAgentMetrics(*snap));
}

}  // namespace muster::node_agent
