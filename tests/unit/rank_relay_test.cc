// The agent's side of the rendezvous relay (node_agent/rank_relay.h): who may use the socket,
// with real processes and their process groups, and the job env knob for the direct path.

#include "node_agent/rank_relay.h"

#include <gtest/gtest.h>
#include <linux/magic.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

extern char** environ;

namespace muster::node_agent {
namespace {

// A child leading its own process group, as the supervisor starts every rank.
class GroupLeader {
 public:
  GroupLeader() {
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&attr, 0);
    char* argv[] = {const_cast<char*>("/bin/sleep"), const_cast<char*>("30"), nullptr};
    EXPECT_EQ(posix_spawn(&pid_, "/bin/sleep", nullptr, &attr, argv, environ), 0);
    posix_spawnattr_destroy(&attr);
  }
  ~GroupLeader() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

TEST(RankRelayTest, OnlyProcessesInTheRanksProcessGroupsAreAdmitted) {
  GroupLeader rank;
  ASSERT_GT(rank.pid(), 0);
  EXPECT_TRUE(InRankGroups(rank.pid(), {rank.pid()}).ok());
  // This test process is not in the rank's group: an outsider of the agent's own user.
  Status outsider = InRankGroups(getpid(), {rank.pid()});
  EXPECT_EQ(outsider.code(), StatusCode::kFailedPrecondition) << outsider;
  EXPECT_NE(outsider.message().find("not one of this attempt's ranks"), std::string::npos)
      << outsider;
  // No ranks yet (or any more): nobody is admitted.
  EXPECT_FALSE(InRankGroups(rank.pid(), {}).ok());
}

TEST(RankRelayTest, AProcessThatIsGoneIsRefused) {
  pid_t pid = -1;
  {
    GroupLeader gone;
    pid = gone.pid();
  }
  Status st = InRankGroups(pid, {pid});
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("is gone"), std::string::npos) << st;
}

TEST(RankRelayTest, TheJobEnvKnobKeepsTheDirectPath) {
  proto::StartAssignment s;
  EXPECT_FALSE(WantsDirectRendezvous(s));
  (*s.mutable_env())[kRdzvDirectEnv] = "0";
  EXPECT_FALSE(WantsDirectRendezvous(s));
  (*s.mutable_env())[kRdzvDirectEnv] = "1";
  EXPECT_TRUE(WantsDirectRendezvous(s));
}

bool OnTmpfs(const std::filesystem::path& p) {
  struct statfs sf {};
  return ::statfs(p.c_str(), &sf) == 0 && sf.f_type == TMPFS_MAGIC;
}

// The agent's relay keeps its socket and gather files on a memory file system when the host
// has one (no disk inodes, nothing written back to a disk), in a private 0700 directory, even
// when the agent's work directory is on a disk.
TEST(RankRelayTest, TheRelaysDirectoryIsOnAMemoryFileSystemWhenTheHostHasOne) {
  const std::filesystem::path work = std::filesystem::current_path() / "rank-relay-test-work";
  if (OnTmpfs(std::filesystem::current_path())) GTEST_SKIP() << "the work directory is a tmpfs";
  if (!OnTmpfs("/dev/shm")) GTEST_SKIP() << "no tmpfs at /dev/shm on this host";
  proto::StartAssignment s;
  s.set_job_id("job");
  s.set_attempt(1);
  s.set_master_addr("127.0.0.1");
  s.set_rendezvous_port(1);
  s.set_ranks_per_node(2);
  zmq::context_t ctx;
  Reactor reactor("rank-relay-test", &ctx);  // not running: Create and close on this thread
  auto relay = StartRankRelay(reactor, s, "insecure", work, [] { return std::vector<pid_t>{}; });
  ASSERT_TRUE(relay.ok()) << relay.status();
  const std::string& endpoint = (*relay)->endpoint();
  ASSERT_EQ(endpoint.rfind("unix://", 0), 0u) << endpoint;
  const std::filesystem::path dir = std::filesystem::path(endpoint.substr(7)).parent_path();
  EXPECT_TRUE(OnTmpfs(dir)) << endpoint;
  struct stat st {};
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u) << endpoint;
  EXPECT_EQ(st.st_uid, ::geteuid());
  relay->reset();
  EXPECT_FALSE(std::filesystem::exists(dir));
  std::filesystem::remove_all(work);
}

}  // namespace
}  // namespace muster::node_agent
