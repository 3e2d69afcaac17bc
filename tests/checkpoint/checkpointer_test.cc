// Checkpointer: save/restore, async snapshot, multi-rank commit, resharding, corruption,
// faults, retention and replication. Ranks run as threads over an in-memory store.

#include "checkpoint/checkpointer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/fault_injection_volume.h"
#include "checkpoint/replicate.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

using testing::Fill;
using testing::TempDir;

constexpr int64_t kRows = 37;  // not divisible by 2, 3, 4 or 8
constexpr int64_t kCols = 129;
constexpr int64_t kBias = 1000;

// Splits `n` rows across `world` ranks as evenly as possible.
std::pair<int64_t, int64_t> RowRange(int64_t n, int world, int rank) {
  int64_t base = n / world, extra = n % world;
  int64_t start = rank * base + std::min<int64_t>(rank, extra);
  return {start, base + (rank < extra ? 1 : 0)};
}

// Rank `rank`'s state at `step`: rows of "w" (u32 stored as i32), a replicated "bias", and a
// 3-D "emb" sharded on dimension 0.
struct RankState {
  std::vector<uint32_t> w, bias, emb;
  SaveState state;
};

RankState MakeState(int64_t step, int world, int rank) {
  RankState s;
  auto [r0, rn] = RowRange(kRows, world, rank);
  s.w = Fill(step, 1, r0 * kCols, rn * kCols);
  s.bias = Fill(step, 2, 0, kBias);
  auto [e0, en] = RowRange(8, world, rank);
  s.emb = Fill(step, 3, e0 * 5 * 3, en * 5 * 3);
  s.state.tensors.push_back(
      TensorRef::RowShard("w", DType::kI32, {kRows, kCols}, r0, rn, s.w.data()));
  s.state.tensors.push_back(TensorRef::Replicated("bias", DType::kI32, {kBias}, s.bias.data()));
  s.state.tensors.push_back(
      TensorRef::RowShard("emb", DType::kI32, {8, 5, 3}, e0, en, s.emb.data()));
  s.state.metadata = "rank=" + std::to_string(rank) + ";step=" + std::to_string(step);
  return s;
}

CheckpointerOptions Opts(const std::string& dir, int world, int rank,
                         collectives::RendezvousStore* store, Volume* v = nullptr) {
  CheckpointerOptions o;
  o.dir = dir;
  o.world_size = world;
  o.rank = rank;
  o.store = store;
  o.volume = v;
  o.block_size = 4096;
  o.write_chunk = 8192;  // many chunks, so the parallel writers all take part
  o.commit_timeout = std::chrono::seconds(20);
  return o;
}

// Saves `steps` with `world` ranks as threads; returns each rank's last Wait() status.
std::vector<Status> SaveWorld(const std::string& dir, int world, std::vector<int64_t> steps,
                              std::vector<Volume*> volumes = {}) {
  auto store = collectives::NewInMemoryRendezvousStore();
  std::vector<Status> out(world);
  std::vector<std::thread> ts;
  for (int r = 0; r < world; ++r) {
    ts.emplace_back([&, r] {
      Volume* v = volumes.empty() ? nullptr : volumes[r];
      auto ck = Checkpointer::Create(Opts(dir, world, r, store.get(), v));
      if (!ck.ok()) {
        out[r] = ck.status();
        return;
      }
      for (int64_t step : steps) {
        RankState s = MakeState(step, world, r);
        Status st = (*ck)->Save(step, s.state);
        if (!st.ok()) {
          out[r] = st;
          return;
        }
        out[r] = (*ck)->Wait();
      }
    });
  }
  for (auto& t : ts) t.join();
  return out;
}

// Restores `step` with `world` ranks and checks every element of every tensor.
void ExpectRestoresExactly(const std::string& dir, int64_t step, int world, Volume* v = nullptr) {
  for (int r = 0; r < world; ++r) {
    SCOPED_TRACE("restore world " + std::to_string(world) + " rank " + std::to_string(r));
    auto ck = Checkpointer::Create(Opts(dir, 1, 0, nullptr, v));
    ASSERT_TRUE(ck.ok()) << ck.status();
    RankState want = MakeState(step, world, r);
    auto [r0, rn] = RowRange(kRows, world, r);
    auto [e0, en] = RowRange(8, world, r);
    std::vector<uint32_t> w(want.w.size(), 0), bias(kBias, 0), emb(want.emb.size(), 0);
    ASSERT_EQ(
        (*ck)->Restore(
            step, {RestoreRequest::RowShard("w", DType::kI32, {kRows, kCols}, r0, rn, w.data()),
                   RestoreRequest::Whole("bias", DType::kI32, bias.data()),
                   RestoreRequest::RowShard("emb", DType::kI32, {8, 5, 3}, e0, en, emb.data())}),
        Status::Ok());
    EXPECT_EQ(w, want.w);
    EXPECT_EQ(bias, want.bias);
    EXPECT_EQ(emb, want.emb);
  }
}

TEST(CheckpointerTest, SingleRankSaveCommitsAndRestores) {
  TempDir dir;
  ASSERT_EQ(SaveWorld(dir.path(), 1, {10})[0], Status::Ok());
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr));
  EXPECT_EQ(*ck->LatestStep(), 10);
  std::ifstream latest(dir.sub("LATEST"));
  std::string line;
  std::getline(latest, line);
  EXPECT_EQ(line, "step-000000010");
  EXPECT_TRUE(std::filesystem::exists(dir.sub("step-000000010/MANIFEST")));
  EXPECT_FALSE(std::filesystem::exists(dir.sub("step-000000010.tmp")));
  auto m = ck->ReadManifest(10);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->UserMetadata(), "rank=0;step=10");
  EXPECT_EQ(m->Find("w")->shape, (std::vector<int64_t>{kRows, kCols}));
  EXPECT_EQ(VerifyStep(LocalVolume(), dir.path(), 10), Status::Ok());
  ExpectRestoresExactly(dir.path(), 10, 1);
}

TEST(CheckpointerTest, SaveReturnsAfterSnapshotAndLaterChangesDoNotLeakIn) {
  TempDir dir;
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr));
  RankState s = MakeState(1, 1, 0);
  ASSERT_EQ(ck->Save(1, s.state), Status::Ok());
  // The training loop goes on mutating its tensors while the save is written.
  std::fill(s.w.begin(), s.w.end(), 0xdeadbeef);
  std::fill(s.bias.begin(), s.bias.end(), 7);
  RankState s2 = MakeState(2, 1, 0);
  ASSERT_EQ(ck->Save(2, s2.state), Status::Ok());  // waits for step 1 first
  ASSERT_EQ(ck->Wait(), Status::Ok());
  EXPECT_EQ(*ck->LatestStep(), 2);
  ExpectRestoresExactly(dir.path(), 1, 1);
  ExpectRestoresExactly(dir.path(), 2, 1);
}

TEST(CheckpointerTest, WithOverlapTheSnapshotIsAlsoTakenBeforeSaveReturns) {
  TempDir dir;
  auto o = Opts(dir.path(), 1, 0, nullptr);
  o.overlap_snapshot = true;
  auto ck = *Checkpointer::Create(o);
  RankState s = MakeState(1, 1, 0);
  ASSERT_EQ(ck->Save(1, s.state), Status::Ok());
  std::fill(s.w.begin(), s.w.end(), 0xdeadbeef);
  ASSERT_EQ(ck->Wait(), Status::Ok());
  ExpectRestoresExactly(dir.path(), 1, 1);
}

TEST(CheckpointerTest, FailedSnapshotFailsTheSaveAndCommitsNothing) {
  // A "device" pointer that is host memory: the device-to-host copy fails where there is no
  // GPU (without CUDA support the save is refused outright). With a GPU, UVA would accept it.
  TempDir dir;
  auto o = Opts(dir.path(), 1, 0, nullptr);
  o.overlap_snapshot = true;  // the writer is running when the snapshot fails
  auto ck = *Checkpointer::Create(o);
  RankState s = MakeState(1, 1, 0);
  std::vector<uint32_t> fake(1024);
  s.state.tensors.push_back(
      TensorRef::Replicated("dev", DType::kI32, {1024}, fake.data(), MemoryKind::kCuda));
  Status st = ck->Save(1, s.state);
  if (st.ok()) GTEST_SKIP() << "this machine has a GPU that accepted the pointer";
  if (CudaBuiltIn()) {
    EXPECT_FALSE(ck->Wait().ok());  // the writer had started: it fails too
  }
  EXPECT_EQ(LatestCommittedStep(LocalVolume(), dir.path()).status().code(), StatusCode::kNotFound);
  // The checkpointer is usable afterwards.
  RankState ok = MakeState(2, 1, 0);
  ASSERT_EQ(ck->Save(2, ok.state), Status::Ok());
  ASSERT_EQ(ck->Wait(), Status::Ok());
  ExpectRestoresExactly(dir.path(), 2, 1);
}

TEST(CheckpointerTest, WorldOfFourRestoresAtOneTwoThreeAndEight) {
  TempDir dir;
  for (const Status& st : SaveWorld(dir.path(), 4, {100})) ASSERT_EQ(st, Status::Ok());
  auto m = *LoadManifest(LocalVolume(), dir.path(), 100);
  EXPECT_EQ(m.world_size, 4);
  EXPECT_EQ(m.shards.size(), 4u);
  EXPECT_EQ(m.Find("bias")->slices.size(), 1u);  // replicated: stored once
  EXPECT_EQ(m.Find("w")->slices.size(), 4u);
  EXPECT_EQ(m.shards[2].metadata, "rank=2;step=100");
  for (int world : {1, 2, 3, 8}) ExpectRestoresExactly(dir.path(), 100, world);
}

TEST(CheckpointerTest, ColumnSliceRestoreCutsAcrossShards) {
  TempDir dir;
  for (const Status& st : SaveWorld(dir.path(), 4, {3})) ASSERT_EQ(st, Status::Ok());
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr));
  RestoreRequest r;
  r.name = "w";
  r.dtype = DType::kI32;
  r.offsets = {5, 10};
  r.lengths = {30, 17};
  std::vector<uint32_t> got(30 * 17);
  r.data = got.data();
  ASSERT_EQ(ck->Restore(3, {r}), Status::Ok());
  for (int64_t i = 0; i < 30; ++i)
    for (int64_t j = 0; j < 17; ++j)
      ASSERT_EQ(got[i * 17 + j], testing::Value(3, 1, (5 + i) * kCols + 10 + j));
}

// Counts the bytes read through it.
class CountingVolume final : public Volume {
 public:
  class File final : public ReadableFile {
   public:
    File(std::unique_ptr<ReadableFile> f, std::atomic<uint64_t>* n) : f_(std::move(f)), n_(n) {}
    StatusOr<size_t> ReadAt(uint64_t off, void* dst, size_t n) override {
      auto r = f_->ReadAt(off, dst, n);
      if (r.ok()) *n_ += *r;
      return r;
    }
    StatusOr<uint64_t> Size() override { return f_->Size(); }
    bool direct() const override { return f_->direct(); }

   private:
    std::unique_ptr<ReadableFile> f_;
    std::atomic<uint64_t>* n_;
  };
  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& p, bool d) override {
    return LocalVolume()->NewWritableFile(p, d);
  }
  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& p,
                                                          bool direct) override {
    MUSTER_ASSIGN_OR_RETURN(auto f, LocalVolume()->NewReadableFile(p, direct));
    if (p.find("shard-") == std::string::npos) return f;
    return std::unique_ptr<ReadableFile>(new File(std::move(f), &shard_bytes));
  }
  Status CreateDirs(const std::string& p) override { return LocalVolume()->CreateDirs(p); }
  Status SyncDir(const std::string& p) override { return LocalVolume()->SyncDir(p); }
  Status Rename(const std::string& a, const std::string& b) override {
    return LocalVolume()->Rename(a, b);
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
  std::atomic<uint64_t> shard_bytes{0};
};

TEST(CheckpointerTest, ReshardedRestoreReadsOnlyOverlappingBlocks) {
  TempDir dir;
  // Big enough that a whole-shard read would stand out: 1024 x 1024 i32 = 4 MiB.
  const int64_t rows = 1024, cols = 1024;
  {
    auto store = collectives::NewInMemoryRendezvousStore();
    std::vector<std::thread> ts;
    for (int r = 0; r < 4; ++r) {
      ts.emplace_back([&, r] {
        auto ck = *Checkpointer::Create(Opts(dir.path(), 4, r, store.get()));
        auto data = Fill(1, 9, r * 256 * cols, 256 * cols);
        SaveState s;
        s.tensors.push_back(
            TensorRef::RowShard("big", DType::kI32, {rows, cols}, r * 256, 256, data.data()));
        ASSERT_EQ(ck->Save(1, s), Status::Ok());
        ASSERT_EQ(ck->Wait(), Status::Ok());
      });
    }
    for (auto& t : ts) t.join();
  }
  CountingVolume counting;
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, &counting));
  // World size 8, rank 3: rows [384, 512), half of rank 1's shard.
  std::vector<uint32_t> got(128 * cols);
  ASSERT_EQ(ck->Restore(1, {RestoreRequest::RowShard("big", DType::kI32, {rows, cols}, 384, 128,
                                                     got.data())}),
            Status::Ok());
  EXPECT_EQ(got, Fill(1, 9, 384 * cols, 128 * cols));
  const uint64_t needed = 128 * cols * 4;
  EXPECT_GE(counting.shard_bytes.load(), needed);
  EXPECT_LE(counting.shard_bytes.load(), needed + 2 * 4096);  // at most the edge blocks
}

TEST(CheckpointerTest, FlippedByteIsCaughtByVerifyAndRestore) {
  TempDir dir;
  for (const Status& st : SaveWorld(dir.path(), 2, {5})) ASSERT_EQ(st, Status::Ok());
  // Flip one byte inside rank 1's slice of "w" (the first piece of its shard).
  {
    std::fstream f(dir.sub("step-000000005/shard-00001.bin"),
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(100);
    char c;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(100);
    f.write(&c, 1);
  }
  Status v = VerifyStep(LocalVolume(), dir.path(), 5);
  EXPECT_EQ(v.code(), StatusCode::kDataLoss);
  EXPECT_NE(v.message().find("step 5"), std::string::npos) << v;
  EXPECT_NE(v.message().find("'w'"), std::string::npos) << v;

  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr));
  std::vector<uint32_t> w(kRows * kCols);
  Status r = ck->Restore(5, {RestoreRequest::Whole("w", DType::kI32, w.data())});
  EXPECT_EQ(r.code(), StatusCode::kDataLoss);
  EXPECT_NE(r.message().find("step 5"), std::string::npos) << r;
  EXPECT_NE(r.message().find("'w'"), std::string::npos) << r;
  // A tensor in untouched blocks still restores.
  std::vector<uint32_t> bias(kBias);
  EXPECT_EQ(ck->Restore(5, {RestoreRequest::Whole("bias", DType::kI32, bias.data())}),
            Status::Ok());
}

TEST(CheckpointerTest, EditedManifestIsNotACheckpoint) {
  TempDir dir;
  ASSERT_EQ(SaveWorld(dir.path(), 1, {1, 2})[0], Status::Ok());
  {
    std::fstream f(dir.sub("step-000000002/MANIFEST"),
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(20);
    f.write("X", 1);
  }
  EXPECT_EQ(LoadManifest(LocalVolume(), dir.path(), 2).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(*LatestCommittedStep(LocalVolume(), dir.path()), 1);
}

TEST(CheckpointerTest, BadInputsGetClearErrors) {
  TempDir dir;
  EXPECT_EQ(Checkpointer::Create(Opts(dir.path(), 2, 0, nullptr)).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(Checkpointer::Create(Opts(dir.path(), 2, 2, nullptr)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(Checkpointer::Create(Opts("", 1, 0, nullptr)).status().code(),
            StatusCode::kInvalidArgument);
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr));
  std::vector<uint32_t> buf(16);
  SaveState dup;
  dup.tensors.push_back(TensorRef::Replicated("a", DType::kI32, {16}, buf.data()));
  dup.tensors.push_back(TensorRef::Replicated("a", DType::kI32, {16}, buf.data()));
  EXPECT_EQ(ck->Save(1, dup).code(), StatusCode::kInvalidArgument);
  SaveState oob;
  oob.tensors.push_back(TensorRef::RowShard("a", DType::kI32, {16}, 10, 8, buf.data()));
  EXPECT_EQ(ck->Save(1, oob).code(), StatusCode::kInvalidArgument);
  SaveState null;
  null.tensors.push_back(TensorRef::Replicated("a", DType::kI32, {16}, nullptr));
  EXPECT_EQ(ck->Save(1, null).code(), StatusCode::kInvalidArgument);
  SaveState ok;
  ok.tensors.push_back(TensorRef::Replicated("a", DType::kI32, {16}, buf.data()));
  ASSERT_EQ(ck->Save(1, ok), Status::Ok());
  ASSERT_EQ(ck->Wait(), Status::Ok());
  // A committed step is never rewritten.
  ASSERT_EQ(ck->Save(1, ok), Status::Ok());
  EXPECT_EQ(ck->Wait().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ck->Restore(1, {RestoreRequest::Whole("nope", DType::kI32, buf.data())}).code(),
            StatusCode::kNotFound);
  EXPECT_EQ(ck->Restore(1, {RestoreRequest::Whole("a", DType::kF64, buf.data())}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ck->Restore(7, {RestoreRequest::Whole("a", DType::kI32, buf.data())}).code(),
            StatusCode::kNotFound);
}

TEST(CheckpointerTest, MismatchedShardingAcrossRanksIsNotCommitted) {
  TempDir dir;
  auto store = collectives::NewInMemoryRendezvousStore();
  std::vector<Status> st(2);
  std::vector<std::thread> ts;
  for (int r = 0; r < 2; ++r) {
    ts.emplace_back([&, r] {
      auto ck = *Checkpointer::Create(Opts(dir.path(), 2, r, store.get()));
      std::vector<uint32_t> buf(8);
      SaveState s;  // both ranks claim rows [0, 8): rows [8, 16) would be missing
      s.tensors.push_back(TensorRef::RowShard("t", DType::kI32, {16}, 0, 8, buf.data()));
      st[r] = ck->Save(1, s);
      if (st[r].ok()) st[r] = ck->Wait();
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_FALSE(st[0].ok());
  EXPECT_FALSE(st[1].ok());
  EXPECT_EQ(LatestCommittedStep(LocalVolume(), dir.path()).status().code(), StatusCode::kNotFound);
}

TEST(CheckpointerTest, FromEnvReadsTheEnvContract) {
  TempDir dir;
  ::setenv("MUSTER_CHECKPOINT_DIR", dir.path().c_str(), 1);
  ::setenv("RANK", "1", 1);
  ::setenv("WORLD_SIZE", "3", 1);
  auto store = collectives::NewInMemoryRendezvousStore();
  auto ck = Checkpointer::FromEnv(store.get());
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_EQ((*ck)->options().rank, 1);
  EXPECT_EQ((*ck)->options().world_size, 3);
  EXPECT_EQ(Checkpointer::FromEnv(nullptr).status().code(), StatusCode::kFailedPrecondition);
  ::setenv("RANK", "x", 1);
  EXPECT_EQ(Checkpointer::FromEnv(store.get()).status().code(), StatusCode::kInvalidArgument);
  ::unsetenv("MUSTER_CHECKPOINT_DIR");
  ::unsetenv("RANK");
  ::unsetenv("WORLD_SIZE");
  EXPECT_EQ(Checkpointer::FromEnv(store.get()).status().code(), StatusCode::kFailedPrecondition);
}

TEST(CheckpointerTest, RetentionKeepsLastKAndEveryMth) {
  TempDir dir;
  auto o = Opts(dir.path(), 1, 0, nullptr);
  o.retention = {.keep_last = 2, .keep_every = 4};
  auto ck = *Checkpointer::Create(o);
  for (int64_t step = 1; step <= 9; ++step) {
    RankState s = MakeState(step, 1, 0);
    ASSERT_EQ(ck->Save(step, s.state), Status::Ok());
  }
  ASSERT_EQ(ck->Wait(), Status::Ok());
  auto steps = *ListSteps(LocalVolume(), dir.path());
  std::vector<int64_t> left;
  for (const auto& s : steps) left.push_back(s.step);
  EXPECT_EQ(left, (std::vector<int64_t>{4, 8, 9}));
  // Explicit gc with K=1 removes all but the newest (and never it).
  auto rep =
      *CollectGarbage(LocalVolume(), dir.path(), {.keep_last = 1, .keep_every = 0}, INT64_MAX);
  EXPECT_EQ(rep.removed_committed, (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(*LatestCommittedStep(LocalVolume(), dir.path()), 9);
  EXPECT_EQ(CollectGarbage(LocalVolume(), dir.path(), {.keep_last = 0}, INT64_MAX).status().code(),
            StatusCode::kInvalidArgument);
}

// --- Faults --------------------------------------------------------------------------------

struct FaultCase {
  std::string name;
  Fault fault;
  bool save_fails;
  bool fails_after_rename = false;  // the step may be in place even though Save reported failure
};

class FaultTest : public ::testing::TestWithParam<FaultCase> {};

TEST_P(FaultTest, NoFaultEverCommitsACorruptCheckpoint) {
  const FaultCase& c = GetParam();
  TempDir dir;
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(SaveWorld(dir.path(), 2, {1}, {&vol, &vol})[0], Status::Ok());
  vol.SetFault(c.fault);
  std::vector<Status> st = SaveWorld(dir.path(), 2, {2}, {&vol, &vol});
  EXPECT_GE(vol.fired(), 1);
  if (c.save_fails) {
    EXPECT_FALSE(st[0].ok()) << "rank 0 should report the fault";
    EXPECT_FALSE(st[1].ok()) << "rank 1 should report the fault";
  } else {
    EXPECT_EQ(st[0], Status::Ok());
  }
  vol.Reset();
  // Whatever LatestStep names verifies and restores bit-exactly.
  auto latest = LatestCommittedStep(LocalVolume(), dir.path());
  ASSERT_TRUE(latest.ok()) << latest.status();
  if (c.save_fails && !c.fails_after_rename) {
    EXPECT_EQ(*latest, 1);
  }
  EXPECT_EQ(VerifyStep(LocalVolume(), dir.path(), *latest), Status::Ok());
  ExpectRestoresExactly(dir.path(), *latest, 2);
  // gc removes the leftovers and the job carries on.
  ASSERT_TRUE(CollectGarbage(LocalVolume(), dir.path(), {.keep_last = 5}, INT64_MAX).ok());
  auto after_gc = *ListSteps(LocalVolume(), dir.path());
  for (const auto& s : after_gc) EXPECT_TRUE(s.committed) << s.path;
  for (const Status& s : SaveWorld(dir.path(), 2, {3}, {&vol, &vol})) EXPECT_EQ(s, Status::Ok());
  ExpectRestoresExactly(dir.path(), 3, 2);
}

INSTANTIATE_TEST_SUITE_P(
    Faults, FaultTest,
    ::testing::Values(
        FaultCase{"TornShardWrite", {FaultKind::kTornWrite, "shard-00001", 1}, true},
        FaultCase{"TornManifestWrite", {FaultKind::kTornWrite, "MANIFEST"}, true},
        FaultCase{"ShortWrites", {FaultKind::kShortWrite, "shard-", 0, true}, false},
        FaultCase{"NoSpace", {FaultKind::kNoSpace, "shard-00000", 2}, true},
        FaultCase{"WriteEio", {FaultKind::kIoError, "shard-00001"}, true},
        FaultCase{"ShardFsyncFails", {FaultKind::kSyncError, "shard-00001"}, true},
        FaultCase{"StepDirFsyncFails",
                  {FaultKind::kSyncError, ".tmp", 0, false, false, /*on_dir=*/true},
                  true},
        FaultCase{"ParentDirFsyncFails",
                  {FaultKind::kSyncError, "muster-ckpt", 1, false, false, /*on_dir=*/true},
                  true,
                  true},
        FaultCase{"RenameFails", {FaultKind::kRenameError, "step-"}, true},
        FaultCase{"LatestFsyncFails", {FaultKind::kSyncError, "LATEST"}, true, true},
        FaultCase{"LatestRenameFails", {FaultKind::kRenameError, "LATEST"}, true, true}),
    [](const auto& info) { return info.param.name; });

TEST(CheckpointerTest, ReadErrorDuringRestoreSurfaces) {
  TempDir dir;
  ASSERT_EQ(SaveWorld(dir.path(), 1, {1})[0], Status::Ok());
  FaultInjectionVolume vol(LocalVolume());
  vol.SetFault({FaultKind::kIoError, "shard-", 0, true, /*on_read=*/true});
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, &vol));
  std::vector<uint32_t> w(kRows * kCols);
  Status st = ck->Restore(1, {RestoreRequest::Whole("w", DType::kI32, w.data())});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("'w'"), std::string::npos) << st;
}

// --- Replication ---------------------------------------------------------------------------

TEST(ReplicateTest, CopiesVerifiesAndCommitsAtTheDestination) {
  TempDir src, dst;
  for (const Status& st : SaveWorld(src.path(), 4, {7})) ASSERT_EQ(st, Status::Ok());
  auto rep = Replicate(LocalVolume(), src.path(), LocalVolume(), dst.path(), 7);
  ASSERT_TRUE(rep.ok()) << rep.status();
  EXPECT_EQ(rep->shards_copied, 4);
  EXPECT_EQ(*LatestCommittedStep(LocalVolume(), dst.path()), 7);
  EXPECT_EQ(VerifyStep(LocalVolume(), dst.path(), 7), Status::Ok());
  ExpectRestoresExactly(dst.path(), 7, 3);
  auto again = Replicate(LocalVolume(), src.path(), LocalVolume(), dst.path(), 7);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->already_present);
}

TEST(ReplicateTest, ResumesAfterACrashAndNeverExposesAPartialCopy) {
  TempDir src, dst;
  for (const Status& st : SaveWorld(src.path(), 4, {7})) ASSERT_EQ(st, Status::Ok());
  FaultInjectionVolume vol(LocalVolume());
  vol.SetFault({FaultKind::kTornWrite, "shard-00002"});
  auto rep = Replicate(LocalVolume(), src.path(), &vol, dst.path(), 7);
  EXPECT_EQ(rep.status().code(), StatusCode::kAborted);
  vol.Reset();
  EXPECT_EQ(LatestCommittedStep(LocalVolume(), dst.path()).status().code(), StatusCode::kNotFound);
  rep = Replicate(LocalVolume(), src.path(), &vol, dst.path(), 7);
  ASSERT_TRUE(rep.ok()) << rep.status();
  EXPECT_EQ(rep->shards_resumed, 2);  // shards 0 and 1 were complete
  EXPECT_EQ(rep->shards_copied, 2);
  EXPECT_EQ(VerifyStep(LocalVolume(), dst.path(), 7), Status::Ok());
  ExpectRestoresExactly(dst.path(), 7, 4);
}

TEST(ReplicateTest, CorruptSourceIsNotReplicated) {
  TempDir src, dst;
  ASSERT_EQ(SaveWorld(src.path(), 1, {3})[0], Status::Ok());
  {
    std::fstream f(src.sub("step-000000003/shard-00000.bin"),
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8);
    f.write("\xff\xfe", 2);
  }
  auto rep = Replicate(LocalVolume(), src.path(), LocalVolume(), dst.path(), 3);
  EXPECT_EQ(rep.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(LatestCommittedStep(LocalVolume(), dst.path()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(Replicate(LocalVolume(), src.path(), LocalVolume(), dst.path(), 4).status().code(),
            StatusCode::kNotFound);
}

// --- Manifest and volumes ------------------------------------------------------------------

TEST(ManifestTest, RoundTripsAndRejectsDamage) {
  Manifest m;
  m.step = 42;
  m.world_size = 2;
  m.block_size = 4096;
  m.shards.push_back({0, "shard-00000.bin", 8192, {1, 2}, std::string("\0\x01md", 4)});
  m.tensors.push_back({"x", DType::kBF16, {2, 2048}, false, {{0, {0, 0}, {2, 2048}, 0, 8192}}});
  std::string bytes = SerializeManifest(m);
  auto back = ParseManifest(bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->step, 42);
  EXPECT_EQ(back->shards[0].metadata, std::string("\0\x01md", 4));
  EXPECT_EQ(back->tensors[0].dtype, DType::kBF16);
  EXPECT_EQ(ParseManifest(bytes.substr(0, bytes.size() / 2)).status().code(),
            StatusCode::kDataLoss);
  std::string edited = bytes;
  edited[bytes.find("42")] = '3';
  EXPECT_EQ(ParseManifest(edited).status().code(), StatusCode::kDataLoss);
  bool inc = false;
  EXPECT_EQ(ParseStepDirName("step-000000042.tmp", &inc), 42);
  EXPECT_TRUE(inc);
  EXPECT_FALSE(ParseStepDirName("step-abc", &inc).has_value());
}

class VolumeConformanceTest : public ::testing::TestWithParam<bool> {};

TEST_P(VolumeConformanceTest, WritesReadsRenamesAndLists) {
  TempDir dir;
  FaultInjectionVolume faulty(LocalVolume());
  Volume* v = GetParam() ? static_cast<Volume*>(&faulty) : LocalVolume();
  ASSERT_EQ(v->CreateDirs(dir.sub("a/b")), Status::Ok());
  ASSERT_EQ(WriteFileAtomic(v, dir.sub("a/b/f"), "hello"), Status::Ok());
  EXPECT_EQ(*ReadFileToString(v, dir.sub("a/b/f")), "hello");
  EXPECT_EQ(*v->FileSize(dir.sub("a/b/f")), 5u);
  ASSERT_EQ(v->Rename(dir.sub("a/b"), dir.sub("a/c")), Status::Ok());
  EXPECT_TRUE(v->Exists(dir.sub("a/c/f")));
  EXPECT_EQ(*v->ListDir(dir.sub("a/c")), std::vector<std::string>{"f"});
  EXPECT_EQ(v->NewReadableFile(dir.sub("nope"), false).status().code(), StatusCode::kNotFound);
  // Direct I/O with aligned buffers, or its buffered fallback.
  auto f = *v->NewWritableFile(dir.sub("d"), true);
  void* p = nullptr;
  ASSERT_EQ(::posix_memalign(&p, 4096, 8192), 0);
  std::memset(p, 'z', 8192);
  EXPECT_EQ(f->Write(0, p, 8192), Status::Ok());
  EXPECT_EQ(f->Sync(), Status::Ok());
  EXPECT_EQ(f->Close(), Status::Ok());
  ::free(p);
  EXPECT_EQ(*ReadFileToString(v, dir.sub("d")), std::string(8192, 'z'));
  ASSERT_EQ(v->RemoveAll(dir.sub("a")), Status::Ok());
  EXPECT_FALSE(v->Exists(dir.sub("a")));
}

// A big staging buffer is 2 MiB-aligned and advised to use transparent huge pages (VM_HUGEPAGE,
// "hg" in /proc/self/smaps), as numpy and torch do for the tensors it copies from; a small one
// keeps ordinary pages.
bool AdvisedHuge(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto addr = reinterpret_cast<uintptr_t>(p);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) {  // a mapping's first line
      inside = lo <= addr && addr < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line.find(" hg") != std::string::npos;
    }
  }
  return false;
}

TEST(StagingBufferTest, BigBuffersAreHugePageAlignedAndAdvised) {
  StagingBuffer big;
  ASSERT_TRUE(big.Reserve((64 << 20) + 123, false).ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(big.data()) % (2 << 20), 0u);
  EXPECT_GE(big.capacity(), (64u << 20) + 123);
  EXPECT_TRUE(AdvisedHuge(big.data())) << "no MADV_HUGEPAGE on the staging buffer";
  StagingBuffer small;
  ASSERT_TRUE(small.Reserve(8192, false).ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small.data()) % 4096, 0u);
}

INSTANTIATE_TEST_SUITE_P(Volumes, VolumeConformanceTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "FaultInjection" : "Local"; });

}  // namespace
}  // namespace muster::checkpoint
