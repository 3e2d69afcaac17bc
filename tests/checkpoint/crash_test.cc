// Crash consistency, proven with real processes: a child process saving checkpoints in a loop
// (two ranks) is killed with SIGKILL at random instants. After every kill, LatestStep() must
// name a checkpoint that verifies and restores bit-exactly at another world size, and gc must
// leave no incomplete directories. 24 trials by default; MUSTER_CKPT_CRASH_TRIALS=200 for the
// stress mode.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <random>
#include <thread>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "checkpoint/replicate.h"
#include "tests/checkpoint/crash_state.h"

namespace muster::checkpoint {
namespace {

using testing::kCrashBias;
using testing::kCrashCols;
using testing::kCrashRows;

// Starts the child with `args`; returns its pid once it printed "ready" (or -1 after 20 s).
pid_t StartChildArgs(const std::vector<std::string>& args) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    std::vector<char*> argv = {const_cast<char*>(CRASH_CHILD)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(CRASH_CHILD, argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string got;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (got.find("ready\n") == std::string::npos) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    struct pollfd p = {fds[0], POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
    char buf[64];
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n <= 0) break;
    got.append(buf, n);
  }
  ::close(fds[0]);
  if (got.find("ready\n") == std::string::npos) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

pid_t StartChild(const std::string& dir, int64_t start) {
  return StartChildArgs({dir, std::to_string(start)});
}

void ExpectStepRestores(const std::string& dir, int64_t step) {
  ASSERT_EQ(VerifyStep(LocalVolume(), dir, step), Status::Ok());
  CheckpointerOptions o;
  o.dir = dir;
  auto ck = *Checkpointer::Create(o);
  auto m = *ck->ReadManifest(step);
  EXPECT_EQ(m.UserMetadata(), "step=" + std::to_string(step));
  // Restore at world size 3 (saved at 2): rows split 128 each.
  for (int r = 0; r < 3; ++r) {
    const int64_t rows = kCrashRows / 3, r0 = r * rows;
    std::vector<uint32_t> w(rows * kCrashCols), big(rows * kCrashCols * 2), bias(kCrashBias);
    ASSERT_EQ(ck->Restore(
                  step, {RestoreRequest::RowShard("w", DType::kI32, {kCrashRows, kCrashCols}, r0,
                                                  rows, w.data()),
                         RestoreRequest::RowShard("big", DType::kI32, {kCrashRows, kCrashCols * 2},
                                                  r0, rows, big.data()),
                         RestoreRequest::Whole("bias", DType::kI32, bias.data())}),
              Status::Ok());
    ASSERT_EQ(w, testing::Fill(step, 1, r0 * kCrashCols, rows * kCrashCols));
    ASSERT_EQ(big, testing::Fill(step, 3, r0 * kCrashCols * 2, rows * kCrashCols * 2));
    ASSERT_EQ(bias, testing::Fill(step, 2, 0, kCrashBias));
  }
}

TEST(CheckpointCrashTest, KillNineAtRandomInstantsNeverLeavesABadLatest) {
  int trials = 24;
  if (const char* e = std::getenv("MUSTER_CKPT_CRASH_TRIALS"); e && *e) trials = std::atoi(e);
  testing::TempDir dir;
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> delay_us(0, 150000);
  int64_t latest = -1;
  int advanced = 0, killed_mid_save = 0;
  for (int t = 0; t < trials; ++t) {
    SCOPED_TRACE("trial " + std::to_string(t));
    // Alternate trials write after the snapshot and overlapped with it.
    if (t % 2) {
      ::setenv("MUSTER_CKPT_OVERLAP", "1", 1);
    } else {
      ::unsetenv("MUSTER_CKPT_OVERLAP");
    }
    pid_t pid = StartChild(dir.path(), latest + 1);
    ASSERT_GT(pid, 0) << "the crash child did not start";
    // The kill instant is the variable under test, not a synchronisation.
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the child exited by itself: " << status;

    auto steps = *ListSteps(LocalVolume(), dir.path());
    for (const auto& s : steps) killed_mid_save += !s.committed && s.step > latest;
    auto now = LatestCommittedStep(LocalVolume(), dir.path());
    if (!now.ok()) {
      ASSERT_EQ(now.status().code(), StatusCode::kNotFound);
      ASSERT_EQ(latest, -1) << "a committed step disappeared";
    } else {
      ASSERT_GE(*now, latest) << "LatestStep went backwards";
      advanced += *now > latest;
      latest = *now;
      ExpectStepRestores(dir.path(), latest);
      if (HasFatalFailure()) return;
    }
    auto gc = CollectGarbage(LocalVolume(), dir.path(), {.keep_last = 2}, INT64_MAX);
    ASSERT_TRUE(gc.ok()) << gc.status();
    auto after_gc = *ListSteps(LocalVolume(), dir.path());
    for (const auto& s : after_gc) {
      EXPECT_TRUE(s.committed) << "gc left " << s.path;
    }
  }
  std::printf("%d trials: latest advanced in %d, killed mid-save in %d, final step %lld\n", trials,
              advanced, killed_mid_save, static_cast<long long>(latest));
  // The trials did exercise both outcomes: commits happened, and kills landed mid-save.
  EXPECT_GT(advanced, 0);
  EXPECT_GT(killed_mid_save, 0);
}

TEST(CheckpointCrashTest, ReplicationKilledAtRandomInstantsResumesAndNeverExposesAPartialCopy) {
  testing::TempDir dir;
  const std::string src = dir.sub("src");
  // Source: the crash state at step 5, saved by two ranks.
  {
    auto store = collectives::NewInMemoryRendezvousStore();
    std::vector<std::thread> ts;
    for (int r = 0; r < testing::kCrashWorld; ++r) {
      ts.emplace_back([&, r] {
        CheckpointerOptions o;
        o.dir = src;
        o.rank = r;
        o.world_size = testing::kCrashWorld;
        o.store = store.get();
        auto ck = *Checkpointer::Create(o);
        auto c = testing::MakeCrashRank(5, r);
        ASSERT_EQ(ck->Save(5, c.state), Status::Ok());
        ASSERT_EQ(ck->Wait(), Status::Ok());
      });
    }
    for (auto& t : ts) t.join();
  }
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> delay_us(0, 40000);
  int completed_by_child = 0, resumed = 0;
  for (int t = 0; t < 10; ++t) {
    SCOPED_TRACE("trial " + std::to_string(t));
    const std::string dst = dir.sub("dst" + std::to_string(t));
    pid_t pid = StartChildArgs({"replicate", src, dst, "5"});
    ASSERT_GT(pid, 0);
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    // Never a partial copy that looks committed.
    auto latest = LatestCommittedStep(LocalVolume(), dst);
    if (latest.ok()) {
      ++completed_by_child;
      ASSERT_EQ(*latest, 5);
      ASSERT_EQ(VerifyStep(LocalVolume(), dst, 5), Status::Ok());
    }
    // Resume to completion.
    auto rep = Replicate(LocalVolume(), src, LocalVolume(), dst, 5);
    ASSERT_TRUE(rep.ok()) << rep.status();
    resumed += rep->shards_resumed > 0;
    ExpectStepRestores(dst, 5);
    if (HasFatalFailure()) return;
  }
  std::printf("replication kills: %d completed before the kill, %d resumed a partial copy\n",
              completed_by_child, resumed);
}

}  // namespace
}  // namespace muster::checkpoint
