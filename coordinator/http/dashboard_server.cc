#include "coordinator/http/dashboard_server.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <fmt/format.h>

#include <charconv>
#include <cstring>
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

void Send(mg_connection* conn, int code, std::string_view type, std::string_view body,
          const char* extra = "") {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %.*s\r\nContent-Length: %zu\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'\r\n"
            "%s\r\n",
            code, mg_get_response_code_text(conn, code), static_cast<int>(type.size()), type.data(),
            body.size(), extra);
  if (std::strcmp(mg_get_request_info(conn)->request_method, "HEAD") != 0) {
    mg_write(conn, body.data(), body.size());
  }
}

void SendJson(mg_connection* conn, int code, std::string_view body) {
  Send(conn, code, "application/json", body);
}

void SendError(mg_connection* conn, const Status& st) {
  int code = 500;
  switch (st.code()) {
    case StatusCode::kInvalidArgument:
      code = 400;
      break;
    case StatusCode::kNotFound:
      code = 404;
      break;
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
      code = 503;
      break;
    case StatusCode::kFailedPrecondition:
      code = 409;
      break;
    default:
      break;
  }
  SendJson(conn, code, ErrorJson(st));
}

bool ConstantTimeEqual(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

}  // namespace

bool IsLoopbackHost(const std::string& host) {
  if (host == "localhost") return true;
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) != 1) return false;
  return (ntohl(a.s_addr) >> 24) == 127;
}

StatusOr<std::pair<std::string, int>> ParseListen(const std::string& listen) {
  auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return InvalidArgumentError("--http '" + listen + "' must be HOST:PORT, e.g. 127.0.0.1:8780");
  }
  std::string host = listen.substr(0, colon);
  std::string port_s = listen.substr(colon + 1);
  int port = -1;
  auto [p, ec] = std::from_chars(port_s.data(), port_s.data() + port_s.size(), port);
  if (ec != std::errc() || p != port_s.data() + port_s.size() || port < 0 || port > 65535) {
    return InvalidArgumentError("--http '" + listen + "': port '" + port_s +
                                "' must be a number in [0, 65535]");
  }
  if (host == "localhost") host = "127.0.0.1";
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) != 1) {
    return InvalidArgumentError("--http '" + listen + "': host '" + host +
                                "' must be an IPv4 address or localhost");
  }
  return std::make_pair(host, port);
}

DashboardServer::DashboardServer(Reactor& reactor, Coordinator& coord, HttpOptions options)
    : reactor_(reactor), coord_(coord), options_(std::move(options)) {}

StatusOr<std::unique_ptr<DashboardServer>> DashboardServer::Start(Reactor& reactor,
                                                                  Coordinator& coord,
                                                                  HttpOptions options) {
  MUSTER_ASSIGN_OR_RETURN(auto hp, ParseListen(options.listen));
  if (!IsLoopbackHost(hp.first) && options.token.empty()) {
    return FailedPreconditionError(fmt::format(
        "--http {} is not a loopback address: the dashboard then needs the bearer token that "
        "`muster keys init` writes to <keys>/http_token",
        options.listen));
  }
  if (IsLoopbackHost(hp.first)) options.token.clear();
  if (options.threads < 1 || options.threads > 64) {
    return InvalidArgumentError("dashboard threads must be in [1, 64]");
  }
  std::unique_ptr<DashboardServer> s(new DashboardServer(reactor, coord, std::move(options)));
  s->host_ = hp.first;
  s->recorder_ = std::make_unique<FleetRecorder>(coord, s->hub_, s->options_.publish_interval_ms);
  s->recorder_->MaybePublish(UnixMs(), /*force=*/true);

  std::string ports = fmt::format("{}:{}", hp.first, hp.second);
  std::string threads = std::to_string(s->options_.threads);
  const char* opts[] = {
      "listening_ports", ports.c_str(),       "num_threads", threads.c_str(), "request_timeout_ms",
      "10000",           "enable_keep_alive", "yes",         nullptr};
  mg_callbacks cb{};
  cb.log_message = [](const mg_connection*, const char* msg) {
    Logger()->warn("http: {}", msg);
    return 1;
  };
  mg_init_library(0);
  s->ctx_ = mg_start(&cb, nullptr, opts);
  if (s->ctx_ == nullptr) {
    return UnavailableError("dashboard: cannot listen on " + ports +
                            " (in use, or not an address of this host)");
  }
  mg_set_request_handler(s->ctx_, "/", &DashboardServer::HandleRequest, s.get());
  mg_server_port sp[4] = {};
  int n = mg_get_server_ports(s->ctx_, 4, sp);
  if (n < 1) return InternalError("dashboard: civetweb reports no listening port");
  s->port_ = sp[0].port;
  Logger()->info("dashboard serving on {}{}", s->url(),
                 s->options_.token.empty() ? " (loopback: no token)" : " (bearer token required)");
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
  if (ctx_) mg_stop(ctx_);
  recorder_.reset();
}

std::string DashboardServer::url() const { return fmt::format("http://{}:{}/", host_, port_); }

void DashboardServer::OnTick() { recorder_->MaybePublish(UnixMs()); }

int DashboardServer::HandleRequest(mg_connection* conn, void* self) {
  return static_cast<DashboardServer*>(self)->Serve(conn);
}

int DashboardServer::Serve(mg_connection* conn) {
  requests_++;
  const mg_request_info* ri = mg_get_request_info(conn);
  std::string method = ri->request_method ? ri->request_method : "";
  std::string path = ri->local_uri ? ri->local_uri : "/";
  if (method != "GET" && method != "HEAD") {
    SendJson(conn, 405, ErrorJson(InvalidArgumentError("the dashboard is read-only: GET only")));
    return 405;
  }
  if (path == "/" || path == "/index.html") {
    Send(conn, 200, "text/html; charset=utf-8", Asset(kIndexHtml, kIndexHtmlSize));
    return 200;
  }
  if (path == "/app.js") {
    Send(conn, 200, "text/javascript; charset=utf-8", Asset(kAppJs, kAppJsSize));
    return 200;
  }
  if (!options_.token.empty()) {
    const char* auth = mg_get_header(conn, "Authorization");
    std::string want = "Bearer " + options_.token;
    if (auth == nullptr || !ConstantTimeEqual(auth, want)) {
      Logger()->warn("dashboard: 401 for {} {} from {} ({})", method, path, ri->remote_addr,
                     auth ? "wrong token" : "no Authorization header");
      Send(conn, 401, "application/json",
           ErrorJson(InvalidArgumentError("a bearer token is required (<keys>/http_token)")),
           "WWW-Authenticate: Bearer realm=\"muster\"\r\n");
      return 401;
    }
  }
  auto snap = hub_.Get();
  const char* qs = ri->query_string;
  auto fail = [&](const Status& st) {
    SendError(conn, st);
    return 400;
  };
  if (path == "/metrics") {
    auto q = ParseQuery(qs, {});
    if (!q.ok()) return fail(q.status());
    Send(conn, 200, "text/plain; version=0.0.4; charset=utf-8", RenderMetrics(*snap));
    return 200;
  }
  if (path == "/api/jobs") {
    auto q = ParseQuery(qs, {});
    if (!q.ok()) return fail(q.status());
    SendJson(conn, 200, RenderJobsJson(*snap));
    return 200;
  }
  if (path == "/api/nodes") {
    auto q = ParseQuery(qs, {});
    if (!q.ok()) return fail(q.status());
    SendJson(conn, 200, RenderNodesJson(*snap));
    return 200;
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
    SendJson(conn, 200, RenderEventsJson(*snap, *after, job, static_cast<int>(*limit)));
    return 200;
  }
  if (path == "/api/checkpoints") {
    auto q = ParseQuery(qs, {"job"});
    if (!q.ok()) return fail(q.status());
    auto body = RenderCheckpointsJson(*snap, q->count("job") ? q->at("job") : "");
    if (!body.ok()) return fail(body.status());
    SendJson(conn, 200, *body);
    return 200;
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
      SendJson(conn, 200, *body);
      return 200;
    }
    if (sub == "/logs") {
      ServeLogs(conn, job, qs ? qs : "");
      return 200;
    }
  }
  SendJson(conn, 404, ErrorJson(NotFoundError("no route " + path)));
  return 404;
}

void DashboardServer::ServeLogs(mg_connection* conn, const std::string& job,
                                const std::string& query) {
  auto snap = hub_.Get();
  auto q = ParseQuery(query.c_str(), {"rank", "attempt", "bytes"});
  if (!q.ok()) return SendError(conn, q.status());
  auto rank = IntParam(*q, "rank", 0, 0, 1 << 20);
  if (!rank.ok()) return SendError(conn, rank.status());
  auto attempt = IntParam(*q, "attempt", 0, 0, 1 << 30);
  if (!attempt.ok()) return SendError(conn, attempt.status());
  auto bytes = IntParam(*q, "bytes", 16 << 10, 1, 1 << 20);
  if (!bytes.ok()) return SendError(conn, bytes.status());
  if (!snap->FindJob(job)) return SendError(conn, NotFoundError("no job '" + job + "'"));

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
  if (!posted) return SendError(conn, UnavailableError("the coordinator is shutting down"));
  proto::Envelope reply;
  {
    std::unique_lock<std::mutex> l(waits->mu);
    if (!waits->cv.wait_for(l, options_.log_timeout,
                            [&] { return result->done || waits->stopping; }) ||
        !result->done) {
      return SendError(conn, UnavailableError(fmt::format("no log from the agent within {} ms",
                                                          options_.log_timeout.count())));
    }
    reply = std::move(result->reply);
  }
  if (reply.has_error()) return SendError(conn, ErrorToStatus(reply.error()));
  if (!reply.has_logs_reply())
    return SendError(conn, InternalError("unexpected reply to a log request"));
  nlohmann::json out = {{"job", job},
                        {"rank", *rank},
                        {"data", reply.logs_reply().data()},
                        {"next_offset", reply.logs_reply().next_offset()},
                        {"eof", reply.logs_reply().eof()}};
  SendJson(conn, 200, out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

}  // namespace muster::coordinator::http
