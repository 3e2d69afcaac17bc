#include "common/logging.h"

#include <gtest/gtest.h>

#include "tests/testing/log_capture.h"

namespace muster {
namespace {

TEST(LoggingTest, LinesCarryComponentAndContext) {
  testing::LogCapture capture;
  log::SetContext("ft-7", "aws-0", "3");
  log::Get("agent.spawn")->warn("started {} ranks", 4);
  log::SetContext("", "", "");
  auto lines = capture.Lines();
  ASSERT_FALSE(lines.empty());
  const std::string& line = lines.back();
  EXPECT_NE(line.find("agent.spawn"), std::string::npos) << line;
  EXPECT_NE(line.find("job=ft-7 node=aws-0 rank=3"), std::string::npos) << line;
  EXPECT_NE(line.find("started 4 ranks"), std::string::npos) << line;
}

TEST(LoggingTest, UnknownLevelIsRefused) {
  Status st = log::InitLogging("chatty");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(log::InitLogging("warn").ok());
}

TEST(LoggingTest, LevelFiltersLines) {
  testing::LogCapture capture;
  ASSERT_TRUE(log::InitLogging("error").ok());
  log::Get("coord.sched")->warn("hidden");
  log::Get("coord.sched")->error("shown");
  ASSERT_TRUE(log::InitLogging("warn").ok());
  auto lines = capture.Lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("shown"), std::string::npos);
}

}  // namespace
}  // namespace muster
