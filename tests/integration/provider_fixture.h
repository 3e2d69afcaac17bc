#pragma once

// A real `muster coordinator` process started with --providers, for the provider integration
// tests (local and slurm): keys, a temp directory, the muster CLI against it, and waits.

#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "tests/testing/subprocess.h"

namespace muster::providers_test {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::RunCommand;
using testing::Subprocess;

template <typename F>
bool WaitUntil(F pred, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return pred();
}

inline std::string ReadFile(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Processes whose command line mentions `needle` (agents started by a provider carry their
// work directory, under the test's directory).
inline std::vector<pid_t> ProcessesMentioning(const std::string& needle) {
  std::vector<pid_t> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename().string();
    if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
    std::string cmd = ReadFile(e.path() / "cmdline");
    std::string stat = ReadFile(e.path() / "stat");
    if (stat.find(") Z") != std::string::npos) continue;  // a zombie has exited
    if (cmd.find(needle) != std::string::npos) out.push_back(std::stoi(name));
  }
  return out;
}

class ProviderCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("muster-providers-test-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    auto k = RunCommand({MUSTER_BIN, "keys", "init", "--dir", (dir_ / "keys").string()});
    ASSERT_TRUE(k.ok()) << k.status().ToString();
  }
  void TearDown() override {
    coordinator_.reset();  // SIGKILL: its provider's agents stop on their parent's death
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // Starts the coordinator with `providers_yaml`; false (and the log) if it did not come up.
  // `listen`: a fixed endpoint, for agents that must find a restarted coordinator again.
  ::testing::AssertionResult StartCoordinator(const std::string& providers_yaml,
                                              const std::vector<std::string>& env = {},
                                              const std::string& listen = "tcp://127.0.0.1:*") {
    fs::create_directories(dir_ / "coord");
    std::ofstream(dir_ / "providers.yaml") << providers_yaml;
    std::vector<std::string> argv = {MUSTER_BIN,
                                     "coordinator",
                                     "--data-dir",
                                     (dir_ / "coord").string(),
                                     "--keys",
                                     (dir_ / "keys").string(),
                                     "--heartbeat-interval-ms",
                                     "200",
                                     "--heartbeat-timeout-ms",
                                     "3000",
                                     "--listen",
                                     listen,
                                     "--providers",
                                     (dir_ / "providers.yaml").string()};
    auto p = Subprocess::Start(argv, env, (dir_ / "coord.log").string());
    if (!p.ok()) return ::testing::AssertionFailure() << p.status().ToString();
    coordinator_ = std::make_unique<Subprocess>(std::move(*p));
    if (!WaitUntil([&] { return fs::exists(dir_ / "coord" / "endpoint"); }, 30s))
      return ::testing::AssertionFailure() << ReadFile(dir_ / "coord.log");
    endpoint_ = ReadFile(dir_ / "coord" / "endpoint");
    while (!endpoint_.empty() && std::isspace(endpoint_.back())) endpoint_.pop_back();
    return ::testing::AssertionSuccess();
  }

  StatusOr<std::string> Muster(std::vector<std::string> args) {
    std::vector<std::string> argv = {MUSTER_BIN};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--coordinator", endpoint_, "--keys", (dir_ / "keys").string()});
    return RunCommand(argv, 15s);
  }

  std::string Submit(const std::string& yaml) {
    fs::path f = dir_ / "job.yaml";
    std::ofstream(f) << yaml;
    auto out = Muster({"submit", f.string()});
    EXPECT_TRUE(out.ok()) << out.status().ToString();
    std::string id = out.ok() ? *out : "";
    while (!id.empty() && std::isspace(id.back())) id.pop_back();
    return id;
  }

  nlohmann::json Status(const std::string& job) {
    auto out = Muster({"status", job, "--json"});
    if (!out.ok()) return {};
    auto j = nlohmann::json::parse(*out, nullptr, false);
    if (j.is_array() && !j.empty()) return j[0];
    return j;
  }

  bool WaitState(const std::string& job, const std::string& state,
                 std::chrono::milliseconds timeout) {
    return WaitUntil([&] { return Status(job).value("state", "") == state; }, timeout);
  }

  int NodeCount() {
    auto out = Muster({"nodes", "--json"});
    if (!out.ok()) return -1;
    auto j = nlohmann::json::parse(*out, nullptr, false);
    return j.is_array() ? static_cast<int>(j.size()) : -1;
  }

  std::string Events(const std::string& job) {
    auto out = Muster({"events", job});
    return out.ok() ? *out : out.status().ToString();
  }

  fs::path dir_;
  std::string endpoint_;
  std::unique_ptr<Subprocess> coordinator_;
};

}  // namespace muster::providers_test
