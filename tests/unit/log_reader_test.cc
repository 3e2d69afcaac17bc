// node_agent/log_reader.h: a follower's cursor across the supervisor's log rotation.

#include "node_agent/log_reader.h"

#include <grp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace muster::node_agent {
namespace {

namespace fs = std::filesystem;

class LogReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / ("log_reader_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = dir_ / "rank-0.log";
  }
  void TearDown() override { fs::remove_all(dir_); }

  void Append(const std::string& s) { std::ofstream(path_, std::ios::app) << s; }
  // The supervisor's rotation: PATH.(k) -> PATH.(k+1), PATH -> PATH.1 (PATH.keep dropped).
  void Rotate(int keep) {
    for (int k = keep; k >= 1; --k) {
      fs::path from = k == 1 ? path_ : fs::path(path_.string() + "." + std::to_string(k - 1));
      std::error_code ec;
      fs::rename(from, path_.string() + "." + std::to_string(k), ec);
    }
    std::ofstream(path_, std::ios::trunc);
  }
  LogRead Read(LogCursor c, int64_t max = 1 << 20) {
    auto r = ReadLog(path_, c, max);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : LogRead{};
  }

  fs::path dir_, path_;
};

TEST_F(LogReaderTest, AFirstReadCountsInTheLivePartAsBefore) {
  Append("hello world\n");
  LogRead r = Read({0, 6});
  EXPECT_EQ(r.data, "world\n");
  EXPECT_EQ(r.next.offset, 12);
  EXPECT_NE(r.next.generation, 0u);
  EXPECT_TRUE(r.at_live_end);
  EXPECT_FALSE(r.skipped);
  EXPECT_EQ(Read({0, 1000}).data, "hello world\n");  // past the end: from the start
  EXPECT_EQ(Read({0, -1}, 6).data, "world\n");       // the tail
  EXPECT_EQ(ReadLog(dir_ / "none.log", {0, 0}, 10).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(ReadLog(path_, {0, 0}, 0).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(LogReaderTest, AFollowerReadsTheRestOfARotatedPartThenTheNewOne) {
  Append("0123456789");
  LogRead r = Read({0, 0}, 4);
  EXPECT_EQ(r.data, "0123");
  EXPECT_FALSE(r.at_live_end);
  Rotate(3);
  Append("abc");  // the new live part is already 3 bytes: an offset-only cursor would skip
  Rotate(3);
  Append("defghijklmnop");  // and now past the old offset too
  std::string all = r.data;
  LogCursor c = r.next;
  for (int i = 0; i < 20 && !r.at_live_end; ++i) {
    r = Read(c, 5);
    EXPECT_FALSE(r.skipped);
    all += r.data;
    c = r.next;
  }
  EXPECT_EQ(all, "0123456789abcdefghijklmnop");
  EXPECT_TRUE(r.at_live_end);
  Append("q");
  EXPECT_EQ(Read(c).data, "q");
}

TEST_F(LogReaderTest, APartRotatedAwayIsSaidAndTheOldestKeptPartFollows) {
  Append("lost");
  LogRead r = Read({0, 0}, 2);
  for (const char* s : {"one", "two", "three"}) {
    Rotate(2);
    Append(s);
  }
  r = Read(r.next);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.data, "one");  // PATH.2, the oldest kept
  r = Read(r.next);
  EXPECT_FALSE(r.skipped);
  EXPECT_EQ(r.data, "two");
  r = Read(r.next);
  EXPECT_EQ(r.data, "three");
  EXPECT_TRUE(r.at_live_end);
}

TEST_F(LogReaderTest, AReadFromTheBeginningStartsAtTheOldestKeptPart) {
  for (const char* s : {"a", "b", "c"}) {
    Append(s);
    Rotate(2);
  }
  Append("d");  // kept: .2 "b", .1 "c", live "d"
  std::string all;
  LogRead r = Read({0, 0});
  all += r.data;
  while (!r.at_live_end) {
    r = Read(r.next);
    all += r.data;
  }
  EXPECT_EQ(all, "bcd");
  EXPECT_EQ(Read({0, -1}, 1).data, "d");  // the tail is the live part's
}

TEST_F(LogReaderTest, ALivePartTruncatedInPlaceRestartsAndSaysSo) {
  Append("0123456789");
  LogRead r = Read({0, 0});
  std::ofstream(path_, std::ios::trunc) << "new";  // rotation with no part kept
  r = Read(r.next);
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.data, "new");
}

// Refused, not "no log": a reader that is told NotFound takes the rank for one that left none.
TEST_F(LogReaderTest, ALogThatIsNotARegularFileIsRefused) {
  ASSERT_EQ(::mkfifo(path_.c_str(), 0600), 0);
  auto r = ReadLog(path_, {0, 0}, 10);  // a FIFO must not block the agent's reactor
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status();
  fs::remove(path_);
  fs::create_symlink("/etc/passwd", path_);
  r = ReadLog(path_, {0, 0}, 10);
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("is a symlink"), std::string::npos) << r.status();
  fs::remove(path_);
  EXPECT_EQ(ReadLog(path_, {0, 0}, 10).status().code(), StatusCode::kNotFound);
}

// A log the agent may not read is FailedPrecondition naming the file and "Permission denied",
// never NotFound. Read by a child that drops to an unprivileged user (root reads anything).
TEST_F(LogReaderTest, PermissionDeniedIsNotNotFound) {
  Append("secret\n");
  fs::permissions(path_, fs::perms::owner_read | fs::perms::owner_write);
  fs::permissions(dir_, fs::perms::all);  // the directory is not what is denied
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (::getuid() == 0 &&
        (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0))
      _exit(100);
    if (::getuid() == 0) _exit(101);
    auto r = ReadLog(path_, {0, 0}, 10);
    if (r.ok()) _exit(102);
    if (r.status().message().find("Permission denied") == std::string::npos ||
        r.status().message().find(path_.string()) == std::string::npos)
      _exit(103);
    _exit(static_cast<int>(r.status().code()));
  }
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), static_cast<int>(StatusCode::kFailedPrecondition))
      << "100: could not drop privileges, 102: read anyway, 103: the message does not say "
         "what, else the StatusCode it got";
}

TEST(LogFileErrorTest, EachErrnoMapsToWhatAReaderShouldDo) {
  EXPECT_EQ(LogFileError(ENOENT, "f").code(), StatusCode::kNotFound);
  EXPECT_EQ(LogFileError(ENOTDIR, "f").code(), StatusCode::kNotFound);
  EXPECT_EQ(LogFileError(EACCES, "f").code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(LogFileError(EPERM, "f").code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(LogFileError(EIO, "f").code(), StatusCode::kDataLoss);
  EXPECT_EQ(LogFileError(EMFILE, "f").code(), StatusCode::kUnavailable);
  EXPECT_EQ(LogFileError(ENOMEM, "f").code(), StatusCode::kUnavailable);
  EXPECT_EQ(LogFileError(EBADF, "f").code(), StatusCode::kInternal);
  EXPECT_EQ(LogFileError(EIO, "log file /a/rank-0.log").message(),
            "log file /a/rank-0.log: Input/output error");
}

}  // namespace
}  // namespace muster::node_agent
