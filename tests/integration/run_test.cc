// `muster run` end to end: the real binary, real ranks, real signals.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/subprocess.h"

extern char** environ;

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// A `muster run ...` process with its stdout and stderr read through pipes.
class MusterRun {
 public:
  explicit MusterRun(std::vector<std::string> args, std::vector<std::string> extra_env = {},
                     const std::string& stdin_text = "") {
    int out[2], err[2], in[2];
    EXPECT_EQ(pipe2(out, O_CLOEXEC), 0);
    EXPECT_EQ(pipe2(err, O_CLOEXEC), 0);
    EXPECT_EQ(pipe2(in, O_CLOEXEC), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    std::vector<std::string> argv = {MUSTER_BIN, "run"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.push_back(*e);
    env.insert(env.end(), extra_env.begin(), extra_env.end());
    std::vector<char*> cenv;
    for (auto& e : env) cenv.push_back(e.data());
    cenv.push_back(nullptr);
    EXPECT_EQ(posix_spawn(&pid_, MUSTER_BIN, &fa, nullptr, cargv.data(), cenv.data()), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    close(in[0]);
    if (!stdin_text.empty()) {
      EXPECT_EQ(write(in[1], stdin_text.data(), stdin_text.size()),
                static_cast<ssize_t>(stdin_text.size()));
    }
    close(in[1]);
    fds_[0] = out[0];
    fds_[1] = err[0];
    pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
    started_ = Clock::now();
  }
  ~MusterRun() {
    if (!exited_) {
      kill(pid_, SIGKILL);
      Wait(10s);
    }
    for (int fd : fds_)
      if (fd >= 0) close(fd);
    if (pidfd_ >= 0) close(pidfd_);
  }

  // Reads output until `stop` says so, the process has exited with its pipes drained, or the
  // deadline passes. Returns whether `stop` was satisfied.
  template <typename Stop>
  bool Pump(Stop stop, std::chrono::milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    while (!stop()) {
      if (exited_ && fds_[0] < 0 && fds_[1] < 0) return stop();
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p[3] = {
          {fds_[0], POLLIN, 0}, {fds_[1], POLLIN, 0}, {exited_ ? -1 : pidfd_, POLLIN, 0}};
      poll(p, 3, static_cast<int>(left.count()));
      for (int i = 0; i < 2; ++i) {
        if (fds_[i] < 0 || !(p[i].revents & (POLLIN | POLLHUP))) continue;
        char buf[65536];
        ssize_t n = read(fds_[i], buf, sizeof(buf));
        if (n <= 0) {
          close(fds_[i]);
          fds_[i] = -1;
        } else {
          text_[i].append(buf, static_cast<size_t>(n));
        }
      }
      if (!exited_ && (p[2].revents & POLLIN)) {
        int status;
        waitpid(pid_, &status, 0);
        exited_ = true;
        ended_ = Clock::now();
        code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
    }
    return true;
  }
  bool WaitForOutput(const std::string& needle, std::chrono::milliseconds timeout = 10s) {
    return Pump([&] { return text_[0].find(needle) != std::string::npos; }, timeout);
  }
  // Exit code, or -1 if it did not exit in time.
  int Wait(std::chrono::milliseconds timeout = 20s) {
    Pump([&] { return exited_ && fds_[0] < 0 && fds_[1] < 0; }, timeout);
    return exited_ ? code_ : -1;
  }
  void Signal(int sig) { kill(pid_, sig); }

  const std::string& out() const { return text_[0]; }
  const std::string& err() const { return text_[1]; }
  std::chrono::milliseconds elapsed() const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(ended_ - started_);
  }
  // The lines of stderr that muster run itself wrote.
  std::vector<std::string> SummaryLines() const {
    std::vector<std::string> out;
    std::stringstream ss(text_[1]);
    std::string line;
    while (std::getline(ss, line))
      if (line.rfind("muster run:", 0) == 0) out.push_back(line);
    return out;
  }

 private:
  pid_t pid_ = -1;
  int pidfd_ = -1;
  int fds_[2] = {-1, -1};
  std::string text_[2];
  bool exited_ = false;
  int code_ = -1;
  Clock::time_point started_, ended_;
};

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string line;
  while (std::getline(ss, line)) out.push_back(line);
  return out;
}

TEST(MusterRunTest, ExitsZeroWhenEveryRankDoes) {
  MusterRun run({"-np", "4", "--tag-output", "sh", "-c", "echo hello $RANK"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  std::set<std::string> lines;
  for (const auto& l : Lines(run.out())) lines.insert(l);
  EXPECT_EQ(lines,
            (std::set<std::string>{"[0] hello 0", "[1] hello 1", "[2] hello 2", "[3] hello 3"}));
  EXPECT_TRUE(run.SummaryLines().empty()) << run.err();
}

// `--` right after `run` (no option before it) ends the options, as with mpirun; CLI11 used to
// take it for itself and refuse the program as "not expected" (exit 109).
TEST(MusterRunTest, ADoubleDashRightAfterRunStartsTheProgram) {
  MusterRun run({"--", "sh", "-c", "echo rank $RANK of $WORLD_SIZE"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  // Without -np, one rank per slot of this machine (as mpirun does).
  std::vector<std::string> lines = Lines(run.out());
  ASSERT_FALSE(lines.empty()) << run.err();
  std::set<std::string> want, got(lines.begin(), lines.end());
  for (size_t r = 0; r < lines.size(); ++r) {
    want.insert("rank " + std::to_string(r) + " of " + std::to_string(lines.size()));
  }
  EXPECT_EQ(got, want) << run.out();
}

TEST(MusterRunTest, FirstFailureDecidesTheCodeAndIsNamedOnce) {
  MusterRun run({"-np", "4", "sh", "-c", "if [ $RANK = 2 ]; then exit 3; fi; exec sleep 100"});
  ASSERT_EQ(run.Wait(), 3) << run.err();
  auto summary = run.SummaryLines();
  ASSERT_EQ(summary.size(), 1u) << run.err();
  EXPECT_NE(summary[0].find("rank 2 "), std::string::npos) << summary[0];
  EXPECT_NE(summary[0].find("on localhost"), std::string::npos) << summary[0];
  EXPECT_NE(summary[0].find("exited with code 3"), std::string::npos) << summary[0];
  // The sleeping ranks were stopped by SIGTERM, not waited for.
  EXPECT_LT(run.elapsed(), 10s);
}

// A FIFO that one rank opens for reading and another for writing: the reader blocks until the
// writer is ready, which orders events across ranks without sleeping.
std::string MakeFifo(const std::string& tag) {
  std::string path =
      ::testing::TempDir() + "/muster_run_fifo_" + tag + "_" + std::to_string(getpid());
  unlink(path.c_str());
  EXPECT_EQ(mkfifo(path.c_str(), 0600), 0);
  return path;
}

TEST(MusterRunTest, FailuresCausedByTheStopAreNotTheFirstFailure) {
  // Rank 3 fails with 7 only because rank 1's failure made the launcher SIGTERM it; rank 1
  // fails only once rank 3 has armed its trap.
  std::string fifo = MakeFifo("stop");
  MusterRun run({"-np", "4", "-x", "FIFO=" + fifo, "sh", "-c",
                 "case $RANK in 1) read x < $FIFO; exit 5;; 3) trap 'exit 7' TERM; "
                 "sleep 100 & echo armed > $FIFO; wait;; *) exec sleep 100;; esac"});
  ASSERT_EQ(run.Wait(), 5) << run.err();
  auto summary = run.SummaryLines();
  ASSERT_EQ(summary.size(), 1u) << run.err();
  EXPECT_NE(summary[0].find("rank 1 "), std::string::npos) << summary[0];
  unlink(fifo.c_str());
}

TEST(MusterRunTest, APeerFailureExitGivesWayToTheRealCulprit) {
  // Rank 1 exits 75 (kPeerFailureExitCode: "a peer died") first; rank 2 then dies
  // of a SIGKILL the launcher did not send. Rank 2 is the culprit.
  std::string fifo = MakeFifo("peer");
  MusterRun run({"-np", "4", "-x", "FIFO=" + fifo, "sh", "-c",
                 "case $RANK in 1) read x < $FIFO; exit 75;; 2) trap 'kill -9 $$' TERM; "
                 "sleep 100 & echo armed > $FIFO; wait;; *) exec sleep 100;; esac"});
  ASSERT_EQ(run.Wait(), 128 + SIGKILL) << run.err();
  ASSERT_EQ(run.SummaryLines().size(), 1u) << run.err();
  EXPECT_NE(run.SummaryLines()[0].find("rank 2 "), std::string::npos) << run.SummaryLines()[0];
  unlink(fifo.c_str());
}

TEST(MusterRunTest, APeerFailureExitIsNamedWhenNothingElseFailed) {
  MusterRun run({"-np", "3", "sh", "-c", "if [ $RANK = 1 ]; then exit 75; fi; exec sleep 100"});
  ASSERT_EQ(run.Wait(), 75) << run.err();
  ASSERT_EQ(run.SummaryLines().size(), 1u) << run.err();
  EXPECT_NE(run.SummaryLines()[0].find("rank 1 "), std::string::npos);
}

TEST(MusterRunTest, RankKilledBySignalGives128PlusSignal) {
  MusterRun run({"-np", "2", "sh", "-c", "if [ $RANK = 1 ]; then kill -9 $$; fi; exec sleep 100"});
  ASSERT_EQ(run.Wait(), 128 + SIGKILL) << run.err();
  auto summary = run.SummaryLines();
  ASSERT_EQ(summary.size(), 1u);
  EXPECT_NE(summary[0].find("rank 1 "), std::string::npos);
  EXPECT_NE(summary[0].find("killed by signal 9 (SIGKILL)"), std::string::npos) << summary[0];
}

TEST(MusterRunTest, RanksIgnoringSigtermAreKilledAfterTheGrace) {
  std::string fifo = MakeFifo("grace");
  // SIG_IGN survives exec, so the sleep of rank 1 ignores SIGTERM.
  MusterRun run({"-np", "2", "--grace", "0.5", "-x", "FIFO=" + fifo, "sh", "-c",
                 "if [ $RANK = 0 ]; then read x < $FIFO; exit 1; fi; trap '' TERM; "
                 "echo armed > $FIFO; exec sleep 100"});
  ASSERT_EQ(run.Wait(), 1) << run.err();
  EXPECT_GE(run.elapsed(), 500ms);
  EXPECT_LT(run.elapsed(), 8s);
  ASSERT_EQ(run.SummaryLines().size(), 1u) << run.err();
  EXPECT_NE(run.SummaryLines()[0].find("rank 0 "), std::string::npos);
  unlink(fifo.c_str());
}

TEST(MusterRunTest, SigtermToTheLauncherIsForwardedToEveryRank) {
  MusterRun run({"-np", "3", "--tag-output", "sh", "-c",
                 "trap 'echo got-TERM; exit 0' TERM; sleep 100 & echo ready; wait"});
  ASSERT_TRUE(run.Pump(
      [&] {
        return run.out().find("[0] ready") != std::string::npos &&
               run.out().find("[1] ready") != std::string::npos &&
               run.out().find("[2] ready") != std::string::npos;
      },
      10s))
      << run.out();
  run.Signal(SIGTERM);
  ASSERT_EQ(run.Wait(), 128 + SIGTERM) << run.err();
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(run.out().find("[" + std::to_string(r) + "] got-TERM"), std::string::npos)
        << run.out();
  }
  ASSERT_EQ(run.SummaryLines().size(), 1u) << run.err();
  EXPECT_NE(run.SummaryLines()[0].find("interrupted by SIGTERM"), std::string::npos);
}

TEST(MusterRunTest, SigintToTheLauncherIsForwardedToEveryRank) {
  MusterRun run({"-np", "2", "--tag-output", "sh", "-c",
                 "trap 'kill $!; echo got-INT; exit 0' INT; sleep 100 & echo ready; wait"});
  ASSERT_TRUE(run.Pump(
      [&] {
        return run.out().find("[0] ready") != std::string::npos &&
               run.out().find("[1] ready") != std::string::npos;
      },
      10s));
  run.Signal(SIGINT);
  ASSERT_EQ(run.Wait(), 128 + SIGINT) << run.err();
  EXPECT_NE(run.out().find("[0] got-INT"), std::string::npos) << run.out();
  EXPECT_NE(run.out().find("[1] got-INT"), std::string::npos) << run.out();
}

TEST(MusterRunTest, RanksDieWithAKilledLauncher) {
  // Ranks that ignore SIGTERM and SIGPIPE and write nothing after their pid: only the
  // launcher's death can end them (mpirun's orted does the same for its ranks).
  MusterRun run(
      {"-np", "2", "--tag-output", "sh", "-c", "trap '' TERM PIPE; echo pid=$$; exec sleep 100"});
  ASSERT_TRUE(run.Pump(
      [&] {
        return run.out().find("[0] pid=") != std::string::npos &&
               run.out().find("[1] pid=") != std::string::npos;
      },
      10s))
      << run.out();
  std::vector<pid_t> ranks;
  std::regex pid_re("pid=([0-9]+)");
  for (std::sregex_iterator it(run.out().begin(), run.out().end(), pid_re), end; it != end; ++it)
    ranks.push_back(std::stoi((*it)[1]));
  ASSERT_EQ(ranks.size(), 2u) << run.out();
  run.Signal(SIGKILL);
  run.Wait();
  auto deadline = Clock::now() + 5s;
  for (pid_t pid : ranks) {
    while (!muster::testing::ProcessExited(pid) && Clock::now() < deadline)
      std::this_thread::sleep_for(20ms);
    EXPECT_TRUE(muster::testing::ProcessExited(pid))
        << "rank pid " << pid << " outlived muster run";
  }
}

TEST(MusterRunTest, TimeoutStopsTheJobWithItsOwnCode) {
  MusterRun run({"-np", "2", "--timeout", "0.5", "sleep", "100"});
  ASSERT_EQ(run.Wait(), 124) << run.err();
  EXPECT_GE(run.elapsed(), 500ms);
  EXPECT_LT(run.elapsed(), 8s);
  ASSERT_EQ(run.SummaryLines().size(), 1u) << run.err();
  EXPECT_NE(run.SummaryLines()[0].find("--timeout"), std::string::npos);
}

TEST(MusterRunTest, LinesOfConcurrentRanksNeverMix) {
  // awk writes in 4 KiB blocks, so lines reach the launcher cut at arbitrary places.
  const int kLines = 3000;
  MusterRun run({"-np", "6", "--tag-output", "awk", "-v", "n=" + std::to_string(kLines),
                 "BEGIN { r = ENVIRON[\"RANK\"]; for (i = 0; i < n; i++) { printf \"r%s-%d-\", "
                 "r, i; for (j = 0; j < 40; j++) printf \"abcdefgh\"; printf \"\\n\" } }"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  std::regex line_re(R"(\[(\d)\] r(\d)-(\d+)-(abcdefgh){40})");
  std::map<int, int> next;
  for (const auto& l : Lines(run.out())) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(l, m, line_re)) << "mixed or torn line: " << l.substr(0, 80);
    int tag = std::stoi(m[1]), rank = std::stoi(m[2]), i = std::stoi(m[3]);
    ASSERT_EQ(tag, rank);
    ASSERT_EQ(i, next[rank]++) << "rank " << rank << " lost or reordered a line";
  }
  for (int r = 0; r < 6; ++r) EXPECT_EQ(next[r], kLines) << "rank " << r;
}

#ifdef MUSTER_CONFORMANCE_RANK
TEST(MusterRunTest, NamesTheRankKilledMidAllreduceNotItsPeers) {
  // Real Gloo ranks through the hosted rendezvous store. Rank 2 is SIGKILLed mid-allreduce;
  // its peers fail with kPeerFailureExitCode (75); the launcher must name rank 2.
  MusterRun run({"-np", "4", "--tag-output", "--grace", "5", "-x", "MUSTER_COLL_BACKEND=gloo", "-x",
                 "MUSTER_COLL_TIMEOUT_MS=2000", "sh", "-c",
                 "echo pid $$; exec " MUSTER_CONFORMANCE_RANK " --loop"});
  std::smatch m;
  std::regex pid_re(R"(\[2\] pid (\d+))");
  ASSERT_TRUE(run.Pump(
      [&] {
        int looping = 0;
        for (size_t p = run.out().find("looping"); p != std::string::npos;
             p = run.out().find("looping", p + 1)) {
          ++looping;
        }
        return looping == 4 && std::regex_search(run.out(), m, pid_re);
      },
      30s))
      << run.out() << run.err();
  ASSERT_EQ(kill(std::stoi(m[1]), SIGKILL), 0);
  ASSERT_EQ(run.Wait(30s), 128 + SIGKILL) << run.out() << run.err();
  auto summary = run.SummaryLines();
  ASSERT_EQ(summary.size(), 1u) << run.err();
  EXPECT_NE(summary[0].find("rank 2 "), std::string::npos) << summary[0];
  EXPECT_NE(summary[0].find("SIGKILL"), std::string::npos) << summary[0];
}
#endif

TEST(MusterRunTest, StdinGoesToRankZeroOnly) {
  MusterRun run({"-np", "2", "--tag-output", "sh", "-c", "cat; echo end"}, {}, "line one\n");
  ASSERT_EQ(run.Wait(), 0) << run.err();
  auto lines = Lines(run.out());
  std::set<std::string> got(lines.begin(), lines.end());
  EXPECT_EQ(got, (std::set<std::string>{"[0] line one", "[0] end", "[1] end"}));
}

TEST(MusterRunTest, ShowsWhatRanksSendOnTheirControlChannelAsTheirOutput) {
  MusterRun run({"-np", "2", "--tag-output", "sh", "-c",
                 "echo \"MUSTER_PROGRESS step=$RANK\" >&$MUSTER_CONTROL_FD; echo done"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  auto lines = Lines(run.out());
  std::set<std::string> got(lines.begin(), lines.end());
  EXPECT_EQ(got, (std::set<std::string>{"[0] MUSTER_PROGRESS step=0", "[1] MUSTER_PROGRESS step=1",
                                        "[0] done", "[1] done"}));
}

TEST(MusterRunTest, GivesEveryRankTheEnvContract) {
  std::string ckpt = ::testing::TempDir();
  MusterRun run({"-np", "3", "--tag-output", "--job-id", "envjob", "--checkpoint-dir", ckpt, "-x",
                 "FOO=bar", "-x", "KEEPME", "env"},
                {"CUDA_VISIBLE_DEVICES=4,5", "KEEPME=kept"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  std::map<int, std::map<std::string, std::string>> env;
  std::regex re(R"(\[(\d+)\] ([A-Za-z_][A-Za-z0-9_]*)=(.*))");
  for (const auto& l : Lines(run.out())) {
    std::smatch m;
    if (std::regex_match(l, m, re)) env[std::stoi(m[1])][m[2]] = m[3];
  }
  ASSERT_EQ(env.size(), 3u);
  const char* gpus[] = {"4", "5", "4"};
  for (int r = 0; r < 3; ++r) {
    auto& e = env[r];
    std::string rs = std::to_string(r);
    EXPECT_EQ(e["RANK"], rs);
    EXPECT_EQ(e["WORLD_SIZE"], "3");
    EXPECT_EQ(e["LOCAL_RANK"], rs);
    EXPECT_EQ(e["LOCAL_WORLD_SIZE"], "3");
    EXPECT_EQ(e["NODE_RANK"], "0");
    EXPECT_EQ(e["GROUP_RANK"], "0");
    EXPECT_EQ(e["NNODES"], "1");
    EXPECT_EQ(e["MASTER_ADDR"], "127.0.0.1");
    EXPECT_GT(std::stoi(e["MASTER_PORT"]), 0);
    EXPECT_EQ(e["MASTER_PORT"], env[0]["MASTER_PORT"]);
    EXPECT_EQ(e["TORCHELASTIC_RESTART_COUNT"], "0");
    EXPECT_EQ(e["OMPI_COMM_WORLD_RANK"], rs);
    EXPECT_EQ(e["OMPI_COMM_WORLD_SIZE"], "3");
    EXPECT_EQ(e["OMPI_COMM_WORLD_LOCAL_RANK"], rs);
    EXPECT_EQ(e["CUDA_VISIBLE_DEVICES"], gpus[r]);
    EXPECT_EQ(e["MUSTER_JOB_ID"], "envjob");
    EXPECT_EQ(e["MUSTER_ATTEMPT"], "0");
    // The launcher's relay (a local socket), as under node agents.
    EXPECT_EQ(e["MUSTER_RDZV_ENDPOINT"].rfind("unix://", 0), 0u) << e["MUSTER_RDZV_ENDPOINT"];
    EXPECT_EQ(e["MUSTER_RDZV_ENDPOINT"], env[0]["MUSTER_RDZV_ENDPOINT"]);
    EXPECT_EQ(e["MUSTER_RDZV_KEY"].rfind("v1,", 0), 0u);
    EXPECT_EQ(e["MUSTER_RDZV_KEY"], env[0]["MUSTER_RDZV_KEY"]);
    EXPECT_EQ(e["MUSTER_CHECKPOINT_DIR"], ckpt);
    EXPECT_TRUE(e.count("MUSTER_RESUME_STEP"));
    EXPECT_EQ(e["MUSTER_RESUME_STEP"], "");
    EXPECT_EQ(e["MUSTER_CONTROL_FD"], "3");
    EXPECT_EQ(e["FOO"], "bar");
    EXPECT_EQ(e["KEEPME"], "kept");
  }
}

TEST(MusterRunTest, MusterRdzvDirectKeepsTheRanksOnTheStoreItself) {
  MusterRun run({"-np", "2", "--tag-output", "sh", "-c", "echo ep=$MUSTER_RDZV_ENDPOINT"},
                {"MUSTER_RDZV_DIRECT=1"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  int seen = 0;
  for (const auto& l : Lines(run.out())) {
    if (l.find("ep=") == std::string::npos) continue;
    ++seen;
    EXPECT_NE(l.find("ep=tcp://127.0.0.1:"), std::string::npos) << l;
  }
  EXPECT_EQ(seen, 2) << run.out();
}

TEST(MusterRunTest, WritesPerRankLogFiles) {
  std::string dir = ::testing::TempDir() + "/muster_run_logs_" + std::to_string(getpid());
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  MusterRun run({"-np", "2", "--log-dir", dir, "sh", "-c", "echo out-$RANK; echo err-$RANK >&2"});
  ASSERT_EQ(run.Wait(), 0) << run.err();
  for (int r = 0; r < 2; ++r) {
    std::ifstream in(dir + "/rank-" + std::to_string(r) + ".log");
    std::stringstream ss;
    ss << in.rdbuf();
    EXPECT_NE(ss.str().find("out-" + std::to_string(r)), std::string::npos);
    EXPECT_NE(ss.str().find("err-" + std::to_string(r)), std::string::npos);
  }
  EXPECT_EQ(system(("rm -rf " + dir).c_str()), 0);
}

TEST(MusterRunTest, RefusesBadInputWithAClearMessage) {
  {
    MusterRun run({"-H", "gpu-node-17:4", "true"});
    EXPECT_EQ(run.Wait(), 2);
    EXPECT_NE(run.err().find("gpu-node-17"), std::string::npos) << run.err();
    EXPECT_NE(run.err().find("--coordinator"), std::string::npos) << run.err();
  }
  {
    MusterRun run({"-np", "5", "-H", "localhost:2", "true"});
    EXPECT_EQ(run.Wait(), 2);
    EXPECT_NE(run.err().find("more than the 2 slots"), std::string::npos) << run.err();
  }
  {
    MusterRun run({"-np", "2", "/nonexistent/muster-test-prog"});
    EXPECT_EQ(run.Wait(), 127);
    EXPECT_NE(run.err().find("muster-test-prog"), std::string::npos) << run.err();
  }
  {
    MusterRun run({"--frobnicate", "true"});
    EXPECT_EQ(run.Wait(), 2);
    EXPECT_NE(run.err().find("--frobnicate"), std::string::npos) << run.err();
  }
  {
    MusterRun run({"-np", "2"});
    EXPECT_EQ(run.Wait(), 2);
    EXPECT_NE(run.err().find("no program"), std::string::npos) << run.err();
  }
}

}  // namespace
