// `muster ckpt ...` run as a real binary over checkpoints written by Checkpointer.

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include "checkpoint/checkpointer.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

struct Result {
  int code;
  std::string out;
};

Result Muster(const std::string& args) {
  std::string cmd = std::string(MUSTER_BIN) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  Result r{-1, ""};
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  int st = ::pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

void SaveSteps(const std::string& dir, std::vector<int64_t> steps) {
  CheckpointerOptions o;
  o.dir = dir;
  auto ck = *Checkpointer::Create(o);
  for (int64_t s : steps) {
    auto w = testing::Fill(s, 1, 0, 64 * 32);
    SaveState st;
    st.tensors.push_back(TensorRef::Replicated("layer.weight", DType::kBF16, {64, 64}, w.data()));
    ASSERT_EQ(ck->Save(s, st), Status::Ok());
    ASSERT_EQ(ck->Wait(), Status::Ok());
  }
}

TEST(CkptCliTest, LsVerifyInspectGcReplicate) {
  testing::TempDir dir;
  const std::string job = dir.sub("job"), copy = dir.sub("copy");
  SaveSteps(job, {10, 20, 30});

  auto ls = Muster("ckpt ls " + job);
  ASSERT_EQ(ls.code, 0) << ls.out;
  EXPECT_NE(ls.out.find("30"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("committed*"), std::string::npos) << ls.out;

  auto verify = Muster("ckpt verify " + job);
  EXPECT_EQ(verify.code, 0) << verify.out;
  EXPECT_NE(verify.out.find("step 20: ok"), std::string::npos) << verify.out;

  auto inspect = Muster("ckpt inspect " + job + " --step 20");
  ASSERT_EQ(inspect.code, 0) << inspect.out;
  EXPECT_NE(inspect.out.find("layer.weight  bf16  [64,64]  replicated"), std::string::npos)
      << inspect.out;

  auto rep = Muster("ckpt replicate " + job + " " + copy + " --latest");
  ASSERT_EQ(rep.code, 0) << rep.out;
  EXPECT_EQ(Muster("ckpt verify " + copy + " --step 30").code, 0);

  auto gc = Muster("ckpt gc " + job + " --keep 1");
  ASSERT_EQ(gc.code, 0) << gc.out;
  EXPECT_NE(gc.out.find("removed step 10"), std::string::npos) << gc.out;
  EXPECT_EQ(Muster("ckpt verify " + job + " --step 10").code, 1);

  // A flipped byte: non-zero exit and the reason.
  {
    std::fstream f(job + "/step-000000030/shard-00000.bin",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(3);
    f.write("\x7f", 1);
  }
  auto bad = Muster("ckpt verify " + job);
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_NE(bad.out.find("DataLoss"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("layer.weight"), std::string::npos) << bad.out;
}

TEST(CkptCliTest, BadInputsFailClearly) {
  testing::TempDir dir;
  auto missing = Muster("ckpt ls " + dir.sub("nope"));
  EXPECT_NE(missing.code, 0);
  EXPECT_NE(missing.out.find("does not exist"), std::string::npos) << missing.out;
  EXPECT_NE(Muster("ckpt inspect " + dir.path()).code, 0);  // --step is required
  EXPECT_NE(Muster("ckpt gc " + dir.path() + " --keep 0").code, 0);
  auto none = Muster("ckpt replicate " + dir.path() + " " + dir.sub("x") + " --latest");
  EXPECT_NE(none.code, 0);
  EXPECT_NE(none.out.find("no committed checkpoint"), std::string::npos) << none.out;
}

}  // namespace
}  // namespace muster::checkpoint
