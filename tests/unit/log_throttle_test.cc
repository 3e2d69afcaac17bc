#include "common/log_throttle.h"

#include <gtest/gtest.h>

namespace muster {
namespace {

using std::chrono::milliseconds;

TEST(LogThrottleTest, TheFirstIsLoggedRepeatsWithinTheIntervalAreCountedThenReported) {
  LogThrottle t(milliseconds(1000));
  LogThrottle::Clock::time_point t0{};
  EXPECT_EQ(t.Admit("k", t0), 0);
  EXPECT_EQ(t.Admit("k", t0 + milliseconds(10)), std::nullopt);
  EXPECT_EQ(t.Admit("k", t0 + milliseconds(999)), std::nullopt);
  // Another key is independent.
  EXPECT_EQ(t.Admit("other", t0 + milliseconds(500)), 0);
  EXPECT_EQ(t.Admit("k", t0 + milliseconds(1000)), 2);
  // The count starts again after a logged line.
  EXPECT_EQ(t.Admit("k", t0 + milliseconds(1500)), std::nullopt);
  EXPECT_EQ(t.Admit("k", t0 + milliseconds(2000)), 1);
  EXPECT_EQ(t.Admit("k", t0 + milliseconds(5000)), 0);
}

TEST(LogThrottleTest, KeysAreBoundedByForgettingTheLeastRecentlyLogged) {
  LogThrottle t(milliseconds(1000), 3);
  LogThrottle::Clock::time_point t0{};
  EXPECT_EQ(t.Admit("a", t0), 0);
  EXPECT_EQ(t.Admit("b", t0 + milliseconds(1)), 0);
  EXPECT_EQ(t.Admit("c", t0 + milliseconds(2)), 0);
  EXPECT_EQ(t.Admit("a", t0 + milliseconds(3)), std::nullopt);
  for (int i = 0; i < 10000; ++i) t.Admit("spam" + std::to_string(i), t0 + milliseconds(4));
  EXPECT_EQ(t.keys(), 3u);
  // "a" was forgotten: logged again as a first occurrence.
  EXPECT_EQ(t.Admit("a", t0 + milliseconds(5)), 0);
}

}  // namespace
}  // namespace muster
