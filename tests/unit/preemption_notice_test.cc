#include "node_agent/preemption_notice.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "tests/testing/subprocess.h"

namespace muster::node_agent {
namespace {

using namespace std::chrono_literals;
using SysClock = std::chrono::system_clock;

TEST(Rfc3339Test, ParsesUtcAndRejectsOthers) {
  auto t = ParseRfc3339Utc("2017-09-18T08:22:00Z");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(SysClock::to_time_t(*t), 1505722920);
  EXPECT_TRUE(ParseRfc3339Utc("2017-09-18T08:22:00.5Z").ok());
  EXPECT_FALSE(ParseRfc3339Utc("2017-09-18T08:22:00+02:00").ok());
  EXPECT_FALSE(ParseRfc3339Utc("yesterday").ok());
}

TEST(NoticeFileTest, AbsentMeansNoNoticeAndContentSetsTheDeadline) {
  std::string path =
      std::filesystem::temp_directory_path() / ("muster-notice-" + std::to_string(getpid()));
  std::filesystem::remove(path);
  auto src = NewNoticeFileSource(path, 30s);
  auto none = src->Check();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  std::ofstream(path) << "";
  auto dflt = src->Check();
  ASSERT_TRUE(dflt.ok() && dflt->has_value());
  auto left = (*dflt)->deadline - SysClock::now();
  EXPECT_GT(left, 25s);
  EXPECT_LE(left, 31s);

  std::ofstream(path) << "5\n";
  auto five = src->Check();
  ASSERT_TRUE(five.ok() && five->has_value());
  EXPECT_LE((*five)->deadline - SysClock::now(), 6s);

  std::ofstream(path) << "2030-01-01T00:00:00Z";
  auto abs = src->Check();
  ASSERT_TRUE(abs.ok() && abs->has_value());
  EXPECT_EQ(SysClock::to_time_t((*abs)->deadline), 1893456000);

  std::ofstream(path) << "soon-ish";
  EXPECT_EQ(src->Check().status().code(), StatusCode::kInvalidArgument);

  // A number that does not fit (std::stoll threw, uncaught, and took the agent down).
  std::ofstream(path) << std::string(30000, '9');
  auto huge = src->Check();
  EXPECT_EQ(huge.status().code(), StatusCode::kInvalidArgument) << huge.status();
  EXPECT_LT(huge.status().message().size(), 300u);
  std::filesystem::remove(path);
}

// The metadata servers, faked on loopback by tests/unit/data/fake_metadata.py.
class MetadataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string log = std::filesystem::temp_directory_path() /
                      ("muster-meta-" + std::to_string(getpid()) + ".out");
    std::filesystem::remove(log);
    auto p = testing::Subprocess::Start({"python3", "-u", MUSTER_FAKE_METADATA}, {}, log);
    ASSERT_TRUE(p.ok()) << p.status();
    server_.emplace(std::move(*p));
    // The server prints its port once it listens; waiting on the file is bounded (30 s: a
    // Python start on a loaded CI host took over 10 s once).
    for (int i = 0; i < 6000 && port_.empty(); ++i) {
      std::ifstream in(log);
      std::getline(in, port_);
      if (port_.empty()) usleep(5000);
    }
    ASSERT_FALSE(port_.empty()) << "fake metadata server did not start";
    base_ = "http://127.0.0.1:" + port_;
  }

  void Control(const std::string& which, const std::string& body) {
    auto r = testing::RunCommand({"python3", "-c",
                                  "import urllib.request,sys; urllib.request.urlopen("
                                  "urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),"
                                  " method='POST'), timeout=5)",
                                  base_ + "/control/" + which, body});
    ASSERT_TRUE(r.ok()) << r.status();
  }

  std::optional<testing::Subprocess> server_;
  std::string port_, base_;
};

TEST_F(MetadataTest, AwsSpotInstanceActionBecomesANoticeWithItsTime) {
  auto src = NewAwsSpotSource(base_, 2000ms);
  auto none = src->Check();
#ifndef MUSTER_HAVE_CURL
  GTEST_SKIP() << none.status().message();
#endif
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  Control("aws", R"({"action": "terminate", "time": "2026-11-27T19:30:00Z"})");
  auto notice = src->Check();
  ASSERT_TRUE(notice.ok()) << notice.status();
  ASSERT_TRUE(notice->has_value());
  EXPECT_EQ((*notice)->source, "aws");
  EXPECT_EQ(SysClock::to_time_t((*notice)->deadline), 1795807800);
  EXPECT_NE((*notice)->detail.find("terminate"), std::string::npos);
}

TEST_F(MetadataTest, GcpPreemptedFlagBecomesANotice) {
  auto src = NewGcpPreemptedSource(base_, 2000ms, 30s);
  auto none = src->Check();
#ifndef MUSTER_HAVE_CURL
  GTEST_SKIP() << none.status().message();
#endif
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  Control("gcp", "TRUE");
  auto notice = src->Check();
  ASSERT_TRUE(notice.ok() && notice->has_value()) << notice.status();
  EXPECT_EQ((*notice)->source, "gcp");
  EXPECT_GT((*notice)->deadline - SysClock::now(), 25s);
}

TEST_F(MetadataTest, MalformedAwsDocumentIsAnErrorNotANotice) {
  auto src = NewAwsSpotSource(base_, 2000ms);
#ifndef MUSTER_HAVE_CURL
  GTEST_SKIP();
#endif
  Control("aws", R"({"action": "terminate"})");
  EXPECT_EQ(src->Check().status().code(), StatusCode::kInvalidArgument);
}

TEST(NoticeWatcherTest, DeliversTheFirstNoticeOnce) {
  std::string path =
      std::filesystem::temp_directory_path() / ("muster-watch-" + std::to_string(getpid()));
  std::filesystem::remove(path);
  std::vector<std::unique_ptr<NoticeSource>> sources;
  sources.push_back(NewNoticeFileSource(path, 10s));
  std::mutex mu;
  std::condition_variable cv;
  std::vector<PreemptionNotice> got;
  NoticeWatcher w(std::move(sources), 10ms, [&](const PreemptionNotice& n) {
    std::lock_guard<std::mutex> l(mu);
    got.push_back(n);
    cv.notify_all();
  });
  w.Start();
  std::ofstream(path) << "3";
  std::unique_lock<std::mutex> l(mu);
  ASSERT_TRUE(cv.wait_for(l, 5s, [&] { return !got.empty(); }));
  l.unlock();
  w.Stop();
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].source, "file");
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace muster::node_agent
