// `muster ckpt ...` run as a real binary over checkpoints written by Checkpointer.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

#include "checkpoint/checkpointer.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

struct Result {
  int code;
  std::string out;
};

// Runs `muster ARGS`; a run that hangs is killed after 20 s (exit status 124 or 137).
Result Muster(const std::string& args) {
  std::string cmd = "timeout -s KILL 20 " + std::string(MUSTER_BIN) + " " + args + " 2>&1";
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

// Each hostile directory makes ls, verify and inspect exit 1 with the reason: before, a huge
// block_size or a sparse MANIFEST aborted them (bad_alloc), a FIFO MANIFEST hung them, and
// wrapping offsets or overlapping slices passed verify as "ok".
TEST(CkptCliTest, HostileDirectoriesFailClearlyWithoutCrashOrHang) {
  struct Case {
    const char* what;
    std::function<void(const std::string& job)> spoil;
    const char* expect;
  };
  const std::string manifest = "/step-000000010/MANIFEST";
  const std::vector<Case> cases = {
      {"huge block_size",
       [](const std::string& job) {
         std::string shard = testing::ReadAll(job + "/step-000000010/shard-00000.bin");
         ASSERT_TRUE(testing::EditManifest(job, 10, [&](Manifest& m) {
           m.block_size = uint64_t{1} << 62;
           m.shards[0].block_xxh3 = testing::BlockHashes(shard, m.block_size);
         }));
       },
       "block_size 4611686018427387904 is outside"},
      {"sparse 1 TiB MANIFEST",
       [&](const std::string& job) {
         ASSERT_EQ(::truncate((job + manifest).c_str(), int64_t{1} << 40), 0);
       },
       "more than the limit"},
      {"FIFO MANIFEST",
       [&](const std::string& job) {
         ASSERT_EQ(::unlink((job + manifest).c_str()), 0);
         ASSERT_EQ(::mkfifo((job + manifest).c_str(), 0644), 0);
       },
       "not a regular file (a FIFO)"},
      {"offset near 2^64",
       [](const std::string& job) {
         ASSERT_TRUE(testing::EditManifest(job, 10, [](Manifest& m) {
           m.tensors[0].slices[0].byte_offset = ~uint64_t{0} - 4095;
         }));
       },
       "byte range [18446744073709547520"},
      {"overlapping slices leaving a gap",
       [](const std::string& job) {
         ASSERT_TRUE(testing::EditManifest(job, 10, [](Manifest& m) {
           StoredSlice a = m.tensors[0].slices[0];
           a.lengths = {32, 64};
           a.byte_length /= 2;
           StoredSlice b = a;
           b.byte_offset = a.byte_length;
           m.tensors[0].slices = {a, b};
         }));
       },
       "tensor 'layer.weight': slices [0+32,0+64] and [0+32,0+64] overlap"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    testing::TempDir dir;
    const std::string job = dir.sub("job");
    SaveSteps(job, {10});
    c.spoil(job);
    for (const std::string cmd : {"ls", "verify", "inspect --step 10"}) {
      auto r = Muster("ckpt " + cmd + " " + job);
      EXPECT_EQ(r.code, 1) << cmd << ": " << r.out;
      EXPECT_NE(r.out.find(c.expect), std::string::npos) << cmd << ": " << r.out;
    }
  }
}

// gc --keep 1 when the newest step lost a shard: the newest good step stays (before, it was
// deleted and nothing restorable was left), and the damaged step is left and reported.
TEST(CkptCliTest, GcKeepsTheNewestGoodStep) {
  testing::TempDir dir;
  const std::string job = dir.sub("job");
  SaveSteps(job, {10, 20});
  ASSERT_EQ(::unlink((job + "/step-000000020/shard-00000.bin").c_str()), 0);
  auto gc = Muster("ckpt gc " + job + " --keep 1");
  ASSERT_EQ(gc.code, 0) << gc.out;
  EXPECT_NE(gc.out.find("kept damaged step 20"), std::string::npos) << gc.out;
  EXPECT_EQ(gc.out.find("removed step 10"), std::string::npos) << gc.out;
  auto v = Muster("ckpt verify " + job + " --step 10");
  EXPECT_EQ(v.code, 0) << v.out;
  auto ls = Muster("ckpt ls " + job);
  EXPECT_EQ(ls.code, 1) << ls.out;
  EXPECT_NE(ls.out.find("shard-00000.bin is not readable"), std::string::npos) << ls.out;
}

// gc --verify also reads every block: a step of the right size with a flipped byte is not good.
TEST(CkptCliTest, GcVerifyCountsOnlyStepsWhoseChecksumsMatch) {
  testing::TempDir dir;
  const std::string job = dir.sub("job");
  SaveSteps(job, {10, 20});
  {
    std::fstream f(job + "/step-000000020/shard-00000.bin",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(3);
    f.write("\x7f", 1);
  }
  auto gc = Muster("ckpt gc " + job + " --keep 1 --verify");
  ASSERT_EQ(gc.code, 0) << gc.out;
  EXPECT_NE(gc.out.find("kept damaged step 20"), std::string::npos) << gc.out;
  EXPECT_TRUE(std::filesystem::exists(job + "/step-000000010"));
  EXPECT_EQ(Muster("ckpt verify " + job + " --step 10").code, 0);
}

}  // namespace
}  // namespace muster::checkpoint
