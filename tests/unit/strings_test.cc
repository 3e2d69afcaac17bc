// common/strings.h: the one Trim, ParseInt64 and EnvValue every module uses.

#include "common/strings.h"

#include <gtest/gtest.h>
#include <stdlib.h>

namespace muster {
namespace {

TEST(StringsTest, TrimRemovesBlanksAtBothEndsOnly) {
  EXPECT_EQ(Trim("  a b\t\r\n"), "a b");
  EXPECT_EQ(Trim("\n\r\t "), "");
  EXPECT_EQ(Trim(""), "");
  EXPECT_EQ(Trim("x"), "x");
  EXPECT_EQ(TrimCopy(" \rhost \r", " \t"), "\rhost \r");  // a narrower set keeps the rest
  EXPECT_EQ(TrimCopy(" host\r\n", " \t\r"), "host\r\n");
  EXPECT_EQ(TrimLeft(" \tx \r"), "x \r");
  EXPECT_EQ(TrimRight(" \tx \r"), " \tx");
  EXPECT_EQ(TrimLeft(" \r\n"), "");
  EXPECT_EQ(TrimRight(" \r\n"), "");
}

TEST(StringsTest, ParseInt64TakesDigitsWithAnOptionalMinusAndNothingElse) {
  EXPECT_EQ(ParseInt64("0"), 0);
  EXPECT_EQ(ParseInt64("-42"), -42);
  EXPECT_EQ(ParseInt64("9223372036854775807"), INT64_MAX);
  EXPECT_EQ(ParseInt64("9223372036854775808"), std::nullopt);  // overflow
  for (const char* bad : {"", "+1", " 1", "1 ", "1x", "0x10", "-", "1.0"}) {
    EXPECT_EQ(ParseInt64(bad), std::nullopt) << "'" << bad << "'";
  }
}

TEST(StringsTest, EnvValueTreatsEmptyAsUnset) {
  ::setenv("MUSTER_STRINGS_TEST_VAR", "v", 1);
  EXPECT_EQ(EnvValue("MUSTER_STRINGS_TEST_VAR"), "v");
  ::setenv("MUSTER_STRINGS_TEST_VAR", "", 1);
  EXPECT_EQ(EnvValue("MUSTER_STRINGS_TEST_VAR"), std::nullopt);
  ::unsetenv("MUSTER_STRINGS_TEST_VAR");
  EXPECT_EQ(EnvValue("MUSTER_STRINGS_TEST_VAR"), std::nullopt);
}

}  // namespace
}  // namespace muster
