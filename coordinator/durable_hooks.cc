// The coordinator's facts that must survive its own restart beyond jobs and nodes: the drain a
// preemption notice causes, and the nodes a failed launch preflight keeps off a job (each
// written to the database before memory, the scheduler, follows, so a coordinator killed
// right after acting on a notice or a preflight verdict still has it when it starts again); and
// the checkpoint copies between providers it follows (saved when one starts and at each tick
// that changed them, asked again after a restart).

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "common/logging.h"
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

namespace {
constexpr const char* kCopiesStateKey = "copies";
}  // namespace

std::string Coordinator::CopiesState() const {
  nlohmann::json all = nlohmann::json::array();
  for (const auto& [key, c] : copies_) {
    all.push_back({{"job_id", c.job_id},
                   {"provider", c.provider},
                   {"volume", c.volume},
                   {"step", c.step},
                   {"source", c.source},
                   {"target", c.target},
                   {"tries", c.tries},
                   {"done", c.done}});
  }
  return all.dump();
}

void Coordinator::SaveCopies() {
  std::string state = CopiesState();
  if (state == saved_copies_) return;
  if (Write("checkpoint copies", [&] {
        return store_->PutState(kCopiesStateKey, state, NowMs());
      }).ok()) {
    saved_copies_ = std::move(state);
  }
}

void Coordinator::RestoreCopies() {
  auto saved = store_->GetState(kCopiesStateKey);
  std::string error;
  if (!saved.ok()) {
    error = saved.status().ToString();
  } else if (saved->has_value()) {
    try {
      for (const auto& j : nlohmann::json::parse(**saved)) {
        CopyRt c;
        c.job_id = j.at("job_id").get<std::string>();
        c.provider = j.at("provider").get<std::string>();
        c.volume = j.at("volume").get<std::string>();
        c.step = j.at("step").get<int64_t>();
        c.source = j.at("source").get<std::string>();
        c.target = j.at("target").get<std::string>();
        c.tries = j.at("tries").get<int>();
        c.done = j.at("done").get<bool>();
        auto job = jobs_.find(c.job_id);
        if (job == jobs_.end()) continue;  // the job ended: nothing resumes from the copy
        if (!c.done) {
          // The try in flight may have died with the coordinator: asked again (of the same
          // target when it is back; one still copying that step takes it as a duplicate) as
          // soon as the source and a target are connected. Not counted as a failed try.
          c.retry_at_ms = NowMs();
          Event(c.job_id, c.target, "replicate_retry",
                fmt::format("step {} to volume {} of provider {}: the coordinator restarted "
                            "during the copy; asked again",
                            c.step, c.volume, c.provider));
        }
        copies_[{c.job_id, c.provider}] = std::move(c);
      }
    } catch (const nlohmann::json::exception& e) {
      copies_.clear();
      error = fmt::format("does not parse: {}", e.what());
    }
  }
  if (!error.empty()) {
    log::Get("coord")->error("checkpoint copies in flight not restored: {}", error);
    Event("", "", "replicate_state_lost", "checkpoint copies in flight not restored: " + error);
  }
  saved_copies_ = CopiesState();
}

}  // namespace muster::coordinator
