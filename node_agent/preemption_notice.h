#pragma once

// Preemption notice sources: how a node agent learns that its node is about to be reclaimed,
// and by when. The agent turns a notice into "checkpoint every affected job at one step, then
// stop" (DESIGN.md, Failure and preemption).
//
// Sources here are polled: a notice file (`--preempt-file PATH`), the AWS spot
// `instance-action` document and the GCP `preempted` flag on the instance metadata servers.
// SIGTERM to the agent and `muster node preempt` reach the agent by other paths and produce the
// same PreemptionNotice.
//
// Thread-safety: a NoticeSource is used by one thread at a time. NoticeWatcher is thread-safe.

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace muster::node_agent {

struct PreemptionNotice {
  std::string source;  // "file", "aws", "gcp", "sigterm", "coordinator"
  // When the node goes away. Sources that give no time get now + their default notice.
  std::chrono::system_clock::time_point deadline;
  std::string detail;  // what the source said, for the event log
};

class NoticeSource {
 public:
  virtual ~NoticeSource() = default;
  virtual std::string name() const = 0;
  // Looks once. Returns the notice if one is pending, nullopt if not, an error if the source
  // could not be read (the watcher logs it and keeps polling).
  virtual StatusOr<std::optional<PreemptionNotice>> Check() = 0;
};

// A notice is pending once `path` exists. The file may hold the seconds of notice ("30"), or an
// RFC 3339 UTC time ("2026-11-27T19:30:00Z"); empty means `default_notice` from the file's
// modification time.
std::unique_ptr<NoticeSource> NewNoticeFileSource(std::string path,
                                                  std::chrono::seconds default_notice);

// AWS EC2 spot interruption notice: IMDSv2 token (PUT /latest/api/token), then
// GET /latest/meta-data/spot/instance-action, which is 404 until an interruption is scheduled
// and then {"action": "terminate"|"stop"|"hibernate", "time": "<RFC 3339>"}.
// `base_url` is "http://169.254.169.254" on EC2.
std::unique_ptr<NoticeSource> NewAwsSpotSource(std::string base_url,
                                               std::chrono::milliseconds http_timeout);

// GCE preemption: GET /computeMetadata/v1/instance/preempted with "Metadata-Flavor: Google"
// answers "TRUE" once the VM is being preempted; GCE then allows about 30 s.
// `base_url` is "http://metadata.google.internal" on GCE.
std::unique_ptr<NoticeSource> NewGcpPreemptedSource(
    std::string base_url, std::chrono::milliseconds http_timeout,
    std::chrono::seconds notice = std::chrono::seconds(30));

// Parses "2026-11-27T19:30:00Z" (fractional seconds allowed, UTC only).
StatusOr<std::chrono::system_clock::time_point> ParseRfc3339Utc(const std::string& text);

// Polls its sources on a background thread every `interval` and calls `on_notice` once, with
// the first notice any source reports, from that thread. Then it stops polling.
class NoticeWatcher {
 public:
  using Callback = std::function<void(const PreemptionNotice&)>;
  NoticeWatcher(std::vector<std::unique_ptr<NoticeSource>> sources,
                std::chrono::milliseconds interval, Callback on_notice);
  ~NoticeWatcher();  // Stops and joins.

  void Start();
  void Stop();

 private:
  void Run();

  std::vector<std::unique_ptr<NoticeSource>> sources_;
  const std::chrono::milliseconds interval_;
  Callback on_notice_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace muster::node_agent
