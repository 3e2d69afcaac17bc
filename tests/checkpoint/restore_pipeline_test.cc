// The restore pipeline (checkpoint/restore_pipeline.h) on the CPU: restores into "device"
// memory go through the same staging ring, checks and asynchronous copies as on a GPU, with a
// fake device (tests/checkpoint/fake_device.h) that copies as late as the protocol allows.
// Resharding, column slices, corrupt and torn shards, short reads, read and copy errors.

#include "checkpoint/restore_pipeline.h"

#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "checkpoint/checkpointer.h"
#include "checkpoint/fault_injection_volume.h"
#include "tests/checkpoint/fake_device.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

using testing::Fill;
using testing::LazyFakeDevice;
using testing::TempDir;

constexpr int64_t kRows = 61;   // not divisible by 2, 3, 4 or 8
constexpr int64_t kCols = 515;  // rows of 2060 bytes: not block-aligned
constexpr int64_t kBias = 3000;

std::pair<int64_t, int64_t> RowRange(int64_t n, int world, int rank) {
  int64_t base = n / world, extra = n % world;
  return {rank * base + std::min<int64_t>(rank, extra), base + (rank < extra ? 1 : 0)};
}

CheckpointerOptions Opts(const std::string& dir, int world, int rank,
                         collectives::RendezvousStore* store, Volume* v = nullptr,
                         DeviceCopier* device = nullptr, int slots = 0) {
  CheckpointerOptions o;
  o.dir = dir;
  o.world_size = world;
  o.rank = rank;
  o.store = store;
  o.volume = v;
  o.block_size = 4096;
  o.write_chunk = 3 * 4096;  // small windows: many of them, and the ring wraps many times
  o.commit_timeout = std::chrono::seconds(20);
  o.device_copier = device;
  o.restore_slots = slots;
  return o;
}

// Step 1 saved by `world` ranks (threads): "w" row-sharded {kRows, kCols} u32, "bias"
// replicated, "emb" {8, 5, 3} sharded on dimension 0.
void SaveWorld(const std::string& dir, int world) {
  auto store = collectives::NewInMemoryRendezvousStore();
  std::vector<std::thread> ts;
  std::vector<Status> st(world);
  for (int r = 0; r < world; ++r) {
    ts.emplace_back([&, r] {
      auto ck = Checkpointer::Create(Opts(dir, world, r, store.get()));
      if (!ck.ok()) {
        st[r] = ck.status();
        return;
      }
      auto [r0, rn] = RowRange(kRows, world, r);
      auto [e0, en] = RowRange(8, world, r);
      auto w = Fill(1, 1, r0 * kCols, rn * kCols);
      auto bias = Fill(1, 2, 0, kBias);
      auto emb = Fill(1, 3, e0 * 15, en * 15);
      SaveState s;
      s.tensors.push_back(TensorRef::RowShard("w", DType::kI32, {kRows, kCols}, r0, rn, w.data()));
      s.tensors.push_back(TensorRef::Replicated("bias", DType::kI32, {kBias}, bias.data()));
      s.tensors.push_back(TensorRef::RowShard("emb", DType::kI32, {8, 5, 3}, e0, en, emb.data()));
      st[r] = (*ck)->Save(1, s);
      if (st[r].ok()) st[r] = (*ck)->Wait();
    });
  }
  for (auto& t : ts) t.join();
  for (const Status& s : st) ASSERT_EQ(s, Status::Ok());
}

// Wraps the local file system; shard files count the bytes read and may cap every read call.
class ReadWrappingVolume final : public Volume {
 public:
  explicit ReadWrappingVolume(size_t max_read = 0) : max_read_(max_read) {}
  std::atomic<uint64_t> shard_bytes{0};

  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& p, bool d) override {
    return LocalVolume()->NewWritableFile(p, d);
  }
  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& p,
                                                          bool direct) override {
    // Short reads come from buffered files (an O_DIRECT read is whole blocks or nothing).
    MUSTER_ASSIGN_OR_RETURN(auto f, LocalVolume()->NewReadableFile(p, direct && max_read_ == 0));
    if (p.find("shard-") == std::string::npos) return f;
    return std::unique_ptr<ReadableFile>(new File(std::move(f), this));
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

 private:
  class File final : public ReadableFile {
   public:
    File(std::unique_ptr<ReadableFile> f, ReadWrappingVolume* v) : f_(std::move(f)), v_(v) {}
    StatusOr<size_t> ReadAt(uint64_t off, void* dst, size_t n) override {
      if (v_->max_read_ > 0) n = std::min(n, v_->max_read_);
      auto r = f_->ReadAt(off, dst, n);
      if (r.ok()) v_->shard_bytes += *r;
      return r;
    }
    StatusOr<uint64_t> Size() override { return f_->Size(); }
    bool direct() const override { return f_->direct(); }

   private:
    std::unique_ptr<ReadableFile> f_;
    ReadWrappingVolume* v_;
  };
  size_t max_read_;
};

// Restores what rank `r` of `world` holds, into "device" memory through `device`, and compares.
void ExpectDeviceRestore(const std::string& dir, int world, int r, LazyFakeDevice* device,
                         int slots, Volume* v = nullptr) {
  SCOPED_TRACE("world " + std::to_string(world) + " rank " + std::to_string(r) + " slots " +
               std::to_string(slots));
  auto ck = Checkpointer::Create(Opts(dir, 1, 0, nullptr, v, device, slots));
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto [r0, rn] = RowRange(kRows, world, r);
  auto [e0, en] = RowRange(8, world, r);
  std::vector<uint32_t> w(rn * kCols, 0xABABABAB), bias(kBias, 0xABABABAB),
      emb(en * 15, 0xABABABAB);
  const uint64_t before = device->bytes_copied();
  ASSERT_EQ(
      (*ck)->Restore(1, {RestoreRequest::RowShard("w", DType::kI32, {kRows, kCols}, r0, rn,
                                                  w.data(), MemoryKind::kCuda),
                         RestoreRequest::Whole("bias", DType::kI32, bias.data(), MemoryKind::kCuda),
                         RestoreRequest::RowShard("emb", DType::kI32, {8, 5, 3}, e0, en, emb.data(),
                                                  MemoryKind::kCuda)}),
      Status::Ok());
  EXPECT_EQ(w, Fill(1, 1, r0 * kCols, rn * kCols));
  EXPECT_EQ(bias, Fill(1, 2, 0, kBias));
  EXPECT_EQ(emb, Fill(1, 3, e0 * 15, en * 15));
  // Every requested byte reached the device exactly once, and nothing is left in flight.
  EXPECT_EQ(device->bytes_copied() - before, (w.size() + bias.size() + emb.size()) * 4);
  EXPECT_EQ(device->queued(), 0u);
  EXPECT_EQ(device->begun(), device->finished());
}

TEST(RestorePipelineTest, ReshardedRestoresIntoDeviceMemoryAreBitExact) {
  TempDir dir;
  SaveWorld(dir.path(), 4);
  LazyFakeDevice device;
  for (int slots : {1, 2, 0}) {
    for (int world : {1, 2, 3, 8}) {
      for (int r = 0; r < world; ++r) ExpectDeviceRestore(dir.path(), world, r, &device, slots);
    }
  }
}

TEST(RestorePipelineTest, ColumnBlocksIntoDeviceAndHostMemoryCutAcrossShards) {
  TempDir dir;
  SaveWorld(dir.path(), 4);
  LazyFakeDevice device;
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, nullptr, &device, 2));
  // Rows [5, 50) x columns [100, 400): every stored shard, one run per row; and a host copy of
  // the same block one element off 4096-alignment.
  const int64_t r0 = 5, rn = 45, c0 = 100, cn = 300;
  std::vector<uint32_t> dev(rn * cn, 0), host_storage(rn * cn + 1, 0);
  uint32_t* host = host_storage.data() + 1;
  RestoreRequest d{"w", DType::kI32, {r0, c0}, {rn, cn}, dev.data(), MemoryKind::kCuda};
  RestoreRequest h{"w", DType::kI32, {r0, c0}, {rn, cn}, host, MemoryKind::kHost};
  ASSERT_EQ(ck->Restore(1, {d, h}), Status::Ok());
  auto all = Fill(1, 1, 0, kRows * kCols);
  for (int64_t i = 0; i < rn; ++i) {
    for (int64_t j = 0; j < cn; ++j) {
      ASSERT_EQ(dev[i * cn + j], all[(r0 + i) * kCols + c0 + j]) << i << "," << j;
      ASSERT_EQ(host[i * cn + j], all[(r0 + i) * kCols + c0 + j]) << i << "," << j;
    }
  }
  EXPECT_EQ(device.bytes_copied(), dev.size() * 4);
  EXPECT_EQ(device.queued(), 0u);
}

TEST(RestorePipelineTest, ACorruptBlockIsCaughtBeforeItReachesTheDevice) {
  TempDir dir;
  SaveWorld(dir.path(), 2);
  // Flip one byte of element 5000 of "w" (rank 0's shard holds rows [0, 31), from offset 0).
  const uint64_t pos = 5000 * 4 + 1;
  {
    std::fstream f(dir.sub("step-000000001/shard-00000.bin"),
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(pos);
    char c;
    f.read(&c, 1);
    c ^= 0x40;
    f.seekp(pos);
    f.write(&c, 1);
  }
  LazyFakeDevice device;
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, nullptr, &device));
  std::vector<uint32_t> w(kRows * kCols, 0xABABABAB);
  Status st =
      ck->Restore(1, {RestoreRequest::Whole("w", DType::kI32, w.data(), MemoryKind::kCuda)});
  EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("step 1"), std::string::npos) << st;
  EXPECT_NE(st.message().find("'w'"), std::string::npos) << st;
  // Nothing of the damaged block was delivered: its elements still hold the fill pattern.
  const int64_t block_first = (pos / 4096 * 4096) / 4;
  for (int64_t i = block_first; i < block_first + 1024; ++i) {
    ASSERT_EQ(w[i], 0xABABABABu) << "element " << i << " of a corrupt block reached the device";
  }
  EXPECT_EQ(device.queued(), 0u);
  EXPECT_EQ(device.begun(), device.finished());
  // Tensors elsewhere in the shard still restore.
  std::vector<uint32_t> bias(kBias);
  EXPECT_EQ(
      ck->Restore(1, {RestoreRequest::Whole("bias", DType::kI32, bias.data(), MemoryKind::kCuda)}),
      Status::Ok());
  EXPECT_EQ(bias, Fill(1, 2, 0, kBias));
}

TEST(RestorePipelineTest, TornShardsAreDataLossNotGarbage) {
  for (bool truncate : {true, false}) {
    SCOPED_TRACE(truncate ? "shard cut short" : "half a block zeroed");
    TempDir dir;
    SaveWorld(dir.path(), 2);
    const std::string shard = dir.sub("step-000000001/shard-00001.bin");
    if (truncate) {
      std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 6000);
    } else {
      // A torn write: the second half of block 2 never reached the disk.
      std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(2 * 4096 + 2048);
      std::string zeros(2048, '\0');
      f.write(zeros.data(), zeros.size());
    }
    LazyFakeDevice device;
    auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, nullptr, &device));
    std::vector<uint32_t> w(kRows * kCols), emb(8 * 15), bias(kBias);
    Status st = ck->Restore(
        1, {RestoreRequest::Whole("w", DType::kI32, w.data(), MemoryKind::kCuda),
            RestoreRequest::Whole("emb", DType::kI32, emb.data(), MemoryKind::kCuda),
            RestoreRequest::Whole("bias", DType::kI32, bias.data(), MemoryKind::kCuda)});
    EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st;
    EXPECT_NE(st.message().find("step 1"), std::string::npos) << st;
    EXPECT_EQ(device.queued(), 0u);
    EXPECT_EQ(device.begun(), device.finished());
  }
}

TEST(RestorePipelineTest, ShortReadsStillRestoreBitExact) {
  TempDir dir;
  SaveWorld(dir.path(), 3);
  ReadWrappingVolume shorts(/*max_read=*/3001);
  LazyFakeDevice device;
  for (int world : {1, 2}) {
    for (int r = 0; r < world; ++r) ExpectDeviceRestore(dir.path(), world, r, &device, 2, &shorts);
  }
  // And into host memory, where whole blocks go straight to the destination.
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, &shorts));
  std::vector<uint32_t> w(kRows * kCols);
  ASSERT_EQ(ck->Restore(1, {RestoreRequest::Whole("w", DType::kI32, w.data())}), Status::Ok());
  EXPECT_EQ(w, Fill(1, 1, 0, kRows * kCols));
}

TEST(RestorePipelineTest, ReshardedDeviceRestoreReadsOnlyTheBlocksItNeeds) {
  TempDir dir;
  SaveWorld(dir.path(), 4);
  ReadWrappingVolume counting;
  LazyFakeDevice device;
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, &counting, &device));
  // World size 8, rank 3: rows [24, 32) of 61: the end of rank 1's rows [16, 31) and the first
  // of rank 2's.
  auto [r0, rn] = RowRange(kRows, 8, 3);
  std::vector<uint32_t> w(rn * kCols);
  ASSERT_EQ(ck->Restore(1, {RestoreRequest::RowShard("w", DType::kI32, {kRows, kCols}, r0, rn,
                                                     w.data(), MemoryKind::kCuda)}),
            Status::Ok());
  EXPECT_EQ(w, Fill(1, 1, r0 * kCols, rn * kCols));
  const uint64_t needed = w.size() * 4;
  EXPECT_GE(counting.shard_bytes.load(), needed);
  // Two runs (one per shard), each reading at most a partial block beyond it at either end.
  EXPECT_LE(counting.shard_bytes.load(), needed + 4 * 4096);
}

TEST(RestorePipelineTest, ADeviceCopyErrorFailsTheRestoreAndDrainsTheRing) {
  TempDir dir;
  SaveWorld(dir.path(), 2);
  LazyFakeDevice device;
  device.FailCopy(3);
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, nullptr, &device, 2));
  std::vector<uint32_t> w(kRows * kCols);
  Status st =
      ck->Restore(1, {RestoreRequest::Whole("w", DType::kI32, w.data(), MemoryKind::kCuda)});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("copy 3 failed"), std::string::npos) << st;
  EXPECT_NE(st.message().find("'w'"), std::string::npos) << st;
  EXPECT_EQ(device.queued(), 0u);
  EXPECT_EQ(device.begun(), device.finished());
  // The same Checkpointer restores fine afterwards (the ring is whole again).
  device.FailCopy(-1);
  ASSERT_EQ(ck->Restore(1, {RestoreRequest::Whole("w", DType::kI32, w.data(), MemoryKind::kCuda)}),
            Status::Ok());
  EXPECT_EQ(w, Fill(1, 1, 0, kRows * kCols));
}

TEST(RestorePipelineTest, AReadErrorMidRestoreSurfacesAndDrainsTheRing) {
  TempDir dir;
  SaveWorld(dir.path(), 2);
  FaultInjectionVolume vol(LocalVolume());
  vol.SetFault({FaultKind::kIoError, "shard-00001", 2, false, /*on_read=*/true});
  LazyFakeDevice device;
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr, &vol, &device, 1));
  std::vector<uint32_t> w(kRows * kCols);
  Status st =
      ck->Restore(1, {RestoreRequest::Whole("w", DType::kI32, w.data(), MemoryKind::kCuda)});
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(vol.fired(), 1);
  EXPECT_NE(st.message().find("'w'"), std::string::npos) << st;
  EXPECT_EQ(device.queued(), 0u);
  EXPECT_EQ(device.begun(), device.finished());
}

// Through the real CUDA copier, a "device" destination that is host memory: without a GPU (or
// without CUDA in the build) Begin fails; with one, CUDA may refuse the copy. Either way the
// restore fails with a status naming the step, and does not hang.
TEST(RestorePipelineTest, ADeviceRestoreCudaCannotDoFailsCleanly) {
  TempDir dir;
  SaveWorld(dir.path(), 1);
  auto ck = *Checkpointer::Create(Opts(dir.path(), 1, 0, nullptr));  // the CUDA runtime
  std::vector<uint32_t> bias(kBias);
  Status st =
      ck->Restore(1, {RestoreRequest::Whole("bias", DType::kI32, bias.data(), MemoryKind::kCuda)});
  if (st.ok()) GTEST_SKIP() << "this machine has a GPU that accepted a host pointer";
  EXPECT_TRUE(st.code() == StatusCode::kFailedPrecondition || st.code() == StatusCode::kInternal)
      << st;
  EXPECT_NE(st.message().find("step 1"), std::string::npos) << st;
}

TEST(RestorePlanTest, WindowsAreAlignedBoundedAndDeliverEveryByteOnce) {
  Manifest m;
  m.block_size = 4096;
  m.shards.resize(2);
  m.shards[0].size = 40 * 4096;
  m.shards[1].size = 8 * 4096;
  const std::string name = "t";
  const uint64_t window = 3 * 4096;
  RestorePlanBuilder b(m, window);
  std::vector<char> dst(1 << 20);
  // A long run, rows of a column slice (adjacent and gapped), and a run in another shard.
  b.AddRun(0, 100, 10 * 4096, dst.data(), MemoryKind::kCuda, &name);
  uint64_t d = 10 * 4096;
  for (int i = 0; i < 20; ++i) {
    b.AddRun(0, 11 * 4096 + i * 700, 300, dst.data() + d, MemoryKind::kCuda, &name);
    d += 300;
  }
  b.AddRun(0, 30 * 4096 + 5, 10, dst.data() + d, MemoryKind::kCuda, &name);
  d += 10;
  // Two runs contiguous in the file and the destination.
  b.AddRun(1, 0, 4000, dst.data() + d, MemoryKind::kHost, &name);
  b.AddRun(1, 4000, 8 * 4096 - 4000, dst.data() + d + 4000, MemoryKind::kHost, &name);
  d += 8 * 4096;
  RestorePlan p = b.Take();
  EXPECT_EQ(p.run_bytes, d);
  EXPECT_LE(p.max_window, window);
  uint64_t delivered = 0;
  for (const auto& w : p.windows) {
    EXPECT_EQ(w.begin % 4096, 0u);
    EXPECT_TRUE(w.end % 4096 == 0 || w.end == m.shards[w.shard].size);
    EXPECT_LE(w.end - w.begin, window);
    ASSERT_GE(w.num_runs, 1u);
    for (size_t i = 0; i < w.num_runs; ++i) {
      const RestoreRun& r = p.runs[w.first_run + i];
      EXPECT_GE(r.file_off, w.begin);
      EXPECT_LE(r.file_off + r.len, w.end);
      delivered += r.len;
    }
  }
  EXPECT_EQ(delivered, d);
  // The long run: 4 windows; the 20 rows span blocks 11-14: the first joins the long run's
  // last window, the other 3 blocks make one; the gapped run: 1; shard 1: 3.
  ASSERT_EQ(p.windows.size(), 9u);
  EXPECT_EQ(p.windows[3].num_runs, 1u + 6u);  // 45056 + 5 * 700 + 300 < 49152
  EXPECT_EQ(p.windows[4].begin, 12u * 4096);
  EXPECT_EQ(p.windows[5].begin, 30u * 4096);
  // Runs contiguous in the file and the destination were merged into one copy.
  EXPECT_EQ(p.windows[6].num_runs, 1u);
  EXPECT_EQ(p.runs[p.windows[6].first_run].len, 3u * 4096);
}

// The planner is the last line of defence for byte ranges it is handed: one that wraps around
// 2^64 or ends past its shard is refused, and executing the plan reads nothing.
TEST(RestorePlanTest, RunsOutsideTheirShardAreRefusedNotWrapped) {
  Manifest m;
  m.block_size = 4096;
  m.shards.resize(1);
  m.shards[0].size = 4 * 4096;
  const std::string name = "t";
  std::vector<char> dst(8 * 4096, 'x');
  struct Case {
    int shard;
    uint64_t off, len;
  };
  for (const Case c : {Case{0, ~uint64_t{0} - 4095, 3 * 4096}, Case{0, 3 * 4096, 2 * 4096},
                       Case{1, 0, 4096}, Case{-1, 0, 4096}}) {
    RestorePlanBuilder b(m, 4096);
    b.AddRun(0, 0, 4096, dst.data(), MemoryKind::kHost, &name);
    b.AddRun(c.shard, c.off, c.len, dst.data() + 4096, MemoryKind::kHost, &name);
    RestorePlan p = b.Take();
    EXPECT_EQ(p.error.code(), StatusCode::kDataLoss) << c.off << " +" << c.len;
    EXPECT_NE(p.error.message().find("tensor 't'"), std::string::npos) << p.error;
    StagingBuffer ring;
    RestoreIo io;
    io.manifest = &m;
    io.ring = &ring;  // no files: a plan that got as far as reading would fail differently
    EXPECT_EQ(ExecuteRestorePlan(p, io), p.error);
  }
  EXPECT_EQ(dst, std::vector<char>(8 * 4096, 'x'));
}

}  // namespace
}  // namespace muster::checkpoint
