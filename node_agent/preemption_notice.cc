#include "node_agent/preemption_notice.h"

#include <sys/stat.h>
#include <time.h>

#include <cerrno>
#include <charconv>
#include <fstream>
#include <map>
#include <sstream>

#include "common/logging.h"
#include "common/strings.h"

#ifdef MUSTER_HAVE_CURL
#include <curl/curl.h>

#include <nlohmann/json.hpp>
#endif

namespace muster::node_agent {
namespace {

using SysClock = std::chrono::system_clock;

constexpr int64_t kMaxNoticeSeconds = 365LL * 24 * 3600;

class NoticeFileSource final : public NoticeSource {
 public:
  NoticeFileSource(std::string path, std::chrono::seconds default_notice)
      : path_(std::move(path)), default_notice_(default_notice) {}
  std::string name() const override { return "file " + path_; }

  StatusOr<std::optional<PreemptionNotice>> Check() override {
    struct stat st;
    if (::stat(path_.c_str(), &st) != 0) {
      if (errno == ENOENT) return std::optional<PreemptionNotice>();
      return ErrnoStatus(errno, "stat " + path_);
    }
    std::ifstream in(path_);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string text = TrimCopy(ss.str());
    auto mtime = SysClock::from_time_t(st.st_mtim.tv_sec);
    PreemptionNotice n{"file", mtime + default_notice_, "notice file " + path_};
    if (!text.empty()) {
      if (text.find_first_not_of("0123456789") == std::string::npos) {
        // Seconds of notice from the file's mtime; a year at most, so the sum cannot overflow.
        int64_t secs = 0;
        auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), secs);
        if (ec != std::errc() || end != text.data() + text.size() || secs > kMaxNoticeSeconds) {
          return InvalidArgumentError("notice file " + path_ + ": " + std::to_string(text.size()) +
                                      "-digit notice; at most " +
                                      std::to_string(kMaxNoticeSeconds) + " seconds");
        }
        n.deadline = mtime + std::chrono::seconds(secs);
      } else {
        MUSTER_ASSIGN_OR_RETURN(n.deadline, ParseRfc3339Utc(text));
      }
      n.detail += ": " + text;
    }
    return std::optional<PreemptionNotice>(n);
  }

 private:
  std::string path_;
  std::chrono::seconds default_notice_;
};

#ifdef MUSTER_HAVE_CURL
struct HttpResponse {
  long code = 0;
  std::string body;
};

size_t AppendBody(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

// One HTTP request with libcurl. Metadata servers are plain HTTP on a link-local address.
StatusOr<HttpResponse> Http(const std::string& method, const std::string& url,
                            const std::vector<std::string>& headers,
                            std::chrono::milliseconds timeout) {
  static const bool initialized = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  if (!initialized) return InternalError("curl_global_init failed");
  std::unique_ptr<CURL, void (*)(CURL*)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) return InternalError("curl_easy_init failed");
  HttpResponse resp;
  curl_slist* hdrs = nullptr;
  for (const auto& h : headers) hdrs = curl_slist_append(hdrs, h.c_str());
  std::unique_ptr<curl_slist, void (*)(curl_slist*)> hdr_guard(hdrs, curl_slist_free_all);
  curl_easy_setopt(curl.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl.get(), CURLOPT_CUSTOMREQUEST, method.c_str());
  curl_easy_setopt(curl.get(), CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(curl.get(), CURLOPT_TIMEOUT_MS, static_cast<long>(timeout.count()));
  curl_easy_setopt(curl.get(), CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl.get(), CURLOPT_NOPROXY, "*");
  curl_easy_setopt(curl.get(), CURLOPT_WRITEFUNCTION, AppendBody);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEDATA, &resp.body);
  if (method == "PUT") curl_easy_setopt(curl.get(), CURLOPT_POSTFIELDS, "");
  CURLcode rc = curl_easy_perform(curl.get());
  if (rc != CURLE_OK) {
    return UnavailableError(method + " " + url + ": " + curl_easy_strerror(rc));
  }
  curl_easy_getinfo(curl.get(), CURLINFO_RESPONSE_CODE, &resp.code);
  return resp;
}

class AwsSpotSource final : public NoticeSource {
 public:
  AwsSpotSource(std::string base, std::chrono::milliseconds timeout)
      : base_(std::move(base)), timeout_(timeout) {}
  std::string name() const override { return "aws spot " + base_; }

  StatusOr<std::optional<PreemptionNotice>> Check() override {
    // IMDSv2: a session token first (IMDSv1-only endpoints answer the GET without it).
    std::vector<std::string> headers;
    auto token = Http("PUT", base_ + "/latest/api/token",
                      {"X-aws-ec2-metadata-token-ttl-seconds: 300"}, timeout_);
    if (token.ok() && token->code == 200) {
      headers.push_back("X-aws-ec2-metadata-token: " + TrimCopy(token->body));
    }
    MUSTER_ASSIGN_OR_RETURN(
        HttpResponse r,
        Http("GET", base_ + "/latest/meta-data/spot/instance-action", headers, timeout_));
    if (r.code == 404) return std::optional<PreemptionNotice>();
    if (r.code != 200) {
      return UnavailableError("aws instance-action answered HTTP " + std::to_string(r.code));
    }
    nlohmann::json doc = nlohmann::json::parse(r.body, nullptr, /*allow_exceptions=*/false);
    if (!doc.is_object() || !doc.contains("action") || !doc.contains("time") ||
        !doc["action"].is_string() || !doc["time"].is_string()) {
      return InvalidArgumentError("aws instance-action: unexpected document: " + r.body);
    }
    MUSTER_ASSIGN_OR_RETURN(auto when, ParseRfc3339Utc(doc["time"].get<std::string>()));
    return std::optional<PreemptionNotice>(
        PreemptionNotice{"aws", when,
                         "spot instance-action " + doc["action"].get<std::string>() + " at " +
                             doc["time"].get<std::string>()});
  }

 private:
  std::string base_;
  std::chrono::milliseconds timeout_;
};

class GcpPreemptedSource final : public NoticeSource {
 public:
  GcpPreemptedSource(std::string base, std::chrono::milliseconds timeout,
                     std::chrono::seconds notice)
      : base_(std::move(base)), timeout_(timeout), notice_(notice) {}
  std::string name() const override { return "gcp preempted " + base_; }

  StatusOr<std::optional<PreemptionNotice>> Check() override {
    MUSTER_ASSIGN_OR_RETURN(HttpResponse r,
                            Http("GET", base_ + "/computeMetadata/v1/instance/preempted",
                                 {"Metadata-Flavor: Google"}, timeout_));
    if (r.code != 200) {
      return UnavailableError("gcp preempted answered HTTP " + std::to_string(r.code));
    }
    std::string v = TrimCopy(r.body);
    if (v == "FALSE") return std::optional<PreemptionNotice>();
    if (v != "TRUE") return InvalidArgumentError("gcp preempted: unexpected value '" + v + "'");
    return std::optional<PreemptionNotice>(
        PreemptionNotice{"gcp", SysClock::now() + notice_, "instance/preempted is TRUE"});
  }

 private:
  std::string base_;
  std::chrono::milliseconds timeout_;
  std::chrono::seconds notice_;
};
#endif  // MUSTER_HAVE_CURL

class UnavailableSource final : public NoticeSource {
 public:
  explicit UnavailableSource(std::string what) : what_(std::move(what)) {}
  std::string name() const override { return what_; }
  StatusOr<std::optional<PreemptionNotice>> Check() override {
    return FailedPreconditionError(what_ +
                                   " needs libcurl: install libcurl4-openssl-dev and rebuild");
  }

 private:
  std::string what_;
};

}  // namespace

StatusOr<SysClock::time_point> ParseRfc3339Utc(const std::string& text) {
  std::tm tm{};
  const char* end = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (end == nullptr) return InvalidArgumentError("not an RFC 3339 time: '" + text + "'");
  double frac = 0;
  if (*end == '.') {
    char* after;
    frac = std::strtod(end, &after);
    end = after;
  }
  if (std::string(end) != "Z" && std::string(end) != "+00:00") {
    return InvalidArgumentError("only UTC times are accepted: '" + text + "'");
  }
  return SysClock::from_time_t(timegm(&tm)) +
         std::chrono::duration_cast<SysClock::duration>(std::chrono::duration<double>(frac));
}

std::unique_ptr<NoticeSource> NewNoticeFileSource(std::string path,
                                                  std::chrono::seconds default_notice) {
  return std::make_unique<NoticeFileSource>(std::move(path), default_notice);
}

std::unique_ptr<NoticeSource> NewAwsSpotSource(std::string base_url,
                                               std::chrono::milliseconds http_timeout) {
#ifdef MUSTER_HAVE_CURL
  return std::make_unique<AwsSpotSource>(std::move(base_url), http_timeout);
#else
  return std::make_unique<UnavailableSource>("aws spot notices");
#endif
}

std::unique_ptr<NoticeSource> NewGcpPreemptedSource(std::string base_url,
                                                    std::chrono::milliseconds http_timeout,
                                                    std::chrono::seconds notice) {
#ifdef MUSTER_HAVE_CURL
  return std::make_unique<GcpPreemptedSource>(std::move(base_url), http_timeout, notice);
#else
  return std::make_unique<UnavailableSource>("gcp preemption notices");
#endif
}

NoticeWatcher::NoticeWatcher(std::vector<std::unique_ptr<NoticeSource>> sources,
                             std::chrono::milliseconds interval, Callback on_notice)
    : sources_(std::move(sources)), interval_(interval), on_notice_(std::move(on_notice)) {}

NoticeWatcher::~NoticeWatcher() { Stop(); }

void NoticeWatcher::Start() {
  thread_ = std::thread([this] { Run(); });
}

void NoticeWatcher::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void NoticeWatcher::Run() {
  auto logger = log::Get("agent.notice");
  std::map<std::string, std::string> last_error;  // log each distinct error once
  for (;;) {
    for (auto& source : sources_) {
      auto r = source->Check();
      if (!r.ok()) {
        std::string msg = r.status().ToString();
        if (last_error[source->name()] != msg) logger->warn("{}: {}", source->name(), msg);
        last_error[source->name()] = msg;
        continue;
      }
      last_error.erase(source->name());
      if (r->has_value()) {
        logger->warn("preemption notice from {}: {}", source->name(), (*r)->detail);
        on_notice_(**r);
        return;
      }
    }
    std::unique_lock<std::mutex> l(mu_);
    if (cv_.wait_for(l, interval_, [&] { return stop_; })) return;
  }
}

}  // namespace muster::node_agent
