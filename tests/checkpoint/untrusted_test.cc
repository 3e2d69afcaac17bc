// A checkpoint directory is untrusted input: another provider's agent replicates it, `muster
// ckpt` reads it, a job restores from it. Hostile or broken MANIFESTs and LATEST files must give
// a clear Status naming what is wrong (never a crash, a hang or a silent success), and
// retention must count only steps that can be restored.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoint/adopt.h"
#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "checkpoint/replicate.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

using testing::BlockHashes;
using testing::EditManifest;
using testing::ReadAll;
using testing::TempDir;

constexpr int64_t kSide = 64;  // "layer.weight" is kSide x kSide f32: 16 KiB, one shard

CheckpointerOptions Opts(const std::string& dir, Volume* v = nullptr) {
  CheckpointerOptions o;
  o.dir = dir;
  o.volume = v;
  o.block_size = 4096;
  return o;
}

// One rank saves `steps` of a replicated kSide x kSide f32 tensor.
void SaveSteps(const CheckpointerOptions& o, std::vector<int64_t> steps) {
  auto ck = Checkpointer::Create(o);
  ASSERT_TRUE(ck.ok()) << ck.status();
  for (int64_t s : steps) {
    auto w = testing::Fill(s, 1, 0, kSide * kSide);
    SaveState st;
    st.tensors.push_back(
        TensorRef::Replicated("layer.weight", DType::kF32, {kSide, kSide}, w.data()));
    ASSERT_EQ((*ck)->Save(s, st), Status::Ok());
    ASSERT_EQ((*ck)->Wait(), Status::Ok());
  }
}

std::string ShardPath(const std::string& dir, int64_t step) {
  return StepPath(dir, step) + "/" + ShardFileName(0);
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// --- Replication from a hostile source (the copier thread of another provider's agent) -------

TEST(UntrustedReplicateTest, HugeBlockSizeAtTheSourceIsAnErrorAndTheDestinationIsUntouched) {
  TempDir tmp;
  const std::string src = tmp.sub("src"), dst = tmp.sub("dst");
  SaveSteps(Opts(src), {5});
  const std::string shard = ReadAll(ShardPath(src, 5));
  // One block of 2^62 bytes: its checksum count still matches (one block), so only a bound on
  // block_size catches it. Before, the copy buffer of 2^62 bytes threw bad_alloc.
  ASSERT_TRUE(EditManifest(src, 5, [&](Manifest& m) {
    m.block_size = uint64_t{1} << 62;
    m.shards[0].block_xxh3 = BlockHashes(shard, m.block_size);
  }));
  auto r = Replicate(LocalVolume(), src, LocalVolume(), dst, 5);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status();
  EXPECT_TRUE(Contains(r.status().message(), "block_size")) << r.status();
  EXPECT_FALSE(std::filesystem::exists(dst)) << "the destination was touched";
}

TEST(UntrustedReplicateTest, SparseTerabyteManifestAtTheSourceIsRefusedByItsSize) {
  TempDir tmp;
  const std::string src = tmp.sub("src"), dst = tmp.sub("dst");
  SaveSteps(Opts(src), {5});
  const std::string manifest = StepPath(src, 5) + "/" + kManifestName;
  ASSERT_EQ(::truncate(manifest.c_str(), int64_t{1} << 40), 0) << std::strerror(errno);
  auto r = Replicate(LocalVolume(), src, LocalVolume(), dst, 5);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.status().message(), "1099511627776 bytes, more than the limit"))
      << r.status();
  EXPECT_FALSE(std::filesystem::exists(dst)) << "the destination was touched";
  // The listing says the same instead of allocating a terabyte.
  auto steps = ListSteps(LocalVolume(), src);
  ASSERT_TRUE(steps.ok()) << steps.status();
  ASSERT_EQ(steps->size(), 1u);
  EXPECT_FALSE((*steps)[0].committed);
  EXPECT_TRUE(Contains((*steps)[0].problem, "more than the limit")) << (*steps)[0].problem;
}

// A source whose MANIFEST claims more than the destination's file system can hold (consistent
// block counts, so the MANIFEST itself passes) is refused before anything is written. Before,
// the copy ran until the source came up short or the disk filled (ENOSPC).
TEST(UntrustedReplicateTest, AClaimLargerThanTheDestinationsFreeSpaceIsRefusedBeforeCopying) {
  TempDir tmp;
  const std::string src = tmp.sub("src"), dst = tmp.sub("dst");
  SaveSteps(Opts(src), {5});
  auto avail = LocalVolume()->AvailableBytes(dst);  // dst does not exist yet: its parent's
  ASSERT_TRUE(avail.ok()) << avail.status();
  ASSERT_TRUE(avail->has_value());
  ASSERT_GT(**avail, 0u);
  const uint64_t claim = **avail + (uint64_t{1} << 30);
  ASSERT_TRUE(EditManifest(src, 5, [&](Manifest& m) {
    m.block_size = kMaxBlockSize;
    m.shards[0].size = claim;
    m.shards[0].block_xxh3.assign((claim + kMaxBlockSize - 1) / kMaxBlockSize, 0);
  }));
  auto r = Replicate(LocalVolume(), src, LocalVolume(), dst, 5);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(Contains(r.status().message(), "needs " + std::to_string(claim) + " bytes"))
      << r.status();
  EXPECT_TRUE(Contains(r.status().message(), "nothing was copied")) << r.status();
  EXPECT_FALSE(std::filesystem::exists(TmpStepPath(dst, 5)));
  // An honest step of the same source still copies.
  SaveSteps(Opts(src), {6});
  auto ok = Replicate(LocalVolume(), src, LocalVolume(), dst, 6);
  ASSERT_TRUE(ok.ok()) << ok.status();
}

// A job can plant links in its own directory on the destination volume; the replicating agent
// must not write through them (before, the shard copy landed in the link's target, and
// LATEST.tmp truncated whatever file it pointed at).
TEST(UntrustedReplicateTest, LinksPlantedAtTheDestinationAreNotWrittenThrough) {
  TempDir tmp;
  const std::string src = tmp.sub("src"), dst = tmp.sub("dst"), outside = tmp.sub("outside");
  SaveSteps(Opts(src), {5});
  ASSERT_TRUE(std::filesystem::create_directories(outside));
  ASSERT_TRUE(std::filesystem::create_directories(dst));
  { std::ofstream(outside + "/precious") << "keep me"; }
  std::filesystem::create_directory_symlink(outside, TmpStepPath(dst, 5));
  std::filesystem::create_symlink(outside + "/precious", dst + "/LATEST.tmp");
  auto r = Replicate(LocalVolume(), src, LocalVolume(), dst, 5);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(std::filesystem::exists(outside + "/" + ShardFileName(0)));
  EXPECT_EQ(ReadAll(outside + "/precious"), "keep me");
  EXPECT_TRUE(std::filesystem::exists(outside)) << "the link's target was removed";
  EXPECT_EQ(*ReadLatest(LocalVolume(), dst), 5);
  EXPECT_EQ(VerifyStep(LocalVolume(), dst, 5), Status::Ok());
}

// --- Validation of what a MANIFEST claims -------------------------------------------------------

TEST(UntrustedManifestTest, OverlappingSlicesThatLeaveAGapFailVerifyAndRestore) {
  TempDir tmp;
  const std::string dir = tmp.path();
  SaveSteps(Opts(dir), {7});
  // Two slices of rows [0, 32): the element count is right (2 x 2048 = 4096), rows [32, 64) are
  // stored nowhere. Before, verify said ok and restore returned uninitialized rows.
  ASSERT_TRUE(EditManifest(dir, 7, [](Manifest& m) {
    StoredSlice a = m.tensors[0].slices[0];
    a.lengths = {kSide / 2, kSide};
    a.byte_length /= 2;
    StoredSlice b = a;
    b.byte_offset = a.byte_length;
    m.tensors[0].slices = {a, b};
  }));
  Status v = VerifyStep(LocalVolume(), dir, 7);
  EXPECT_EQ(v.code(), StatusCode::kDataLoss) << v;
  EXPECT_TRUE(Contains(v.message(), "'layer.weight'")) << v;
  EXPECT_TRUE(Contains(v.message(), "overlap")) << v;

  auto ck = *Checkpointer::Create(Opts(dir));
  std::vector<float> got(kSide * kSide, -1.0f);
  Status r = ck->Restore(7, {RestoreRequest::Whole("layer.weight", DType::kF32, got.data())});
  EXPECT_EQ(r.code(), StatusCode::kDataLoss) << r;
  EXPECT_TRUE(Contains(r.message(), "'layer.weight'")) << r;
  EXPECT_EQ(LatestCommittedStep(LocalVolume(), dir).status().code(), StatusCode::kNotFound);
}

TEST(UntrustedManifestTest, RestoreOfAByteRangeThatWrapsAroundIsRefused) {
  TempDir tmp;
  const std::string dir = tmp.path();
  SaveSteps(Opts(dir), {3});
  // byte_offset + byte_length wraps to 12 KiB, inside the 16 KiB shard. Before, the manifest
  // passed and Restore planned no reads at all: it returned OK with the destination untouched.
  ASSERT_TRUE(EditManifest(dir, 3, [](Manifest& m) {
    m.tensors[0].slices[0].byte_offset = ~uint64_t{0} - 4095;  // 2^64 - 4096
  }));
  auto ck = *Checkpointer::Create(Opts(dir));
  std::vector<float> got(kSide * kSide, -1.0f);
  Status r = ck->Restore(3, {RestoreRequest::Whole("layer.weight", DType::kF32, got.data())});
  EXPECT_EQ(r.code(), StatusCode::kDataLoss) << r;
  EXPECT_TRUE(Contains(r.message(), "'layer.weight'")) << r;
  EXPECT_TRUE(Contains(r.message(), "byte range")) << r;
  for (float f : got) ASSERT_EQ(f, -1.0f);
}

// A whole-tensor restore takes its size from the stored tensor. With the destination's
// capacity, a stored tensor of another size (a hostile MANIFEST, or a model whose shape changed
// since the checkpoint) is refused before one byte is written past, or short of, the buffer.
TEST(UntrustedManifestTest, AWholeRestoreIntoASmallerBufferIsRefusedNamingBothSizes) {
  TempDir tmp;
  const std::string dir = tmp.path();
  {
    auto ck = *Checkpointer::Create(Opts(dir));
    std::vector<float> w(2 * kSide * kSide, 1.5f);  // twice the rows the restorer expects
    SaveState st;
    st.tensors.push_back(
        TensorRef::Replicated("layer.weight", DType::kF32, {2 * kSide, kSide}, w.data()));
    ASSERT_EQ(ck->Save(5, st), Status::Ok());
    ASSERT_EQ(ck->Wait(), Status::Ok());
  }
  auto ck = *Checkpointer::Create(Opts(dir));
  // Room for the stored tensor so that an unchecked restore cannot crash this test; the
  // request says it holds half of it.
  std::vector<float> got(2 * kSide * kSide, -1.0f);
  const uint64_t capacity = kSide * kSide * sizeof(float);
  Status r =
      ck->Restore(5, {RestoreRequest::Whole("layer.weight", DType::kF32, got.data(), capacity)});
  EXPECT_EQ(r.code(), StatusCode::kInvalidArgument) << r;
  EXPECT_TRUE(Contains(r.message(), "'layer.weight' holds 32768 bytes, the destination 16384"))
      << r;
  for (float f : got) ASSERT_EQ(f, -1.0f);
  // A buffer of the stored size restores; so does a box inside a larger capacity.
  EXPECT_EQ(ck->Restore(
                5, {RestoreRequest::Whole("layer.weight", DType::kF32, got.data(), 2 * capacity)}),
            Status::Ok());
  EXPECT_EQ(got[0], 1.5f);
  auto box = RestoreRequest::RowShard("layer.weight", DType::kF32, {2 * kSide, kSide}, 0, kSide,
                                      got.data());
  box.capacity = capacity - 1;
  EXPECT_EQ(ck->Restore(5, {box}).code(), StatusCode::kInvalidArgument);
  box.capacity = 2 * capacity;
  EXPECT_EQ(ck->Restore(5, {box}), Status::Ok());
}

TEST(UntrustedManifestTest, ValuesOutOfRangeAreDataLossNamingTheField) {
  TempDir tmp;
  const std::string dir = tmp.path();
  SaveSteps(Opts(dir), {1});
  const std::string good = ReadAll(StepPath(dir, 1) + "/" + kManifestName);
  ASSERT_TRUE(ParseManifest(good).ok());
  struct Case {
    const char* what;
    std::function<void(Manifest&)> edit;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"block_size 0", [](Manifest& m) { m.block_size = 0; }, "block_size"},
      {"world size 0", [](Manifest& m) { m.world_size = 0; }, "world_size"},
      {"rank outside the world", [](Manifest& m) { m.shards[0].rank = 3; }, "rank 3"},
      {"shard size near 2^64", [](Manifest& m) { m.shards[0].size = ~uint64_t{0} - 10; }, "size"},
      {"shape overflows",
       [](Manifest& m) {
         m.tensors[0].shape = {INT64_MAX / 2, 4};
       },
       "overflows"},
      {"slice end overflows",
       [](Manifest& m) {
         m.tensors[0].slices[0].offsets = {INT64_MAX, 0};
       },
       "out of bounds"},
      {"a gap",
       [](Manifest& m) {
         m.tensors[0].slices[0].lengths = {kSide / 2, kSide};
         m.tensors[0].slices[0].byte_length /= 2;
       },
       "cover 2048 of its 4096"},
      {"tensor twice", [](Manifest& m) { m.tensors.push_back(m.tensors[0]); }, "listed twice"},
      {"shard file twice", [](Manifest& m) { m.shards.push_back(m.shards[0]); }, "named twice"},
  };
  for (const auto& c : cases) {
    auto m = *ParseManifest(good);
    c.edit(m);
    auto got = ParseManifest(SerializeManifest(m));
    ASSERT_FALSE(got.ok()) << c.what;
    EXPECT_EQ(got.status().code(), StatusCode::kDataLoss) << c.what << ": " << got.status();
    EXPECT_TRUE(Contains(got.status().message(), c.expect)) << c.what << ": " << got.status();
  }
  // Integers nlohmann would cast silently: a negative size, a world size past 2^32.
  std::string body = good.substr(0, good.rfind("\nxxh3:"));
  auto with = [&](const std::string& from, const std::string& to) {
    std::string b = body;
    size_t at = b.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) b.replace(at, from.size(), to);
    return b + "\nxxh3:" + HexU64(Xxh3(b.data(), b.size())) + "\n";
  };
  EXPECT_EQ(ParseManifest(with("\"world_size\": 1", "\"world_size\": 4294967297")).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(ParseManifest(with("\"block_size\": 4096", "\"block_size\": -4096")).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(ParseManifest(with("\"step\": 1", "\"step\": 1e300")).status().code(),
            StatusCode::kDataLoss);
}

TEST(UntrustedManifestTest, ShardedLayoutsStillValidate) {
  // Row, column and grid shardings with zero-size pieces: exact covers that must pass.
  auto make = [](std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> boxes) {
    Manifest m;
    m.block_size = 4096;
    m.world_size = 1;
    uint64_t off = 0;
    TensorEntry t{"t", DType::kU8, {6, 8}, false, {}};
    for (auto& [o, l] : boxes) {
      uint64_t n = static_cast<uint64_t>(NumElements(l));
      t.slices.push_back({0, o, l, off, n});
      off += n;
    }
    m.shards.push_back({0, "shard-00000.bin", off, {0}, ""});
    m.tensors.push_back(t);
    return m;
  };
  EXPECT_EQ(ValidateManifest(make({{{0, 0}, {3, 8}}, {{3, 0}, {3, 8}}, {{6, 0}, {0, 8}}})),
            Status::Ok());
  EXPECT_EQ(ValidateManifest(make({{{0, 0}, {6, 4}}, {{0, 4}, {6, 4}}})), Status::Ok());
  EXPECT_EQ(ValidateManifest(
                make({{{0, 0}, {3, 4}}, {{0, 4}, {3, 4}}, {{3, 0}, {3, 4}}, {{3, 4}, {3, 4}}})),
            Status::Ok());
  // The same grid with one cell moved onto its neighbour: right count, overlap.
  Status bad = ValidateManifest(
      make({{{0, 0}, {3, 4}}, {{0, 4}, {3, 4}}, {{3, 0}, {3, 4}}, {{2, 4}, {3, 4}}}));
  EXPECT_EQ(bad.code(), StatusCode::kDataLoss) << bad;
  EXPECT_TRUE(Contains(bad.message(), "overlap")) << bad;
}

// --- LATEST -------------------------------------------------------------------------------------

// A source directory named checkpoint-N gives the step N; an N past int64 is a clear error (it
// was an uncaught std::out_of_range that took `muster ckpt adopt` down).
TEST(UntrustedAdoptTest, AStepNameTooLargeForInt64IsRefused) {
  TempDir tmp;
  for (const std::string name : {"checkpoint-42", "checkpoint-99999999999999999999"}) {
    std::filesystem::create_directories(tmp.sub(name));
    std::ofstream(tmp.sub(name + "/trainer_state.json")) << "{}";
    // An empty zip archive (its end-of-central-directory record alone): whole weights.
    std::ofstream(tmp.sub(name + "/pytorch_model.bin"), std::ios::binary)
        << std::string("PK\x05\x06", 4) << std::string(18, '\0');
  }
  auto ok = CheckAdoptable(tmp.sub("checkpoint-42"));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->step, 42);
  auto big = CheckAdoptable(tmp.sub("checkpoint-99999999999999999999"));
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument) << big.status();
  EXPECT_NE(big.status().message().find("checkpoint-99999999999999999999"), std::string::npos)
      << big.status();
}

TEST(UntrustedLatestTest, ParseLatestAcceptsOnlyACommittedStepName) {
  EXPECT_EQ(*ParseLatest("step-000000300\n"), 300);
  EXPECT_EQ(*ParseLatest("step-7"), 7);
  EXPECT_FALSE(ParseLatest("").ok());
  EXPECT_FALSE(ParseLatest("step-000000300.tmp\n").ok());
  EXPECT_FALSE(ParseLatest("300\n").ok());
  EXPECT_FALSE(ParseLatest("step-99999999999999999999").ok());
  EXPECT_FALSE(ParseLatest(std::string(5000, ' ')).ok());
}

TEST(UntrustedLatestTest, AFifoLatestDoesNotHangASave) {
  TempDir tmp;
  const std::string dir = tmp.path();
  SaveSteps(Opts(dir), {1});
  const std::string latest = dir + "/" + kLatestName;
  ASSERT_EQ(::unlink(latest.c_str()), 0);
  ASSERT_EQ(::mkfifo(latest.c_str(), 0644), 0) << std::strerror(errno);
  EXPECT_EQ(ReadLatest(LocalVolume(), dir).status().code(), StatusCode::kFailedPrecondition);
  // Before, UpdateLatest opened the FIFO to read it and waited for a writer forever.
  SaveSteps(Opts(dir), {2});
  EXPECT_EQ(*ReadLatest(LocalVolume(), dir), 2);
}

// --- Retention counts only good steps ----------------------------------------------------------

// Loses shard-00000.bin of `lose_step` right as its directory is renamed into place: the
// commit succeeds, and the step is not restorable.
class LosingVolume final : public Volume {
 public:
  explicit LosingVolume(int64_t lose_step) : lose_(StepDirName(lose_step)) {}
  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& p, bool d) override {
    return LocalVolume()->NewWritableFile(p, d);
  }
  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& p, bool d) override {
    return LocalVolume()->NewReadableFile(p, d);
  }
  Status CreateDirs(const std::string& p) override { return LocalVolume()->CreateDirs(p); }
  Status SyncDir(const std::string& p) override { return LocalVolume()->SyncDir(p); }
  Status Rename(const std::string& a, const std::string& b) override {
    MUSTER_RETURN_IF_ERROR(LocalVolume()->Rename(a, b));
    if (b.size() >= lose_.size() && b.compare(b.size() - lose_.size(), lose_.size(), lose_) == 0) {
      return LocalVolume()->DeleteFile(JoinPath(b, ShardFileName(0)));
    }
    return Status::Ok();
  }
  StatusOr<std::vector<std::string>> ListDir(const std::string& p) override {
    return LocalVolume()->ListDir(p);
  }
  bool Exists(const std::string& p) override { return LocalVolume()->Exists(p); }
  StatusOr<uint64_t> FileSize(const std::string& p) override { return LocalVolume()->FileSize(p); }
  StatusOr<double> AgeSeconds(const std::string& p) override {
    return LocalVolume()->AgeSeconds(p);
  }
  Status DeleteFile(const std::string& p) override { return LocalVolume()->DeleteFile(p); }
  Status RemoveAll(const std::string& p) override { return LocalVolume()->RemoveAll(p); }

 private:
  std::string lose_;
};

TEST(UntrustedRetentionTest, CheckpointerRetentionKeepsTheNewestGoodStep) {
  TempDir tmp;
  const std::string dir = tmp.path();
  LosingVolume v(/*lose_step=*/2);
  CheckpointerOptions o = Opts(dir, &v);
  o.retention = {.keep_last = 1, .keep_every = 0};
  SaveSteps(o, {1, 2});
  // Step 2 lost a shard: step 1 is the newest good step and must survive keep_last = 1.
  EXPECT_TRUE(LocalVolume()->Exists(StepPath(dir, 1)));
  EXPECT_EQ(VerifyStep(LocalVolume(), dir, 1), Status::Ok());
  EXPECT_TRUE(LocalVolume()->Exists(StepPath(dir, 2))) << "a damaged step is left for a human";
  auto ck = *Checkpointer::Create(Opts(dir));
  EXPECT_EQ(*ck->LatestStep(), 1);
  // A later good step makes step 1 the one to go.
  SaveSteps(o, {3});
  EXPECT_FALSE(LocalVolume()->Exists(StepPath(dir, 1)));
  EXPECT_EQ(*ck->LatestStep(), 3);
}

TEST(UntrustedRetentionTest, GcCountsOnlyStepsWhoseShardsArePresentWithTheirSizes) {
  TempDir tmp;
  const std::string dir = tmp.path();
  SaveSteps(Opts(dir), {10, 20, 30});
  ASSERT_EQ(::truncate(ShardPath(dir, 30).c_str(), 4096), 0);  // short
  ASSERT_EQ(::unlink(ShardPath(dir, 20).c_str()), 0);          // missing
  auto gc = CollectGarbage(LocalVolume(), dir, {.keep_last = 1}, INT64_MAX);
  ASSERT_TRUE(gc.ok()) << gc.status();
  EXPECT_TRUE(gc->removed_committed.empty());
  ASSERT_EQ(gc->damaged.size(), 2u);
  EXPECT_EQ(VerifyStep(LocalVolume(), dir, 10), Status::Ok());
  EXPECT_EQ(*LatestCommittedStep(LocalVolume(), dir), 10);
}

}  // namespace
}  // namespace muster::checkpoint
