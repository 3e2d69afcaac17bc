// DecidePins (coordinator/snapshot_pin.h): the step every agent keeps so that the loss of any one
// node of a gang of 3 or more leaves a complete set, chosen in two phases from what the agents
// report. Table-driven; the gangs are rings (node rank i holds its own ranks and copies of node
// rank i-1's), one rank per node unless a case says otherwise.

#include "coordinator/snapshot_pin.h"

#include <gtest/gtest.h>

namespace muster::coordinator {
namespace {

SnapshotHolding H(const std::string& node, int rank, int attempt, int64_t step, bool pinned = false,
                  int world = 3) {
  return {node, rank, world, attempt, step, pinned};
}
// `rank`'s frame of (attempt, step) on both of its ring holders.
void Both(std::vector<SnapshotHolding>& v, const std::vector<std::string>& ring, int rank,
          int attempt, int64_t step, bool pinned, int world) {
  const int n = static_cast<int>(ring.size());
  v.push_back(H(ring[rank % n], rank, attempt, step, pinned, world));
  v.push_back(H(ring[(rank + 1) % n], rank, attempt, step, pinned, world));
}
// Every rank of the world at (attempt, step) on both holders (ranks_per_node 1).
std::vector<SnapshotHolding> Ring(const std::vector<std::string>& ring, int attempt, int64_t step,
                                  bool pinned) {
  std::vector<SnapshotHolding> v;
  const int world = static_cast<int>(ring.size());
  for (int r = 0; r < world; ++r) Both(v, ring, r, attempt, step, pinned, world);
  return v;
}
std::vector<SnapshotHolding> Cat(std::vector<std::vector<SnapshotHolding>> parts) {
  std::vector<SnapshotHolding> out;
  for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
SnapshotRef R(int attempt, int64_t step) { return {attempt, step}; }
constexpr SnapshotRef kNone{};

const std::vector<std::string> kAbc = {"a", "b", "c"};
const std::vector<std::string> kAbcd = {"a", "b", "c", "d"};

struct Case {
  std::string name;
  int world;
  std::vector<SnapshotHolding> held;
  std::set<std::string> reported;
  std::vector<std::string> attempt_nodes;
  PinState previous;
  bool send;
  SnapshotRef kept, candidate;
};

std::string Show(const SnapshotRef& r) {
  return r.valid()
             ? "(attempt " + std::to_string(r.attempt) + ", step " + std::to_string(r.step) + ")"
             : "none";
}

TEST(DecidePinsTest, Table) {
  // The 3-node state in which each agent's own rule keeps a different step: the copies reached
  // step 11 on a, 10 on b and 12 on c, and each keeps its own ranks' 10..12. No step has every
  // rank on two nodes, so none survives the loss of any one node: a pin must be set earlier.
  std::vector<SnapshotHolding> drifted = {H("a", 0, 1, 10), H("a", 0, 1, 11), H("a", 0, 1, 12),
                                          H("a", 2, 1, 11), H("b", 1, 1, 10), H("b", 1, 1, 11),
                                          H("b", 1, 1, 12), H("b", 0, 1, 10), H("c", 2, 1, 10),
                                          H("c", 2, 1, 11), H("c", 2, 1, 12), H("c", 1, 1, 12)};
  // The same with step 8 kept under a pin everywhere (the coordinator pinned it earlier).
  std::vector<SnapshotHolding> drifted_with_pin = Cat({drifted, Ring(kAbc, 1, 8, true)});
  // Step 10 pinned on a and b (their pins arrived), c's pin still on its way.
  std::vector<SnapshotHolding> half =
      Cat({Ring(kAbc, 1, 8, true),
           {H("a", 0, 1, 10, true), H("a", 2, 1, 10, true), H("b", 1, 1, 10, true),
            H("b", 0, 1, 10, true), H("c", 2, 1, 10), H("c", 1, 1, 10)}});
  // c dropped its own rank's step 10 before the pin reached it.
  std::vector<SnapshotHolding> c_dropped =
      Cat({Ring(kAbc, 1, 8, true),
           {H("a", 0, 1, 10, true), H("a", 2, 1, 10, true), H("b", 1, 1, 10, true),
            H("b", 0, 1, 10, true), H("c", 1, 1, 10, true)},
           Ring(kAbc, 1, 12, false)});
  // After node b was lost (its frames forgotten): step 8 pinned on a and c only.
  std::vector<SnapshotHolding> b_lost;
  for (const auto& h : Ring(kAbc, 1, 8, true)) {
    if (h.node != "b") b_lost.push_back(h);
  }
  // 4 nodes, 2 ranks per node (world 8): node i holds ranks 2i, 2i+1 and copies of 2i-2, 2i-1.
  auto four = [](int attempt, int64_t step, bool pinned) {
    std::vector<SnapshotHolding> v;
    for (int node = 0; node < 4; ++node) {
      for (int local = 0; local < 2; ++local) {
        const int rank = node * 2 + local;
        v.push_back(H(kAbcd[node], rank, attempt, step, pinned, 8));
        v.push_back(H(kAbcd[(node + 1) % 4], rank, attempt, step, pinned, 8));
      }
    }
    return v;
  };
  std::vector<SnapshotHolding> four_no_copy_on_d = four(1, 30, false);
  std::erase_if(four_no_copy_on_d,
                [](const SnapshotHolding& h) { return h.node == "d" && h.rank < 6; });

  const std::set<std::string> abc(kAbc.begin(), kAbc.end()), abcd(kAbcd.begin(), kAbcd.end());
  const std::vector<Case> cases = {
      {"nothing held yet", 3, {}, abc, kAbc, {}, true, kNone, kNone},
      {"a node of the attempt has not reported since the coordinator started: nothing sent",
       3,
       Ring(kAbc, 1, 10, true),
       {"a", "b"},
       kAbc,
       {},
       false,
       kNone,
       kNone},
      {"every rank on two nodes, unpinned: a candidate",
       3,
       Ring(kAbc, 1, 10, false),
       abc,
       kAbc,
       {},
       true,
       kNone,
       R(1, 10)},
      {"drifted apart, nothing pinned: no step survives the loss of any node",
       3,
       drifted,
       abc,
       kAbc,
       {},
       true,
       kNone,
       kNone},
      {"drifted apart, step 8 pinned earlier: 8 stays kept",
       3,
       drifted_with_pin,
       abc,
       kAbc,
       {},
       true,
       R(1, 8),
       kNone},
      {"the candidate's pin has not reached c yet: it stays the candidate",
       3,
       half,
       abc,
       kAbc,
       {R(1, 8), R(1, 10), 1},
       true,
       R(1, 8),
       R(1, 10)},
      {"every holder pins the candidate: it is kept",
       3,
       Cat({Ring(kAbc, 1, 8, true), Ring(kAbc, 1, 10, true), Ring(kAbc, 1, 11, false)}),
       abc,
       kAbc,
       {R(1, 8), R(1, 10), 3},
       true,
       R(1, 10),
       R(1, 11)},
      {"c dropped a frame before the pin came: given up, the next candidate is newer",
       3,
       c_dropped,
       abc,
       kAbc,
       {R(1, 8), R(1, 10), 2},
       true,
       R(1, 8),
       R(1, 12)},
      {"a candidate whose pins never come is given up after kMaxPendingDecisions",
       3,
       half,
       abc,
       kAbc,
       {R(1, 8), R(1, 10), kMaxPendingDecisions},
       true,
       R(1, 8),
       kNone},
      {"a lost node: the pinned set is complete on the survivors, never released",
       3,
       b_lost,
       {"a", "c"},
       {"a", "c"},
       {},
       true,
       R(1, 8),
       kNone},
      {"a new attempt's node that holds nothing yet: no candidate, the old set stays kept",
       3,
       Cat({b_lost, {H("a", 0, 2, 9), H("c", 2, 2, 9), H("a", 2, 2, 9)}}),
       {"a", "c", "d"},
       {"a", "c", "d"},
       {},
       true,
       R(1, 8),
       kNone},
      {"stale attempts: attempt 1's and attempt 2's frames of step 20 are never one set",
       3,
       {H("a", 0, 1, 20), H("b", 0, 2, 20), H("b", 1, 1, 20), H("c", 1, 2, 20), H("c", 2, 1, 20),
        H("a", 2, 2, 20)},
       abc,
       kAbc,
       {},
       true,
       kNone,
       kNone},
      {"stale attempts: the newer attempt's set wins a tie on the step",
       3,
       Cat({Ring(kAbc, 1, 20, false), Ring(kAbc, 2, 20, false)}),
       abc,
       kAbc,
       {},
       true,
       kNone,
       R(2, 20)},
      {"frames of another world size are not counted",
       3,
       Ring(kAbcd, 1, 10, false),
       abc,
       kAbc,
       {},
       true,
       kNone,
       kNone},
      {"4 nodes x 2 ranks: kept 20, candidate 30",
       8,
       Cat({four(1, 20, true), four(1, 30, false)}),
       abcd,
       kAbcd,
       {},
       true,
       R(1, 20),
       R(1, 30)},
      {"4 nodes: d holds no copy yet at 30, so 30 is no candidate",
       8,
       Cat({four(1, 20, true), four_no_copy_on_d}),
       abcd,
       kAbcd,
       {},
       true,
       R(1, 20),
       kNone},
      {"4 nodes: a candidate no agent holds any more is given up; kept stays until the next one",
       8,
       Cat({four(1, 20, true), four(1, 30, false)}),
       abcd,
       kAbcd,
       {R(1, 20), R(1, 25), 1},
       true,
       R(1, 20),
       R(1, 30)},
      {"only the candidate becomes kept: a given-up one still reported pinned never does",
       3,
       Cat({Ring(kAbc, 1, 8, true), Ring(kAbc, 1, 10, true), Ring(kAbc, 1, 12, false)}),
       abc,
       kAbc,
       {R(1, 8), R(1, 12), 1},
       true,
       R(1, 8),
       R(1, 12)},
      {"a restarted coordinator learns the kept step from the pinned reports",
       3,
       Cat({Ring(kAbc, 1, 8, true), Ring(kAbc, 1, 12, false)}),
       abc,
       kAbc,
       {},
       true,
       R(1, 8),
       R(1, 12)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    PinDecision d = DecidePins(c.world, c.held, c.reported, c.attempt_nodes, c.previous);
    EXPECT_EQ(d.send, c.send);
    if (!c.send) {
      EXPECT_EQ(d.next.candidate, c.previous.candidate) << "state kept while nothing is sent";
      continue;
    }
    EXPECT_EQ(d.kept, c.kept) << "kept " << Show(d.kept) << ", want " << Show(c.kept);
    EXPECT_EQ(d.candidate, c.candidate)
        << "candidate " << Show(d.candidate) << ", want " << Show(c.candidate);
    EXPECT_EQ(d.next.candidate, c.candidate);
  }
}

// The pending count grows while the candidate waits and starts again with a new candidate.
TEST(DecidePinsTest, PendingCountsDecisionsOfOneCandidate) {
  std::vector<SnapshotHolding> held = Ring(kAbc, 1, 10, false);
  const std::set<std::string> abc(kAbc.begin(), kAbc.end());
  PinDecision d = DecidePins(3, held, abc, kAbc, {});
  ASSERT_EQ(d.candidate, R(1, 10));
  EXPECT_EQ(d.next.pending, 0);
  d = DecidePins(3, held, abc, kAbc, d.next);
  EXPECT_EQ(d.candidate, R(1, 10));
  EXPECT_EQ(d.next.pending, 1);
  d = DecidePins(3, Ring(kAbc, 1, 10, true), abc, kAbc, d.next);
  EXPECT_EQ(d.kept, R(1, 10));
  EXPECT_FALSE(d.candidate.valid());
  EXPECT_EQ(d.next.pending, 0);
}

}  // namespace
}  // namespace muster::coordinator
