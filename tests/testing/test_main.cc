// main() for every muster test binary: quiet logs unless MUSTER_LOG_LEVEL says otherwise.

#include <gtest/gtest.h>

#include <cstdlib>

#include "common/logging.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const char* env = std::getenv("MUSTER_LOG_LEVEL");
  muster::log::InitLogging(env && *env ? env : "warn").IgnoreError();
  return RUN_ALL_TESTS();
}
