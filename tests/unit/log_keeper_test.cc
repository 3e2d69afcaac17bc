// LogKeeper (coordinator/log_keeper.h): the per-job cap keeps each rank's tail and says what
// it dropped, older attempts are cut first, the total cap evicts the job kept longest ago, the
// index survives a reopen, and no name from a peer leaves the directory.

#include "coordinator/log_keeper.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

namespace muster::coordinator {
namespace {

namespace fs = std::filesystem;

std::string Lines(int first, int n) {
  std::string out;
  for (int i = first; i < first + n; ++i) {
    char buf[16];
    std::snprintf(buf, sizeof(buf), "line %04d\n", i);  // 10 bytes
    out += buf;
  }
  return out;
}

class LogKeeperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("logkeep-keeper-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::unique_ptr<LogKeeper> Open(int64_t job_bytes, int64_t total_bytes) {
    auto k = LogKeeper::Open(dir_, {job_bytes, total_bytes});
    EXPECT_TRUE(k.ok()) << k.status();
    return k.ok() ? std::move(*k) : nullptr;
  }
  static std::string ReadAll(const LogKeeper& k, const std::string& job, int attempt, int rank) {
    std::string out;
    int64_t off = 0;
    while (true) {
      auto c = k.Read(job, attempt, rank, off, 7);  // small chunks: the cursor is exercised
      EXPECT_TRUE(c.ok()) << c.status();
      if (!c.ok()) return out;
      out += c->data;
      off = c->next_offset;
      if (c->eof) return out;
    }
  }
  static void Keep(LogKeeper& k, const std::string& job, int attempt, int rank, int ranks,
                   const std::string& data) {
    ASSERT_TRUE(k.Begin(job, attempt, rank, ranks).ok());
    // In pieces, as chunks come.
    for (size_t i = 0; i < data.size(); i += 30) {
      ASSERT_TRUE(k.Append(job, attempt, rank, data.substr(i, 30)).ok());
    }
    ASSERT_TRUE(k.Commit(job, attempt, rank).ok());
  }
  fs::path dir_;
};

TEST_F(LogKeeperTest, AWholeLogUnderItsShareIsKeptAsWritten) {
  auto k = Open(1000, 1 << 20);
  Keep(*k, "job-1", 1, 0, 2, Lines(0, 40));  // 400 bytes, share 500
  EXPECT_TRUE(k->Has("job-1", 1, 0));
  EXPECT_TRUE(k->Complete("job-1", 1, 0));
  EXPECT_FALSE(k->Has("job-1", 1, 1));
  EXPECT_EQ(ReadAll(*k, "job-1", 1, 0), Lines(0, 40));
  EXPECT_TRUE(fs::exists(dir_ / "job-1" / "1" / "rank-0.log"));
  auto tail = k->Read("job-1", 1, 0, -1, 20);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(tail->data, Lines(38, 2));
  EXPECT_TRUE(tail->eof);
  auto none = k->Read("job-1", 1, 1, 0, 100);
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound) << none.status();
}

TEST_F(LogKeeperTest, ARankKeepsTheTailOfItsShareAndSaysHowManyBytesWereDropped) {
  auto k = Open(1000, 1 << 20);
  // Share 1000 / 4 = 250 bytes; 3000 written, so the copy is trimmed while it is written too.
  Keep(*k, "job-1", 1, 3, 4, Lines(0, 300));
  EXPECT_EQ(ReadAll(*k, "job-1", 1, 3), "[muster: 2750 bytes dropped]\n" + Lines(275, 25));
}

TEST_F(LogKeeperTest, TheTailOfTheShareIsExactWhateverTheChunksAndNothingIsLeftBehind) {
  auto k = Open(1000, 1 << 30);
  std::string all = Lines(0, 400);  // 4000 bytes; the share of 4 ranks is 250
  int n = 0;
  for (size_t chunk : {1, 7, 249, 250, 251, 1000}) {
    for (size_t total : {0, 1, 249, 250, 251, 500, 777, 4000}) {
      std::string job = "job-" + std::to_string(n++);
      ASSERT_TRUE(k->Begin(job, 1, 0, 4).ok());
      for (size_t i = 0; i < total; i += chunk) {
        ASSERT_TRUE(k->Append(job, 1, 0, all.substr(i, std::min(chunk, total - i))).ok());
      }
      ASSERT_TRUE(k->Commit(job, 1, 0).ok());
      std::string want = total <= 250 ? all.substr(0, total)
                                      : "[muster: " + std::to_string(total - 250) +
                                            " bytes dropped]\n" + all.substr(total - 250, 250);
      EXPECT_EQ(ReadAll(*k, job, 1, 0), want) << "chunk " << chunk << " total " << total;
      std::vector<std::string> files;
      for (const auto& f : fs::directory_iterator(dir_ / job / "1"))
        files.push_back(f.path().filename().string());
      EXPECT_EQ(files, std::vector<std::string>{"rank-0.log"});
    }
  }
}

TEST_F(LogKeeperTest, ANoteEndsAnIncompleteCopy) {
  auto k = Open(1000, 1 << 20);
  ASSERT_TRUE(k->Begin("job-1", 1, 0, 1).ok());
  ASSERT_TRUE(k->Append("job-1", 1, 0, "partial line").ok());
  EXPECT_TRUE(k->Writing("job-1", 1, 0));
  EXPECT_FALSE(k->Has("job-1", 1, 0)) << "not readable before it is committed";
  ASSERT_TRUE(k->Commit("job-1", 1, 0, "node aws-1 went away").ok());
  EXPECT_FALSE(k->Writing("job-1", 1, 0));
  EXPECT_EQ(ReadAll(*k, "job-1", 1, 0), "partial line\n[muster: node aws-1 went away]\n");
  EXPECT_TRUE(k->Has("job-1", 1, 0));
  EXPECT_FALSE(k->Complete("job-1", 1, 0));
  EXPECT_FALSE(k->Append("job-1", 1, 0, "more").ok()) << "committed: nothing more is written";
}

TEST_F(LogKeeperTest, AJobOverItsCapLosesItsOlderAttemptsFirst) {
  auto k = Open(1000, 1 << 20);
  Keep(*k, "job-1", 1, 0, 1, Lines(0, 90));    // 900 bytes
  Keep(*k, "job-1", 2, 0, 1, Lines(100, 80));  // 800 more: over 1000
  EXPECT_EQ(ReadAll(*k, "job-1", 2, 0), Lines(100, 80));
  std::string old = ReadAll(*k, "job-1", 1, 0);
  EXPECT_EQ(old.rfind("[muster: 900 bytes dropped", 0), 0u) << old;
  EXPECT_LE(k->job_bytes("job-1"), 1000);
}

TEST_F(LogKeeperTest, TheTotalCapEvictsTheJobKeptLongestAgo) {
  auto k = Open(1000, 2000);
  Keep(*k, "old", 1, 0, 1, Lines(0, 80));
  Keep(*k, "mid", 1, 0, 1, Lines(0, 80));
  EXPECT_EQ(k->total_bytes(), 1600);
  Keep(*k, "new", 1, 0, 1, Lines(0, 80));  // 2400 > 2000: "old" goes
  EXPECT_FALSE(k->Has("old", 1, 0));
  EXPECT_FALSE(fs::exists(dir_ / "old"));
  EXPECT_TRUE(k->Has("mid", 1, 0));
  EXPECT_TRUE(k->Has("new", 1, 0));
  EXPECT_EQ(k->total_bytes(), 1600);
}

TEST_F(LogKeeperTest, AJobBeingWrittenIsNeverEvicted) {
  auto k = Open(1000, 1500);
  ASSERT_TRUE(k->Begin("writing", 1, 1, 2).ok());  // rank 1 still being copied
  Keep(*k, "writing", 1, 0, 2, Lines(0, 50));
  Keep(*k, "other", 1, 0, 1, Lines(0, 90));  // 1400... then rank 1 of "writing" comes in
  ASSERT_TRUE(k->Append("writing", 1, 1, Lines(0, 50)).ok());
  ASSERT_TRUE(k->Commit("writing", 1, 1).ok());  // 1900 > 1500: "other" goes, not "writing"
  EXPECT_TRUE(k->Has("writing", 1, 0));
  EXPECT_TRUE(k->Has("writing", 1, 1));
  EXPECT_FALSE(k->Has("other", 1, 0));
}

TEST_F(LogKeeperTest, TheIndexSurvivesAReopenAndHalfWrittenCopiesAreNotServed) {
  {
    auto k = Open(1000, 1 << 20);
    Keep(*k, "job-1", 1, 0, 1, Lines(0, 50));
    ASSERT_TRUE(k->Begin("job-1", 1, 1, 1).ok());
    ASSERT_TRUE(k->Append("job-1", 1, 1, "cut short").ok());
  }
  auto k = Open(1000, 1 << 20);
  EXPECT_EQ(k->total_bytes(), 500);
  EXPECT_EQ(ReadAll(*k, "job-1", 1, 0), Lines(0, 50));
  EXPECT_FALSE(k->Has("job-1", 1, 1));
  // Not counted, not served: only listed (interrupted()) until asked again or given up.
  EXPECT_EQ(k->interrupted(), (std::vector<LogKeeper::CopyId>{{"job-1", 1, 1}}));
  k->Discard({"job-1", 1, 1});
  EXPECT_FALSE(fs::exists(dir_ / "job-1" / "1" / "rank-1.log.part"));
  // A smaller total cap at the next start applies at once.
  k.reset();
  k = Open(1000, 100);
  EXPECT_FALSE(k->Has("job-1", 1, 0));
  EXPECT_EQ(k->total_bytes(), 0);
}

// The copies a reopen drops half written are listed, so the coordinator can ask for them again:
// one only in .prev.part (rotated, the next chunk not come yet) counts too; a kept copy, a
// stray file and a name that is not a copy's do not.
TEST_F(LogKeeperTest, AReopenListsTheCopiesItFoundHalfWritten) {
  {
    auto k = Open(100, 1 << 20);
    Keep(*k, "job-1", 1, 0, 2, Lines(0, 3));
    ASSERT_TRUE(k->Begin("job-1", 1, 1, 2).ok());
    ASSERT_TRUE(k->Append("job-1", 1, 1, "cut short").ok());
    ASSERT_TRUE(k->Begin("job-2", 3, 7, 1).ok());
    ASSERT_TRUE(k->Append("job-2", 3, 7, Lines(0, 10)).ok());  // a whole share: rotated
    ASSERT_TRUE(fs::exists(dir_ / "job-2" / "3" / "rank-7.log.prev.part"));
    ASSERT_FALSE(fs::exists(dir_ / "job-2" / "3" / "rank-7.log.part"));
  }
  std::ofstream(dir_ / "job-1" / "1" / "notes.part") << "x";
  std::ofstream(dir_ / "job-1" / "1" / "rank-x.log.part") << "x";
  auto k = Open(100, 1 << 20);
  using Id = LogKeeper::CopyId;
  const std::vector<Id> both = {{"job-1", 1, 1}, {"job-2", 3, 7}};
  EXPECT_EQ(k->interrupted(), both);
  EXPECT_FALSE(fs::exists(dir_ / "job-1" / "1" / "rank-x.log.part")) << "not a copy's: removed";
  EXPECT_FALSE(k->Has("job-1", 1, 1));
  // A coordinator that stops before it asks again or gives up (a start that fails later) finds
  // the same copies at its next Open: their part files are still there.
  k.reset();
  k = Open(100, 1 << 20);
  EXPECT_EQ(k->interrupted(), both);
  EXPECT_TRUE(fs::exists(dir_ / "job-2" / "3" / "rank-7.log.prev.part"));
  // Asked again (Begin starts afresh) or given up (Discard): listed no more.
  ASSERT_TRUE(k->Begin("job-1", 1, 1, 2).ok());
  ASSERT_TRUE(k->Append("job-1", 1, 1, "whole now").ok());
  ASSERT_TRUE(k->Commit("job-1", 1, 1, "").ok());
  k->Discard({"job-2", 3, 7});
  EXPECT_FALSE(fs::exists(dir_ / "job-2" / "3" / "rank-7.log.prev.part"));
  k.reset();
  EXPECT_TRUE(Open(100, 1 << 20)->interrupted().empty());
}

TEST_F(LogKeeperTest, NamesThatWouldLeaveTheDirectoryAreRefused) {
  auto k = Open(1000, 1 << 20);
  for (const char* job : {"..", ".", "../x", "a/b", "", "a\nb", "/etc"}) {
    Status st = k->Begin(job, 1, 0, 1);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << job;
    EXPECT_FALSE(k->Has(job, 1, 0));
    EXPECT_EQ(k->Read(job, 1, 0, 0, 10).status().code(), StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(k->Begin("job", 0, 0, 1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(k->Begin("job", 1, -1, 1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(k->Begin("job", 1, LogKeeper::kMaxRank + 1, 1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(LogKeeper::Open(dir_, {0, 1}).status().code(), StatusCode::kInvalidArgument);
  // Nothing was created outside the directory, nor in it.
  EXPECT_TRUE(fs::is_empty(dir_));
}

}  // namespace
}  // namespace muster::coordinator
