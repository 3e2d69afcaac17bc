// The on-disk format does not move: a checkpoint written by an earlier build
// (testdata/v1_all_dtypes: step 7, one rank, a 3x4 tensor of every dtype, each named after its
// dtype, written before the dtype enum moved to common/dtype.h) still reads, restores the same
// bytes, and its MANIFEST serializes back to the same bytes.

#include <gtest/gtest.h>

#include <filesystem>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "checkpoint/manifest.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

using testing::ReadAll;
using testing::TempDir;

// The dtype names of format version 1, in the order the golden tensors were saved, with the
// enum value each must read as.
struct Named {
  const char* name;
  DType type;
  size_t size;
};
constexpr Named kV1DTypes[] = {
    {"f32", DType::kF32, 4},   {"f64", DType::kF64, 8}, {"f16", DType::kF16, 2},
    {"bf16", DType::kBF16, 2}, {"i32", DType::kI32, 4}, {"i64", DType::kI64, 8},
    {"u8", DType::kU8, 1},     {"i8", DType::kI8, 1},   {"bool", DType::kBool, 1},
};

// The bytes the generator saved as the i-th tensor (bool: 0 or 1).
std::vector<unsigned char> GoldenBytes(int i, size_t n, bool is_bool) {
  std::vector<unsigned char> b(n);
  for (size_t k = 0; k < n; ++k) {
    b[k] = is_bool ? ((k + i) % 3 == 0) : static_cast<unsigned char>(k * 37 + i * 11 + 5);
  }
  return b;
}

std::string Golden() { return std::string(MUSTER_TESTDATA) + "/v1_all_dtypes"; }

TEST(FormatPinTest, DTypeNamesAndSizesAreTheFormatsOwn) {
  for (const Named& d : kV1DTypes) {
    EXPECT_EQ(DTypeName(d.type), d.name);
    EXPECT_EQ(DTypeSize(d.type), d.size) << d.name;
    auto parsed = ParseDType(d.name);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, d.type) << d.name;
  }
  auto bad = ParseDType("float32");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("float32"), std::string::npos) << bad.status();
}

TEST(FormatPinTest, AnEarlierBuildsManifestParsesAndSerializesToTheSameBytes) {
  const std::string bytes = ReadAll(Golden() + "/" + StepDirName(7) + "/" + kManifestName);
  ASSERT_FALSE(bytes.empty()) << "no golden MANIFEST under " << Golden();
  auto m = ParseManifest(bytes);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->tensors.size(), std::size(kV1DTypes));
  for (const Named& d : kV1DTypes) {
    const TensorEntry* t = m->Find(d.name);
    ASSERT_NE(t, nullptr) << d.name;
    EXPECT_EQ(t->dtype, d.type) << d.name;
  }
  EXPECT_EQ(SerializeManifest(*m), bytes);
}

TEST(FormatPinTest, AnEarlierBuildsCheckpointRestoresEveryDtype) {
  TempDir tmp;
  std::filesystem::copy(Golden(), tmp.path(), std::filesystem::copy_options::recursive);
  CheckpointerOptions o;
  o.dir = tmp.path();
  o.block_size = 4096;
  auto c = Checkpointer::Create(o);
  ASSERT_TRUE(c.ok()) << c.status();
  auto latest = (*c)->LatestStep();
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(*latest, 7);
  auto m = (*c)->ReadManifest(7);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->UserMetadata(), "golden v1");

  std::vector<std::vector<unsigned char>> got;
  std::vector<RestoreRequest> requests;
  for (const Named& d : kV1DTypes) got.emplace_back(3 * 4 * d.size, 0xee);
  for (size_t i = 0; i < std::size(kV1DTypes); ++i) {
    requests.push_back(RestoreRequest::Whole(kV1DTypes[i].name, kV1DTypes[i].type, got[i].data()));
  }
  Status s = (*c)->Restore(7, requests);
  ASSERT_TRUE(s.ok()) << s;
  for (size_t i = 0; i < std::size(kV1DTypes); ++i) {
    EXPECT_EQ(got[i],
              GoldenBytes(static_cast<int>(i), got[i].size(), kV1DTypes[i].type == DType::kBool))
        << kV1DTypes[i].name;
  }
}

}  // namespace
}  // namespace muster::checkpoint
