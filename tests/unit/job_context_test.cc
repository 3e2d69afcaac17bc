#include "runtime/job_context.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "collectives/rendezvous_store.h"

namespace muster::runtime {
namespace {

namespace fs = std::filesystem;

// The reading end of a control channel: what an agent would see.
class Channel {
 public:
  Channel() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_), 0); }
  ~Channel() {
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  int write_fd() const { return fds_[1]; }
  // Everything sent so far (non-blocking).
  std::string Drain() {
    std::string out;
    char buf[4096];
    for (;;) {
      ssize_t n = ::recv(fds_[0], buf, sizeof(buf), MSG_DONTWAIT);
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }

 private:
  int fds_[2] = {-1, -1};
};

class TempDir {
 public:
  TempDir()
      : path_(fs::temp_directory_path() /
              ("job-context-test-" + std::to_string(::getpid()) + "-" +
               ::testing::UnitTest::GetInstance()->current_test_info()->name())) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

TEST(JobContextTest, ProgressGoesOnTheControlChannelFromRankZeroOnly) {
  Channel ch;
  RankEnv env;
  env.world_size = 2;
  env.control_fd = ch.write_fd();
  auto ctx = JobContext::FromEnv(env, nullptr);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  ASSERT_TRUE((*ctx)->Progress(12, 100, 1.5, {{"tokens_per_s", 812.5}, {"lr", 0.001}}).ok());
  EXPECT_EQ(ch.Drain(), "MUSTER_PROGRESS step=12 total=100 loss=1.5 tokens_per_s=812.5 lr=0.001\n");
  EXPECT_EQ((*ctx)->Progress(1, -1, std::nan(""), {{"bad name", 1}}).code(),
            StatusCode::kInvalidArgument);
  env.rank = 1;
  auto other = JobContext::FromEnv(env, nullptr);
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE((*other)->Progress(12, 100, 1.5).ok());
  EXPECT_EQ(ch.Drain(), "");
}

TEST(JobContextTest, TheCheckpointerAnnouncesItsOwnCommits) {
  Channel ch;
  TempDir dir;
  RankEnv env;
  env.checkpoint_dir = dir.path();
  env.control_fd = ch.write_fd();
  env.resume_step = 7;
  auto ctx = JobContext::FromEnv(env, nullptr);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  auto ck = (*ctx)->NewCheckpointer();
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_EQ(*(*ck)->ResumeStep(), 7);  // MUSTER_RESUME_STEP, not the directory's latest
  std::vector<float> w(64, 1.0f);
  checkpoint::SaveState s;
  s.tensors.push_back(
      checkpoint::TensorRef::Replicated("w", checkpoint::DType::kF32, {64}, w.data()));
  ASSERT_TRUE((*ck)->Save(5, s).ok());
  ASSERT_TRUE((*ck)->Wait().ok());
  // Announced with the commit latency the checkpointer measured.
  std::string line = ch.Drain();
  EXPECT_EQ(line.rfind("MUSTER_CHECKPOINT step=5 seconds=", 0), 0u) << line;
  ASSERT_EQ(line.back(), '\n');
  const std::string seconds = line.substr(33, line.size() - 34);
  char* end = nullptr;
  double s_value = std::strtod(seconds.c_str(), &end);
  EXPECT_TRUE(end && *end == '\0' && s_value >= 0) << line;
}

TEST(JobContextTest, ANoticeFileOrTheStoreKeyIsANoticeAndEveryRankAgreesToStop) {
  TempDir dir;
  std::shared_ptr<collectives::RendezvousStore> store = collectives::NewInMemoryRendezvousStore();
  constexpr int kWorld = 2;
  std::vector<std::unique_ptr<JobContext>> ctxs;
  for (int r = 0; r < kWorld; ++r) {
    RankEnv env;
    env.rank = r;
    env.world_size = kWorld;
    env.local_rank = r;
    env.local_world_size = kWorld;
    env.coll_backend = "gloo";
    env.preempt_file = dir.path() + "/notice-" + std::to_string(r);
    auto ctx = JobContext::FromEnv(env, store);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctxs.push_back(std::move(*ctx));
  }
  EXPECT_FALSE(ctxs[1]->NoticeSeen());
  std::ofstream(dir.path() + "/notice-1") << "30\n";
  EXPECT_TRUE(ctxs[1]->NoticeSeen());
  EXPECT_EQ(ctxs[1]->NoticeReason(), "notice file " + dir.path() + "/notice-1");
  // Rank 0 has seen nothing; it agrees to stop at the same call all the same.
  bool stop[kWorld] = {false, false};
  std::vector<std::thread> ranks;
  for (int r = 0; r < kWorld; ++r) {
    ranks.emplace_back([&, r] {
      collectives::CommConfig cc;
      cc.timeout = std::chrono::seconds(20);
      auto comm = ctxs[r]->NewCommunicator(cc);
      ASSERT_TRUE(comm.ok()) << comm.status();
      auto agreed = ctxs[r]->AgreeToStop(**comm);
      ASSERT_TRUE(agreed.ok()) << agreed.status();
      stop[r] = *agreed;
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_TRUE(stop[0]);
  EXPECT_TRUE(stop[1]);
  // The agent's store key reaches rank 0.
  EXPECT_FALSE(ctxs[0]->NoticeSeen());
  ASSERT_TRUE(store->Set(JobContext::kPreemptKey, "1700000000000").ok());
  EXPECT_TRUE(ctxs[0]->NoticeSeen());
  EXPECT_EQ(ctxs[0]->NoticeReason(), "store key muster/preempt (deadline 1700000000000 unix ms)");
}

TEST(JobContextTest, AMalformedEnvIsRefused) {
  RankEnv env;
  env.rank = 3;  // of 1
  EXPECT_EQ(JobContext::FromEnv(env, nullptr).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace muster::runtime
