#pragma once

// DecidePins: which step of a job's in-memory snapshots every agent must keep, so that a gang of
// any number of nodes survives the loss of any one node with a complete set of frames.
//
// Why: each node's agent holds its own ranks' frames and copies of the previous node rank's
// (snapshot_plan.h, the ring). Each agent's store keeps, on its own, the newest step at which it
// holds all of those (snapshot_store.h, the complete step). With two nodes that is enough; with
// more, the agents keep different steps, and after a node is lost the survivors may share none:
// the gang falls back to the volume although a complete set existed at some step. So the
// coordinator, which sees every agent's frames (heartbeats), picks one step for all and pins it.
//
// The protocol (two phases, so that no agent releases the kept step before every agent holds the
// next one under a pin):
//   - A frame is reported `pinned` by its agent when a pin (kept or candidate, below) covers it:
//     from then on, until the coordinator sends that agent other pins for the job, the agent
//     never drops it (snapshot_store.h, SetPins).
//   - kept: the previous decision's, until its candidate has a pinned frame of every rank
//     0..world_size-1 on at least two nodes (it survives the loss of any one node): then the
//     candidate. Only the candidate can become kept: while it is the candidate every decision
//     still pins it, so the agents' reports that they pin it are current (a candidate given up
//     may still be reported pinned by an agent that has not heard yet; it is never kept).
//     With no previous kept set still complete on the pinned frames (the first decisions, a
//     restarted coordinator, or its frames are gone), kept is learned from the reports: the
//     newest (step, attempt) at which every rank has a pinned frame on two nodes, else on one,
//     other than the candidate (a complete set still held is never released until a newer one
//     is kept).
//   - candidate: a newer (step, attempt) at which every rank has frames on at least two nodes,
//     pinned or not, chosen newest first. It is sent along with kept; it stays the candidate
//     while some node holding a frame of it has not reported that frame pinned yet (the pin is on
//     its way), for at most kMaxPendingDecisions decisions. Once every holder reports it pinned
//     it becomes kept (when it still survives the loss of any one node) or is given up (an agent
//     had dropped a frame before the pin reached it), and a newer candidate is chosen.
//   - Nothing is decided (send == false: every agent keeps the pins it has) until every node of
//     the job's current attempt has reported what it holds since this coordinator started: a
//     restarted coordinator first learns the pins from the reports, never releases them blind.
//   - Frames of different attempts are never mixed in one set, as in ChooseResume
//     (snapshot_resume.h), which orders sets the same way: newer step, then higher attempt.
//
// The guarantee: once a step S is kept, every agent holding a frame of S keeps it until the
// coordinator keeps a newer step, and every rank's frame of S is on two nodes: whichever one
// node is lost, ChooseResume finds a complete set at S or newer on the survivors.
//
// Thread-safety: pure function.

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "coordinator/snapshot_resume.h"

namespace muster::coordinator {

// A step of one attempt's frames. step < 0: none.
struct SnapshotRef {
  int32_t attempt = 0;
  int64_t step = -1;
  bool valid() const { return step >= 0; }
  friend bool operator==(const SnapshotRef& a, const SnapshotRef& b) {
    return a.step == b.step && (a.step < 0 || a.attempt == b.attempt);
  }
  // Newer: the higher step, then the higher attempt (none is older than any).
  friend bool operator<(const SnapshotRef& a, const SnapshotRef& b) {
    if (a.step != b.step) return a.step < b.step;
    return a.step >= 0 && a.attempt < b.attempt;
  }
};

inline constexpr int kMaxPendingDecisions = 64;

// What the coordinator remembers per job between decisions.
struct PinState {
  SnapshotRef kept;
  SnapshotRef candidate;
  int pending = 0;  // decisions the candidate has waited for its pins
};

struct PinDecision {
  bool send = false;  // false: send nothing; the agents keep the pins they have
  SnapshotRef kept;
  SnapshotRef candidate;
  PinState next;  // the state for the next decision
};

// `held`: every frame of the job the agents report (SnapshotHolding.pinned as reported).
// `reported`: the nodes that have reported their frames since this coordinator started (with
// none of the job's, too). `attempt_nodes`: the nodes of the job's current attempt.
// REQUIRES: world_size >= 1.
PinDecision DecidePins(int32_t world_size, const std::vector<SnapshotHolding>& held,
                       const std::set<std::string>& reported,
                       const std::vector<std::string>& attempt_nodes, const PinState& previous);

}  // namespace muster::coordinator
