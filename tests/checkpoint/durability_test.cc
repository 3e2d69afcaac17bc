// Durability of the checkpoint commit path under a power loss. FaultInjectionVolume::Crash()
// drops every byte that was not fsynced and every create, rename and delete that no directory
// fsync made durable (LevelDB's FaultInjectionTestEnv). The first tests pin that model; the
// last ones remove each fsync and directory fsync of the commit path in turn (kDroppedSync: the
// call reports success and makes nothing durable) and show that a crash then loses a step
// whose save succeeded, or exposes a torn one.

#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <optional>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "checkpoint/fault_injection_volume.h"
#include "tests/checkpoint/test_util.h"

namespace muster::checkpoint {
namespace {

using testing::Fill;
using testing::TempDir;

std::string Read(const std::string& path) {
  auto s = ReadFileToString(LocalVolume(), path);
  return s.ok() ? *s : "<" + s.status().ToString() + ">";
}

Status WriteFile(Volume* v, const std::string& path, const std::string& data, bool sync) {
  MUSTER_ASSIGN_OR_RETURN(auto f, v->NewWritableFile(path, /*direct=*/false));
  MUSTER_RETURN_IF_ERROR(f->Write(0, data.data(), data.size()));
  if (sync) MUSTER_RETURN_IF_ERROR(f->Sync());
  return f->Close();
}

// --- The model -----------------------------------------------------------------------------

TEST(FaultInjectionVolumeCrashTest, BytesPastTheLastFsyncAreLost) {
  TempDir dir;
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(WriteFile(&vol, dir.sub("never"), "hello", /*sync=*/false), Status::Ok());
  auto f = *vol.NewWritableFile(dir.sub("partly"), false);
  ASSERT_EQ(f->Write(0, "hello", 5), Status::Ok());
  ASSERT_EQ(f->Sync(), Status::Ok());
  ASSERT_EQ(f->Write(5, " world", 6), Status::Ok());
  ASSERT_EQ(f->Close(), Status::Ok());
  ASSERT_EQ(WriteFile(&vol, dir.sub("synced"), "kept", /*sync=*/true), Status::Ok());
  ASSERT_EQ(vol.SyncDir(dir.path()), Status::Ok());  // the three names are durable
  EXPECT_EQ(Read(dir.sub("partly")), "hello world");
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_EQ(Read(dir.sub("never")), "");
  EXPECT_EQ(Read(dir.sub("partly")), "hello");
  EXPECT_EQ(Read(dir.sub("synced")), "kept");
}

TEST(FaultInjectionVolumeCrashTest, ACreateWithoutADirectoryFsyncIsLost) {
  TempDir dir;
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(vol.CreateDirs(dir.sub("a/b")), Status::Ok());
  ASSERT_EQ(WriteFile(&vol, dir.sub("a/b/f"), "data", /*sync=*/true), Status::Ok());
  ASSERT_EQ(vol.SyncDir(dir.sub("a/b")), Status::Ok());  // f is in b, but b is not in a
  ASSERT_EQ(vol.SyncDir(dir.path()), Status::Ok());      // a is in dir
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_TRUE(LocalVolume()->Exists(dir.sub("a")));
  EXPECT_FALSE(LocalVolume()->Exists(dir.sub("a/b")));
}

TEST(FaultInjectionVolumeCrashTest, AnUnsyncedRenameIsUndoneAndTheOverwrittenFileComesBack) {
  TempDir dir;
  ASSERT_EQ(WriteFileAtomic(LocalVolume(), dir.sub("LATEST"), "old"), Status::Ok());
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(WriteFile(&vol, dir.sub("LATEST.tmp"), "new", /*sync=*/true), Status::Ok());
  ASSERT_EQ(vol.Rename(dir.sub("LATEST.tmp"), dir.sub("LATEST")), Status::Ok());
  EXPECT_EQ(Read(dir.sub("LATEST")), "new");
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_EQ(Read(dir.sub("LATEST")), "old");
  EXPECT_FALSE(LocalVolume()->Exists(dir.sub("LATEST.tmp")));  // its create was not durable
  // The same with the directory fsync: the new contents are durable.
  ASSERT_EQ(WriteFileAtomic(&vol, dir.sub("LATEST"), "new"), Status::Ok());
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_EQ(Read(dir.sub("LATEST")), "new");
}

TEST(FaultInjectionVolumeCrashTest, AnUnsyncedRemoveIsUndone) {
  TempDir dir;
  ASSERT_EQ(LocalVolume()->CreateDirs(dir.sub("t/u")), Status::Ok());
  ASSERT_EQ(WriteFile(LocalVolume(), dir.sub("t/u/f"), "tree", true), Status::Ok());
  ASSERT_EQ(WriteFile(LocalVolume(), dir.sub("g"), "file", true), Status::Ok());
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(vol.RemoveAll(dir.sub("t")), Status::Ok());
  ASSERT_EQ(vol.DeleteFile(dir.sub("g")), Status::Ok());
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_EQ(Read(dir.sub("t/u/f")), "tree");
  EXPECT_EQ(Read(dir.sub("g")), "file");
  ASSERT_EQ(vol.RemoveAll(dir.sub("t")), Status::Ok());
  ASSERT_EQ(vol.SyncDir(dir.path()), Status::Ok());
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_FALSE(LocalVolume()->Exists(dir.sub("t")));
  EXPECT_EQ(Read(dir.sub("g")), "file");
}

TEST(FaultInjectionVolumeCrashTest, ARenamedDirectoryTakesItsUnsyncedEntriesAlong) {
  // The commit path's shape: files in step.tmp, rename to step, fsync the parent. Without an
  // fsync of step.tmp itself the files' names are not durable, under the new name too.
  TempDir dir;
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(vol.CreateDirs(dir.sub("s.tmp")), Status::Ok());
  ASSERT_EQ(WriteFile(&vol, dir.sub("s.tmp/f"), "data", /*sync=*/true), Status::Ok());
  ASSERT_EQ(vol.Rename(dir.sub("s.tmp"), dir.sub("s")), Status::Ok());
  ASSERT_EQ(vol.SyncDir(dir.path()), Status::Ok());
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_TRUE(LocalVolume()->Exists(dir.sub("s")));
  EXPECT_FALSE(LocalVolume()->Exists(dir.sub("s/f")));
  EXPECT_FALSE(LocalVolume()->Exists(dir.sub("s.tmp")));
}

TEST(FaultInjectionVolumeCrashTest, ADroppedSyncReportsSuccessAndKeepsNothing) {
  TempDir dir;
  FaultInjectionVolume vol(LocalVolume());
  vol.SetFault({FaultKind::kDroppedSync, "f"});
  ASSERT_EQ(WriteFile(&vol, dir.sub("f"), "data", /*sync=*/true), Status::Ok());
  EXPECT_EQ(vol.fired(), 1);
  ASSERT_EQ(vol.SyncDir(dir.path()), Status::Ok());
  vol.SetFault({FaultKind::kDroppedSync, "", 0, false, false, /*on_dir=*/true});
  ASSERT_EQ(WriteFile(&vol, dir.sub("g"), "data", /*sync=*/true), Status::Ok());
  ASSERT_EQ(vol.SyncDir(dir.path()), Status::Ok());
  EXPECT_EQ(vol.fired(), 2);
  ASSERT_EQ(vol.syncs().size(), 4u);
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_EQ(Read(dir.sub("f")), "");
  EXPECT_FALSE(LocalVolume()->Exists(dir.sub("g")));
}

// --- The commit path -----------------------------------------------------------------------

constexpr int64_t kElems = 3 * 1024 + 77;  // three blocks and a bit

std::vector<uint32_t> StepData(int64_t step) { return Fill(step, 1, 0, kElems); }

Status SaveStep(Volume* v, const std::string& dir, int64_t step) {
  CheckpointerOptions o;
  o.dir = dir;
  o.volume = v;
  o.block_size = 4096;
  o.write_chunk = 8192;
  MUSTER_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(o));
  std::vector<uint32_t> data = StepData(step);
  SaveState s;
  s.tensors.push_back(TensorRef::Replicated("x", DType::kI32, {kElems}, data.data()));
  MUSTER_RETURN_IF_ERROR(ck->Save(step, s));
  return ck->Wait();
}

// What must hold after a crash that followed a successful save of `saved`: the step is good
// (every checksum) and restores exactly, no step directory is torn, and LATEST names
// `latest` (checkpoint-format.md: LATEST lags the scan only if the crash fell inside a commit).
// Returns what does not hold, or "" when all of it does.
std::string Violations(const std::string& dir, int64_t saved, int64_t latest) {
  std::string out;
  if (Status st = VerifyStep(LocalVolume(), dir, saved); !st.ok()) {
    out += "step " + std::to_string(saved) + " is lost or damaged: " + st.ToString() + "; ";
  } else {
    CheckpointerOptions o;
    o.dir = dir;
    auto ck = Checkpointer::Create(o);
    std::vector<uint32_t> got(kElems, 0);
    Status st2 = ck.ok()
                     ? (*ck)->Restore(saved, {RestoreRequest::Whole("x", DType::kI32, got.data())})
                     : ck.status();
    if (!st2.ok() || got != StepData(saved)) {
      out += "step " + std::to_string(saved) + " does not restore: " + st2.ToString() + "; ";
    }
  }
  auto steps = ListSteps(LocalVolume(), dir);
  if (steps.ok()) {
    for (const auto& s : *steps) {
      if (!s.problem.empty()) out += "torn step directory " + s.path + ": " + s.problem + "; ";
    }
  }
  auto l = ReadLatest(LocalVolume(), dir);
  if (!l.ok() || *l != latest) {
    out += "LATEST does not name step " + std::to_string(latest) + ": " +
           (l.ok() ? std::to_string(*l) : l.status().ToString()) + "; ";
  }
  return out;
}

struct Scenario {
  std::string name;
  int64_t newer_step;  // > 0: a good newer step is already in the directory
  int64_t step;        // the step saved through the fault-injecting volume
  // The commit path's fsyncs in order, as "file:<name>" or "dir:<name>" relative to the
  // checkpoint directory ("." is the directory itself).
  std::vector<std::string> expected_syncs;
  // The syncs (by index) whose removal the crash does not expose in this scenario, and why.
  std::map<size_t, std::string> covered;
};

std::string Label(const std::string& dir, const SyncCall& c) {
  std::string rel = c.path == dir ? "." : c.path.substr(dir.size() + 1);
  return (c.dir ? "dir:" : "file:") + rel;
}

// Runs the scenario in a fresh directory, with `fault` set on the volume for the save, then
// crashes the volume. Returns the save's status, the syncs the save made and the violations.
struct Outcome {
  Status save;
  std::vector<std::string> syncs;
  std::string violations;
};

Outcome RunScenario(const Scenario& sc, std::optional<Fault> fault) {
  TempDir dir;
  Outcome out;
  int64_t latest = sc.step;
  if (sc.newer_step > 0) {
    out.save = SaveStep(LocalVolume(), dir.path(), sc.newer_step);
    if (!out.save.ok()) return out;
    latest = sc.newer_step;
  }
  FaultInjectionVolume vol(LocalVolume());
  if (fault) vol.SetFault(*fault);
  out.save = SaveStep(&vol, dir.path(), sc.step);
  for (const SyncCall& c : vol.syncs()) out.syncs.push_back(Label(dir.path(), c));
  if (fault && vol.fired() != 1) {
    out.violations = "the dropped sync did not fire exactly once";
    return out;
  }
  if (Status st = vol.Crash(); !st.ok()) {
    out.violations = "crash: " + st.ToString();
    return out;
  }
  out.violations = Violations(dir.path(), sc.step, latest);
  return out;
}

// A DIR the checkpointer creates itself, with a missing parent, survives a power loss after a
// save: Create fsyncs the parent of each directory it made.
TEST(CheckpointerCreateTest, ADirectoryItCreatesSurvivesAPowerLoss) {
  TempDir root;
  std::string dir = root.path() + "/job/ckpt";
  FaultInjectionVolume vol(LocalVolume());
  ASSERT_EQ(SaveStep(&vol, dir, 7), Status::Ok());
  ASSERT_EQ(vol.Crash(), Status::Ok());
  EXPECT_EQ(Violations(dir, 7, 7), "");
}

class CommitSyncTest : public ::testing::TestWithParam<Scenario> {};

TEST_P(CommitSyncTest, EveryFsyncOnTheCommitPathIsNeeded) {
  const Scenario& sc = GetParam();
  // With every sync in place the save survives the crash, and the syncs are the ones listed.
  Outcome base = RunScenario(sc, std::nullopt);
  ASSERT_EQ(base.save, Status::Ok());
  ASSERT_EQ(base.violations, "");
  ASSERT_EQ(base.syncs, sc.expected_syncs);
  // Each sync dropped alone: the save still reports success, and the crash shows the loss.
  for (size_t i = 0; i < base.syncs.size(); ++i) {
    const std::string& label = base.syncs[i];
    SCOPED_TRACE("without " + label);
    const bool is_dir = label.rfind("dir:", 0) == 0;
    const std::string name = label.substr(label.find(':') + 1);
    // Match the sync by its name: "." (the directory) matches every directory sync, so skip
    // the earlier matching ones.
    Fault f{FaultKind::kDroppedSync, name == "." ? "" : name, 0, false, false, is_dir};
    for (size_t j = 0; j < i; ++j) {
      const bool same_kind = (base.syncs[j].rfind("dir:", 0) == 0) == is_dir;
      if (same_kind && (name == "." || base.syncs[j].find(name) != std::string::npos)) f.skip++;
    }
    Outcome o = RunScenario(sc, f);
    ASSERT_EQ(o.save, Status::Ok());
    auto why = sc.covered.find(i);
    if (why == sc.covered.end()) {
      EXPECT_NE(o.violations, "") << "dropping " << label << " loses nothing in a crash";
    } else {
      EXPECT_EQ(o.violations, "") << why->second;
    }
    if (!o.violations.empty())
      std::printf("  without %-28s %s\n", label.c_str(), o.violations.c_str());
  }
}

const std::string kTmp = "step-000000001.tmp";

INSTANTIATE_TEST_SUITE_P(
    Commit, CommitSyncTest,
    ::testing::Values(
        // A step committed into an empty directory. Each sync but one breaks it; the parent
        // fsync after the step's rename is also done, later, by LATEST's own parent fsync.
        Scenario{"FirstStep",
                 0,
                 1,
                 {"file:" + kTmp + "/shard-00000.bin", "file:" + kTmp + "/MANIFEST", "dir:" + kTmp,
                  "dir:.", "file:LATEST.tmp", "dir:."},
                 {{3,
                   "LATEST's own fsync of the directory, later in the same commit, also makes "
                   "the step's rename durable"}}},
        // A step committed below a newer good one: LATEST is left alone, so the parent fsync
        // after the rename is the only one that makes the step's name durable.
        Scenario{"BelowANewerStep",
                 9,
                 1,
                 {"file:" + kTmp + "/shard-00000.bin", "file:" + kTmp + "/MANIFEST", "dir:" + kTmp,
                  "dir:."},
                 {}}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace muster::checkpoint
