#pragma once

// LeaseWatchdog: enforces the agent's lease on a thread of its own, whatever the agent's
// reactor is doing. The coordinator hands out a lease at registration: once it has not heard
// from the agent for that long it may run the agent's attempts elsewhere, so by then this
// node's ranks must be dead (no split brain). The reactor cannot be trusted with that: a stall
// there (a blocking read, a bug) would let the ranks run on.
//
// Fed by every registration or heartbeat that the coordinator answered, with the time the
// request was *sent* (the coordinator saw it no earlier, so the agent's lease never ends after
// the coordinator's). When the lease runs out, the watchdog stops every process group it was
// given: SIGTERM at `expiry - grace`, SIGKILL of what is left at `expiry` (grace is capped at
// half the lease), so nothing of this node's ranks outlives the lease. After that it stays
// expired (a group added then is killed at once) until the next Feed.
//
// Groups are (process group id, leader's start time) pairs, as a restarted agent kills its
// predecessor's leftovers: a group whose leader exists with another start time is an
// unrelated process that reused the number and is left alone; while any member of a group
// lives the kernel does not hand its number out again.
//
// When to signal is decided by a LeaseTimeline (below), a pure state machine on time points
// the caller gives, so the lease's arithmetic is tested on a fake clock without sleeps; the
// watchdog drives it with the monotonic clock. Thread-safe; the destructor stops the thread.

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

namespace muster::node_agent {

// LeaseTimeline: the lease's decisions, with no clock, thread or signal of its own. Feed moves
// the lease on; Advance(now) says what is due at `now`: nothing yet (and when to look again),
// SIGTERM (once per expiry, at `fed + lease - grace`, grace capped at half the lease) or SIGKILL
// (at `fed + lease`, after which it stays expired until the next Feed). Not thread-safe (the
// watchdog holds its mutex around it).
class LeaseTimeline {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Action { kWait, kTerm, kKill };
  struct Step {
    Action action = Action::kWait;
    // kWait: when to call Advance again; nullopt: not before the next Feed (no lease, or
    // expired).
    std::optional<Clock::time_point> wake;
    std::chrono::milliseconds silent{0};  // kTerm: how long the coordinator has been silent
  };

  explicit LeaseTimeline(std::chrono::milliseconds grace) : grace_(grace) {}

  // The coordinator answered a request sent at `sent`, with this lease (0: no lease yet). A
  // `sent` older than one already fed does not move the lease back.
  void Feed(Clock::time_point sent, std::chrono::milliseconds lease);
  Step Advance(Clock::time_point now);

  // A lease is running (handed out and not expired): Advance has something to wait for.
  bool armed() const { return lease_.count() > 0 && !expired_; }
  bool expired() const { return expired_; }

 private:
  const std::chrono::milliseconds grace_;
  Clock::time_point fed_{};
  std::chrono::milliseconds lease_{0};  // 0: none
  bool expired_ = false;
  bool termed_ = false;  // SIGTERM due-and-given for this expiry
};

class LeaseWatchdog {
 public:
  using Clock = std::chrono::steady_clock;

  // `on_expired` runs on the watchdog's thread just before the SIGTERMs (for logs and to let
  // the reactor know, ahead of the exits they cause); it must not block: the SIGTERMs wait.
  LeaseWatchdog(std::chrono::milliseconds grace,
                std::function<void(std::chrono::milliseconds silent)> on_expired);
  ~LeaseWatchdog();
  LeaseWatchdog(const LeaseWatchdog&) = delete;
  LeaseWatchdog& operator=(const LeaseWatchdog&) = delete;

  // The coordinator answered a request sent at `sent`, with this lease (0: no lease yet).
  void Feed(Clock::time_point sent, std::chrono::milliseconds lease);

  // A rank's process group (its leader's pid) to stop when the lease runs out; `label` names
  // it in logs. RemoveGroup once its leader was reaped and the group is of no more concern.
  void AddGroup(pid_t pgid, const std::string& label);
  void RemoveGroup(pid_t pgid);

  bool expired() const;
  // Process groups given and not removed.
  size_t groups() const;

 private:
  struct Group {
    uint64_t start_time = 0;
    std::string label;
  };
  void Run();
  void Signal(int sig);  // REQUIRES: mu_ held

  const std::function<void(std::chrono::milliseconds)> on_expired_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;              // GUARDED_BY(mu_)
  LeaseTimeline timeline_;         // GUARDED_BY(mu_)
  std::map<pid_t, Group> groups_;  // GUARDED_BY(mu_)
  std::thread thread_;
};

// The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22); 0 when
// the process is gone. With the pid, it names a process across pid reuse.
uint64_t ProcessStartTime(pid_t pid);

}  // namespace muster::node_agent
