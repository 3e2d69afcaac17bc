#include "http/http_server.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <fmt/format.h>

#include <charconv>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common/logging.h"

namespace muster::http {

namespace {

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

StatusOr<std::pair<std::string, int>> ParseListen(const std::string& listen,
                                                  const std::string& flag) {
  auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return InvalidArgumentError(flag + " '" + listen + "' must be HOST:PORT, e.g. 127.0.0.1:8780");
  }
  std::string host = listen.substr(0, colon);
  std::string port_s = listen.substr(colon + 1);
  int port = -1;
  auto [p, ec] = std::from_chars(port_s.data(), port_s.data() + port_s.size(), port);
  if (ec != std::errc() || p != port_s.data() + port_s.size() || port < 0 || port > 65535) {
    return InvalidArgumentError(flag + " '" + listen + "': port '" + port_s +
                                "' must be a number in [0, 65535]");
  }
  if (host == "localhost") host = "127.0.0.1";
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) != 1) {
    return InvalidArgumentError(flag + " '" + listen + "': host '" + host +
                                "' must be an IPv4 address or localhost");
  }
  return std::make_pair(host, port);
}

std::string ErrorJson(const Status& status) {
  nlohmann::json j = {{"error", status.message()},
                      {"code", std::string(StatusCodeName(status.code()))}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

int HttpCodeOf(const Status& st) {
  switch (st.code()) {
    case StatusCode::kInvalidArgument:
      return 400;
    case StatusCode::kNotFound:
      return 404;
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
      return 503;
    case StatusCode::kFailedPrecondition:
      return 409;
    default:
      return 500;
  }
}

Request::Request(mg_connection* conn) : conn_(conn) {
  const mg_request_info* ri = mg_get_request_info(conn);
  method_ = ri->request_method ? ri->request_method : "";
  path_ = ri->local_uri ? ri->local_uri : "/";
  remote_ = ri->remote_addr;
  query_ = ri->query_string;
}

void Request::Send(int code, std::string_view type, std::string_view body,
                   const char* extra_headers) {
  mg_printf(conn_,
            "HTTP/1.1 %d %s\r\nContent-Type: %.*s\r\nContent-Length: %zu\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'\r\n"
            "%s\r\n",
            code, mg_get_response_code_text(conn_, code), static_cast<int>(type.size()),
            type.data(), body.size(), extra_headers);
  if (method_ != "HEAD") mg_write(conn_, body.data(), body.size());
}

void Request::SendError(const Status& st) { SendJson(HttpCodeOf(st), ErrorJson(st)); }

HttpServer::HttpServer(HttpServerOptions options, Handler handler)
    : options_(std::move(options)), handler_(std::move(handler)) {}

StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(HttpServerOptions options,
                                                        Handler handler) {
  MUSTER_ASSIGN_OR_RETURN(auto hp, ParseListen(options.listen, options.flag));
  if (!IsLoopbackHost(hp.first) && options.token.empty()) {
    return FailedPreconditionError(
        fmt::format("{} {} is not a loopback address: the {} then needs the bearer token that "
                    "`muster keys init` writes to <keys>/http_token",
                    options.flag, options.listen, options.what));
  }
  if (IsLoopbackHost(hp.first)) options.token.clear();
  if (options.threads < 1 || options.threads > 64) {
    return InvalidArgumentError(options.what + " threads must be in [1, 64]");
  }
  std::unique_ptr<HttpServer> s(new HttpServer(std::move(options), std::move(handler)));
  s->host_ = hp.first;
  std::string ports = fmt::format("{}:{}", hp.first, hp.second);
  std::string threads = std::to_string(s->options_.threads);
  const char* opts[] = {
      "listening_ports", ports.c_str(),       "num_threads", threads.c_str(), "request_timeout_ms",
      "10000",           "enable_keep_alive", "yes",         nullptr};
  mg_callbacks cb{};
  cb.log_message = [](const mg_connection* conn, const char* msg) {
    const mg_context* ctx = conn ? mg_get_context(conn) : nullptr;
    auto* self = ctx ? static_cast<HttpServer*>(mg_get_user_data(ctx)) : nullptr;
    log::Get(self ? self->options_.logger : "http")->warn("http: {}", msg);
    return 1;
  };
  mg_init_library(0);
  s->ctx_ = mg_start(&cb, s.get(), opts);
  if (s->ctx_ == nullptr) {
    return UnavailableError(s->options_.what + ": cannot listen on " + ports +
                            " (in use, or not an address of this host)");
  }
  mg_set_request_handler(s->ctx_, "/", &HttpServer::HandleRequest, s.get());
  mg_server_port sp[4] = {};
  int n = mg_get_server_ports(s->ctx_, 4, sp);
  if (n < 1) return InternalError(s->options_.what + ": civetweb reports no listening port");
  s->port_ = sp[0].port;
  return s;
}

HttpServer::~HttpServer() {
  if (ctx_) mg_stop(ctx_);
}

std::string HttpServer::url() const { return fmt::format("http://{}:{}/", host_, port_); }

int HttpServer::HandleRequest(mg_connection* conn, void* self) {
  static_cast<HttpServer*>(self)->Serve(conn);
  return 1;  // handled (civetweb: a non-zero return means the response was written)
}

void HttpServer::Serve(mg_connection* conn) {
  Request req(conn);
  if (req.method() != "GET" && req.method() != "HEAD") {
    req.SendJson(
        405, ErrorJson(InvalidArgumentError("the " + options_.what + " is read-only: GET only")));
    return;
  }
  if (!options_.token.empty() && options_.public_paths.count(req.path()) == 0) {
    const char* auth = mg_get_header(conn, "Authorization");
    std::string want = "Bearer " + options_.token;
    if (auth == nullptr || !ConstantTimeEqual(auth, want)) {
      log::Get(options_.logger)
          ->warn("{}: 401 for {} {} from {} ({})", options_.what, req.method(), req.path(),
                 req.remote(), auth ? "wrong token" : "no Authorization header");
      req.Send(401, "application/json",
               ErrorJson(InvalidArgumentError("a bearer token is required (<keys>/http_token)")),
               "WWW-Authenticate: Bearer realm=\"muster\"\r\n");
      return;
    }
  }
  handler_(req);
}

}  // namespace muster::http
