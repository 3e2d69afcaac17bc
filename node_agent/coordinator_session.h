#pragma once

// CoordinatorSession: the agent's side of its session with the coordinator. A control thread
// registers (again whenever the coordinator forgets the session, listing what still runs),
// heartbeats with what runs and the newest progress, and sends the Outbox in order (reports
// and log chunks wait there while the coordinator is away: outbox.h); a poll thread keeps a
// long poll outstanding for actions. Every answered registration or heartbeat feeds the lease
// watchdog with the time its request was sent (lease_watchdog.h), so the lease is enforced
// off these threads and off the reactor.
//
// The session knows nothing of ranks: what runs, the progress and the actions go through the
// Delegate, whose functions are called on the session's threads (the agent hops them onto its
// reactor).
//
// Ownership: owns both coordinator clients, the outbox and the two threads; borrows the
// watchdog, which must outlive it. Thread-safety: every public method is thread-safe.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/logging.h"
#include "common/proto/envelope.pb.h"
#include "coordinator/client.h"
#include "node_agent/lease_watchdog.h"
#include "node_agent/outbox.h"
#include "node_agent/register_backoff.h"

namespace muster::node_agent {

class CoordinatorSession {
 public:
  using Clock = std::chrono::steady_clock;
  using ProgressMap = std::map<std::string, proto::Progress>;  // newest per job

  // Called on the session's threads; each must be thread-safe.
  struct Delegate {
    // What runs on this node (for a registration).
    std::function<std::vector<proto::RunningAssignment>()> running;
    // What runs, and the progress not yet sent (taken: a heartbeat that fails gives it back).
    std::function<std::pair<std::vector<proto::RunningAssignment>, ProgressMap>()> snapshot;
    std::function<void(ProgressMap)> return_progress;
    // An action from the coordinator, in the order received; must not block.
    std::function<void(const proto::AgentAction&)> on_action;
    // The in-memory snapshot frames held now, for each heartbeat; unset or nullopt: none.
    std::function<std::optional<std::vector<proto::SnapshotHeld>>()> snapshots_held;
    // The coordinator refused the registration for good (register_backoff.h: the key's scope,
    // a name bound to another key, a node moving providers): the session has stopped asking
    // and the agent should end with an error. Called once. Unset: only logged.
    std::function<void(const Status&)> on_fatal;
  };

  // `ctl` makes the control calls, `poll` the long polls (one each: calls on one client are
  // serialized). `labels` are registered as given; the node's name tags every message.
  // `call_timeout` bounds registrations (and heartbeats and reports, which also stay within a
  // third of the lease).
  CoordinatorSession(std::unique_ptr<coordinator::CoordinatorClient> ctl,
                     std::unique_ptr<coordinator::CoordinatorClient> poll, proto::NodeLabels labels,
                     std::chrono::milliseconds call_timeout, LeaseWatchdog* watchdog,
                     Delegate delegate);
  ~CoordinatorSession();  // RequestStop() and Join() if not done
  CoordinatorSession(const CoordinatorSession&) = delete;
  CoordinatorSession& operator=(const CoordinatorSession&) = delete;

  // Starts the control and poll threads. A registration that gets no answer is asked again
  // 500 ms later; one the coordinator refuses, after an exponential backoff with jitter (0.5 s
  // doubling to 30 s: register_backoff.h), each new refusal logged once; a permanent refusal
  // ends the asking and goes to Delegate::on_fatal.
  void Start();

  // A message for the coordinator (reports never dropped, log chunks bounded: outbox.h).
  void Queue(proto::Envelope e);
  // A report, tagged with this node's name.
  void QueueReport(proto::AgentReport r);

  // The session id; empty while not registered.
  std::string session() const;
  bool stopping() const;
  const std::string& endpoint() const { return ctl_->endpoint(); }

  // Waits until the outbox is empty (everything sent) or `until`; true when empty.
  bool WaitSent(Clock::time_point until);

  // Stop: the control thread sends what it can of the outbox (one more try if the coordinator
  // does not take it) and ends; the outstanding long poll is replaced by an immediate one so
  // the poll thread ends now. Join waits for both threads.
  void RequestStop();
  void Join();

 private:
  void ForgetSession(const std::string& stale);
  std::chrono::milliseconds ControlTimeout();
  void ApplyActions(const google::protobuf::RepeatedPtrField<proto::AgentAction>& actions);
  // Ok, or why the coordinator did not register this node.
  Status Register();
  void Heartbeat(const std::string& sid);
  bool SendOne(const std::string& sid);
  void ControlLoop();
  void PollLoop();

  const std::unique_ptr<coordinator::CoordinatorClient> ctl_;   // control thread (and stop)
  const std::unique_ptr<coordinator::CoordinatorClient> poll_;  // poll thread
  const proto::NodeLabels labels_;
  const std::chrono::milliseconds call_timeout_;
  LeaseWatchdog* const watchdog_;
  const Delegate delegate_;
  std::shared_ptr<spdlog::logger> logger_ = log::Get("agent");

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;                            // GUARDED_BY(mu_)
  std::string session_;                          // GUARDED_BY(mu_)
  std::chrono::milliseconds hb_interval_{1000};  // GUARDED_BY(mu_)
  std::chrono::milliseconds lease_{0};           // GUARDED_BY(mu_); 0: not registered yet
  Outbox outbox_;                                // GUARDED_BY(mu_)
  std::atomic<bool> ever_registered_{false};
  RegisterBackoff backoff_{std::chrono::milliseconds(500), std::chrono::seconds(30)};  // control
  std::string last_refusal_;  // control thread: the refusal last logged
  std::thread control_thread_, poll_thread_;
};

}  // namespace muster::node_agent
