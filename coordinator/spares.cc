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

#include <set>

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
            fmt::format("no spare to replace lost node {} ({}); the gang is placed again", lost,
                        spare.status().message()));
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

void Coordinator::SaveSpares() {
  std::map<std::string, std::vector<std::string>> now;
  for (const auto& [id, j] : jobs_) {
    auto held = sched_->SparesOf(id);  // sorted
    if (!held.empty()) now[id] = std::move(held);
  }
  std::set<std::string> ids;
  for (const auto& [id, s] : now) ids.insert(id);
  for (const auto& [id, s] : saved_spares_) ids.insert(id);
  static const std::vector<std::string> kNone;
  for (const auto& id : ids) {
    auto n = now.find(id);
    auto s = saved_spares_.find(id);
    const auto& want = n == now.end() ? kNone : n->second;
    if (s != saved_spares_.end() && s->second == want) continue;
    if (s == saved_spares_.end() && want.empty()) continue;
    if (!Write("spares of job " + id, [&] { return store_->PutSpares(id, want, NowMs()); }).ok())
      return;  // latched: nothing is written from now on
    if (want.empty()) {
      saved_spares_.erase(id);
    } else {
      saved_spares_[id] = want;
    }
  }
}

void Coordinator::RestoreSpares() {
  auto saved = store_->LoadSpares();
  if (!saved.ok()) {
    // The restored jobs are short of spares and get new ones in the next passes.
    log::Get("coord")->error("spares not restored: {}", saved.status().ToString());
    return;
  }
  saved_spares_ = *saved;  // what the database has; SaveSpares drops what is not held now
  for (const auto& [id, nodes] : *saved) {
    if (!jobs_.count(id) || !sched_->IsRunning(id)) continue;  // not held while pending
    for (const auto& node : nodes) {
      Status st = sched_->RestoreSpare(id, node);
      if (st.ok()) {
        Event(id, node, "spare_restored",
              fmt::format("node {} held as a spare again after the coordinator restarted", node));
      } else {
        Event(id, node, "spare_not_restored",
              fmt::format("node {} not held as a spare again ({}); a new one is requested", node,
                          st.message()));
      }
    }
  }
}

}  // namespace muster::coordinator
