// The coordinator's database on real SQLite files: round trips, and no submitted job lost
// when the process writing it is killed with SIGKILL.

#include "coordinator/coordinator_db.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "coordinator/fault_injection_coordinator_db.h"

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;

class CoordinatorDbTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("muster-state-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

JobRecord Job(const std::string& name) {
  JobRecord j;
  j.spec.set_name(name);
  j.spec.add_command("/bin/true");
  j.spec.set_nodes(2);
  j.submitted_ms = 1000;
  return j;
}

TEST_F(CoordinatorDbTest, JobsRoundTripInSubmissionOrder) {
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  JobRecord a = Job("a"), b = Job("b");
  ASSERT_TRUE((*store)->InsertJob(&a).ok());
  ASSERT_TRUE((*store)->InsertJob(&b).ok());
  EXPECT_EQ(a.id, "a-1");
  EXPECT_EQ(b.id, "b-2");
  a.state = proto::JOB_RUNNING;
  a.attempt = 1;
  a.nodes = {"n1", "n2"};
  a.resume_step = 300;
  ASSERT_TRUE((*store)->UpdateJob(a).ok());
  store->reset();

  auto again = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(again.ok()) << again.status();
  auto jobs = (*again)->LoadJobs();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].id, "a-1");
  EXPECT_EQ((*jobs)[0].state, proto::JOB_RUNNING);
  EXPECT_EQ((*jobs)[0].nodes, (std::vector<std::string>{"n1", "n2"}));
  EXPECT_EQ((*jobs)[0].resume_step, 300);
  EXPECT_EQ((*jobs)[0].spec.nodes(), 2);
  EXPECT_EQ((*jobs)[1].seq, 2u);
  JobRecord missing = Job("m");
  missing.id = "nope";
  EXPECT_EQ((*again)->UpdateJob(missing).code(), StatusCode::kNotFound);
  EXPECT_EQ((*again)->GetJob("nope").status().code(), StatusCode::kNotFound);
}

TEST_F(CoordinatorDbTest, NodesAttemptsEventsCheckpoints) {
  auto store = *CoordinatorDb::Open(dir_);
  NodeRecord n;
  n.labels.set_name("aws-0");
  n.labels.set_provider("aws");
  n.labels.add_volumes()->set_name("ckpt");
  n.state = proto::NODE_DRAINING;
  n.quarantines = 2;
  ASSERT_TRUE(store->PutNode(n).ok());
  auto nodes = *store->LoadNodes();
  ASSERT_EQ(nodes.size(), 1u);
  EXPECT_EQ(nodes[0].labels.provider(), "aws");
  EXPECT_EQ(nodes[0].labels.volumes(0).name(), "ckpt");
  EXPECT_EQ(nodes[0].state, proto::NODE_DRAINING);
  EXPECT_EQ(nodes[0].quarantines, 2);

  ASSERT_TRUE(store->PutAttempt({"j-1", 1, {"a", "b"}, 10, 0, "", ""}).ok());
  ASSERT_TRUE(store->PutAttempt({"j-1", 1, {"a", "b"}, 10, 20, "failed", "rank 3 exited 1"}).ok());
  auto attempts = *store->LoadAttempts("j-1");
  ASSERT_EQ(attempts.size(), 1u);
  EXPECT_EQ(attempts[0].outcome, "failed");
  EXPECT_EQ(attempts[0].nodes.size(), 2u);

  proto::Event e;
  e.set_job_id("j-1");
  e.set_kind("submitted");
  int64_t id1 = *store->AppendEvent(e);
  e.set_job_id("j-2");
  store->AppendEvent(e).status().IgnoreError();
  e.set_job_id("j-1");
  e.set_kind("scheduled");
  int64_t id3 = *store->AppendEvent(e);
  EXPECT_LT(id1, id3);
  auto events = *store->Events("j-1", 0, 100);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[1].kind(), "scheduled");
  EXPECT_EQ(store->Events("j-1", id1, 100)->size(), 1u);
  EXPECT_EQ(store->Events("", 0, 100)->size(), 3u);

  EXPECT_FALSE(store->LatestCommittedStep("j-1", "")->has_value());
  ASSERT_TRUE(store->RecordCheckpoint({"j-1", 100, "aws-vol", true, 1}).ok());
  ASSERT_TRUE(store->RecordCheckpoint({"j-1", 200, "aws-vol", true, 2}).ok());
  ASSERT_TRUE(store->RecordCheckpoint({"j-1", 100, "gcp-vol", true, 3}).ok());
  ASSERT_TRUE(store->RecordCheckpoint({"j-1", 300, "aws-vol", false, 4}).ok());
  EXPECT_EQ(**store->LatestCommittedStep("j-1", "aws-vol"), 200);
  EXPECT_EQ(**store->LatestCommittedStep("j-1", "gcp-vol"), 100);
  EXPECT_EQ(**store->LatestCommittedStep("j-1", ""), 200);
  EXPECT_EQ(store->Checkpoints("j-1")->size(), 4u);
}

// The checkpoint counters a report adds are written with its catalog row, add up per job and
// provider, and are there after the database is opened again (what a restarted coordinator
// serves as /metrics' counters).
TEST_F(CoordinatorDbTest, CheckpointCountersAddUpWithTheCatalogAndSurviveReopening) {
  auto count = [](bool replica, uint64_t bytes, double seconds) {
    CheckpointStats c;
    c.AddReport(replica, bytes, seconds);
    return c;
  };
  {
    auto store = *CoordinatorDb::Open(dir_);
    EXPECT_TRUE(store->CheckpointCounters("j-1")->empty());
    ASSERT_TRUE(store
                    ->RecordCheckpointCounted({"j-1", 10, "ckpt@aws", true, 1}, "aws",
                                              count(false, 1000, 0.3))
                    .ok());
    ASSERT_TRUE(store
                    ->RecordCheckpointCounted({"j-1", 20, "ckpt@aws", true, 2}, "aws",
                                              count(false, 3000, 4.0))
                    .ok());
    ASSERT_TRUE(
        store
            ->RecordCheckpointCounted({"j-1", 20, "ckpt@gcp", true, 3}, "gcp", count(true, 3000, 0))
            .ok());
    ASSERT_TRUE(store
                    ->RecordCheckpointCounted({"j-2", 5, "ckpt@aws", true, 4}, "aws",
                                              count(false, 7, 2000))  // above the last bound
                    .ok());
    EXPECT_EQ(**store->LatestCommittedStep("j-1", "ckpt@gcp"), 20);
    // The same report again (its answer was lost): catalogued, not counted twice.
    ASSERT_TRUE(store
                    ->RecordCheckpointCounted({"j-1", 20, "ckpt@aws", true, 5}, "aws",
                                              count(false, 3000, 4.0))
                    .ok());
  }
  auto store = *CoordinatorDb::Open(dir_);
  auto c = *store->CheckpointCounters("j-1");
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c["aws"].commits, 2u);
  EXPECT_EQ(c["aws"].commit_bytes, 4000u);
  EXPECT_EQ(c["aws"].replicas, 0u);
  EXPECT_EQ(c["aws"].latency.count, 2u);
  EXPECT_DOUBLE_EQ(c["aws"].latency.sum, 4.3);
  EXPECT_EQ(c["aws"].latency.counts[2], 1u);  // 0.3 s: le=0.5
  EXPECT_EQ(c["aws"].latency.counts[5], 1u);  // 4 s: le=5
  EXPECT_EQ(c["gcp"].replicas, 1u);
  EXPECT_EQ(c["gcp"].replica_bytes, 3000u);
  EXPECT_EQ(c["gcp"].latency.count, 0u);
  auto j2 = *store->CheckpointCounters("j-2");
  EXPECT_EQ(j2["aws"].latency.count, 1u);  // counted in +Inf only
  uint64_t in_buckets = 0;
  for (auto n : j2["aws"].latency.counts) in_buckets += n;
  EXPECT_EQ(in_buckets, 0u);
  EXPECT_EQ(store->Checkpoints("j-1")->size(), 3u);
}

// The flusher, off the writer's thread, syncs the log and, once the log is large (1000 pages),
// checkpoints it into the database file itself; the writer's own commits never do (the WAL hook
// replaces SQLite's checkpoints on its thread). So a copy of coordinator.db alone, without its
// -wal log, lacks a small write but soon has the last of about 5 MiB of writes. Sync returns
// once all of it is durable, and everything is there when the database is opened again.
TEST_F(CoordinatorDbTest, TheFlusherSyncsASmallLogAndCheckpointsALargeOne) {
  auto file_has_state = [&](const std::string& key) {
    fs::path copy = dir_ / "copy";
    fs::remove_all(copy);
    fs::create_directories(copy);
    fs::copy_file(dir_ / "coordinator.db", copy / "coordinator.db");
    sqlite3* db = nullptr;
    EXPECT_EQ(
        sqlite3_open_v2((copy / "coordinator.db").c_str(), &db, SQLITE_OPEN_READWRITE, nullptr),
        SQLITE_OK);
    sqlite3_stmt* q = nullptr;
    bool found = false;
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM state WHERE key = ?", -1, &q, nullptr) ==
        SQLITE_OK) {
      sqlite3_bind_text(q, 1, key.c_str(), -1, SQLITE_TRANSIENT);
      found = sqlite3_step(q) == SQLITE_ROW && sqlite3_column_int(q, 0) == 1;
    }
    sqlite3_finalize(q);
    sqlite3_close_v2(db);
    return found;
  };
  auto store = *CoordinatorDb::Open(dir_, std::chrono::milliseconds(10));
  ASSERT_TRUE(store->PutState("small", "x", 1).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // ten flush intervals
  EXPECT_TRUE(store->Sync().ok());
  EXPECT_FALSE(file_has_state("small")) << "a small log is synced, not checkpointed";
  const std::string blob(100 << 10, 'b');
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(store->PutState("big-" + std::to_string(i), blob, 2).ok());
  }
  ASSERT_TRUE(store->PutState("last", "y", 3).ok());
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!file_has_state("last") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(file_has_state("last"));
  EXPECT_TRUE(file_has_state("small"));
  EXPECT_TRUE(store->Sync().ok());
  EXPECT_TRUE(store->FlushError().ok());
  store.reset();
  auto again = *CoordinatorDb::Open(dir_, std::chrono::milliseconds(0));
  EXPECT_EQ(**again->GetState("last"), "y");
  EXPECT_EQ((*again->GetState("big-49"))->size(), blob.size());
  EXPECT_TRUE(again->Sync().ok());  // no flusher: every write was synced at its commit
}

// A VFS over SQLite's default one that fails writes or syncs of main database files while the
// test asks it to (the state database's own code and SQLite are the real ones; only the system
// calls under them fail). Registered as the default, so CoordinatorDb::Open uses it.
std::atomic<bool> g_fail_db_writes{false};
std::atomic<int> g_fail_db_syncs{0};  // that many syncs of a main database file fail

struct FaultFile {
  sqlite3_file base;
  sqlite3_file* real;  // right after this struct, in the same allocation
  bool main_db;
};
sqlite3_vfs* g_real_vfs = nullptr;
sqlite3_io_methods g_fault_methods;

sqlite3_file* Real(sqlite3_file* f) { return reinterpret_cast<FaultFile*>(f)->real; }

int FaultOpen(sqlite3_vfs*, sqlite3_filename name, sqlite3_file* file, int flags, int* out) {
  auto* ff = reinterpret_cast<FaultFile*>(file);
  ff->real = reinterpret_cast<sqlite3_file*>(ff + 1);
  ff->main_db = (flags & SQLITE_OPEN_MAIN_DB) != 0;
  int rc = g_real_vfs->xOpen(g_real_vfs, name, ff->real, flags, out);
  if (rc != SQLITE_OK || ff->real->pMethods == nullptr) {
    file->pMethods = nullptr;
    return rc;
  }
  static std::once_flag once;
  std::call_once(once, [&] {
    // Every method the real file has, forwarded; writes and syncs of main database files checked.
    const sqlite3_io_methods* r = ff->real->pMethods;
    g_fault_methods = *r;
    g_fault_methods.xClose = [](sqlite3_file* f) {
      int rc = Real(f)->pMethods->xClose(Real(f));
      f->pMethods = nullptr;
      return rc;
    };
    g_fault_methods.xRead = [](sqlite3_file* f, void* b, int n, sqlite3_int64 o) {
      return Real(f)->pMethods->xRead(Real(f), b, n, o);
    };
    g_fault_methods.xWrite = [](sqlite3_file* f, const void* b, int n, sqlite3_int64 o) {
      if (reinterpret_cast<FaultFile*>(f)->main_db && g_fail_db_writes) return SQLITE_IOERR_WRITE;
      return Real(f)->pMethods->xWrite(Real(f), b, n, o);
    };
    g_fault_methods.xTruncate = [](sqlite3_file* f, sqlite3_int64 n) {
      return Real(f)->pMethods->xTruncate(Real(f), n);
    };
    g_fault_methods.xSync = [](sqlite3_file* f, int flags) {
      if (reinterpret_cast<FaultFile*>(f)->main_db && g_fail_db_syncs > 0) {
        --g_fail_db_syncs;
        return SQLITE_IOERR_FSYNC;
      }
      return Real(f)->pMethods->xSync(Real(f), flags);
    };
    g_fault_methods.xFileSize = [](sqlite3_file* f, sqlite3_int64* n) {
      return Real(f)->pMethods->xFileSize(Real(f), n);
    };
    g_fault_methods.xLock = [](sqlite3_file* f, int l) {
      return Real(f)->pMethods->xLock(Real(f), l);
    };
    g_fault_methods.xUnlock = [](sqlite3_file* f, int l) {
      return Real(f)->pMethods->xUnlock(Real(f), l);
    };
    g_fault_methods.xCheckReservedLock = [](sqlite3_file* f, int* o) {
      return Real(f)->pMethods->xCheckReservedLock(Real(f), o);
    };
    g_fault_methods.xFileControl = [](sqlite3_file* f, int op, void* a) {
      return Real(f)->pMethods->xFileControl(Real(f), op, a);
    };
    g_fault_methods.xSectorSize = [](sqlite3_file* f) {
      return Real(f)->pMethods->xSectorSize(Real(f));
    };
    g_fault_methods.xDeviceCharacteristics = [](sqlite3_file* f) {
      return Real(f)->pMethods->xDeviceCharacteristics(Real(f));
    };
    if (r->iVersion >= 2) {
      g_fault_methods.xShmMap = [](sqlite3_file* f, int pg, int sz, int ext, void volatile** p) {
        return Real(f)->pMethods->xShmMap(Real(f), pg, sz, ext, p);
      };
      g_fault_methods.xShmLock = [](sqlite3_file* f, int off, int n, int flags) {
        return Real(f)->pMethods->xShmLock(Real(f), off, n, flags);
      };
      g_fault_methods.xShmBarrier = [](sqlite3_file* f) {
        Real(f)->pMethods->xShmBarrier(Real(f));
      };
      g_fault_methods.xShmUnmap = [](sqlite3_file* f, int del) {
        return Real(f)->pMethods->xShmUnmap(Real(f), del);
      };
    }
    if (r->iVersion >= 3) {
      g_fault_methods.xFetch = [](sqlite3_file* f, sqlite3_int64 o, int n, void** p) {
        return Real(f)->pMethods->xFetch(Real(f), o, n, p);
      };
      g_fault_methods.xUnfetch = [](sqlite3_file* f, sqlite3_int64 o, void* p) {
        return Real(f)->pMethods->xUnfetch(Real(f), o, p);
      };
    }
  });
  file->pMethods = &g_fault_methods;
  return rc;
}

void InstallFaultVfs() {
  static sqlite3_vfs vfs;
  static std::once_flag once;
  std::call_once(once, [] {
    g_real_vfs = sqlite3_vfs_find(nullptr);
    vfs = *g_real_vfs;
    vfs.zName = "muster-test-fault";
    vfs.szOsFile = static_cast<int>(sizeof(FaultFile)) + g_real_vfs->szOsFile;
    vfs.xOpen = FaultOpen;
    sqlite3_vfs_register(&vfs, /*makeDflt=*/1);
  });
}

// A checkpoint of the log into the database file whose writes fail (a full disk, an I/O error)
// loses nothing and is not latched: the log still holds every change and is synced, so writes
// go on; the failures are counted (/metrics) and the next flush tries again, and once writes
// work the checkpoint completes. A failed sync of the database file is latched like a failed
// sync of the log: frames an earlier checkpoint copied may be lost, and retrying would claim
// them.
TEST_F(CoordinatorDbTest, AFailedCheckpointWriteIsRetriedAndAFailedSyncIsLatched) {
  InstallFaultVfs();
  auto opened = CoordinatorDb::Open(dir_, std::chrono::milliseconds(10));
  ASSERT_TRUE(opened.ok()) << opened.status();
  auto store = std::move(*opened);
  auto wait_for = [](const std::function<bool()>& done) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return done();
  };
  const std::string blob(100 << 10, 'b');
  g_fail_db_writes = true;
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(store->PutState("big-" + std::to_string(i), blob, 2).ok()) << i;
  }
  ASSERT_TRUE(wait_for([&] { return store->GetDurability().checkpoint_errors > 0; }))
      << "no checkpoint was tried with a log of " << store->GetDurability().log_pages << " pages";
  // The flush that counted it went on to sync the log: every commit is durable.
  ASSERT_TRUE(wait_for([&] { return store->GetDurability().durable == 50; }));
  CoordinatorDb::Durability d = store->GetDurability();
  EXPECT_TRUE(d.flusher);
  EXPECT_FALSE(d.failed);
  EXPECT_TRUE(store->FlushError().ok()) << store->FlushError();
  EXPECT_GE(d.log_pages, 1000);
  EXPECT_TRUE(store->PutState("during", "x", 3).ok()) << "writes are not refused";
  // Writes work again: the next checkpoint copies the log (which restarts small at the next
  // commit).
  g_fail_db_writes = false;
  ASSERT_TRUE(wait_for([&] {
    EXPECT_TRUE(store->PutState("tick", "t", 4).ok());
    return store->GetDurability().log_pages < 100;
  })) << "the checkpoint never completed once writes worked";
  EXPECT_FALSE(store->GetDurability().failed);
  EXPECT_TRUE(store->FlushError().ok());

  // Now a sync of the database file fails: latched, and later changes are refused.
  g_fail_db_syncs = 1000;
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(store->PutState("more-" + std::to_string(i), blob, 5).ok()) << i;
  }
  ASSERT_TRUE(wait_for([&] { return !store->FlushError().ok(); }));
  EXPECT_NE(store->FlushError().message().find("checkpoint of"), std::string::npos)
      << store->FlushError();
  EXPECT_TRUE(store->GetDurability().failed);
  EXPECT_FALSE(store->PutState("refused", "r", 6).ok());
  g_fail_db_syncs = 0;
  store.reset();
  // Everything committed before the latch is there.
  auto again = CoordinatorDb::Open(dir_, std::chrono::milliseconds(0));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*(*again)->GetState("big-49"))->size(), blob.size());
  EXPECT_EQ(**(*again)->GetState("during"), "x");
  EXPECT_EQ((*(*again)->GetState("more-49"))->size(), blob.size());
  EXPECT_FALSE((*(*again)->GetState("refused")).has_value());
}

// A counted report whose write fails changes neither the catalog nor the counters.
TEST_F(CoordinatorDbTest, FailedCountedCheckpointChangesNothing) {
  FaultInjectionCoordinatorDb store(*CoordinatorDb::Open(dir_));
  CheckpointStats one;
  one.AddReport(false, 10, 1.0);
  ASSERT_TRUE(store.RecordCheckpointCounted({"j-1", 10, "ckpt@aws", true, 1}, "aws", one).ok());
  store.FailWrite(2);
  EXPECT_FALSE(store.RecordCheckpointCounted({"j-1", 20, "ckpt@aws", true, 2}, "aws", one).ok());
  EXPECT_EQ(store.write_log().back(), "RecordCheckpoint j-1 step 20");
  EXPECT_EQ((*store.CheckpointCounters("j-1"))["aws"].commits, 1u);
  EXPECT_EQ(store.Checkpoints("j-1")->size(), 1u);
}

TEST_F(CoordinatorDbTest, SecondOpenOfTheSameDirIsRefused) {
  auto first = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(first.ok());
  auto second = CoordinatorDb::Open(dir_);
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("in use"), std::string::npos);
}

TEST_F(CoordinatorDbTest, KillNineLosesNoInsertedJob) {
  // A child inserts jobs and reports each id on a pipe after InsertJob returns; the parent
  // SIGKILLs it mid-stream. Every reported job must be there.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    auto store = CoordinatorDb::Open(dir_);
    if (!store.ok()) _exit(3);
    for (int i = 0;; ++i) {
      JobRecord j = Job("k");
      if (!(*store)->InsertJob(&j).ok()) _exit(4);
      std::string line = j.id + "\n";
      if (write(fds[1], line.data(), line.size()) < 0) _exit(5);
    }
  }
  close(fds[1]);
  std::string got;
  char buf[256];
  int lines = 0;
  while (lines < 25) {
    ssize_t n = read(fds[0], buf, sizeof(buf));
    ASSERT_GT(n, 0) << "child died early";
    got.append(buf, n);
    lines = std::count(got.begin(), got.end(), '\n');
  }
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  close(fds[0]);
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto jobs = *(*store)->LoadJobs();
  EXPECT_GE(static_cast<int>(jobs.size()), lines);
  for (int i = 1; i <= lines; ++i) {
    EXPECT_TRUE((*store)->GetJob("k-" + std::to_string(i)).ok()) << "lost k-" << i;
  }
}

TEST_F(CoordinatorDbTest, SubmitterAndNodeKeyBindingsPersist) {
  {
    auto store = CoordinatorDb::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    JobRecord a = Job("a");
    a.submitter = "alice-key";
    ASSERT_TRUE((*store)->InsertJob(&a).ok());
    ASSERT_TRUE((*store)->BindNodeKey("n0", "key-0", 1).ok());
    ASSERT_TRUE((*store)->BindNodeKey("n1", "key-1", 1).ok());
    ASSERT_TRUE((*store)->BindNodeKey("n1", "key-2", 2).ok());  // moved to another key
  }
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].submitter, "alice-key");
  auto keys = (*store)->LoadNodeKeys();
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(*keys, (std::map<std::string, std::string>{{"n0", "key-0"}, {"n1", "key-2"}}));
}

// A database written before jobs recorded their submitter gets the column; its jobs have none.
TEST_F(CoordinatorDbTest, ADatabaseFromBeforeSubmittersOpens) {
  {
    auto store = CoordinatorDb::Open(dir_);
    ASSERT_TRUE(store.ok());
    JobRecord a = Job("old");
    ASSERT_TRUE((*store)->InsertJob(&a).ok());
  }
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "coordinator.db").c_str(), &db), SQLITE_OK);
    int rc = sqlite3_exec(db, "ALTER TABLE jobs DROP COLUMN submitter", nullptr, nullptr, nullptr);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << "could not make an old database";
  }
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].submitter, "");
  JobRecord b = Job("new");
  b.submitter = "k";
  ASSERT_TRUE((*store)->InsertJob(&b).ok());
  EXPECT_EQ((*store)->GetJob(b.id)->submitter, "k");
}

// Exclusions and state blobs round-trip and survive a reopen; putting a state again replaces it.
TEST_F(CoordinatorDbTest, ExclusionsAndStateSurviveAReopen) {
  {
    auto store = CoordinatorDb::Open(dir_);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->ExcludeNode("j-1", "n1", "no GPU", 5).ok());
    ASSERT_TRUE((*store)->ExcludeNode("j-1", "n1", "again", 6).ok()) << "twice is Ok";
    ASSERT_TRUE((*store)->ExcludeNode("j-1", "n2", "no route", 7).ok());
    ASSERT_TRUE((*store)->ExcludeNode("j-2", "n1", "no GPU", 8).ok());
    ASSERT_TRUE((*store)->PutState("providers", "v1", 1).ok());
    ASSERT_TRUE((*store)->PutState("providers", std::string("v2\0bin", 6), 2).ok());
    auto none = (*store)->GetState("other");
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none->has_value());
  }
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok());
  auto ex = (*store)->LoadExclusions();
  ASSERT_TRUE(ex.ok()) << ex.status();
  std::map<std::string, std::set<std::string>> want = {{"j-1", {"n1", "n2"}}, {"j-2", {"n1"}}};
  EXPECT_EQ(*ex, want);
  auto v = (*store)->GetState("providers");
  ASSERT_TRUE(v.ok() && v->has_value());
  EXPECT_EQ(**v, std::string("v2\0bin", 6));
}

// A database made before exclusions and state blobs were stored (no such tables) opens: the
// tables are created and the old rows are kept.
TEST_F(CoordinatorDbTest, ADatabaseFromBeforeExclusionsAndStateOpens) {
  {
    auto store = CoordinatorDb::Open(dir_);
    ASSERT_TRUE(store.ok());
    JobRecord a = Job("old");
    ASSERT_TRUE((*store)->InsertJob(&a).ok());
  }
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "coordinator.db").c_str(), &db), SQLITE_OK);
    int rc =
        sqlite3_exec(db, "DROP TABLE job_exclusions; DROP TABLE state;", nullptr, nullptr, nullptr);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << "could not make an old database";
  }
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  ASSERT_EQ(jobs->size(), 1u);
  auto ex = (*store)->LoadExclusions();
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_TRUE(ex->empty());
  ASSERT_TRUE((*store)->ExcludeNode((*jobs)[0].id, "n1", "no GPU", 1).ok());
  ASSERT_TRUE((*store)->PutState("providers", "{}", 1).ok());
  EXPECT_EQ((*store)->LoadExclusions()->at((*jobs)[0].id).count("n1"), 1u);
}

// Hot spares: each job's set is replaced whole, an empty set deletes it, a node held for
// another job moves, and the sets survive a reopen; a database made before spares were kept
// (no job_spares table) opens with none.
TEST_F(CoordinatorDbTest, SparesAreReplacedPerJobAndSurviveAReopen) {
  {
    auto store = CoordinatorDb::Open(dir_);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->PutSpares("j-1", {"n3", "n2"}, 1).ok());
    ASSERT_TRUE((*store)->PutSpares("j-2", {"n4"}, 2).ok());
    ASSERT_TRUE((*store)->PutSpares("j-1", {"n3"}, 3).ok()) << "n2 replaced a lost node";
    ASSERT_TRUE((*store)->PutSpares("j-3", {"n5"}, 4).ok());
    ASSERT_TRUE((*store)->PutSpares("j-3", {}, 5).ok()) << "j-3 ended";
    ASSERT_TRUE((*store)->PutSpares("j-4", {"n4"}, 6).ok()) << "n4 moves from j-2";
  }
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok());
  auto sp = (*store)->LoadSpares();
  ASSERT_TRUE(sp.ok()) << sp.status();
  std::map<std::string, std::vector<std::string>> want = {{"j-1", {"n3"}}, {"j-4", {"n4"}}};
  EXPECT_EQ(*sp, want);
  store->reset();
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "coordinator.db").c_str(), &db), SQLITE_OK);
    int rc = sqlite3_exec(db, "DROP TABLE job_spares;", nullptr, nullptr, nullptr);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << "could not make an old database";
  }
  store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  sp = (*store)->LoadSpares();
  ASSERT_TRUE(sp.ok()) << sp.status();
  EXPECT_TRUE(sp->empty());
  ASSERT_TRUE((*store)->PutSpares("j-1", {"n1"}, 7).ok());
  EXPECT_EQ((*store)->LoadSpares()->at("j-1"), std::vector<std::string>{"n1"});
}

// Snapshot fallbacks: put, replaced, cleared by an empty reason, kept across a reopen; a
// database made before they were kept (no job_snapshot_fallbacks table) opens with none and
// takes new ones.
TEST_F(CoordinatorDbTest, SnapshotFallbacksSurviveAReopenAndAnOldDatabaseTakesThem) {
  {
    auto store = CoordinatorDb::Open(dir_);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->PutSnapshotFallback("j-1", "first", 1).ok());
    ASSERT_TRUE((*store)->PutSnapshotFallback("j-1", "second", 2).ok());
    ASSERT_TRUE((*store)->PutSnapshotFallback("j-2", "gone soon", 3).ok());
    ASSERT_TRUE((*store)->PutSnapshotFallback("j-2", "", 4).ok()) << "j-2's next attempt planned";
    ASSERT_TRUE((*store)->PutSnapshotFallback("j-3", "", 5).ok()) << "clearing nothing is fine";
  }
  auto store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok());
  auto fb = (*store)->LoadSnapshotFallbacks();
  ASSERT_TRUE(fb.ok()) << fb.status();
  EXPECT_EQ(*fb, (std::map<std::string, std::string>{{"j-1", "second"}}));
  store->reset();
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "coordinator.db").c_str(), &db), SQLITE_OK);
    int rc = sqlite3_exec(db, "DROP TABLE job_snapshot_fallbacks;", nullptr, nullptr, nullptr);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << "could not make an old database";
  }
  store = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  fb = (*store)->LoadSnapshotFallbacks();
  ASSERT_TRUE(fb.ok()) << fb.status();
  EXPECT_TRUE(fb->empty());
  ASSERT_TRUE((*store)->PutSnapshotFallback("j-1", "again", 6).ok());
  EXPECT_EQ((*store)->LoadSnapshotFallbacks()->at("j-1"), "again");
}

// The fault-injecting store fails exactly the write asked for (and, sticky, every one after),
// names it, and a failed write does not reach the store underneath.
TEST_F(CoordinatorDbTest, TheFaultInjectingStoreFailsTheChosenWritesOnly) {
  auto base = CoordinatorDb::Open(dir_);
  ASSERT_TRUE(base.ok());
  FaultInjectionCoordinatorDb fault(std::move(*base));
  fault.FailWrite(2);
  JobRecord a = Job("a");
  ASSERT_TRUE(fault.InsertJob(&a).ok());
  a.detail = "changed";
  Status st = fault.UpdateJob(a);
  EXPECT_EQ(st.code(), StatusCode::kInternal);
  EXPECT_EQ(st.message(), "injected fault: write 2 (UpdateJob " + a.id + ") failed");
  EXPECT_EQ(fault.GetJob(a.id)->detail, "") << "a failed write changes nothing";
  ASSERT_TRUE(fault.UpdateJob(a).ok()) << "only write 2";
  EXPECT_EQ(fault.GetJob(a.id)->detail, "changed");
  fault.FailWrite(4, /*sticky=*/true);
  proto::Event e;
  e.set_kind("k");
  EXPECT_FALSE(fault.AppendEvent(e).ok());
  EXPECT_FALSE(fault.PutAttempt({a.id, 1, {"n"}, 1, 0, "", ""}).ok()) << "sticky";
  EXPECT_EQ(fault.writes(), 5);
  EXPECT_EQ(fault.write_log()[4], "PutAttempt " + a.id + " attempt 1");
  EXPECT_TRUE(fault.Events("", 0, 10)->empty());
}

}  // namespace
}  // namespace muster::coordinator
