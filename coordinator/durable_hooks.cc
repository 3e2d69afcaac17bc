// The coordinator's facts that must survive its own restart beyond jobs and nodes: the drain a
// preemption notice causes, and the nodes a failed launch preflight keeps off a job. Each is
// written to the state store before memory (the scheduler) follows, so a coordinator killed
// right after acting on a notice or a preflight verdict still has it when it starts again.

#include <fmt/format.h>

#include "coordinator/coordinator.h"

namespace muster::coordinator {

Status Coordinator::DrainOnNotice(const std::string& node) {
  NodeRt* n = nodes_.Find(node);
  if (n == nullptr) return NotFoundError("unknown node " + node);
  if (n->rec.state != proto::NODE_DRAINING) {
    NodeRecord next = n->rec;
    next.state = proto::NODE_DRAINING;
    MUSTER_RETURN_IF_ERROR(Write("node " + node, [&] { return store_->PutNode(next); }));
    n->rec = next;
    Event("", node, "node_drained",
          "preemption notice: no new work until `muster node undrain " + node + "`");
  }
  // A node that is not connected stays down; it comes back draining when it registers.
  if (!n->session.empty()) sched_->SetNodeState(node, NodeState::kDraining).IgnoreError();
  pass_needed_ = true;
  return Status::Ok();
}

Status Coordinator::ExcludeFromJob(JobRequest& job, const std::string& node,
                                   const std::string& why) {
  MUSTER_RETURN_IF_ERROR(Write(fmt::format("exclusion of node {} from job {}", node, job.id),
                               [&] { return store_->ExcludeNode(job.id, node, why, NowMs()); }));
  job.excluded_nodes.insert(node);
  sched_->Exclude(job.id, node).IgnoreError();
  return Status::Ok();
}

}  // namespace muster::coordinator
