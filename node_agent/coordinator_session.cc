#include "node_agent/coordinator_session.h"

#include <algorithm>

namespace muster::node_agent {

using std::chrono::milliseconds;

CoordinatorSession::CoordinatorSession(std::unique_ptr<coordinator::CoordinatorClient> ctl,
                                       std::unique_ptr<coordinator::CoordinatorClient> poll,
                                       proto::NodeLabels labels, milliseconds call_timeout,
                                       LeaseWatchdog* watchdog, Delegate delegate)
    : ctl_(std::move(ctl)),
      poll_(std::move(poll)),
      labels_(std::move(labels)),
      call_timeout_(call_timeout),
      watchdog_(watchdog),
      delegate_(std::move(delegate)) {}

CoordinatorSession::~CoordinatorSession() {
  RequestStop();
  Join();
}

void CoordinatorSession::Start() {
  control_thread_ = std::thread([this] { ControlLoop(); });
  poll_thread_ = std::thread([this] { PollLoop(); });
}

bool CoordinatorSession::stopping() const {
  std::lock_guard<std::mutex> l(mu_);
  return stop_;
}

bool CoordinatorSession::WaitSent(Clock::time_point until) {
  std::unique_lock<std::mutex> l(mu_);
  return cv_.wait_until(l, until, [&] { return outbox_.empty(); });
}

void CoordinatorSession::RequestStop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  // Replace the outstanding long poll with an immediate one so the poll thread returns now.
  if (std::string sid = session(); !sid.empty()) {
    proto::Envelope req;
    req.mutable_agent_poll()->set_node(labels_.name());
    req.mutable_agent_poll()->set_session_id(sid);
    req.mutable_agent_poll()->set_wait_ms(0);
    (void)ctl_->Call(std::move(req), milliseconds(500));
  }
}

void CoordinatorSession::Join() {
  if (control_thread_.joinable()) control_thread_.join();
  if (poll_thread_.joinable()) poll_thread_.join();
}

void CoordinatorSession::Queue(proto::Envelope e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    uint64_t dropped = outbox_.dropped_log_chunks();
    outbox_.Push(std::move(e));
    if (outbox_.dropped_log_chunks() != dropped) {
      logger_->warn("coordinator away: dropped the oldest log chunk waiting for it ({} so far)",
                    outbox_.dropped_log_chunks());
    }
  }
  cv_.notify_all();
}

void CoordinatorSession::QueueReport(proto::AgentReport r) {
  r.set_node(labels_.name());
  proto::Envelope e;
  *e.mutable_agent_report() = std::move(r);
  Queue(std::move(e));
}

std::string CoordinatorSession::session() const {
  std::lock_guard<std::mutex> l(mu_);
  return session_;
}

void CoordinatorSession::ForgetSession(const std::string& stale) {
  std::lock_guard<std::mutex> l(mu_);
  if (session_ == stale) session_.clear();
}

// Heartbeats and reports give up well inside the lease, so a reply that was lost (the
// coordinator restarted) is asked for again before the lease runs out.
milliseconds CoordinatorSession::ControlTimeout() {
  std::lock_guard<std::mutex> l(mu_);
  if (lease_.count() <= 0) return call_timeout_;
  return std::clamp(lease_ / 3, milliseconds(200), call_timeout_);
}

void CoordinatorSession::ApplyActions(
    const google::protobuf::RepeatedPtrField<proto::AgentAction>& actions) {
  for (const auto& a : actions) {
    delegate_.on_action(a);
  }
}

Status CoordinatorSession::Register() {
  proto::Envelope req;
  auto* r = req.mutable_agent_register();
  *r->mutable_labels() = labels_;
  r->set_agent_version("muster 0.1");
  auto running = delegate_.running();
  for (auto& ra : running) *r->add_running() = std::move(ra);
  auto sent = Clock::now();
  auto reply = ctl_->Call(std::move(req), call_timeout_);
  if (!reply.ok()) {
    // Once per change: an agent refused for an hour logs its reason once, not 7200 times.
    std::string why = reply.status().ToString();
    if (why != last_refusal_) {
      logger_->warn("register with {} as {} failed: {}", ctl_->endpoint(), labels_.name(), why);
      last_refusal_ = why;
    }
    return reply.status();
  }
  last_refusal_.clear();
  const auto& reg = reply->agent_registered();
  {
    std::lock_guard<std::mutex> l(mu_);
    session_ = reg.session_id();
    hb_interval_ = milliseconds(std::max<int64_t>(50, reg.heartbeat_interval_ms()));
    lease_ = milliseconds(std::max<int64_t>(reg.lease_ms(), 2 * hb_interval_.count()));
    watchdog_->Feed(sent, lease_);
  }
  bool first = !ever_registered_.exchange(true);
  logger_->info("{} with {} as {} (session {}, {} assignment(s) running, lease {} ms)",
                first ? "registered" : "re-registered", ctl_->endpoint(), labels_.name(),
                reg.session_id(), running.size(), reg.lease_ms());
  ApplyActions(reg.actions());
  return Status::Ok();
}

void CoordinatorSession::Heartbeat(const std::string& sid) {
  proto::Envelope req;
  auto* h = req.mutable_agent_heartbeat();
  h->set_node(labels_.name());
  h->set_session_id(sid);
  auto [running, prog] = delegate_.snapshot();
  for (auto& ra : running) *h->add_running() = std::move(ra);
  for (auto& [job, p] : prog) *h->add_progress() = p;
  if (delegate_.snapshots_held) {
    if (auto held = delegate_.snapshots_held()) {
      h->set_snapshots_reported(true);
      for (auto& s : *held) *h->add_snapshots_held() = std::move(s);
    }
  }
  auto sent = Clock::now();
  auto reply = ctl_->Call(std::move(req), ControlTimeout());
  if (!reply.ok()) {
    if (reply.status().code() == StatusCode::kNotFound) {
      // Not a renewal of the lease: the registration that follows is.
      logger_->warn("coordinator forgot session {}: registering again", sid);
      ForgetSession(sid);
    } else {
      logger_->warn("heartbeat failed: {}", reply.status().ToString());
      // Give the progress back so the next heartbeat carries it.
      delegate_.return_progress(std::move(prog));
    }
    return;
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    watchdog_->Feed(sent, lease_);
  }
  ApplyActions(reply->agent_heartbeat_reply().actions());
}

// Sends the oldest outbox message. False when it could not (kept for later).
bool CoordinatorSession::SendOne(const std::string& sid) {
  proto::Envelope e;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (outbox_.empty()) return false;
    e = outbox_.front();
  }
  if (e.has_agent_report()) e.mutable_agent_report()->set_session_id(sid);
  if (e.has_agent_log_chunk()) e.mutable_agent_log_chunk()->set_session_id(sid);
  auto reply = ctl_->Call(e, ControlTimeout());
  if (!reply.ok() && reply.status().code() == StatusCode::kNotFound && e.has_agent_report()) {
    // Unknown session: register again first, then resend.
    ForgetSession(sid);
    return false;
  }
  if (!reply.ok() && (reply.status().code() == StatusCode::kDeadlineExceeded ||
                      reply.status().code() == StatusCode::kUnavailable)) {
    return false;  // coordinator away: keep it
  }
  if (!reply.ok()) {
    logger_->warn("coordinator refused a report: {}", reply.status().ToString());
  }
  bool drained;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!outbox_.empty()) outbox_.pop_front();
    drained = outbox_.empty();
  }
  if (drained) cv_.notify_all();  // WaitSent
  return true;
}

void CoordinatorSession::ControlLoop() {
  auto next_hb = Clock::now();
  auto retry_at = Clock::now();
  for (;;) {
    {
      std::unique_lock<std::mutex> l(mu_);
      if (stop_ && outbox_.empty()) return;
    }
    std::string sid = session();
    if (sid.empty()) {
      if (Clock::now() >= retry_at) {
        Status st = Register();
        if (st.ok()) {
          backoff_.Reset();
          next_hb = Clock::now();
          continue;
        }
        if (IsPermanentRegisterRefusal(st)) {
          logger_->critical(
              "the coordinator at {} refuses node {} for good, asking again cannot change it: "
              "{} (fix the agent's key, its scope in authorized_keys or the node's labels, then "
              "start the agent again)",
              ctl_->endpoint(), labels_.name(), st.message());
          if (delegate_.on_fatal) delegate_.on_fatal(st);
          return;
        }
        // No answer: the call already waited its timeout. An answered refusal: back off.
        retry_at = Clock::now() + (st.code() == StatusCode::kDeadlineExceeded ? milliseconds(500)
                                                                              : backoff_.Next());
      }
      std::unique_lock<std::mutex> l(mu_);
      if (stop_) return;  // no coordinator: the last reports cannot go anywhere
      cv_.wait_until(l, retry_at, [&] { return stop_; });
      continue;
    }
    bool sent = false;
    while (SendOne(sid)) sent = true;
    if (Clock::now() >= next_hb) {
      Heartbeat(sid);
      std::lock_guard<std::mutex> l(mu_);
      next_hb = Clock::now() + hb_interval_;
    }
    std::unique_lock<std::mutex> l(mu_);
    if (stop_ && (outbox_.empty() || !sent)) {
      if (outbox_.empty()) return;
      // Could not send: one more try after a short pause, then give up.
      cv_.wait_for(l, milliseconds(200));
      l.unlock();
      while (SendOne(sid)) {
      }
      return;
    }
    bool outbox_stuck = !outbox_.empty();
    auto until = outbox_stuck ? std::min(next_hb, Clock::now() + milliseconds(200)) : next_hb;
    cv_.wait_until(l, until, [&] { return stop_ || (!outbox_.empty() && !outbox_stuck); });
  }
}

void CoordinatorSession::PollLoop() {
  for (;;) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_) return;
    }
    std::string sid = session();
    if (sid.empty()) {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, milliseconds(100), [&] { return stop_ || !session_.empty(); });
      continue;
    }
    proto::Envelope req;
    auto* p = req.mutable_agent_poll();
    p->set_node(labels_.name());
    p->set_session_id(sid);
    p->set_wait_ms(10000);
    auto reply = poll_->Call(std::move(req), milliseconds(10000) + call_timeout_);
    if (reply.ok()) {
      ApplyActions(reply->agent_actions().actions());
      continue;
    }
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, milliseconds(300), [&] { return stop_; });
  }
}

}  // namespace muster::node_agent
