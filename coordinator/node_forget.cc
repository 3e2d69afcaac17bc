// `muster node forget NODE`: an admin drops a node's record from the coordinator (a machine
// taken out of the pool for good, so that `muster nodes` no longer lists it and no job waits
// for it). Only what nothing needs any more is forgotten: the request is refused, with every
// reason, while the node is connected (its agent would only register it again), belongs to an
// on-demand provider (which releases it, and so forgets it, itself), is in an attempt of a job
// that has not ended, is held as a spare, holds in-memory snapshots of a job that has not
// ended, or is the source or target of a checkpoint copy not done (its volume has a step the
// other provider does not). The right (an admin key) is checked in Handle.
//
// Forgetting deletes the record (database first), the scheduler's node and the registry's;
// the node-key binding stays, so only the same key can register the name again. A
// `node_forgotten` event names the key that asked.

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator {

StatusOr<proto::Envelope> Coordinator::OnForgetNode(const Caller& caller,
                                                    const proto::ForgetNodeRequest& req) {
  const std::string& name = req.node();
  if (name.empty()) return InvalidArgumentError("node forget needs a node name");
  const NodeRt* n = nodes_.Find(name);
  if (n == nullptr) return NotFoundError("unknown node " + name);
  std::vector<std::string> why;
  if (n->connected()) {
    why.push_back("it is connected (its agent would register it again: stop the agent first)");
  }
  if (providers_ && providers_->config().Find(n->rec.labels.provider()) != nullptr) {
    // Its provider forgets it when it releases it; forgotten here first, it would never be
    // released (the provider decides from the nodes the coordinator has).
    why.push_back(fmt::format(
        "it belongs to on-demand provider {}, which releases it (and its machine) when it is "
        "idle or down",
        n->rec.labels.provider()));
  }
  for (auto& reason : JobsNeedingNode(name)) why.push_back(std::move(reason));
  if (auto v = sched_->GetNode(name, options_.clock()); v.ok() && !v->job.empty()) {
    if (v->spare) {
      why.push_back(fmt::format("it is held as a spare of job {}", v->job));
    } else if (std::none_of(why.begin(), why.end(), [&](const std::string& w) {
                 return w.ends_with("of job " + v->job);
               })) {
      why.push_back(fmt::format("it is allocated to job {}", v->job));
    }
  }
  for (const auto& [key, c] : copies_) {
    if (c.done) continue;
    if (c.source == name) {
      why.push_back(fmt::format(
          "it is the source of job {}'s checkpoint copy of step {} to provider {}, not done yet",
          c.job_id, c.step, c.provider));
    } else if (c.target == name) {
      why.push_back(
          fmt::format("it is the target of job {}'s checkpoint copy of step {}, not done yet",
                      c.job_id, c.step));
    }
  }
  if (!why.empty()) {
    return FailedPreconditionError(
        fmt::format("node {} is not forgotten: {}", name, fmt::join(why, "; ")));
  }
  MUSTER_RETURN_IF_ERROR(ForgetNode(name, "was forgotten"));
  Event("", name, "node_forgotten",
        fmt::format("node record forgotten by key '{}' (role {}); its key binding stays",
                    caller.name, KeyRoleName(caller.role)));
  pass_needed_ = true;
  proto::Envelope e;
  e.mutable_forget_node_reply()->set_node(name);
  return e;
}

}  // namespace muster::coordinator
