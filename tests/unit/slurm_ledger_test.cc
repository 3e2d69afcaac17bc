// The Slurm provider's ledger (slurm_provider.h): what it holds in Slurm is recorded through the
// coordinator's ledger (here an in-memory one) and, after a restart, adopted when still wanted
// or given back. Through the Provider interface, with fake sbatch/squeue/scancel scripts that
// log their arguments (as tests/integration/provider_restart_test.cc uses them).

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "coordinator/providers/slurm_provider.h"

namespace muster::coordinator::providers {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class SlurmLedgerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("durable2-slurm-ledger-" + std::to_string(getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
    fs::create_directories(dir_ / "bin");
    // sbatch answers job 4242; squeue lists the -j jobs as RUNNING and, for --name, what the
    // test put in by-name; scancel succeeds.
    Tool("sbatch", "echo 4242");
    Tool("squeue", "case \"$*\" in *--name*) cat " + (dir_ / "by-name").string() +
                       " 2>/dev/null; true ;; *-j*) for a; do last=$a; done; "
                       "echo \"$last\" | tr ',' '\\n' | sed 's/$/ RUNNING/' ;; esac");
    Tool("scancel", "exit 0");
    config_.name = "hpc";
    config_.kind = "slurm";
    config_.slurm.bin_dir = (dir_ / "bin").string();
    config_.slurm.work_dir = (dir_ / "work").string();
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Tool(const std::string& name, const std::string& body) {
    fs::path p = dir_ / "bin" / name;
    std::ofstream(p) << "#!/bin/sh\necho \"$@\" >> " << (dir_ / (name + ".log")).string() << "\n"
                     << body << "\n";
    chmod(p.c_str(), 0755);
  }
  std::string Log(const std::string& tool) { return ReadFile(dir_ / (tool + ".log")); }
  // Polls `p` (the reactor's side: it flushes the ledger) until `pred` holds or 10 s pass.
  bool PollUntil(SlurmProvider& p, const std::function<bool()>& pred,
                 std::vector<RequestFailure>* failures = nullptr) {
    auto end = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < end) {
      auto f = p.Poll();
      if (failures) failures->insert(failures->end(), f.begin(), f.end());
      if (pred()) return true;
      std::this_thread::sleep_for(20ms);
    }
    return pred();
  }
  std::vector<LedgerEntry> Ledger() { return *ledger_.Load("hpc"); }
  bool LedgerHas(const std::string& key) {
    for (const auto& e : Ledger()) {
      if (e.key == key) return true;
    }
    return false;
  }
  static NodeGroupRequest Req(uint64_t id, std::vector<std::string> names) {
    NodeGroupRequest r;
    r.id = id;
    r.job = "train-1";
    r.names = std::move(names);
    return r;
  }

  fs::path dir_;
  ProviderConfig config_;
  MemoryProviderLedger ledger_;
};

// Before sbatch runs, its intent is durable in the ledger with the request and node names; the
// answer replaces it with the Slurm job id.
TEST_F(SlurmLedgerTest, TheIntentIsDurableBeforeSbatchAndTheAnswerReplacesIt) {
  Tool("sbatch", "echo 4242");
  SlurmProvider p(config_, AgentLaunch{"muster", "tcp://127.0.0.1:1", {}});
  EXPECT_TRUE(p.Adopt(&ledger_, [](uint64_t, const auto&) { return true; }).empty());
  ASSERT_TRUE(p.Request(Req(3, {"hpc-1", "hpc-2"})).ok());
  // Request returned: the intent is in the ledger whether or not sbatch ran yet.
  bool intent = false;
  for (const auto& e : Ledger()) intent |= e.key.rfind("name:muster-hpc-train-1-r3-", 0) == 0;
  EXPECT_TRUE(intent || LedgerHas("4242")) << EncodeLedger(Ledger());
  ASSERT_TRUE(PollUntil(p, [&] { return LedgerHas("4242"); })) << EncodeLedger(Ledger());
  auto l = Ledger();
  ASSERT_EQ(l.size(), 1u) << EncodeLedger(l);
  EXPECT_EQ(l[0].request, 3u);
  EXPECT_EQ(l[0].nodes, (std::vector<std::string>{"hpc-1", "hpc-2"}));
}

// A restarted provider adopts what is still wanted (a request in flight; nodes the coordinator
// knows), scancels the rest, finds an adopted intent's job by its name, and afterwards Cancel
// and Release act on the adopted allocations as on its own.
TEST_F(SlurmLedgerTest, ARestartAdoptsWhatIsWantedAndScancelsTheRest) {
  ASSERT_TRUE(ledger_
                  .Save("hpc", {{"1001", 7, {"hpc-1"}},
                                {"1002", 8, {"hpc-2"}},
                                {"name:muster-hpc-train-1-r9-abc", 9, {"hpc-3"}},
                                {"1004", 10, {"hpc-9"}}})
                  .ok());
  std::ofstream(dir_ / "by-name") << "1003\n";
  SlurmProvider p(config_, AgentLaunch{"muster", "tcp://127.0.0.1:1", {}});
  auto adopted = p.Adopt(&ledger_, [](uint64_t id, const std::vector<std::string>& nodes) {
    return id == 7 || id == 9 || nodes == std::vector<std::string>{"hpc-2"};
  });
  EXPECT_EQ(adopted, (std::set<uint64_t>{7, 8, 9}));
  ASSERT_TRUE(PollUntil(p, [&] { return !LedgerHas("1004") && LedgerHas("1003"); }))
      << EncodeLedger(Ledger()) << Log("scancel") << Log("squeue");
  EXPECT_NE(Log("squeue").find("--name muster-hpc-train-1-r9-abc"), std::string::npos);
  std::string scancelled = Log("scancel");
  EXPECT_EQ(scancelled, "1004\n") << "only what nobody wants goes back";
  // The adopted ones are the provider's own now.
  p.Release("hpc-2");
  p.Cancel(7);
  p.Cancel(9);
  ASSERT_TRUE(PollUntil(p, [&] { return Ledger().empty(); })) << EncodeLedger(Ledger());
  for (const char* job : {"1001\n", "1002\n", "1003\n"}) {
    EXPECT_NE(Log("scancel").find(job), std::string::npos) << job << Log("scancel");
  }
}

// An adopted intent that Slurm has no job for: sbatch never submitted it. Its request's try
// fails (retried as any failed try) and its name is scancelled all the same (the cleanup a
// killed coordinator's intent always got).
TEST_F(SlurmLedgerTest, AnAdoptedIntentSlurmDoesNotKnowFailsItsTry) {
  ASSERT_TRUE(ledger_.Save("hpc", {{"name:muster-hpc-train-1-r4-abc", 4, {"hpc-1"}}}).ok());
  SlurmProvider p(config_, AgentLaunch{"muster", "tcp://127.0.0.1:1", {}});
  EXPECT_EQ(p.Adopt(&ledger_, [](uint64_t, const auto&) { return true; }), (std::set<uint64_t>{4}));
  std::vector<RequestFailure> failures;
  ASSERT_TRUE(PollUntil(
      p, [&] { return !failures.empty() && Ledger().empty(); }, &failures))
      << EncodeLedger(Ledger());
  EXPECT_EQ(failures[0].id, 4u);
  EXPECT_NE(failures[0].message.find("submitted nothing"), std::string::npos)
      << failures[0].message;
  EXPECT_NE(Log("scancel").find("--name muster-hpc-train-1-r4-abc"), std::string::npos)
      << Log("scancel");
}

// The file an older coordinator kept (<work_dir>/allocations) is read once: its jobs and intents
// go back as they did then, and the file is removed.
TEST_F(SlurmLedgerTest, AnOlderCoordinatorsLedgerFileIsScancelledAndRemoved) {
  fs::create_directories(dir_ / "work");
  std::ofstream(dir_ / "work" / "allocations") << "555\nname:muster-hpc-old-r1-x\n";
  SlurmProvider p(config_, AgentLaunch{"muster", "tcp://127.0.0.1:1", {}});
  EXPECT_TRUE(p.Adopt(&ledger_, [](uint64_t, const auto&) { return true; }).empty());
  EXPECT_FALSE(fs::exists(dir_ / "work" / "allocations")) << "moved into the database";
  ASSERT_TRUE(PollUntil(p, [&] { return Ledger().empty(); })) << EncodeLedger(Ledger());
  EXPECT_NE(Log("scancel").find("555\n"), std::string::npos) << Log("scancel");
  EXPECT_NE(Log("scancel").find("--name muster-hpc-old-r1-x"), std::string::npos) << Log("scancel");
}

// A ledger that cannot be written: the request is refused before sbatch runs.
TEST_F(SlurmLedgerTest, ARequestWhoseIntentCannotBeRecordedIsRefused) {
  class BrokenLedger : public ProviderLedger {
   public:
    Status Save(const std::string&, const std::vector<LedgerEntry>&) override {
      return InternalError("disk gone");
    }
    StatusOr<std::vector<LedgerEntry>> Load(const std::string&) override {
      return std::vector<LedgerEntry>{};
    }
  } broken;
  SlurmProvider p(config_, AgentLaunch{"muster", "tcp://127.0.0.1:1", {}});
  p.Adopt(&broken, [](uint64_t, const auto&) { return true; });
  Status st = p.Request(Req(1, {"hpc-1"}));
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_NE(st.message().find("disk gone"), std::string::npos) << st.ToString();
  p.Poll();
  EXPECT_EQ(Log("sbatch"), "") << "sbatch never ran";
}

}  // namespace
}  // namespace muster::coordinator::providers
