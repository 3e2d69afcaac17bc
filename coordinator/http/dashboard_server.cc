#include "coordinator/http/dashboard_server.h"

#include <fmt/format.h>

#include <map>
#include <nlohmann/json.hpp>

#include "common/logging.h"
#include "common/wire.h"
#include "coordinator/http/dashboard_assets.h"
#include "coordinator/http/query.h"
#include "coordinator/http/render.h"

namespace muster::coordinator::http {

namespace {

auto Logger() {
  static auto l = log::Get("coord.http");
  return l;
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string_view Asset(const unsigned char* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

}  // namespace

DashboardServer::DashboardServer(Reactor& reactor, Coordinator& coord, HttpOptions options)
    : reactor_(reactor), coord_(coord), options_(std::move(options)) {}

StatusOr<std::unique_ptr<DashboardServer>> DashboardServer::Start(Reactor& reactor,
                                                                  Coordinator& coord,
                                                                  HttpOptions options) {
  // The address and token are checked before anything is built (HttpServer::Start checks them
  // again, with the same messages).
  MUSTER_ASSIGN_OR_RETURN(auto hp, ParseListen(options.listen));
  if (!IsLoopbackHost(hp.first) && options.token.empty()) {
    return FailedPreconditionError(fmt::format(
        "--http {} is not a loopback address: the dashboard then needs the bearer token that "
        "`muster keys init` writes to <keys>/http_token",
        options.listen));
  }
  std::unique_ptr<DashboardServer> s(new DashboardServer(reactor, coord, std::move(options)));
  s->recorder_ = std::make_unique<FleetRecorder>(coord, s->hub_, s->options_.publish_interval_ms);
  s->recorder_->MaybePublish(UnixMs(), /*force=*/true);

  ::muster::http::HttpServerOptions ho;
  ho.listen = s->options_.listen;
  ho.token = s->options_.token;
  ho.public_paths = {"/", "/index.html", "/app.js"};
  ho.threads = s->options_.threads;
  ho.what = "dashboard";
  ho.logger = "coord.http";
  DashboardServer* self = s.get();
  MUSTER_ASSIGN_OR_RETURN(
      s->server_, ::muster::http::HttpServer::Start(
                      std::move(ho), [self](::muster::http::Request& r) { self->Serve(r); }));
  s->port_ = s->server_->port();
  Logger()->info(
      "dashboard serving on {}{}", s->url(),
      s->server_->token_required() ? " (bearer token required)" : " (loopback: no token)");
  return s;
}

ServerExtensionFactory DashboardServer::Factory(
    HttpOptions options, std::function<void(const std::string& url)> on_started) {
  return [options, on_started](Reactor& reactor,
                               Coordinator& coord) -> StatusOr<std::unique_ptr<ServerExtension>> {
    MUSTER_ASSIGN_OR_RETURN(auto s, Start(reactor, coord, options));
    if (on_started) on_started(s->url());
    return std::unique_ptr<ServerExtension>(std::move(s));
  };
}

DashboardServer::~DashboardServer() {
  {
    std::lock_guard<std::mutex> l(waits_->mu);
    waits_->stopping = true;
  }
  waits_->cv.notify_all();
  server_.reset();
  recorder_.reset();
}

std::string DashboardServer::url() const { return server_ ? server_->url() : ""; }

void DashboardServer::OnTick() { recorder_->MaybePublish(UnixMs()); }

void DashboardServer::Serve(::muster::http::Request& req) {
  requests_++;
  const std::string& path = req.path();
  if (path == "/" || path == "/index.html") {
    req.Send(200, "text/html; charset=utf-8", Asset(kIndexHtml, kIndexHtmlSize));
    return;
  }
  if (path == "/app.js") {
    req.Send(200, "text/javascript; charset=utf-8", Asset(kAppJs, kAppJsSize));
    return;
  }
  auto snap = hub_.Get();
  const char* qs = req.query();
  auto fail = [&](const Status& st) { req.SendError(st); };
  if (path == "/metrics") {
    auto q = ParseQuery(qs, {});
    if (!q.ok()) return fail(q.status());
    req.Send(200, "text/plain; version=0.0.4; charset=utf-8", RenderMetrics(*snap));
    return;
  }
  if (path == "/api/jobs") {
    auto q = ParseQuery(qs, {});
    if (!q.ok()) return fail(q.status());
    req.SendJson(200, RenderJobsJson(*snap));
    return;
  }
  if (path == "/api/nodes") {
    auto q = ParseQuery(qs, {});
    if (!q.ok()) return fail(q.status());
    req.SendJson(200, RenderNodesJson(*snap));
    return;
  }
  if (path == "/api/events") {
    auto q = ParseQuery(qs, {"after", "job", "limit"});
    if (!q.ok()) return fail(q.status());
    auto after = IntParam(*q, "after", 0, 0, INT64_MAX);
    if (!after.ok()) return fail(after.status());
    auto limit = IntParam(*q, "limit", 1000, 1, 10000);
    if (!limit.ok()) return fail(limit.status());
    std::string job = q->count("job") ? q->at("job") : "";
    if (!job.empty() && !snap->FindJob(job)) {
      return fail(NotFoundError("no job '" + job + "'"));
    }
    req.SendJson(200, RenderEventsJson(*snap, *after, job, static_cast<int>(*limit)));
    return;
  }
  if (path == "/api/checkpoints") {
    auto q = ParseQuery(qs, {"job"});
    if (!q.ok()) return fail(q.status());
    auto body = RenderCheckpointsJson(*snap, q->count("job") ? q->at("job") : "");
    if (!body.ok()) return fail(body.status());
    req.SendJson(200, *body);
    return;
  }
  const std::string prefix = "/api/jobs/";
  if (path.rfind(prefix, 0) == 0) {
    std::string rest = path.substr(prefix.size());
    auto slash = rest.find('/');
    std::string job = rest.substr(0, slash);
    std::string sub = slash == std::string::npos ? "" : rest.substr(slash);
    if (job.empty()) return fail(NotFoundError("no job named in " + path));
    if (sub.empty()) {
      auto q = ParseQuery(qs, {});
      if (!q.ok()) return fail(q.status());
      auto body = RenderJobJson(*snap, job);
      if (!body.ok()) return fail(body.status());
      req.SendJson(200, *body);
      return;
    }
    if (sub == "/logs") {
      ServeLogs(req, job, qs ? qs : "");
      return;
    }
  }
  req.SendJson(404, ErrorJson(NotFoundError("no route " + path)));
}

void DashboardServer::ServeLogs(::muster::http::Request& http_req, const std::string& job,
                                const std::string& query) {
  auto snap = hub_.Get();
  auto q = ParseQuery(query.c_str(), {"rank", "attempt", "bytes"});
  if (!q.ok()) return http_req.SendError(q.status());
  auto rank = IntParam(*q, "rank", 0, 0, 1 << 20);
  if (!rank.ok()) return http_req.SendError(rank.status());
  auto attempt = IntParam(*q, "attempt", 0, 0, 1 << 30);
  if (!attempt.ok()) return http_req.SendError(attempt.status());
  auto bytes = IntParam(*q, "bytes", 16 << 10, 1, 1 << 20);
  if (!bytes.ok()) return http_req.SendError(bytes.status());
  if (!snap->FindJob(job)) return http_req.SendError(NotFoundError("no job '" + job + "'"));

  struct Result {
    bool done = false;
    proto::Envelope reply;
  };
  auto result = std::make_shared<Result>();
  auto waits = waits_;
  proto::Envelope req;
  auto* lr = req.mutable_logs_request();
  lr->set_job_id(job);
  lr->set_rank(static_cast<int32_t>(*rank));
  lr->set_attempt(static_cast<int32_t>(*attempt));
  lr->set_offset(-1);
  lr->set_max_bytes(static_cast<int32_t>(*bytes));
  Coordinator* coord = &coord_;
  bool posted = reactor_.Post("http.logs", [coord, req = std::move(req), result, waits]() mutable {
    coord->Handle("dashboard", std::move(req), [result, waits](proto::Envelope e) {
      {
        std::lock_guard<std::mutex> l(waits->mu);
        result->reply = std::move(e);
        result->done = true;
      }
      waits->cv.notify_all();
    });
  });
  if (!posted) return http_req.SendError(UnavailableError("the coordinator is shutting down"));
  proto::Envelope reply;
  {
    std::unique_lock<std::mutex> l(waits->mu);
    if (!waits->cv.wait_for(l, options_.log_timeout,
                            [&] { return result->done || waits->stopping; }) ||
        !result->done) {
      return http_req.SendError(UnavailableError(
          fmt::format("no log from the agent within {} ms", options_.log_timeout.count())));
    }
    reply = std::move(result->reply);
  }
  if (reply.has_error()) return http_req.SendError(ErrorToStatus(reply.error()));
  if (!reply.has_logs_reply())
    return http_req.SendError(InternalError("unexpected reply to a log request"));
  nlohmann::json out = {{"job", job},
                        {"rank", *rank},
                        {"data", reply.logs_reply().data()},
                        {"next_offset", reply.logs_reply().next_offset()},
                        {"eof", reply.logs_reply().eof()}};
  http_req.SendJson(200, out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

}  // namespace muster::coordinator::http
