// The process supervisor with real child processes: output lines, exits, env, stdin, stops.

#include "node_agent/supervisor.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "node_agent/log_reader.h"

namespace muster::node_agent {
namespace {

using namespace std::chrono_literals;

struct Line {
  ChildId id;
  std::string name;
  OutputStream stream;
  std::string text;
};

// Runs a Supervisor on its own reactor and records everything its callbacks report.
class SupervisorHarness {
 public:
  explicit SupervisorHarness(Supervisor::Options options = {}) : reactor_("test") {
    reactor_.Start();
    Supervisor::Callbacks cb;
    cb.on_line = [this](ChildId id, const std::string& name, OutputStream s, std::string_view l) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.push_back({id, name, s, std::string(l)});
      cv_.notify_all();
    };
    cb.on_exit = [this](ChildId id, const std::string&, const ExitInfo& e) {
      std::lock_guard<std::mutex> lock(mu_);
      exits_[id] = e;
      // Output already delivered must precede on_exit's bookkeeping; closed must follow exit.
      EXPECT_EQ(closed_.count(id), 0u);
      cv_.notify_all();
    };
    cb.on_closed = [this](ChildId id, const std::string&) {
      std::lock_guard<std::mutex> lock(mu_);
      EXPECT_EQ(exits_.count(id), 1u) << "closed before its exit was reported";
      closed_.insert(id);
      cv_.notify_all();
    };
    reactor_.Call("make", [&] { sup_ = std::make_unique<Supervisor>(reactor_, cb, options); });
  }
  ~SupervisorHarness() {
    reactor_.Call("destroy", [&] { sup_.reset(); });
    reactor_.Stop();
  }

  StatusOr<ChildId> Spawn(SpawnSpec spec) {
    if (spec.env.empty()) spec.env = {"PATH=/usr/bin:/bin"};
    return reactor_.Call("spawn", [&] { return sup_->Spawn(spec); });
  }
  ChildId SpawnOk(SpawnSpec spec) {
    auto id = Spawn(std::move(spec));
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }
  StatusOr<ChildId> Sh(const std::string& script, std::string name = "c") {
    SpawnSpec s;
    s.name = std::move(name);
    s.group = "g";
    s.argv = {"/bin/sh", "-c", script};
    return Spawn(s);
  }
  template <typename F>
  auto OnReactor(F f) {
    return reactor_.Call("test", f);
  }

  bool WaitClosed(ChildId id, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return closed_.count(id) > 0; });
  }
  bool WaitExit(ChildId id, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return exits_.count(id) > 0; });
  }
  bool WaitLine(ChildId id, const std::string& text, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      for (const auto& l : lines_)
        if (l.id == id && l.text == text) return true;
      return false;
    });
  }
  ExitInfo Exit(ChildId id) {
    std::lock_guard<std::mutex> lock(mu_);
    return exits_.at(id);
  }
  std::vector<std::string> Lines(ChildId id, OutputStream s) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const auto& l : lines_)
      if (l.id == id && l.stream == s) out.push_back(l.text);
    return out;
  }

  Supervisor& sup() { return *sup_; }

 private:
  Reactor reactor_;
  std::unique_ptr<Supervisor> sup_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Line> lines_;
  std::map<ChildId, ExitInfo> exits_;
  std::set<ChildId> closed_;
};

TEST(SupervisorTest, DeliversWholeLinesOfBothStreamsAndTheExitCode) {
  SupervisorHarness h;
  auto id = h.Sh(
      "echo one; echo two; echo err >&2; printf 'a'; printf 'b'; printf 'c\\n'; "
      "printf tail; exit 3");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(h.WaitClosed(*id));
  EXPECT_EQ(h.Lines(*id, OutputStream::kStdout),
            (std::vector<std::string>{"one", "two", "abc", "tail"}));
  EXPECT_EQ(h.Lines(*id, OutputStream::kStderr), (std::vector<std::string>{"err"}));
  ExitInfo e = h.Exit(*id);
  EXPECT_FALSE(e.signaled);
  EXPECT_EQ(e.code, 3);
  EXPECT_EQ(e.ShellCode(), 3);
  EXPECT_EQ(e.Describe(), "exited with code 3");
}

TEST(SupervisorTest, AControlChannelAtFd3IsReadLineByLineAndLoggedAsStdout) {
  SupervisorHarness h;
  const std::string dir = ::testing::TempDir() + "/supervisor_control_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  SpawnSpec s;
  s.name = "c";
  s.group = "g";
  s.control_channel = true;
  s.log_path = dir + "/merged.log";
  s.stream_log_paths[0] = dir + "/out.log";
  s.argv = {"/bin/sh", "-c",
            "echo out; echo 'MUSTER_CHECKPOINT step=7' >&3; printf 'part' >&3; printf 'ial' >&3"};
  ChildId id = h.SpawnOk(s);
  ASSERT_TRUE(h.WaitClosed(id));
  EXPECT_EQ(h.Lines(id, OutputStream::kControl),
            (std::vector<std::string>{"MUSTER_CHECKPOINT step=7", "partial"}));
  EXPECT_EQ(h.Lines(id, OutputStream::kStdout), (std::vector<std::string>{"out"}));
  std::ifstream merged(s.log_path), out(s.stream_log_paths[0]);
  std::string m((std::istreambuf_iterator<char>(merged)), {});
  std::string o((std::istreambuf_iterator<char>(out)), {});
  EXPECT_NE(m.find("MUSTER_CHECKPOINT step=7\n"), std::string::npos) << m;
  // Logged as if printed on stdout (the two sockets are read in either order).
  EXPECT_NE(o.find("out\n"), std::string::npos) << o;
  EXPECT_NE(o.find("MUSTER_CHECKPOINT step=7\npartial\n"), std::string::npos) << o;
  EXPECT_EQ(o.size(), std::string("out\nMUSTER_CHECKPOINT step=7\npartial\n").size()) << o;
  std::filesystem::remove_all(dir);
  // Without the option, fd 3 is not open in the child.
  auto plain = h.Sh("echo x >&3 && echo open || echo closed");
  ASSERT_TRUE(plain.ok());
  ASSERT_TRUE(h.WaitClosed(*plain));
  EXPECT_EQ(h.Lines(*plain, OutputStream::kStdout), (std::vector<std::string>{"closed"}));
}

TEST(SupervisorTest, ReportsDeathBySignal) {
  SupervisorHarness h;
  auto id = h.Sh("kill -9 $$");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitClosed(*id));
  ExitInfo e = h.Exit(*id);
  EXPECT_TRUE(e.signaled);
  EXPECT_EQ(e.signal, SIGKILL);
  EXPECT_EQ(e.ShellCode(), 137);
  EXPECT_EQ(e.Describe(), "was killed by signal 9 (SIGKILL)");
}

TEST(SupervisorTest, SplitsOverlongLinesAtTheLimit) {
  SupervisorHarness h;
  size_t n = Supervisor::kMaxLineBytes + 100;
  auto id = h.Sh("head -c " + std::to_string(n) + " /dev/zero | tr '\\0' x; echo; echo after");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitClosed(*id));
  auto lines = h.Lines(*id, OutputStream::kStdout);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0], std::string(Supervisor::kMaxLineBytes, 'x'));
  EXPECT_EQ(lines[1], std::string(100, 'x'));
  EXPECT_EQ(lines[2], "after");
  // The same bytes, written so that the newline arrives in the read that takes the line past
  // the limit: most of the line, a pause (the supervisor reads it), then the rest at once.
  auto one = h.Sh(
      "python3 -c \"import os, time; os.write(1, b'x' * 60000); time.sleep(0.3); "
      "os.write(1, b'x' * " +
      std::to_string(n - 60000) + " + b'\\nafter\\n')\"");
  ASSERT_TRUE(one.ok());
  ASSERT_TRUE(h.WaitClosed(*one));
  EXPECT_EQ(h.Lines(*one, OutputStream::kStdout), lines);
}

TEST(SupervisorTest, GivesTheExactEnvironmentAndWorkingDirectory) {
  SupervisorHarness h;
  SpawnSpec s;
  s.name = "env";
  s.argv = {"/bin/sh", "-c", "echo \"$FOO|$HOME|$(pwd)\""};
  s.env = {"FOO=bar baz", "PATH=/usr/bin:/bin"};
  s.cwd = "/usr";
  ChildId id = h.SpawnOk(s);
  ASSERT_TRUE(h.WaitClosed(id));
  EXPECT_EQ(h.Lines(id, OutputStream::kStdout), (std::vector<std::string>{"bar baz||/usr"}));
}

TEST(SupervisorTest, StdinComesFromTheGivenFdOrDevNull) {
  SupervisorHarness h;
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  ASSERT_EQ(write(p[1], "hello\n", 6), 6);
  close(p[1]);
  SpawnSpec s;
  s.name = "cat";
  s.argv = {"cat"};
  s.stdin_fd = p[0];
  ChildId with_input = h.SpawnOk(s);
  close(p[0]);
  s.stdin_fd = -1;
  ChildId without = h.SpawnOk(s);
  ASSERT_TRUE(h.WaitClosed(with_input));
  ASSERT_TRUE(h.WaitClosed(without));
  EXPECT_EQ(h.Lines(with_input, OutputStream::kStdout), (std::vector<std::string>{"hello"}));
  EXPECT_TRUE(h.Lines(without, OutputStream::kStdout).empty());
  EXPECT_TRUE(h.Exit(without).success());
}

TEST(SupervisorTest, WritesLinesToTheLogFile) {
  SupervisorHarness h;
  std::string path = ::testing::TempDir() + "/supervisor_log_" + std::to_string(getpid());
  unlink(path.c_str());
  SpawnSpec s;
  s.name = "log";
  s.argv = {"/bin/sh", "-c", "echo out; echo err >&2; printf partial"};
  s.log_path = path;
  ChildId id = h.SpawnOk(s);
  ASSERT_TRUE(h.WaitClosed(id));
  FILE* f = fopen(path.c_str(), "r");
  ASSERT_NE(f, nullptr);
  char buf[256] = {};
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  std::string content(buf, n);
  EXPECT_NE(content.find("out\n"), std::string::npos) << content;
  EXPECT_NE(content.find("err\n"), std::string::npos) << content;
  EXPECT_NE(content.find("partial\n"), std::string::npos) << content;
  unlink(path.c_str());
}

std::string ReadFile(const std::string& path) {
  std::string out;
  FILE* f = fopen(path.c_str(), "r");
  if (f == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  fclose(f);
  return out;
}

// A chatty rank cannot fill the disk: its log is rotated by size, the newest output is in the
// file readers follow, and the older parts are kept up to a count.
TEST(SupervisorTest, LogsAreRotatedBySizeAndTheNewestOutputStaysInTheCurrentFile) {
  Supervisor::Options o;
  o.log_max_bytes = 4096;
  o.log_keep = 2;
  SupervisorHarness h(o);
  std::string path = ::testing::TempDir() + "/supervisor_rotate_" + std::to_string(getpid());
  std::string out_path = path + ".stdout";
  for (const std::string& p : {path, out_path}) {
    for (const char* suffix : {"", ".1", ".2", ".3"}) unlink((p + suffix).c_str());
  }
  SpawnSpec s;
  s.name = "chatty";
  // 2000 numbered lines of 101 bytes: 200 KB, fifty times the limit.
  s.argv = {"/bin/sh", "-c",
            "i=0; while [ $i -lt 2000 ]; do printf '%06d %093d\\n' $i 0; i=$((i+1)); done"};
  s.log_path = path;
  s.stream_log_paths[0] = out_path;
  ChildId id = h.SpawnOk(s);
  ASSERT_TRUE(h.WaitClosed(id, 30s));
  for (const std::string& p : {path, out_path}) {
    std::string current = ReadFile(p), one = ReadFile(p + ".1"), two = ReadFile(p + ".2");
    EXPECT_LE(current.size(), 4096u) << p;
    EXPECT_EQ(one.size(), 4040u) << p;  // 40 whole lines of 101 bytes fit under the limit
    EXPECT_EQ(two.size(), 4040u) << p;
    EXPECT_FALSE(std::filesystem::exists(p + ".3")) << "only log_keep old parts are kept";
    // The kept parts are the newest output, whole lines, in order, the last line last.
    std::string all = two + one + current;
    ASSERT_FALSE(all.empty());
    ASSERT_EQ(all.back(), '\n');
    EXPECT_EQ(all.substr(all.size() - 101, 7), "001999 ") << p;
    int expect = -1;
    size_t pos = 0;
    while (pos < all.size()) {
      size_t nl = all.find('\n', pos);
      ASSERT_EQ(nl - pos, 100u) << "a torn line in " << p;
      int n = std::stoi(all.substr(pos, 6));
      if (expect >= 0) EXPECT_EQ(n, expect) << p;
      expect = n + 1;
      pos = nl + 1;
    }
    for (const char* suffix : {"", ".1", ".2"}) unlink((p + suffix).c_str());
  }
}

// A follower (`muster logs -f`) reading while the log rotates under it loses nothing and
// duplicates nothing: its cursor names the part it reads (node_agent/log_reader.h).
TEST(SupervisorTest, AFollowerReadingDuringRotationGetsEveryLineOnce) {
  Supervisor::Options o;
  o.log_max_bytes = 4096;
  o.log_keep = kMaxLogParts;  // 2000 lines make 50 parts: none is dropped before it is read
  SupervisorHarness h(o);
  std::string path = ::testing::TempDir() + "/supervisor_follow_" + std::to_string(getpid());
  auto cleanup = [&] {
    unlink(path.c_str());
    for (int k = 1; k <= kMaxLogParts + 1; ++k) unlink((path + "." + std::to_string(k)).c_str());
  };
  cleanup();
  SpawnSpec s;
  s.name = "chatty";
  s.argv = {"/bin/sh", "-c",
            "i=0; while [ $i -lt 2000 ]; do printf '%06d %093d\\n' $i 0; i=$((i+1)); done"};
  s.log_path = path;
  ChildId id = h.SpawnOk(s);
  std::string all;
  LogCursor cursor;
  bool closed = false;
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = ReadLog(path, cursor, 1500);  // smaller than a part: each part takes several reads
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), StatusCode::kNotFound) << r.status();  // not created yet
      std::this_thread::sleep_for(1ms);
      continue;
    }
    ASSERT_FALSE(r->skipped) << "at " << all.size() << " bytes";
    all += r->data;
    cursor = r->next;
    if (closed && r->at_live_end) break;
    if (r->at_live_end) closed = h.WaitClosed(id, 1ms);
  }
  ASSERT_TRUE(closed);
  ASSERT_EQ(all.size(), 2000u * 101) << "lines lost or read twice across rotation";
  for (int i = 0; i < 2000; ++i) {
    ASSERT_EQ(all.substr(static_cast<size_t>(i) * 101, 7), fmt::format("{:06d} ", i)) << i;
  }
  EXPECT_TRUE(std::filesystem::exists(path + ".40"));  // it did rotate, many times
  cleanup();
}

TEST(SupervisorTest, LogRotationOffKeepsEverything) {
  Supervisor::Options o;
  o.log_max_bytes = 0;
  SupervisorHarness h(o);
  std::string path = ::testing::TempDir() + "/supervisor_norotate_" + std::to_string(getpid());
  unlink(path.c_str());
  SpawnSpec s;
  s.name = "chatty";
  s.argv = {"/bin/sh", "-c",
            "i=0; while [ $i -lt 500 ]; do printf '%099d\\n' $i; i=$((i+1)); done"};
  s.log_path = path;
  ChildId id = h.SpawnOk(s);
  ASSERT_TRUE(h.WaitClosed(id, 30s));
  EXPECT_EQ(ReadFile(path).size(), 50000u);
  EXPECT_FALSE(std::filesystem::exists(path + ".1"));
  unlink(path.c_str());
}

TEST(SupervisorTest, MissingProgramIsNotFoundAndStartsNothing) {
  SupervisorHarness h;
  SpawnSpec s;
  s.name = "x";
  s.argv = {"/nonexistent/muster-no-such-program"};
  auto id = h.Spawn(s);
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), StatusCode::kNotFound);
  EXPECT_NE(id.status().message().find("muster-no-such-program"), std::string::npos);
  EXPECT_EQ(h.OnReactor([&] { return h.sup().List().size(); }), 0u);
  s.argv = {};
  EXPECT_EQ(h.Spawn(s).status().code(), StatusCode::kInvalidArgument);
}

TEST(SupervisorTest, StopSendsSigtermThatAWellBehavedChildObeys) {
  SupervisorHarness h;
  auto id = h.Sh("echo ready; exec sleep 1000");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitLine(*id, "ready"));
  h.OnReactor([&] { h.sup().Stop(*id, 10s); });
  ASSERT_TRUE(h.WaitClosed(*id, 5s));
  EXPECT_TRUE(h.Exit(*id).signaled);
  EXPECT_EQ(h.Exit(*id).signal, SIGTERM);
}

TEST(SupervisorTest, StopKillsAChildThatIgnoresSigtermAfterTheGrace) {
  SupervisorHarness h;
  // SIG_IGN survives exec: the sleep ignores SIGTERM.
  auto id = h.Sh("trap '' TERM; echo ready; exec sleep 1000");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitLine(*id, "ready"));
  auto t0 = std::chrono::steady_clock::now();
  h.OnReactor([&] { h.sup().Stop(*id, 300ms); });
  ASSERT_TRUE(h.WaitClosed(*id, 5s));
  auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(h.Exit(*id).signaled);
  EXPECT_EQ(h.Exit(*id).signal, SIGKILL);
  EXPECT_GE(took, 300ms);
  EXPECT_LT(took, 3s);
}

TEST(SupervisorTest, ExitsCausedByAStopAreMarkedStopped) {
  SupervisorHarness h;
  auto obeys = h.Sh("echo ready; exec sleep 1000");
  auto traps = h.Sh("trap 'exit 7' TERM; echo ready; sleep 1000 & wait");
  auto unstopped = h.Sh("exit 4");
  ASSERT_TRUE(obeys.ok() && traps.ok() && unstopped.ok());
  ASSERT_TRUE(h.WaitLine(*obeys, "ready"));
  ASSERT_TRUE(h.WaitLine(*traps, "ready"));
  h.OnReactor([&] {
    h.sup().Stop(*obeys, 10s);
    h.sup().Stop(*traps, 10s);
  });
  ASSERT_TRUE(h.WaitClosed(*obeys));
  ASSERT_TRUE(h.WaitClosed(*traps));
  ASSERT_TRUE(h.WaitClosed(*unstopped));
  EXPECT_TRUE(h.Exit(*obeys).stopped);
  EXPECT_TRUE(h.Exit(*traps).stopped);
  EXPECT_EQ(h.Exit(*traps).code, 7);
  EXPECT_FALSE(h.Exit(*unstopped).stopped);
}

TEST(SupervisorTest, AKillFromOutsideDuringAStopIsNotMarkedStopped) {
  SupervisorHarness h;
  auto id = h.Sh("trap '' TERM; echo ready; exec sleep 1000");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitLine(*id, "ready"));
  pid_t pid = h.OnReactor([&] {
    h.sup().Stop(*id, 60s);  // SIGTERM (ignored) now, SIGKILL only in a minute
    return h.sup().List()[0].pid;
  });
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  ASSERT_TRUE(h.WaitClosed(*id));
  EXPECT_EQ(h.Exit(*id).signal, SIGKILL);
  EXPECT_FALSE(h.Exit(*id).stopped);
}

TEST(SupervisorTest, StopReachesTheWholeProcessGroup) {
  // The grandchild holds the pipes; the child ends only when it does. If the stop missed
  // the grandchild, the drain timeout (30 s) would be what closes the pipes.
  SupervisorHarness h(Supervisor::Options{30s});
  auto id = h.Sh("sleep 1000 & echo ready; wait");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitLine(*id, "ready"));
  h.OnReactor([&] { h.sup().Stop(*id, 5s); });
  EXPECT_TRUE(h.WaitClosed(*id, 4s));
}

TEST(SupervisorTest, LeftoverProcessesAreKilledAfterTheDrainTimeout) {
  SupervisorHarness h(Supervisor::Options{200ms});
  auto id = h.Sh("(sleep 1000 &); echo parent-done");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(h.WaitExit(*id));
  EXPECT_TRUE(h.Exit(*id).success());
  ASSERT_TRUE(h.WaitClosed(*id, 5s));
  EXPECT_EQ(h.Lines(*id, OutputStream::kStdout), (std::vector<std::string>{"parent-done"}));
}

TEST(SupervisorTest, StopGroupStopsOnlyThatGroupAndListShowsState) {
  SupervisorHarness h;
  SpawnSpec s;
  s.argv = {"/bin/sh", "-c", "echo ready; exec sleep 1000"};
  s.name = "a0";
  s.group = "job-a";
  ChildId a0 = h.SpawnOk(s);
  s.name = "a1";
  ChildId a1 = h.SpawnOk(s);
  s.name = "b0";
  s.group = "job-b";
  ChildId b0 = h.SpawnOk(s);
  for (ChildId id : {a0, a1, b0}) ASSERT_TRUE(h.WaitLine(id, "ready"));
  auto list = h.OnReactor([&] { return h.sup().List(); });
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0].name, "a0");
  EXPECT_EQ(list[2].group, "job-b");
  EXPECT_GT(list[1].pid, 0);
  h.OnReactor([&] { h.sup().StopGroup("job-a", 5s); });
  ASSERT_TRUE(h.WaitClosed(a0));
  ASSERT_TRUE(h.WaitClosed(a1));
  list = h.OnReactor([&] { return h.sup().List(); });
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].name, "b0");
  EXPECT_TRUE(list[0].running);
  EXPECT_EQ(h.OnReactor([&] { return h.sup().running(); }), 1u);
  EXPECT_TRUE(h.OnReactor([&] { return h.sup().Signal(b0, SIGKILL); }).ok());
  ASSERT_TRUE(h.WaitClosed(b0));
  EXPECT_EQ(h.Exit(b0).signal, SIGKILL);
  EXPECT_EQ(h.OnReactor([&] { return h.sup().Signal(b0, SIGTERM); }).code(), StatusCode::kNotFound);
}

TEST(SupervisorTest, ExitsAreNumberedInTheOrderTheyHappen) {
  SupervisorHarness h;
  auto first = h.Sh("exit 1");
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(h.WaitExit(*first));
  auto second = h.Sh("exit 2");
  ASSERT_TRUE(second.ok());
  ASSERT_TRUE(h.WaitExit(*second));
  EXPECT_LT(h.Exit(*first).seq, h.Exit(*second).seq);
  EXPECT_LE(h.Exit(*first).when, h.Exit(*second).when);
}

TEST(SupervisorTest, DestructorKillsChildrenStillRunning) {
  pid_t pid;
  {
    SupervisorHarness h;
    auto id = h.Sh("echo ready; exec sleep 1000");
    ASSERT_TRUE(id.ok());
    ASSERT_TRUE(h.WaitLine(*id, "ready"));
    pid = h.OnReactor([&] { return h.sup().List()[0].pid; });
  }
  EXPECT_EQ(kill(pid, 0), -1);
  EXPECT_EQ(errno, ESRCH);
}

}  // namespace
}  // namespace muster::node_agent
