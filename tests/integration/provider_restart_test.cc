// The providers' state survives its coordinator: a real `muster coordinator` started with
// --providers is killed with SIGKILL (its whole process group, children included) and started
// again on the same data dir and providers file.

#include <fmt/format.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <regex>

#include "tests/integration/provider_fixture.h"

namespace muster::providers_test {
namespace {

class ProviderRestartTest : public ProviderCluster {
 protected:
  void TearDown() override {
    std::ofstream(dir_ / "release");  // a fake sbatch still waiting gives up now
    ProviderCluster::TearDown();
  }
  // A fake tool in dir_/bin: `body` runs after its arguments are appended to dir_/<name>.log.
  void FakeTool(const std::string& name, const std::string& body) {
    fs::create_directories(dir_ / "bin");
    fs::path p = dir_ / "bin" / name;
    std::ofstream(p) << "#!/bin/sh\necho \"$@\" >> " << (dir_ / (name + ".log")).string() << "\n"
                     << body << "\n";
    chmod(p.c_str(), 0755);
  }
  // SIGKILL (the whole process group) and a start on the same data dir and providers file.
  ::testing::AssertionResult KillNineAndRestart(const std::string& providers) {
    coordinator_.reset();
    fs::remove(dir_ / "coord" / "endpoint");  // the dead one's
    return StartCoordinator(providers);
  }
  // The provider's ledger as the coordinator's database has it (read-only, beside the running
  // coordinator: SQLite WAL lets a reader in).
  std::string Ledger(const std::string& provider) {
    sqlite3* db = nullptr;
    std::string out;
    if (sqlite3_open_v2((dir_ / "coord" / "coordinator.db").c_str(), &db, SQLITE_OPEN_READONLY,
                        nullptr) == SQLITE_OK) {
      sqlite3_busy_timeout(db, 2000);
      sqlite3_stmt* st = nullptr;
      if (sqlite3_prepare_v2(db, "SELECT value FROM state WHERE key = ?", -1, &st, nullptr) ==
          SQLITE_OK) {
        std::string key = "provider_ledger/" + provider;
        sqlite3_bind_text(st, 1, key.c_str(), -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) == SQLITE_ROW) {
          const void* p = sqlite3_column_blob(st, 0);
          if (p) out.assign(static_cast<const char*>(p), sqlite3_column_bytes(st, 0));
        }
      }
      sqlite3_finalize(st);
    }
    sqlite3_close_v2(db);
    return out;
  }
  std::string SlurmProviders(int request_timeout_s) {
    return fmt::format(
        "providers:\n"
        "  - name: hpc\n"
        "    kind: slurm\n"
        "    request_timeout_s: {}\n"
        "    node: {{slots: 1}}\n"
        "    slurm:\n"
        "      bin_dir: {}\n"
        "      work_dir: {}\n",
        request_timeout_s, (dir_ / "bin").string(), (dir_ / "hpc").string());
  }
  std::unique_ptr<Subprocess> StartAgent(const std::string& name) {
    auto p =
        Subprocess::Start({MUSTER_BIN, "agent", "--coordinator", endpoint_, "--keys",
                           (dir_ / "keys").string(), "--name", name, "--provider", "hpc", "--slots",
                           "1", "--gpus", "0", "--work-dir", (dir_ / name).string()},
                          {}, (dir_ / (name + ".log")).string());
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    return p.ok() ? std::make_unique<Subprocess>(std::move(*p)) : nullptr;
  }
  std::string PendingReason(const std::string& job) {
    auto st = Status(job);
    return st.is_object() ? st.value("pending_reason", "") : "";
  }
  int Count(const std::string& text, const std::string& needle) {
    int n = 0;
    for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
      ++n;
    return n;
  }
};

// The coordinator dies while sbatch has not answered (the allocation may exist, its id is
// unknown): the intent recorded before sbatch ran makes the next coordinator scancel the Slurm
// job by its name, which is unique to that try.
TEST_F(ProviderRestartTest, AnUnansweredSbatchIsScancelledByNameAfterKillNine) {
  // sbatch records its arguments, then hangs (a slow controller) until the test ends.
  FakeTool("sbatch", fmt::format("i=0; while [ ! -e {} ] && [ $i -lt 300 ]; do sleep 0.1; "
                                 "i=$((i+1)); done; exit 1",
                                 (dir_ / "release").string()));
  FakeTool("scancel", "exit 0");
  FakeTool("squeue", "exit 0");
  const std::string providers = fmt::format(
      "providers:\n"
      "  - name: hpc\n"
      "    kind: slurm\n"
      "    node: {{slots: 1}}\n"
      "    slurm:\n"
      "      bin_dir: {}\n"
      "      work_dir: {}\n",
      (dir_ / "bin").string(), (dir_ / "hpc").string());
  ASSERT_TRUE(StartCoordinator(providers));
  std::string job = Submit("name: slow\ncommand: [\"true\"]\nnodes: 1\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitUntil(
      [&] { return ReadFile(dir_ / "sbatch.log").find("--job-name") != std::string::npos; }, 15s))
      << ReadFile(dir_ / "coord.log");
  std::smatch m;
  const std::string sbatch = ReadFile(dir_ / "sbatch.log");
  ASSERT_TRUE(std::regex_search(sbatch, m, std::regex("--job-name (\\S+)"))) << sbatch;
  const std::string name = m[1];
  EXPECT_NE(Ledger("hpc").find("name:" + name), std::string::npos)
      << "the intent is recorded before sbatch runs: " << Ledger("hpc");

  ASSERT_TRUE(KillNineAndRestart(providers));  // sbatch dies with it
  EXPECT_TRUE(WaitUntil(
      [&] { return ReadFile(dir_ / "scancel.log").find("--name " + name) != std::string::npos; },
      15s))
      << "scancel.log: " << ReadFile(dir_ / "scancel.log") << "\n"
      << ReadFile(dir_ / "coord.log");
  EXPECT_TRUE(WaitUntil([&] { return Ledger("hpc").find(name) == std::string::npos; }, 5s))
      << Ledger("hpc");
}

// sbatch answered (Slurm job 777) and the coordinator died before the node registered: the next
// coordinator adopts the request (it does not scancel the allocation nor ask again), and the
// node that registers afterwards under the request's name is that request's node: the job runs
// on it.
TEST_F(ProviderRestartTest, AnAnsweredRequestIsAdoptedAndItsNodeRegistersAfterKillNine) {
  FakeTool("sbatch", "echo 777");
  FakeTool("squeue", "case \"$*\" in *-j*) echo '777 RUNNING' ;; esac");
  FakeTool("scancel", "exit 0");
  ASSERT_TRUE(StartCoordinator(SlurmProviders(120)));
  std::string job = Submit("name: later\ncommand: [\"true\"]\nnodes: 1\n");
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(WaitUntil([&] { return Ledger("hpc").find("\"777\"") != std::string::npos; }, 15s))
      << Ledger("hpc") << ReadFile(dir_ / "coord.log");
  EXPECT_NE(Ledger("hpc").find("hpc-1"), std::string::npos) << Ledger("hpc");

  ASSERT_TRUE(KillNineAndRestart(SlurmProviders(120)));
  ASSERT_TRUE(
      WaitUntil([&] { return Events(job).find("provider_adopted") != std::string::npos; }, 10s))
      << Events(job);
  auto agent = StartAgent("hpc-1");  // the node Slurm was booting comes up now
  ASSERT_TRUE(WaitState(job, "succeeded", 30s)) << Events(job) << ReadFile(dir_ / "coord.log");
  EXPECT_EQ(Count(ReadFile(dir_ / "sbatch.log"), "--job-name"), 1) << "asked once";
  EXPECT_EQ(Events(job).find("provider_retry"), std::string::npos) << Events(job);
  EXPECT_EQ(ReadFile(dir_ / "scancel.log").find("777"), std::string::npos)
      << "the allocation was not given back while its node was wanted";
}

// An adopted request whose node never registers is cancelled at its deadline (request_timeout
// from the try's start, before the kill): its allocation is scancelled and the try retried.
TEST_F(ProviderRestartTest, AnAdoptedRequestWhoseNodeNeverComesIsScancelledAtItsDeadline) {
  FakeTool("sbatch", "echo 777");
  FakeTool("squeue", "case \"$*\" in *-j*) echo '777 RUNNING' ;; esac");
  FakeTool("scancel", "exit 0");
  ASSERT_TRUE(StartCoordinator(SlurmProviders(4)));
  std::string job = Submit("name: never\ncommand: [\"true\"]\nnodes: 1\n");
  ASSERT_TRUE(WaitUntil([&] { return Ledger("hpc").find("\"777\"") != std::string::npos; }, 15s))
      << Ledger("hpc") << ReadFile(dir_ / "coord.log");
  ASSERT_TRUE(KillNineAndRestart(SlurmProviders(4)));
  ASSERT_TRUE(
      WaitUntil([&] { return Events(job).find("provider_adopted") != std::string::npos; }, 10s))
      << Events(job);
  EXPECT_EQ(ReadFile(dir_ / "scancel.log").find("777"), std::string::npos) << "adopted, kept";
  EXPECT_TRUE(
      WaitUntil([&] { return Events(job).find("provider_retry") != std::string::npos; }, 15s))
      << Events(job);
  EXPECT_TRUE(WaitUntil(
      [&] { return ReadFile(dir_ / "scancel.log").find("777") != std::string::npos; }, 10s))
      << ReadFile(dir_ / "scancel.log") << ReadFile(dir_ / "coord.log");
}

// A provider that failed a gang max_tries times is given up for it for retry_backoff_max_s; a
// coordinator killed and restarted in that time still has it given up (the same pending
// reason, no new request), rather than starting the tries over.
TEST_F(ProviderRestartTest, AGivenUpProviderStaysGivenUpAfterKillNine) {
  const std::string providers =
      "providers:\n  - name: aws\n    kind: local\n    max_tries: 2\n    retry_backoff_s: 0.2\n"
      "    retry_backoff_max_s: 3600\n    work_dir: /proc/muster-cannot-write\n";
  ASSERT_TRUE(StartCoordinator(providers));
  std::string job = Submit("name: stuck\ncommand: [\"true\"]\nnodes: 1\n");
  const std::string given_up = "provider aws could not supply 1 nodes after 2 tries";
  auto reason = [&] { return PendingReason(job); };
  ASSERT_TRUE(WaitUntil([&] { return reason().find(given_up) != std::string::npos; }, 15s))
      << Status(job).dump() << Events(job);
  const int requests = Count(Events(job), "provider_request");
  ASSERT_EQ(requests, 2) << Events(job);

  ASSERT_TRUE(KillNineAndRestart(providers));
  // The first passes after the restart: with the state lost the gang would ask again and show
  // "waiting for 1 nodes from provider aws" until two more tries failed.
  ASSERT_TRUE(WaitUntil([&] { return !reason().empty(); }, 10s)) << Status(job).dump();
  EXPECT_NE(reason().find(given_up), std::string::npos) << Status(job).dump() << Events(job);
  EXPECT_EQ(Count(Events(job), "provider_request"), requests) << Events(job);
}

}  // namespace
}  // namespace muster::providers_test
