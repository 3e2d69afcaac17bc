// The coordinator after a failed in-memory snapshot resume (snapshot_plan.h,
// FailedSnapshotResume), on an injected clock without sockets: the attempt that resumed from
// snapshots and failed before passing the resumed step costs its one restart, and the next
// attempt resumes from the volume (not from the same frames again, which would cost a restart
// each), with an event naming why. And the pins (snapshot_pin.h) a 3-node gang's agents get
// back on their heartbeats.

#include <gtest/gtest.h>

#include <map>

#include "coordinator/coordinator.h"
#include "tests/testing/coordinator_harness.h"

namespace muster::coordinator {
namespace {

using namespace std::chrono_literals;

class SnapshotFallbackTest : public ::testing::Test, public testing::CoordinatorHarness {
 protected:
  SnapshotFallbackTest() : CoordinatorHarness("snapnet-fallback-unit") {
    now_ = std::chrono::system_clock::now();
  }
  void SetUp() override { Open(); }
  // A coordinator over the database in dir_. Called again, it is a restart (see
  // CoordinatorHarness::Open); agents register again.
  void Open() {
    CoordinatorOptions o;
    o.heartbeat_timeout = 5s;
    ASSERT_TRUE(CoordinatorHarness::Open(o));
  }

  // An agent with snapshot memory and volume "ckpt".
  void Register(const std::string& name) {
    sessions_[name] = CoordinatorHarness::Register(name, {.volume = true, .snapshots = true});
  }

  // A heartbeat from `node`, reporting the frames it holds of `job` (ranks `ranks` of a world of
  // 2, attempt `attempt`, step `step`); the start actions it gets back.
  std::vector<proto::StartAssignment> Heartbeat(const std::string& node, const std::string& job,
                                                std::vector<int> ranks, int attempt, int64_t step) {
    proto::Envelope e;
    auto* h = e.mutable_agent_heartbeat();
    h->set_node(node);
    h->set_session_id(sessions_[node]);
    h->set_snapshots_reported(true);
    for (int rank : ranks) {
      auto* s = h->add_snapshots_held();
      s->set_job_id(job);
      s->set_rank(rank);
      s->set_world_size(2);
      s->set_attempt(attempt);
      s->set_step(step);
    }
    std::vector<proto::StartAssignment> starts;
    const proto::Envelope reply = Call(e);
    for (const auto& a : reply.agent_heartbeat_reply().actions()) {
      if (a.has_start()) starts.push_back(a.start());
    }
    return starts;
  }

  proto::Envelope ReportFrom(const std::string& node, const std::string& job, int attempt) {
    return CoordinatorHarness::ReportFrom(node, sessions_[node], job, attempt);
  }
  void Started(const std::string& node, const std::string& job, int attempt) {
    proto::Envelope e = ReportFrom(node, job, attempt);
    e.mutable_agent_report()->set_started(true);
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }
  void Exited(const std::string& node, const std::string& job, int attempt, int code) {
    proto::Envelope e = ReportFrom(node, job, attempt);
    e.mutable_agent_report()->add_exits()->set_exit_code(code);
    e.mutable_agent_report()->set_all_exited(true);
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }
  void StartFailed(const std::string& node, const std::string& job, int attempt,
                   const std::string& why) {
    proto::Envelope e = ReportFrom(node, job, attempt);
    e.mutable_agent_report()->set_start_error(why);
    e.mutable_agent_report()->set_all_exited(true);
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }
  void Committed(const std::string& node, const std::string& job, int attempt, int64_t step) {
    proto::Envelope e = ReportFrom(node, job, attempt);
    e.mutable_agent_report()->set_checkpoint_step(step);
    e.mutable_agent_report()->set_checkpoint_volume("ckpt");
    EXPECT_TRUE(Call(e).has_agent_report_reply());
  }

  // Heartbeats from a and b (holding frames of step `step` of `frames_attempt` for both ranks)
  // until attempt `attempt` is started on both, the clock moving 1 s per round (for up to 2
  // minutes: a restart backoff is waited out, after a coordinator restart too); returns its
  // starts by node.
  std::map<std::string, proto::StartAssignment> WaitForAttempt(const std::string& job, int attempt,
                                                               int frames_attempt, int64_t step) {
    std::map<std::string, proto::StartAssignment> got;
    for (int i = 0; i < 120 && got.size() < 2; ++i) {
      for (const std::string node : {"a", "b"}) {
        std::vector<int> ranks = {0, 1};
        if (frames_attempt == 0) ranks.clear();
        for (auto& s : Heartbeat(node, job, ranks, frames_attempt, step)) {
          if (s.attempt() == attempt) got[node] = s;
        }
      }
      if (got.size() < 2) {
        now_ += 1s;
        coord_->Tick();
      }
    }
    return got;
  }

  std::map<std::string, std::string> sessions_;
};

TEST_F(SnapshotFallbackTest, AFailedSnapshotResumeCostsOneRestartAndTheNextAttemptUsesTheVolume) {
  Register("a");
  Register("b");
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml(
      "name: s\ncommand: x\nnodes: 2\nrestart:\n  max_restarts: 5\n  backoff: 2s\n"
      "checkpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n");
  const std::string id = Call(submit).submit_reply().job_id();
  ASSERT_FALSE(id.empty());

  // Attempt 1 commits step 20 to the volume, snapshots up to step 28, and a rank fails.
  auto a1 = WaitForAttempt(id, 1, 0, 0);
  ASSERT_EQ(a1.size(), 2u) << Events(id);
  for (const auto& [node, s] : a1) Started(node, id, 1);
  Committed("a", id, 1, 20);
  Exited("a", id, 1, 1);
  Exited("b", id, 1, 75);

  // Attempt 2 resumes from those frames (both agents hold both ranks' step 28)...
  auto a2 = WaitForAttempt(id, 2, 1, 28);
  ASSERT_EQ(a2.size(), 2u) << Events(id);
  for (const auto& [node, s] : a2) {
    EXPECT_EQ(s.snapshot_resume_step(), 28) << Events(id);
    EXPECT_GT(s.snapshot_sources_size(), 0);
  }
  // ... and fails before passing step 28: a frame could not be fetched.
  StartFailed("a", id, 2, "snapshot resume: snapshot of rank 0 step 28 (attempt 1): unreachable");
  // b's ranks were stopped; it reports them gone.
  Exited("b", id, 2, 143);
  std::string events = Events(id);
  EXPECT_NE(events.find("snapshot_resume_failed [] the snapshot resume of attempt 2 (step 28, "
                        "in-memory snapshots of attempt 1) failed before the gang passed that "
                        "step (node a could not start: snapshot resume: snapshot of rank 0 step 28 "
                        "(attempt 1): "
                        "unreachable)"),
            std::string::npos)
      << events;

  // Attempt 3: from the volume's step 20, though the agents still report the frames.
  auto a3 = WaitForAttempt(id, 3, 1, 28);
  ASSERT_EQ(a3.size(), 2u) << Events(id);
  for (const auto& [node, s] : a3) {
    EXPECT_EQ(s.snapshot_sources_size(), 0) << node << " told to fetch frames again\n"
                                            << Events(id);
    EXPECT_EQ(s.snapshot_resume_step(), 0) << node;
    EXPECT_EQ(s.resume_step(), 20) << node;
    EXPECT_FALSE(s.snapshot_peer_endpoint().empty()) << "the copies go on in attempt 3";
  }
  events = Events(id);
  EXPECT_NE(events.find("attempt 3 resumes from step 20 on volume ckpt (provider aws): the "
                        "snapshot resume of attempt 2"),
            std::string::npos)
      << events;
  // Attempt 1's failure and attempt 2's: one restart each, none more.
  EXPECT_EQ(Status(id).restarts(), 2) << events;
}

// The same with the coordinator restarted between the failed snapshot resume and the next
// attempt: the fallback is in the database, so attempt 3 still resumes from the volume although
// the agents (registered again) still report the frames that failed.
TEST_F(SnapshotFallbackTest, TheFallbackSurvivesACoordinatorRestart) {
  Register("a");
  Register("b");
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml(
      "name: s\ncommand: x\nnodes: 2\nrestart:\n  max_restarts: 5\n  backoff: 30s\n"
      "checkpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n");
  const std::string id = Call(submit).submit_reply().job_id();
  ASSERT_FALSE(id.empty());
  auto a1 = WaitForAttempt(id, 1, 0, 0);
  ASSERT_EQ(a1.size(), 2u) << Events(id);
  for (const auto& [node, s] : a1) Started(node, id, 1);
  Committed("a", id, 1, 20);
  Exited("a", id, 1, 1);
  Exited("b", id, 1, 75);
  auto a2 = WaitForAttempt(id, 2, 1, 28);
  ASSERT_EQ(a2.size(), 2u) << Events(id);
  for (const auto& [node, s] : a2) ASSERT_EQ(s.snapshot_resume_step(), 28) << Events(id);
  StartFailed("a", id, 2, "snapshot resume: rank 0 step 28: unreachable");
  Exited("b", id, 2, 143);
  ASSERT_NE(Events(id).find("snapshot_resume_failed"), std::string::npos) << Events(id);
  // The restart comes before attempt 3 is placed (the 30 s backoff has not passed).
  ASSERT_EQ(Status(id).attempt(), 2);

  Open();
  sessions_.clear();
  Register("a");
  Register("b");
  auto a3 = WaitForAttempt(id, 3, 1, 28);
  ASSERT_EQ(a3.size(), 2u) << Events(id);
  for (const auto& [node, s] : a3) {
    EXPECT_EQ(s.snapshot_sources_size(), 0) << node << " told to fetch the failed frames again\n"
                                            << Events(id);
    EXPECT_EQ(s.snapshot_resume_step(), 0) << node;
    EXPECT_EQ(s.resume_step(), 20) << node;
  }
  EXPECT_NE(Events(id).find("attempt 3 resumes from step 20 on volume ckpt (provider aws): the "
                            "snapshot resume of attempt 2"),
            std::string::npos)
      << Events(id);
}

// A 3-node gang: once every agent has reported, a step each rank holds on two nodes comes back
// as the candidate on every heartbeat reply; once every holder reports it pinned, it comes back
// as the kept step. While a node of the attempt has not reported, nothing is sent.
TEST_F(SnapshotFallbackTest, AThreeNodeGangGetsItsPinsOnHeartbeats) {
  for (const char* n : {"a", "b", "c"}) Register(n);
  proto::Envelope submit;
  submit.mutable_submit_request()->set_yaml(
      "name: s\ncommand: x\nnodes: 3\ncheckpoint:\n  volume: ckpt\n  snapshot_every_steps: 1\n");
  const std::string id = Call(submit).submit_reply().job_id();
  ASSERT_FALSE(id.empty());
  struct F {
    int rank;
    int64_t step;
    bool pinned;
  };
  std::map<std::string, int> node_rank;
  // A heartbeat from `node` holding `frames` (world 3, attempt 1); the pins it gets back.
  auto beat = [&](const std::string& node, std::vector<F> frames,
                  bool report = true) -> std::optional<proto::SnapshotPins> {
    proto::Envelope e;
    auto* h = e.mutable_agent_heartbeat();
    h->set_node(node);
    h->set_session_id(sessions_[node]);
    h->set_snapshots_reported(report);
    for (const F& f : frames) {
      auto* s = h->add_snapshots_held();
      s->set_job_id(id);
      s->set_rank(f.rank);
      s->set_world_size(3);
      s->set_attempt(1);
      s->set_step(f.step);
      s->set_pinned(f.pinned);
    }
    std::optional<proto::SnapshotPins> pins;
    const proto::Envelope reply = Call(e);
    for (const auto& a : reply.agent_heartbeat_reply().actions()) {
      if (a.has_start()) node_rank[node] = a.start().node_rank();
      if (a.has_snapshot_pins() && a.snapshot_pins().job_id() == id) pins = a.snapshot_pins();
    }
    return pins;
  };
  for (int i = 0; i < 20 && node_rank.size() < 3; ++i) {
    for (const char* n : {"a", "b", "c"}) beat(n, {}, /*report=*/false);
    now_ += 1s;
    coord_->Tick();
  }
  ASSERT_EQ(node_rank.size(), 3u) << Events(id);
  for (const auto& [node, r] : node_rank) Started(node, id, 1);
  // Node rank i holds rank i and the copy of rank i-1, at `step`.
  auto ring = [&](const std::string& node, int64_t step, bool pinned) {
    const int r = node_rank[node];
    return std::vector<F>{{r, step, pinned}, {(r + 2) % 3, step, pinned}};
  };
  EXPECT_FALSE(beat("a", ring("a", 10, false)).has_value())
      << "b and c have not reported: nothing is decided";
  beat("b", ring("b", 10, false));
  auto pins = beat("c", ring("c", 10, false));
  ASSERT_TRUE(pins.has_value());
  EXPECT_EQ(pins->kept_step(), -1);
  EXPECT_EQ(pins->candidate_step(), 10);
  EXPECT_EQ(pins->candidate_attempt(), 1);
  // a and b pinned it; c's pin is on its way: still the candidate.
  auto more = [&](const std::string& node, bool pinned) {
    auto v = ring(node, 10, pinned);
    for (const F& f : ring(node, 11, false)) v.push_back(f);
    return v;
  };
  beat("a", more("a", true));
  pins = beat("b", more("b", true));
  ASSERT_TRUE(pins.has_value());
  EXPECT_EQ(pins->kept_step(), -1);
  EXPECT_EQ(pins->candidate_step(), 10);
  pins = beat("c", more("c", true));
  ASSERT_TRUE(pins.has_value());
  EXPECT_EQ(pins->kept_step(), 10);
  EXPECT_EQ(pins->kept_attempt(), 1);
  EXPECT_EQ(pins->candidate_step(), 11) << "the next candidate";
}

TEST(FailedSnapshotResumeTest, OnlyASnapshotResumeThatNeverPassedItsStep) {
  ResumeChoice snap;
  snap.source = ResumeChoice::Source::kSnapshot;
  snap.step = 28;
  snap.attempt = 1;
  EXPECT_TRUE(FailedSnapshotResume(2, snap, std::nullopt, "rank 0 exited 7").has_value());
  EXPECT_TRUE(FailedSnapshotResume(2, snap, 28, "rank 0 exited 7").has_value());
  EXPECT_FALSE(FailedSnapshotResume(2, snap, 29, "rank 0 exited 1").has_value())
      << "the gang trained past the step: the restore worked";
  ResumeChoice volume;
  volume.source = ResumeChoice::Source::kVolume;
  volume.step = 20;
  EXPECT_FALSE(FailedSnapshotResume(2, volume, std::nullopt, "x").has_value());
}

}  // namespace
}  // namespace muster::coordinator
