#include "node_agent/lease_watchdog.h"

#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace muster::node_agent {

using std::chrono::milliseconds;

uint64_t ProcessStartTime(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), {});
  auto close = stat.rfind(')');
  if (close == std::string::npos || close + 2 > stat.size()) return 0;
  std::istringstream fields(stat.substr(close + 2));
  std::string f;
  for (int i = 3; i <= 22 && fields >> f; ++i) {
    if (i == 22) return std::strtoull(f.c_str(), nullptr, 10);
  }
  return 0;
}

void LeaseTimeline::Feed(Clock::time_point sent, milliseconds lease) {
  fed_ = std::max(fed_, sent);
  lease_ = lease;
  expired_ = false;
  termed_ = false;
}

LeaseTimeline::Step LeaseTimeline::Advance(Clock::time_point now) {
  Step step;
  if (!armed()) return step;  // nothing to wait for until the next Feed
  milliseconds grace = std::min(grace_, lease_ / 2);
  auto expiry = fed_ + lease_;
  auto term_at = expiry - grace;
  if (!termed_ && now < term_at) {
    step.wake = term_at;
    return step;
  }
  if (!termed_) {
    termed_ = true;
    step.action = Action::kTerm;
    step.silent = std::chrono::duration_cast<milliseconds>(now - fed_);
    return step;
  }
  if (now < expiry) {
    step.wake = expiry;
    return step;
  }
  // Still unanswered at the lease's end: whatever is left is killed.
  expired_ = true;
  step.action = Action::kKill;
  return step;
}

LeaseWatchdog::LeaseWatchdog(milliseconds grace, std::function<void(milliseconds)> on_expired)
    : on_expired_(std::move(on_expired)), timeline_(grace) {
  thread_ = std::thread([this] { Run(); });
}

LeaseWatchdog::~LeaseWatchdog() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void LeaseWatchdog::Feed(Clock::time_point sent, milliseconds lease) {
  {
    std::lock_guard<std::mutex> l(mu_);
    timeline_.Feed(sent, lease);
  }
  cv_.notify_all();
}

void LeaseWatchdog::AddGroup(pid_t pgid, const std::string& label) {
  if (pgid <= 1) return;
  std::lock_guard<std::mutex> l(mu_);
  groups_[pgid] = {ProcessStartTime(pgid), label};
  if (timeline_.expired()) {
    // The lease is out: nothing may start running here until the coordinator answers again.
    ::kill(-pgid, SIGKILL);
  }
}

void LeaseWatchdog::RemoveGroup(pid_t pgid) {
  std::lock_guard<std::mutex> l(mu_);
  groups_.erase(pgid);
}

bool LeaseWatchdog::expired() const {
  std::lock_guard<std::mutex> l(mu_);
  return timeline_.expired();
}

size_t LeaseWatchdog::groups() const {
  std::lock_guard<std::mutex> l(mu_);
  return groups_.size();
}

void LeaseWatchdog::Signal(int sig) {
  for (const auto& [pgid, g] : groups_) {
    uint64_t now = ProcessStartTime(pgid);
    if (now != 0 && g.start_time != 0 && now != g.start_time) continue;  // number reused
    ::kill(-pgid, sig);
  }
}

void LeaseWatchdog::Run() {
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    LeaseTimeline::Step step = timeline_.Advance(Clock::now());
    switch (step.action) {
      case LeaseTimeline::Action::kTerm:
        // Told first, signalled after: the agent posts the expiry to its reactor, so it runs
        // there before any rank's exit that this SIGTERM causes, and those exits are reported
        // as the agent's doing (stopped_by_agent), not blamed on the ranks.
        l.unlock();
        if (on_expired_) on_expired_(step.silent);
        l.lock();
        Signal(SIGTERM);
        break;
      case LeaseTimeline::Action::kKill:
        Signal(SIGKILL);
        break;
      case LeaseTimeline::Action::kWait:
        // Woken early by a Feed or the destructor: Advance re-reads the lease.
        if (step.wake) {
          cv_.wait_until(l, *step.wake);
        } else {
          cv_.wait(l, [&] { return stop_ || timeline_.armed(); });
        }
        break;
    }
  }
}

}  // namespace muster::node_agent
