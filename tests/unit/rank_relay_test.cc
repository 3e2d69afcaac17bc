// The agent's side of the rendezvous relay (node_agent/rank_relay.h): who may use the socket,
// with real processes and their process groups, and the job env knob for the direct path.

#include "node_agent/rank_relay.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

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

}  // namespace
}  // namespace muster::node_agent
