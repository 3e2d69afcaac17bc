// The agent's line parsers, the volume server's confinement, and the demo's SVG plot.

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/control_channel.h"
#include "common/progress.h"
#include "common/reactor.h"
#include "demo/loss_plot.h"
#include "node_agent/agent.h"
#include "node_agent/replication_queue.h"
#include "node_agent/volume_transfer.h"
#include "tests/testing/port_range.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using node_agent::ParseCheckpointLine;
using node_agent::ParseProgressLine;
using node_agent::TcpPortInUse;

TEST(ProgressLineTest, ParsesTheDocumentedKeys) {
  auto p = ParseProgressLine(
      "MUSTER_PROGRESS step=120 total=1000 loss=1.93 throughput=812.5 unit=samples/s");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->step(), 120);
  EXPECT_EQ(p->total_steps(), 1000);
  EXPECT_DOUBLE_EQ(p->loss(), 1.93);
  EXPECT_DOUBLE_EQ(p->throughput(), 812.5);
  EXPECT_EQ(p->throughput_unit(), "samples/s");
}

TEST(ProgressLineTest, PerSecondKeysAndUnknownKeysAndCarriageReturns) {
  auto p = ParseProgressLine("  MUSTER_PROGRESS step=7 tokens_per_s=2500 lr=0.001 junk\r");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->step(), 7);
  EXPECT_DOUBLE_EQ(p->throughput(), 2500);
  EXPECT_EQ(p->throughput_unit(), "tokens/s");
}

TEST(ProgressLineTest, RejectsWhatIsNotAProgressLine) {
  EXPECT_FALSE(ParseProgressLine("step=5"));
  EXPECT_FALSE(ParseProgressLine("MUSTER_PROGRESS total=5"));     // no step
  EXPECT_FALSE(ParseProgressLine("MUSTER_PROGRESS step=-1"));     // negative
  EXPECT_FALSE(ParseProgressLine("MUSTER_PROGRESS step=12abc"));  // junk
  EXPECT_FALSE(ParseProgressLine("MUSTER_PROGRESSstep=5"));       // no separator
  EXPECT_FALSE(ParseProgressLine(""));
}

TEST(ProgressLineTest, TheCxxCallWritesWhatTheAgentParses) {
  ProgressReport r;
  r.step = 42;
  r.total = 100;
  r.loss = 2.5;
  r.throughput = 1234.5;
  r.unit = "samples/s";
  auto p = ParseProgressLine(FormatProgressLine(r));
  ASSERT_TRUE(p.has_value()) << FormatProgressLine(r);
  EXPECT_EQ(p->step(), 42);
  EXPECT_EQ(p->total_steps(), 100);
  EXPECT_DOUBLE_EQ(p->loss(), 2.5);
  EXPECT_DOUBLE_EQ(p->throughput(), 1234.5);
  EXPECT_EQ(p->throughput_unit(), "samples/s");
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ReportProgress(r, fds[1]);
  close(fds[1]);
  char buf[256] = {};
  ssize_t n = read(fds[0], buf, sizeof(buf) - 1);
  close(fds[0]);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, n), FormatProgressLine(r) + "\n") << "one whole line";
}

TEST(TcpPortInUseTest, SeesAListenerOnTheAddressOrOnEveryAddress) {
  muster::testing::PortRange range;  // ports no other test holds meanwhile
  const int port = range.base() + 999;
  EXPECT_FALSE(TcpPortInUse("127.0.0.1", port));
  EXPECT_FALSE(TcpPortInUse("0.0.0.0", port));
  {
    muster::testing::HeldPort held(port);
    ASSERT_GE(held.fd(), 0);
    EXPECT_TRUE(TcpPortInUse("127.0.0.1", port));
    EXPECT_TRUE(TcpPortInUse("0.0.0.0", port));  // a listener on one address blocks them all
    EXPECT_TRUE(TcpPortInUse("", port));
  }
  EXPECT_FALSE(TcpPortInUse("127.0.0.1", port));  // closed: free again at once
  EXPECT_FALSE(TcpPortInUse("not-an-address", port));
}

proto::ReplicateCheckpoint Copy(const std::string& job, int64_t step,
                                const std::string& volume = "ckpt") {
  proto::ReplicateCheckpoint r;
  r.set_job_id(job);
  r.set_step(step);
  r.set_volume(volume);
  return r;
}

TEST(ReplicationQueueTest, OneCopyRunsPerJobAndTheNewestStepWaits) {
  node_agent::ReplicationQueue q;
  auto a = q.Offer(Copy("j", 10));
  ASSERT_TRUE(a.start);
  EXPECT_EQ(a.start->step(), 10);
  EXPECT_TRUE(a.superseded.empty());
  // Commits faster than the copy: 20 waits, then 30 replaces it; 25 and 30 again are stale.
  auto b = q.Offer(Copy("j", 20));
  EXPECT_FALSE(b.start);
  EXPECT_TRUE(b.superseded.empty());
  auto c = q.Offer(Copy("j", 30));
  EXPECT_FALSE(c.start);
  ASSERT_EQ(c.superseded.size(), 1u);
  EXPECT_EQ(c.superseded[0].first.step(), 20);
  EXPECT_EQ(c.superseded[0].second, 30);
  auto d = q.Offer(Copy("j", 25));
  EXPECT_FALSE(d.start);
  ASSERT_EQ(d.superseded.size(), 1u);
  EXPECT_EQ(d.superseded[0].first.step(), 25);
  EXPECT_EQ(d.superseded[0].second, 30);
  // The same step asked again (the coordinator retrying a copy it thought lost), waiting or
  // running: a duplicate, neither started nor reported as superseded by itself.
  for (int64_t again : {30, 10}) {
    auto e = q.Offer(Copy("j", again));
    EXPECT_FALSE(e.start);
    EXPECT_TRUE(e.superseded.empty());
    EXPECT_TRUE(e.duplicate);
  }
  // Another job, or another volume of the same job, has its own slot.
  EXPECT_TRUE(q.Offer(Copy("k", 5)).start);
  EXPECT_TRUE(q.Offer(Copy("j", 5, "other")).start);
  EXPECT_EQ(q.running(), 3u);
  // 10 is done: 30 runs next, and nothing after it.
  auto next = q.Finished(Copy("j", 10));
  ASSERT_TRUE(next);
  EXPECT_EQ(next->step(), 30);
  auto older = q.Offer(Copy("j", 12));  // older than the one running now
  ASSERT_EQ(older.superseded.size(), 1u);
  EXPECT_EQ(older.superseded[0].second, 30);
  EXPECT_FALSE(q.Finished(Copy("j", 30)));
  EXPECT_EQ(q.running(), 2u);
  // The slot is free again: the next request runs at once.
  EXPECT_TRUE(q.Offer(Copy("j", 40)).start);
}

TEST(CheckpointLineTest, CarriesTheCommitLatencyWhenGiven) {
  using node_agent::ParseCheckpointCommitLine;
  EXPECT_EQ(CheckpointLine(40), "MUSTER_CHECKPOINT step=40");
  EXPECT_EQ(CheckpointLine(40, 2.5), "MUSTER_CHECKPOINT step=40 seconds=2.500");
  auto c = ParseCheckpointCommitLine(CheckpointLine(40, 2.5));
  ASSERT_TRUE(c);
  EXPECT_EQ(c->step, 40);
  EXPECT_DOUBLE_EQ(c->seconds, 2.5);
  EXPECT_EQ(ParseCheckpointLine(CheckpointLine(40, 2.5)), 40) << "older parsers read the step";
  EXPECT_EQ(ParseCheckpointCommitLine("MUSTER_CHECKPOINT step=7")->seconds, -1);
  EXPECT_EQ(ParseCheckpointCommitLine("MUSTER_CHECKPOINT step=7 seconds=x")->seconds, -1);
  EXPECT_EQ(ParseCheckpointCommitLine("MUSTER_CHECKPOINT step=7 seconds=-1")->seconds, -1);
  EXPECT_EQ(ParseCheckpointCommitLine("MUSTER_CHECKPOINT step=7 seconds=inf")->seconds, -1);
  EXPECT_DOUBLE_EQ(
      ParseCheckpointCommitLine("MUSTER_CHECKPOINT step=7 x=1 seconds=0.25\r")->seconds, 0.25);
  EXPECT_FALSE(ParseCheckpointCommitLine("MUSTER_CHECKPOINT step=0 seconds=1"));
}

TEST(CheckpointLineTest, ParsesCommittedSteps) {
  EXPECT_EQ(ParseCheckpointLine("MUSTER_CHECKPOINT step=40"), 40);
  EXPECT_EQ(ParseCheckpointLine("MUSTER_CHECKPOINT step=40 extra=1"), 40);
  EXPECT_FALSE(ParseCheckpointLine("MUSTER_CHECKPOINT step=0"));
  EXPECT_FALSE(ParseCheckpointLine("MUSTER_CHECKPOINT step=x"));
  EXPECT_FALSE(ParseCheckpointLine("checkpoint step=40"));
}

// The volume server only serves inside the transfer's job directory.
TEST(VolumeTransferTest, ServesOnlyInsideTheJobDirectory) {
  fs::path root = fs::temp_directory_path() / ("muster-vol-" + std::to_string(getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "job-1" / "step-000000010");
  fs::create_directories(root / "job-2");
  std::ofstream(root / "job-1" / "step-000000010" / "MANIFEST") << "manifest bytes";
  std::ofstream(root / "job-2" / "secret") << "other job";
  std::ofstream(root / "top-secret") << "outside";

  Reactor reactor("vol-test");
  auto server = node_agent::VolumeServer::Create(reactor, nullptr, /*insecure=*/true,
                                                 "tcp://127.0.0.1:*", {{"ckpt", root.string()}});
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  reactor.Start();
  auto v = node_agent::RemoteVolume::Connect((*server)->endpoint(), "", {}, true, "ckpt");
  ASSERT_TRUE(v.ok());
  auto& vol = **v;
  auto data = checkpoint::ReadFileToString(&vol, "job-1/step-000000010/MANIFEST");
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  EXPECT_EQ(*data, "manifest bytes");
  auto list = vol.ListDir("job-1");
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(*list, std::vector<std::string>{"step-000000010"});
  EXPECT_FALSE(vol.Exists("job-1/../top-secret"));
  EXPECT_FALSE(checkpoint::ReadFileToString(&vol, "job-1/../job-2/secret").ok());
  EXPECT_FALSE(checkpoint::ReadFileToString(&vol, "/etc/passwd").ok());
  EXPECT_FALSE(vol.NewWritableFile("job-1/x", false).ok()) << "read-only";
  v->reset();
  reactor.Call("stop", [&] { server->reset(); });
  reactor.Stop();
  fs::remove_all(root);
}

// Under CURVE nothing is readable without an AllowTransfer, and a transfer key reads only its job.
TEST(VolumeTransferTest, TransferKeysAreRequiredAndScopedToOneJob) {
  fs::path root = fs::temp_directory_path() / ("muster-vol-curve-" + std::to_string(getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "job-1");
  fs::create_directories(root / "job-2");
  std::ofstream(root / "job-1" / "a") << "one";
  std::ofstream(root / "job-2" / "b") << "two";
  Reactor reactor("vol-curve-test");
  auto zap = ZapAuthenticator::Create(reactor);
  ASSERT_TRUE(zap.ok());
  auto server = node_agent::VolumeServer::Create(reactor, zap->get(), false, "tcp://127.0.0.1:*",
                                                 {{"ckpt", root.string()}});
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  reactor.Start();
  auto key = GenerateKeyPair();
  ASSERT_TRUE(key.ok());
  {
    auto v = node_agent::RemoteVolume::Connect((*server)->endpoint(), (*server)->public_key(), *key,
                                               false, "ckpt");
    ASSERT_TRUE(v.ok());
    auto r = checkpoint::ReadFileToString(v->get(), "job-1/a");
    EXPECT_FALSE(r.ok()) << "an unknown key is refused";
  }
  int64_t expires = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count() +
                    60000;
  ASSERT_TRUE((*server)->Allow("job-1", key->public_key, expires).ok());
  auto v = node_agent::RemoteVolume::Connect((*server)->endpoint(), (*server)->public_key(), *key,
                                             false, "ckpt");
  ASSERT_TRUE(v.ok());
  auto a = checkpoint::ReadFileToString(v->get(), "job-1/a");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(*a, "one");
  EXPECT_FALSE(checkpoint::ReadFileToString(v->get(), "job-2/b").ok())
      << "a transfer key reads only its own job";
  v->reset();
  reactor.Call("stop", [&] {
    server->reset();
    zap->reset();
  });
  reactor.Stop();
  fs::remove_all(root);
}

TEST(LossPlotTest, OnePolylinePerSeriesAndEveryMarker) {
  std::string svg = demo::RenderLossSvg("t <&>",
                                        {{"attempt 1 on aws", {{5, 4.0}, {10, 3.5}, {15, 3.1}}},
                                         {"attempt 2 on gcp", {{20, 3.0}, {25, 2.8}}}},
                                        {{15, "notice"}, {15, "resumed"}});
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  size_t polylines = 0;
  for (size_t at = 0; (at = svg.find("<polyline", at)) != std::string::npos; ++at) ++polylines;
  EXPECT_EQ(polylines, 2u);
  EXPECT_NE(svg.find("notice"), std::string::npos);
  EXPECT_NE(svg.find("resumed"), std::string::npos);
  EXPECT_NE(svg.find("t &lt;&amp;&gt;"), std::string::npos) << "text is escaped";
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  // Degenerate input still makes a valid document.
  std::string empty = demo::RenderLossSvg("empty", {}, {});
  EXPECT_NE(empty.find("</svg>"), std::string::npos);
}

}  // namespace
}  // namespace muster
