#pragma once

// HttpServer: a small read-only HTTP server over libcivetweb (Debian), shared by the
// coordinator's dashboard (coordinator/http/) and the agent's /metrics (node_agent/metrics/).
//
// What it does for its user:
//   - listens on "HOST:PORT" (IPv4 or localhost; port 0 picks a free port);
//   - answers anything but GET and HEAD with 405 (JSON error) itself;
//   - access: bound to a loopback address it serves anyone on the host; bound elsewhere, Start
//     requires a bearer token, and every path not listed in `public_paths` answers 401 (JSON
//     error, WWW-Authenticate) without `Authorization: Bearer <token>`, and the refusal is
//     logged on the given logger;
//   - hands every other request to the handler, on one of civetweb's threads, with a Request
//     that writes the response (a HEAD gets the headers only).
//
// Ownership: owns the civetweb context; the destructor stops it (waiting for handlers in
// progress). The handler must stay valid until then.
// Thread-safety: Start and the destructor on one thread; the handler runs concurrently on up to
// `threads` threads and must be thread-safe.

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>

#include "common/status.h"

struct mg_context;
struct mg_connection;

namespace muster::http {

// True for 127.0.0.0/8 and "localhost".
bool IsLoopbackHost(const std::string& host);
// "HOST:PORT" -> (host, port); "localhost" becomes 127.0.0.1. InvalidArgument naming what is
// wrong (`flag` names the option in the message, e.g. "--http").
StatusOr<std::pair<std::string, int>> ParseListen(const std::string& listen,
                                                  const std::string& flag = "--http");

// {"error": message, "code": "NOT_FOUND"}
std::string ErrorJson(const Status& status);
// The HTTP status for a Status: InvalidArgument 400, NotFound 404, FailedPrecondition 409,
// Unavailable and DeadlineExceeded 503, anything else 500.
int HttpCodeOf(const Status& status);

// One request, valid during the handler call.
class Request {
 public:
  const std::string& method() const { return method_; }
  const std::string& path() const { return path_; }
  // The raw query string; null when the URL has none.
  const char* query() const { return query_; }
  const std::string& remote() const { return remote_; }

  // Writes the whole response (no-store, nosniff, a same-origin CSP); a HEAD gets no body.
  // `extra_headers`: more "Name: value\r\n" lines.
  void Send(int code, std::string_view type, std::string_view body, const char* extra_headers = "");
  void SendJson(int code, std::string_view body) { Send(code, "application/json", body); }
  // ErrorJson(st) with HttpCodeOf(st).
  void SendError(const Status& st);

 private:
  friend class HttpServer;
  explicit Request(mg_connection* conn);
  mg_connection* conn_;
  std::string method_, path_, remote_;
  const char* query_ = nullptr;
};

struct HttpServerOptions {
  std::string listen;  // HOST:PORT
  // Required when `listen` is not a loopback address; ignored (cleared) otherwise.
  std::string token;
  // Paths served without the token (pages that hold no data).
  std::set<std::string> public_paths;
  int threads = 4;  // [1, 64]
  // Named in messages: "dashboard", "agent metrics".
  std::string what = "http";
  // The option the address came from, for messages ("--http").
  std::string flag = "--http";
  // The logger refusals and civetweb's own messages go to ("coord.http").
  std::string logger = "http";
};

class HttpServer {
 public:
  using Handler = std::function<void(Request&)>;

  // FailedPrecondition for a non-loopback address without a token, InvalidArgument for a bad
  // address or thread count, Unavailable when the address cannot be bound.
  static StatusOr<std::unique_ptr<HttpServer>> Start(HttpServerOptions options, Handler handler);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  const std::string& host() const { return host_; }
  int port() const { return port_; }
  // "http://HOST:PORT/"
  std::string url() const;
  // Whether data routes need the token (bound beyond loopback).
  bool token_required() const { return !options_.token.empty(); }

 private:
  HttpServer(HttpServerOptions options, Handler handler);
  static int HandleRequest(mg_connection* conn, void* self);
  void Serve(mg_connection* conn);

  HttpServerOptions options_;
  Handler handler_;
  std::string host_;
  int port_ = 0;
  mg_context* ctx_ = nullptr;
};

}  // namespace muster::http
