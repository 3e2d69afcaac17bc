#include "common/status.h"

#include <gtest/gtest.h>

#include "common/wire.h"

namespace muster {
namespace {

TEST(StatusTest, EveryCodeRoundTripsThroughTheWireError) {
  for (int c = 0; c <= static_cast<int>(StatusCode::kInternal); ++c) {
    Status s =
        c == 0 ? Status::Ok() : Status(static_cast<StatusCode>(c), "detail " + std::to_string(c));
    proto::Error e = StatusToError(s);
    // Through bytes, as it travels.
    proto::Error parsed;
    ASSERT_TRUE(parsed.ParseFromString(e.SerializeAsString()));
    EXPECT_EQ(ErrorToStatus(parsed), s) << StatusCodeName(s.code());
  }
}

TEST(StatusTest, UnknownWireCodeBecomesInternalWithTheMessage) {
  proto::Error e;
  e.set_code(static_cast<proto::Code>(99));
  e.set_message("from the future");
  Status s = ErrorToStatus(e);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_NE(s.message().find("from the future"), std::string::npos);
}

StatusOr<int> Half(int x) {
  if (x % 2) return InvalidArgumentError("odd: " + std::to_string(x));
  return x / 2;
}

StatusOr<int> Quarter(int x) {
  MUSTER_ASSIGN_OR_RETURN(int h, Half(x));
  MUSTER_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

Status CheckQuarter(int x) {
  MUSTER_RETURN_IF_ERROR(Quarter(x));
  return Status::Ok();
}

TEST(StatusTest, MacrosPropagateTheFirstError) {
  EXPECT_EQ(*Quarter(8), 2);
  StatusOr<int> bad = Quarter(6);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "odd: 3");
  EXPECT_TRUE(CheckQuarter(4).ok());
  EXPECT_EQ(CheckQuarter(5).message(), "odd: 5");
}

TEST(StatusTest, StatusOrFromOkStatusIsAnError) {
  StatusOr<int> s{Status::Ok()};
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInternal);
}

TEST(StatusTest, ErrnoMapsToCodes) {
  EXPECT_EQ(ErrnoStatus(ENOENT, "open x").code(), StatusCode::kNotFound);
  EXPECT_EQ(ErrnoStatus(ENOSPC, "write x").code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrnoStatus(EIO, "read x").code(), StatusCode::kDataLoss);
  EXPECT_NE(ErrnoStatus(ENOENT, "open x").message().find("open x"), std::string::npos);
}

TEST(StatusTest, WithContextKeepsTheCode) {
  Status s = DataLossError("checksum").WithContext("step 100");
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_EQ(s.ToString(), "DataLoss: step 100: checksum");
}

}  // namespace
}  // namespace muster
