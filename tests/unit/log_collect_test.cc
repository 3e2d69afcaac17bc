// Kept logs (coordinator/log_collect.cc): when an attempt ends on a node, the coordinator asks
// that node for each of its ranks' logs (FetchLog), keeps what the node answers, serves
// `muster logs` from the copy, and holds the idle on-demand node back from release until the
// copy is in, or log_keep_wait has passed (then an event says what was lost). A chunk from
// another node is refused. A real Coordinator on an injected clock, over a fake provider.

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "coordinator/coordinator.h"
#include "coordinator/providers/provider_manager.h"
#include "tests/testing/coordinator_harness.h"

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class LogCollectTest : public ::testing::Test, public testing::CoordinatorHarness {
 protected:
  LogCollectTest() : CoordinatorHarness("logkeep-collect") {}
  void SetUp() override { StartCoordinator(); }
  // A coordinator on dir_ (again after Restart: what a kill -9 leaves, the .part files of
  // copies in flight, is still there; the destructor only drops the fetches' replies).
  void StartCoordinator(bool with_providers = true) {
    CoordinatorOptions o;
    o.log_keep_dir = dir_ / "logs";
    o.log_keep_wait = 10s;
    o.heartbeat_timeout = 60s;
    o.lease = 90s;
    ASSERT_TRUE(Open(o));
    if (with_providers) UseReleaseRecorder(2s, /*volume=*/false);
  }
  void Restart(bool with_providers = true) { StartCoordinator(with_providers); }
  std::string Register(const std::string& name, const std::string& provider) {
    return CoordinatorHarness::Register(name, {.provider = provider});
  }
  proto::Envelope Chunk(const std::string& node, const std::string& session, uint64_t fetch,
                        const std::string& data, int64_t next, bool eof) {
    proto::Envelope e;
    auto* c = e.mutable_agent_log_chunk();
    c->set_node(node);
    c->set_session_id(session);
    c->set_fetch_id(fetch);
    c->set_data(data);
    c->set_next_offset(next);
    c->set_eof(eof);
    c->set_generation(77);
    return Call(e);
  }
  // The agent's answer when it cannot read the log: `code` a muster::StatusCode.
  proto::Envelope ChunkError(uint64_t fetch, StatusCode code, const std::string& message) {
    proto::Envelope e;
    auto* c = e.mutable_agent_log_chunk();
    c->set_node("gcp-1");
    c->set_session_id(sg_);
    c->set_fetch_id(fetch);
    c->set_error(message);
    c->set_error_code(static_cast<int>(code));
    c->set_eof(true);
    return Call(e);
  }
  proto::Envelope Logs(const std::string& job, int rank, int64_t offset = 0, bool kept = false) {
    proto::Envelope e;
    auto* l = e.mutable_logs_request();
    l->set_job_id(job);
    l->set_rank(rank);
    l->set_offset(offset);
    l->set_kept(kept);
    return CallOrPark(e).value_or(proto::Envelope());  // parked while the node is asked
  }
  std::string Events() {
    proto::Envelope e;
    e.mutable_events_request();
    auto r = Call(e);
    std::string out;
    for (const auto& ev : r.events_reply().events()) {
      out += ev.kind() + " " + ev.node() + ": " + ev.message() + "\n";
    }
    return out;
  }
  void TickAll() {
    Heartbeat("gcp-1", sg_);
    Heartbeat("aws-1", sa_);
    coord_->Tick();
  }
  // Runs a 2-rank job on gcp-1 to its end; returns its id.
  std::string RunJobToTheEnd() {
    std::string id = StartJob();
    EndJob(id);
    return id;
  }
  // A 2-rank job started on gcp-1; returns its id.
  std::string StartJob() {
    proto::Envelope submit;
    submit.mutable_submit_request()->set_yaml(
        "name: lk\ncommand: x\nranks_per_node: 2\nplacement:\n  providers: [gcp]\n");
    auto r = Call(submit);
    EXPECT_TRUE(r.has_submit_reply()) << r.DebugString();
    std::string id = r.submit_reply().job_id();
    coord_->Tick();
    auto actions = Heartbeat("gcp-1", sg_);
    EXPECT_EQ(actions.size(), 1u);
    EXPECT_TRUE(!actions.empty() && actions[0].has_start());
    proto::Envelope rep;
    auto* a = rep.mutable_agent_report();
    a->set_node("gcp-1");
    a->set_session_id(sg_);
    a->set_job_id(id);
    a->set_attempt(1);
    a->set_started(true);
    Call(rep);
    return id;
  }
  // gcp-1 reports both ranks gone.
  void EndJob(const std::string& id, bool stopped = false) {
    proto::Envelope rep;
    auto* a = rep.mutable_agent_report();
    a->set_node("gcp-1");
    a->set_session_id(sg_);
    a->set_job_id(id);
    a->set_attempt(1);
    for (int rank : {0, 1}) {
      auto* x = a->add_exits();
      x->set_rank(rank);
      x->set_exit_code(stopped ? -1 : 0);
      x->set_signal(stopped ? 15 : 0);
      x->set_stopped_by_agent(stopped);
    }
    a->set_all_exited(true);
    auto reply = Call(rep);
    EXPECT_FALSE(reply.has_error()) << reply.DebugString();
  }
  // The FetchLog actions gcp-1 gets now, by rank.
  std::map<int, uint64_t> Fetches() {
    std::map<int, uint64_t> out;
    for (const auto& a : Heartbeat("gcp-1", sg_)) {
      if (a.has_fetch_log()) out[a.fetch_log().rank()] = a.fetch_log().fetch_id();
    }
    return out;
  }

  std::string sa_, sg_;
};

TEST_F(LogCollectTest, AFinishedAttemptsLogsAreKeptAndTheIdleNodeWaitsForThem) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  std::map<int, uint64_t> fetch;
  for (const auto& a : Heartbeat("gcp-1", sg_)) {
    if (!a.has_fetch_log()) continue;
    EXPECT_EQ(a.fetch_log().job_id(), id);
    EXPECT_EQ(a.fetch_log().attempt(), 1);
    EXPECT_EQ(a.fetch_log().offset(), 0);
    fetch[a.fetch_log().rank()] = a.fetch_log().fetch_id();
  }
  ASSERT_EQ(fetch.size(), 2u) << "one FetchLog per rank of the node";

  // Another node cannot answer for gcp-1.
  auto denied = Chunk("aws-1", sa_, fetch[0], "forged\n", 7, true);
  ASSERT_TRUE(denied.has_error());
  EXPECT_NE(denied.error().message().find("permission denied"), std::string::npos);

  // Rank 0 in two chunks: the second asked from where the first ended, with its cursor.
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[0], "r0 a\nr0 b\n", 10, false).has_error());
  uint64_t second = 0;
  for (const auto& a : Heartbeat("gcp-1", sg_)) {
    if (!a.has_fetch_log()) continue;
    EXPECT_EQ(a.fetch_log().rank(), 0);
    EXPECT_EQ(a.fetch_log().offset(), 10);
    EXPECT_EQ(a.fetch_log().generation(), 77u);
    second = a.fetch_log().fetch_id();
  }
  ASSERT_NE(second, 0u);
  ASSERT_FALSE(Chunk("gcp-1", sg_, second, "r0 c\n", 15, true).has_error());

  // Rank 1 never answers. Far past idle_timeout (2 s): the node is kept for its logs.
  for (int i = 0; i < 6; ++i) {
    now_ += 1s;
    TickAll();
  }
  EXPECT_TRUE(released_.empty()) << Events();
  auto l0 = Logs(id, 0);
  ASSERT_TRUE(l0.has_logs_reply()) << l0.DebugString();
  EXPECT_EQ(l0.logs_reply().data(), "r0 a\nr0 b\nr0 c\n");
  EXPECT_TRUE(l0.logs_reply().eof());
  EXPECT_TRUE(l0.logs_reply().kept());
  EXPECT_EQ(l0.logs_reply().kept_note(), "") << "the node is there: nothing to say";

  // log_keep_wait (10 s) passes: rank 1 is given up with an event, and the node goes back.
  for (int i = 0; i < 10 && released_.empty(); ++i) {
    now_ += 1s;
    TickAll();
  }
  EXPECT_EQ(released_, (std::vector<std::string>{"gcp-1"})) << Events();
  std::string events = Events();
  EXPECT_NE(events.find("logs_lost gcp-1: attempt 1: the log of rank 1 is kept only in part: not "
                        "all of it was copied from node gcp-1 within 10000 ms"),
            std::string::npos)
      << events;
  EXPECT_NE(events.find("logs_kept gcp-1: attempt 1: the logs of 2 rank(s) from node gcp-1"),
            std::string::npos)
      << events;
  // The release's PassProviders forgot the node: the copies still answer.
  now_ += 1s;
  coord_->Tick();
  auto again = Logs(id, 0);
  ASSERT_TRUE(again.has_logs_reply()) << again.DebugString();
  EXPECT_EQ(again.logs_reply().data(), "r0 a\nr0 b\nr0 c\n");
  EXPECT_EQ(again.logs_reply().kept_note(),
            "logs of attempt 1 kept by the coordinator; node gcp-1 was released");
  auto l1 = Logs(id, 1);
  ASSERT_TRUE(l1.has_logs_reply()) << l1.DebugString();
  EXPECT_EQ(l1.logs_reply().data(),
            "[muster: not all of it was copied from node gcp-1 within 10000 ms]\n");
  // A follower's cursor in the copy goes on in the copy.
  auto tail = Logs(id, 0, 5, /*kept=*/true);
  ASSERT_TRUE(tail.has_logs_reply()) << tail.DebugString();
  EXPECT_EQ(tail.logs_reply().data(), "r0 b\nr0 c\n");
  EXPECT_TRUE(tail.logs_reply().kept_note().empty()) << "said once, on the first reply";
}

TEST_F(LogCollectTest, AChunkLargerThanAskedEndsTheCopy) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  uint64_t fetch = 0;
  for (const auto& a : Heartbeat("gcp-1", sg_)) {
    if (a.has_fetch_log() && a.fetch_log().rank() == 0) fetch = a.fetch_log().fetch_id();
  }
  ASSERT_NE(fetch, 0u);
  Chunk("gcp-1", sg_, fetch, std::string((1 << 20) + 1, 'x'), (1 << 20) + 1, true);
  coord_->AgentGone("gcp-1", sg_, "gone");  // so `muster logs` reads the copy
  auto l0 = Logs(id, 0);
  ASSERT_TRUE(l0.has_logs_reply()) << l0.DebugString();
  EXPECT_NE(l0.logs_reply().data().find("more than the 1048576 asked for"), std::string::npos);
  EXPECT_EQ(l0.logs_reply().data().find("xxx"), std::string::npos);
}

TEST_F(LogCollectTest, ACancelledJobsLogsAreKept) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = StartJob();
  proto::Envelope cancel;
  cancel.mutable_cancel_request()->set_job_id(id);
  ASSERT_FALSE(Call(cancel).has_error());
  bool stop = false;
  for (const auto& a : Heartbeat("gcp-1", sg_)) stop |= a.has_stop();
  ASSERT_TRUE(stop);
  EXPECT_TRUE(Fetches().empty()) << "nothing is copied while the ranks still run";
  EndJob(id, /*stopped=*/true);
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[0], "zero\n", 5, true).has_error());
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[1], "one\n", 4, true).has_error());
  EXPECT_NE(Events().find("logs_kept gcp-1"), std::string::npos) << Events();
  auto l1 = Logs(id, 1);
  ASSERT_TRUE(l1.has_logs_reply()) << l1.DebugString();
  EXPECT_EQ(l1.logs_reply().data(), "one\n");
  EXPECT_TRUE(l1.logs_reply().kept());
}

TEST_F(LogCollectTest, ANodeLostWhileItsLogsAreCopiedKeepsWhatCameWithANote) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[0], "first half", 10, false).has_error());
  coord_->AgentGone("gcp-1", sg_, "its agent's connections closed");
  coord_->Tick();
  auto l0 = Logs(id, 0);
  ASSERT_TRUE(l0.has_logs_reply()) << l0.DebugString();
  EXPECT_EQ(l0.logs_reply().data(),
            "first half\n[muster: node gcp-1 went away before all of it was kept]\n");
  EXPECT_EQ(l0.logs_reply().kept_note(),
            "logs of attempt 1 kept by the coordinator; node gcp-1 is not connected");
  std::string events = Events();
  EXPECT_NE(events.find("logs_lost gcp-1: attempt 1: the log of rank 0 is kept only in part"),
            std::string::npos)
      << events;
  // The fetch still in flight for it expires later: the copy has ended, nothing changes.
  now_ += 11s;
  coord_->Tick();
  EXPECT_EQ(Logs(id, 0).logs_reply().data(), l0.logs_reply().data());
}

TEST_F(LogCollectTest, AnIncompleteCopyDoesNotHideTheLogOfANodeStillThere) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[0], "part\n", 5, false).has_error());
  fetch = Fetches();
  ASSERT_EQ(fetch.size(), 1u);
  proto::Envelope e;
  auto* c = e.mutable_agent_log_chunk();
  c->set_node("gcp-1");
  c->set_session_id(sg_);
  c->set_fetch_id(fetch[0]);
  c->set_error("cannot read rank-0.log: Input/output error");
  ASSERT_FALSE(Call(e).has_error());
  EXPECT_NE(Events().find("logs_lost gcp-1: attempt 1: the log of rank 0 is kept only in part"),
            std::string::npos)
      << Events();
  // The node is there: it is asked, not the copy.
  auto l0 = Logs(id, 0);
  EXPECT_FALSE(l0.has_logs_reply()) << l0.DebugString();
  bool asked = false;
  for (const auto& a : Heartbeat("gcp-1", sg_))
    asked |= a.has_fetch_log() && a.fetch_log().rank() == 0;
  EXPECT_TRUE(asked);
}

TEST_F(LogCollectTest, ARankWithNoLogOnItsNodeLeavesNothingBehind) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  for (int rank : {0, 1}) {
    proto::Envelope e;
    auto* c = e.mutable_agent_log_chunk();
    c->set_node("gcp-1");
    c->set_session_id(sg_);
    c->set_fetch_id(fetch[rank]);
    c->set_error("no log for rank " + std::to_string(rank));
    c->set_eof(true);
    ASSERT_FALSE(Call(e).has_error());
  }
  EXPECT_FALSE(fs::exists(dir_ / "logs" / id)) << "no part file, no empty directory";
  std::string events = Events();
  EXPECT_EQ(events.find("logs_kept"), std::string::npos) << events;
  EXPECT_EQ(events.find("logs_lost"), std::string::npos) << events;
  // Nothing holds the node back: it goes back after its idle timeout.
  for (int i = 0; i < 4 && released_.empty(); ++i) {
    now_ += 1s;
    TickAll();
  }
  EXPECT_EQ(released_, (std::vector<std::string>{"gcp-1"})) << Events();
}

TEST_F(LogCollectTest, ANodeLostBeforeItsLogsWereCopiedIsAnEventAndNothingIsKept) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = StartJob();
  coord_->AgentGone("gcp-1", sg_, "its agent's connections closed");
  std::string events = Events();
  EXPECT_NE(events.find("logs_lost gcp-1: attempt 1: the logs of ranks 0-1 were not kept: node "
                        "gcp-1 was lost before they could be copied"),
            std::string::npos)
      << events;
  auto l0 = Logs(id, 0);
  ASSERT_TRUE(l0.has_error()) << l0.DebugString();
  EXPECT_NE(l0.error().message().find("not connected"), std::string::npos) << l0.DebugString();
  EXPECT_FALSE(fs::exists(dir_ / "logs" / id / "1" / "rank-0.log"));
}

// A copy in flight when the coordinator stops (kill -9: its .part files stay) is asked again of
// its node once the node's agent registers with the restarted coordinator, from the start; a
// copy that was complete is not asked again.
TEST_F(LogCollectTest, ACopyInFlightIsAskedAgainAfterARestart) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[0], "zero\n", 5, true).has_error());
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[1], "one a\n", 6, false).has_error());

  Restart();
  std::string events = Events();
  EXPECT_NE(events.find("logs_copy_retry gcp-1: attempt 1: the log of rank(s) 1 is copied again "
                        "from node gcp-1: the coordinator restarted during the copy"),
            std::string::npos)
      << events;
  coord_->Tick();  // its node is not back yet: the copy waits for it
  EXPECT_EQ(Events().find("logs_lost"), std::string::npos) << Events();
  now_ += 2s;
  sg_ = Register("gcp-1", "gcp");
  coord_->Tick();
  fetch = Fetches();
  ASSERT_EQ(fetch.size(), 1u) << "rank 1 is asked again, rank 0 (kept whole) is not";
  ASSERT_TRUE(fetch.count(1));
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[1], "one a\none b\n", 12, true).has_error());
  events = Events();
  EXPECT_NE(events.find("logs_kept gcp-1: attempt 1: the logs of 2 rank(s) from node gcp-1"),
            std::string::npos)
      << events;
  auto l1 = Logs(id, 1, 0, /*kept=*/true);
  ASSERT_TRUE(l1.has_logs_reply()) << l1.DebugString();
  EXPECT_EQ(l1.logs_reply().data(), "one a\none b\n");
  EXPECT_FALSE(fs::exists(dir_ / "logs" / id / "1" / "rank-1.incomplete"));
  EXPECT_EQ(Events().find("logs_lost"), std::string::npos) << Events();
}

// The node of a copy in flight does not come back within a heartbeat timeout of the restart:
// the copy is given up with a logs_lost event, and nothing half written is left.
TEST_F(LogCollectTest, ACopyInFlightWhoseNodeDoesNotComeBackIsLost) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  ASSERT_FALSE(Chunk("gcp-1", sg_, fetch[0], "zero\n", 5, false).has_error());

  // Without providers: the idle down node is not released first (that ends the copy too, as
  // "node gcp-1 was released").
  Restart(/*with_providers=*/false);
  for (int i = 0; i < 7; ++i) {
    now_ += 10s;
    coord_->Tick();
  }
  std::string events = Events();
  for (int rank : {0, 1}) {
    EXPECT_NE(events.find(fmt::format("logs_lost gcp-1: attempt 1: the log of rank {} was not "
                                      "kept: the coordinator restarted during its copy, and node "
                                      "gcp-1 did not register again within 60000 ms",
                                      rank)),
              std::string::npos)
        << events;
  }
  EXPECT_FALSE(fs::exists(dir_ / "logs" / id)) << "no part file, no empty directory";
  // Another restart does not ask again.
  Restart();
  EXPECT_EQ(Events().find("logs_copy_retry gcp-1", events.size()), std::string::npos) << Events();
}

// The agent says why it cannot read a log (error_code): permission denied or an I/O error ends
// the copy with the node's reason in a logs_lost event (as NOT_FOUND, all it used to say, the
// rank was taken for one that left no log, and nothing was said); UNAVAILABLE is asked again.
TEST_F(LogCollectTest, TheAgentsReadErrorDecidesBetweenGivingUpAndAskingAgain) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = RunJobToTheEnd();
  auto fetch = Fetches();
  ASSERT_EQ(fetch.size(), 2u);
  ASSERT_FALSE(ChunkError(fetch[0], StatusCode::kFailedPrecondition,
                          "log file /x/rank-0.log: Permission denied")
                   .has_error());
  ASSERT_FALSE(
      ChunkError(fetch[1], StatusCode::kUnavailable, "log file /x/rank-1.log: Too many open files")
          .has_error());
  std::string events = Events();
  EXPECT_NE(events.find("logs_lost gcp-1: attempt 1: the log of rank 0 is kept only in part: the "
                        "rest was not kept: log file /x/rank-0.log: Permission denied"),
            std::string::npos)
      << events;
  EXPECT_EQ(events.find("rank 1"), std::string::npos) << events;
  now_ += 1s;
  coord_->Tick();
  fetch = Fetches();
  ASSERT_EQ(fetch.size(), 1u) << "rank 1 is asked again";
  ASSERT_TRUE(fetch.count(1));
  ASSERT_FALSE(ChunkError(fetch[1], StatusCode::kDataLoss, "reading a log file: Input/output error")
                   .has_error());
  events = Events();
  EXPECT_NE(events.find("logs_lost gcp-1: attempt 1: the log of rank 1 is kept only in part: the "
                        "rest was not kept: reading a log file: Input/output error"),
            std::string::npos)
      << events;
  // The kept copy says why.
  auto l0 = Logs(id, 0, 0, /*kept=*/true);
  ASSERT_TRUE(l0.has_logs_reply()) << "the kept copy says why: " << l0.DebugString();
  EXPECT_EQ(l0.logs_reply().data(),
            "[muster: the rest was not kept: log file /x/rank-0.log: Permission denied]\n");
}

// `muster logs` through the node: the agent's error code reaches the client.
TEST_F(LogCollectTest, ALogReadErrorReachesTheClientWithItsCode) {
  sa_ = Register("aws-1", "aws");
  sg_ = Register("gcp-1", "gcp");
  std::string id = StartJob();
  // `muster logs` of `rank` (on gcp-1), which answers the fetch with `code` and `message`; the
  // client's reply.
  auto read_failing = [&](int rank, StatusCode code, const std::string& message) {
    proto::Envelope req;
    req.mutable_logs_request()->set_job_id(id);
    req.mutable_logs_request()->set_rank(rank);
    proto::Envelope out;
    coord_->Handle("test", std::move(req), [&](proto::Envelope e) { out = std::move(e); });
    uint64_t fetch = 0;
    for (const auto& a : Heartbeat("gcp-1", sg_)) {
      if (a.has_fetch_log()) fetch = a.fetch_log().fetch_id();
    }
    EXPECT_NE(fetch, 0u);
    EXPECT_FALSE(ChunkError(fetch, code, message).has_error());
    return out;
  };
  proto::Envelope out =
      read_failing(0, StatusCode::kDataLoss, "reading a log file: Input/output error");
  ASSERT_TRUE(out.has_error()) << out.DebugString();
  EXPECT_EQ(out.error().code(), proto::DATA_LOSS) << out.DebugString();
  EXPECT_EQ(out.error().message(), "reading a log file: Input/output error");
  // A code that is not one is INTERNAL, never passed on as it came; nor is a valid code that a
  // log read never gives (DEADLINE_EXCEEDED is the coordinator's own timeout: taken from an
  // agent, it would have a kept copy asked again at once).
  for (StatusCode code :
       {static_cast<StatusCode>(99), StatusCode::kDeadlineExceeded, StatusCode::kAborted}) {
    out = read_failing(1, code, "not a log read's");
    ASSERT_TRUE(out.has_error()) << out.DebugString();
    EXPECT_EQ(out.error().code(), proto::INTERNAL)
        << static_cast<int>(code) << ": " << out.DebugString();
  }
}

}  // namespace
}  // namespace muster::coordinator
