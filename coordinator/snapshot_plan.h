#pragma once

// The coordinator's side of in-memory peer snapshots (node_agent/snapshots/):
//
// SnapshotBook: what each node's agent last said it holds (heartbeats carry every frame held;
// the report that an attempt's ranks all exited carries the job's frames as they are once its
// ranks are gone). A lost node's or a re-registered agent's holdings are forgotten.
//
// PlanSnapshots: fills in an attempt's StartAssignments. Each node copies its frames to the next
// node rank's agent (ring order). And where the job resumes: ChooseResume (snapshot_resume.h)
// over the frames that the attempt's own nodes hold (a rank may then fetch its frame from another
// node of the attempt, which admits the attempt's key) and the volume's step; for a snapshot
// resume each node gets the step, the attempt and the holders of its ranks' frames (its own node
// first). resume_step stays the volume's step.
//
// Thread-safety: SnapshotBook is not thread-safe (the coordinator's reactor only);
// PlanSnapshots is a pure function of its arguments.

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/proto/coordinator.pb.h"
#include "coordinator/snapshot_pin.h"
#include "coordinator/snapshot_resume.h"

namespace muster::coordinator {

class SnapshotBook {
 public:
  using Held = google::protobuf::RepeatedPtrField<proto::SnapshotHeld>;
  // Everything `node` holds (a heartbeat).
  void ReplaceNode(const std::string& node, const Held& held);
  // What `node` holds of `job` (an all-exited report).
  void ReplaceJob(const std::string& node, const std::string& job, const Held& held);
  void ForgetNode(const std::string& node);
  // Every frame of `job` that some node holds.
  std::vector<SnapshotHolding> Of(const std::string& job) const;
  // The nodes that hold frames of `job` and are not in `keep`; they are forgotten as holders
  // of it (the caller asks them to drop the frames: DropSnapshots).
  std::vector<std::string> TakeHoldersExcept(const std::string& job,
                                             const std::vector<std::string>& keep);
  // The jobs `node` reported frames of.
  std::vector<std::string> JobsOf(const std::string& node) const;
  // The nodes that reported what they hold (with nothing, too) since they were last forgotten.
  std::set<std::string> Reported() const;

 private:
  // node -> job -> frames
  std::map<std::string, std::map<std::string, std::vector<SnapshotHolding>>> held_;
};

// SnapshotPinner: the coordinator's side of the pins (snapshot_pin.h): DecidePins per job, with
// the state it keeps between decisions. Not thread-safe (the coordinator's reactor only).
class SnapshotPinner {
 public:
  // The SnapshotPins action for the agents holding frames of `job` (nullopt: send nothing, they
  // keep their pins). `attempt_nodes`: the job's current attempt's nodes (REQUIRES: not empty).
  std::optional<proto::AgentAction> Decide(const std::string& job, int32_t world_size,
                                           const std::vector<SnapshotHolding>& held,
                                           const std::set<std::string>& reported,
                                           const std::vector<std::string>& attempt_nodes);
  void Forget(const std::string& job) { state_.erase(job); }

 private:
  std::map<std::string, PinState> state_;
};

// A node of the attempt, in node-rank order: where its agent takes snapshot frames (empty: it
// has no snapshot memory).
struct SnapshotNode {
  std::string name;
  std::string endpoint;
  std::string key;
};

// REQUIRES: starts.size() == nodes.size(), each holding a start; ranks_per_node >= 1.
// `volume_step`: the newest step on the volume (nullopt: none). `no_resume_because`: when not
// empty, the attempt does not resume from snapshots at all (the previous snapshot resume
// failed: FailedSnapshotResume); the choice is the volume's (or a fresh start) with this reason.
// The ring of copies is set up either way.
ResumeChoice PlanSnapshots(const std::vector<SnapshotNode>& nodes, int ranks_per_node,
                           const std::vector<SnapshotHolding>& held,
                           std::optional<int64_t> volume_step,
                           std::vector<proto::AgentAction>& starts,
                           const std::string& no_resume_because = "");

// An attempt that resumed from in-memory snapshots (`resumed`, its PlanSnapshots choice) ended
// in a failure that counts as a restart. It is a failed snapshot resume when the gang reported
// no step past the resumed one (`progress_step`: the newest step reported, nullopt: none): the
// fetch of a frame failed, or a rank could not restore it. Then the next attempt must resume
// from the volume rather than try the same frames again (each try would cost a restart): the
// reason, for the job's events and PlanSnapshots, is returned. nullopt otherwise (not a
// snapshot resume, or the gang trained past it, so the restore worked).
std::optional<std::string> FailedSnapshotResume(int attempt, const ResumeChoice& resumed,
                                                std::optional<int64_t> progress_step,
                                                const std::string& failure);

// "attempt A resumes from step S (in-memory snapshot of attempt P on nodes x,y; the volume has
// step V)" for a snapshot choice.
std::string SnapshotResumeEvent(int attempt, const ResumeChoice& c,
                                std::optional<int64_t> volume_step);

}  // namespace muster::coordinator
