// A gang of 3 and of 4 nodes, each with a real SnapshotStore (node_agent/snapshots/), its own
// rank's frame every step and the previous node rank's copies arriving late and thinned, at a
// different pace on each link (as peer_copy.h's forwarders do when the network is slower than the
// steps). Every step the "coordinator" decides the pins from what the stores report
// (coordinator/snapshot_pin.h) and sends them to every store (SetPins). Then each node in turn is
// lost, and ChooseResume (coordinator/snapshot_resume.h) is asked where the survivors resume.
//
// Without the pins (each store on its own rule: its newest complete step) the survivors share no
// step and the gang falls back to the volume; with them it resumes from the kept step, whichever
// node is lost.

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/snapshot_frame.h"
#include "coordinator/snapshot_pin.h"
#include "coordinator/snapshot_resume.h"
#include "node_agent/snapshots/snapshot_store.h"

namespace muster {
namespace {

using checkpoint::SnapshotFrame;
using coordinator::ChooseResume;
using coordinator::DecidePins;
using coordinator::PinState;
using coordinator::ResumeChoice;
using coordinator::SnapshotHolding;
using node_agent::SnapshotStore;

constexpr char kJob[] = "gang-1";
constexpr int64_t kVolumeStep = 20;

SnapshotFrame Frame(int rank, int world, int64_t step) {
  std::string payload(64, static_cast<char>('a' + rank));
  auto enc = checkpoint::EncodeSnapshotFrame(
      {.job = kJob, .attempt = 1, .rank = rank, .world_size = world, .step = step}, payload);
  EXPECT_TRUE(enc.ok()) << enc.status().ToString();
  auto f = checkpoint::DecodeSnapshotFrame(*enc, 1 << 20);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  return *f;
}

// Node i's copy link to node i+1: it sends the frame of every `every`-th step (offset by
// `phase`), which arrives `lag` steps later.
struct Link {
  int every, phase, lag;
};

struct Outcome {
  // lost node -> where the survivors resume
  std::map<int, ResumeChoice> after_loss;
};

// Runs `steps` steps of a ring of links.size() nodes (one rank each) and loses each node in turn.
// With `pins`, the coordinator's pins reach every store each step. `keep_steps`: the stores'
// reserved steps per rank (2 before the pins, 3 with them).
Outcome RunGang(const std::vector<Link>& links, int steps, bool pins, int keep_steps) {
  const int n = static_cast<int>(links.size());
  // Room for 4 frames of each of 2 ranks (own and copy) per store, whatever is reserved.
  std::vector<std::unique_ptr<SnapshotStore>> stores;
  for (int i = 0; i < n; ++i) {
    stores.push_back(std::make_unique<SnapshotStore>(node_agent::SnapshotStoreOptions{
        .memory_limit = 2 * 4 * 64, .keep_steps = keep_steps, .window_steps = 4}));
  }
  auto name = [](int i) { return std::string(1, static_cast<char>('a' + i)); };
  std::multimap<int, std::pair<int, SnapshotFrame>> in_flight;  // arrival step -> (node, frame)
  PinState state;
  std::set<std::string> all;
  std::vector<std::string> nodes;
  for (int i = 0; i < n; ++i) {
    all.insert(name(i));
    nodes.push_back(name(i));
  }
  auto report = [&](const std::set<int>& alive) {
    std::vector<SnapshotHolding> held;
    for (int i : alive) {
      for (const auto& h : stores[i]->Held(kJob)) {
        held.push_back({name(i), h.rank, h.world_size, h.attempt, h.step, h.pinned});
      }
    }
    return held;
  };
  std::set<int> everyone;
  for (int i = 0; i < n; ++i) everyone.insert(i);
  for (int step = 1; step <= steps; ++step) {
    for (int i = 0; i < n; ++i) {
      EXPECT_TRUE(stores[i]->Put(Frame(i, n, step)).ok());
      if (step % links[i].every == links[i].phase) {
        in_flight.insert({step + links[i].lag, {(i + 1) % n, Frame(i, n, step)}});
      }
    }
    for (auto it = in_flight.begin(); it != in_flight.end() && it->first <= step;) {
      EXPECT_TRUE(stores[it->second.first]->Put(it->second.second).ok());
      it = in_flight.erase(it);
    }
    for (const auto& s : stores) {
      EXPECT_LE(s->used_bytes(), s->memory_limit()) << "step " << step;
    }
    if (pins) {
      auto d = DecidePins(n, report(everyone), all, nodes, state);
      state = d.next;
      if (d.send) {
        for (auto& s : stores) {
          s->SetPins(kJob, {d.kept.attempt, d.kept.step}, {d.candidate.attempt, d.candidate.step});
        }
      }
    }
  }
  Outcome out;
  for (int lost = 0; lost < n; ++lost) {
    std::set<int> alive = everyone;
    alive.erase(lost);
    out.after_loss[lost] = ChooseResume(n, report(alive), {name(lost)}, kVolumeStep);
  }
  return out;
}

struct GangCase {
  std::string name;
  std::vector<Link> links;
};

class SnapshotGangTest : public ::testing::TestWithParam<GangCase> {};

TEST_P(SnapshotGangTest, WithoutPinsTheSurvivorsShareNoStep) {
  // The old rule, as the store had it before the pins (2 reserved steps) and with 3: each store
  // keeps its own complete step, and some node's loss leaves the survivors without a common one
  // (the defect the pins fix).
  for (int keep : {2, 3}) {
    Outcome o = RunGang(GetParam().links, 60, /*pins=*/false, keep);
    int fell_back = 0;
    for (const auto& [lost, c] : o.after_loss) {
      fell_back += c.source == ResumeChoice::Source::kVolume;
    }
    EXPECT_GT(fell_back, 0) << "keep_steps " << keep
                            << ": every single loss left a complete set without pins";
  }
}

TEST_P(SnapshotGangTest, WithPinsTheLossOfAnyOneNodeResumesFromSnapshots) {
  const int steps = 60;
  Outcome o = RunGang(GetParam().links, steps, /*pins=*/true, /*keep_steps=*/3);
  for (const auto& [lost, c] : o.after_loss) {
    EXPECT_EQ(c.source, ResumeChoice::Source::kSnapshot) << "node " << lost << ": " << c.reason;
    // Newer than the volume, and within a few copy intervals of the last step.
    EXPECT_GT(c.step, kVolumeStep) << "node " << lost;
    EXPECT_GE(c.step, steps - 24) << "node " << lost << ": " << c.reason;
  }
}

INSTANTIATE_TEST_SUITE_P(Rings, SnapshotGangTest,
                         ::testing::Values(GangCase{"three", {{2, 0, 1}, {3, 0, 2}, {4, 0, 1}}},
                                           GangCase{"four",
                                                    {{2, 0, 1}, {3, 0, 1}, {4, 0, 2}, {2, 0, 1}}}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace muster
