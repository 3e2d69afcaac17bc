// The coordinator's side of hot spares (JobSpec::spares; the rules are in scheduler.h): the
// events that say which nodes are held, which spare replaced which lost node, and which spares
// were lost; the hooks in coordinator.cc call these and keep the job's own state.
//
// A lost node of a gang whose job holds a spare: the spare takes the lost node's node rank at
// once (Scheduler::TakeSpare), so the survivors and the spare stay allocated to the job while
// the gang stops; the next attempt starts on them as soon as the lost node's lease fence allows
// (DecideAttemptEnd's not_before), without a scheduling pass, and the job is short of a spare
// until a pass (or an on-demand provider) finds a new one.

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/logging.h"
#include "coordinator/coordinator.h"

namespace muster::coordinator {

void Coordinator::SpareEvents(const Decisions& d) {
  for (const auto& p : d.placements) {
    if (p.spares.empty() || !sched_->IsRunning(p.job)) continue;
    Event(p.job, "", "spares_held",
          fmt::format("holding {} idle as spare{} of the gang", fmt::join(p.spares, ","),
                      p.spares.size() == 1 ? "" : "s"));
  }
  for (const auto& h : d.spares_held) {
    Event(h.job, h.node, "spare_held",
          fmt::format("node {} held as a new spare ({} held now)", h.node,
                      sched_->SparesOf(h.job).size()));
  }
}

bool Coordinator::ReplaceWithSpare(const std::string& job, const std::string& lost) {
  auto spare = sched_->TakeSpare(job, lost);
  if (!spare.ok()) {
    if (spare.status().code() == StatusCode::kFailedPrecondition) {
      Event(job, lost, "no_spare",
            fmt::format("no spare held to replace lost node {}; the gang is placed again", lost));
    }
    return false;
  }
  Event(job, *spare, "spare_replaces", fmt::format("spare {} replaces lost node {}", *spare, lost));
  Event(job, "", "spare_requested",
        fmt::format("{} spare(s) held now; a new one is requested", sched_->SparesOf(job).size()));
  return true;
}

void Coordinator::DropLostSpare(const std::string& node) {
  auto v = sched_->GetNode(node, options_.clock());
  if (!v.ok() || !v->spare) return;
  if (!sched_->DropSpare(v->job, node).ok()) return;
  Event(v->job, node, "spare_lost", fmt::format("spare {} lost; a new one is requested", node));
}

}  // namespace muster::coordinator
