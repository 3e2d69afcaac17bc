#pragma once

// MusterClusterTest: the fixture the cluster scenarios share. A NetnsCluster of `hosts` (host 0
// runs the coordinator), a fresh root directory under /tmp with the keys of `muster keys init`,
// a real `muster coordinator` and real `muster agent`s started inside their namespaces (CURVE,
// their logs in the root directory as coordinator.log and <host>.log), and the `muster` CLI run
// on host 0 as a user there would. A scenario derives from it, passes its hosts, port and name,
// and adds the agent flags of its own (AgentFlags) and its own helpers.
//
// The including target defines MUSTER_BIN (the muster binary). Needs root (network namespaces):
// SetUp skips the test otherwise. Logs are printed and the root directory kept when a test
// fails; both go when it passes. Thread-safety: the test's thread only.

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/cluster/netns_cluster.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/wait_until.h"

#ifndef MUSTER_BIN
#error "MUSTER_BIN (the muster binary) must be defined by the test target"
#endif

namespace muster::testing {

inline std::string ReadFileText(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class MusterClusterTest : public ::testing::Test {
 protected:
  using json = nlohmann::json;

  // hosts[0] is the coordinator's host; `port` its listening port (distinct per test binary,
  // so that a stale process of another suite never answers); `name` names the root directory.
  MusterClusterTest(std::vector<std::string> hosts, int port, std::string name)
      : hosts_(std::move(hosts)), port_(port), name_(std::move(name)) {}

  // The cluster, the root directory and the keys. Derived fixtures call this first, then start
  // the coordinator and the agents they need; `net_` is null when the test was skipped.
  void SetUp() override {
    auto c = NetnsCluster::Create(hosts_);
    if (!c.ok()) GTEST_SKIP() << "no multi-host cluster: " << c.status().message();
    net_ = std::move(*c);
    // Short: an agent's Unix sockets live below it (108 bytes at most). One test per process
    // under ctest; the counter keeps a whole-binary run's tests apart.
    static int tests_run = 0;
    root_ =
        std::filesystem::temp_directory_path() /
        ("muster-" + name_ + "-" + std::to_string(getpid()) + "-" + std::to_string(tests_run++));
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
    keys_ = (root_ / "keys").string();
    auto k = RunCommand({MUSTER_BIN, "--log-level", "warn", "keys", "init", "--dir", keys_});
    ASSERT_TRUE(k.ok()) << k.status();
  }

  void TearDown() override {
    if (HasFailure() && net_) std::cout << "cluster logs kept in " << root_ << "\n" << Logs();
    agents_.clear();
    coordinator_.reset();
    net_.reset();  // kills whatever is left in the namespaces (ranks), then deletes them
    if (!HasFailure() && !root_.empty()) std::filesystem::remove_all(root_);
  }

  std::string Endpoint() const { return "tcp://" + net_->address(0) + ":" + std::to_string(port_); }
  std::filesystem::path WorkDir(const std::string& node) const { return root_ / "work" / node; }
  // The host index of `node`, -1 when no host has that name.
  int HostOf(const std::string& node) const {
    for (int h = 0; h < static_cast<int>(hosts_.size()); ++h) {
      if (hosts_[h] == node) return h;
    }
    return -1;
  }

  // Starts (or, after a kill, starts again) the coordinator on host 0 on its data directory,
  // logging to `log` in the root directory. Heartbeats every 250 ms; a node is lost after
  // `heartbeat_timeout_ms`.
  void StartCoordinator(const std::string& log = "coordinator.log",
                        int heartbeat_timeout_ms = 3000) {
    auto p = Subprocess::Start(
        net_->Wrap(0, {MUSTER_BIN, "--log-level", "info", "coordinator", "--data-dir",
                       (root_ / "coord").string(), "--listen", Endpoint(), "--keys", keys_,
                       "--heartbeat-interval-ms", "250", "--heartbeat-timeout-ms",
                       std::to_string(heartbeat_timeout_ms)}),
        {}, (root_ / log).string());
    ASSERT_TRUE(p.ok()) << p.status();
    coordinator_.emplace(std::move(*p));
  }

  // The flags of host `host`'s agent beyond what every agent gets (coordinator, keys, name,
  // address, work directory, no GPUs, one slot). Default: provider aws.
  virtual std::vector<std::string> AgentFlags(int /*host*/) const { return {"--provider", "aws"}; }

  // Starts (or starts again) the agent of host `host`, logging to <host>.log.
  void StartAgent(int host) {
    const std::string& name = hosts_[host];
    std::filesystem::create_directories(WorkDir(name));
    std::vector<std::string> argv = {
        MUSTER_BIN, "--log-level", "info",    "agent", "--coordinator", Endpoint(),
        "--keys",   keys_,         "--name",  name,    "--address",     net_->address(host),
        "--gpus",   "0",           "--slots", "1",     "--work-dir",    WorkDir(name).string()};
    for (auto& f : AgentFlags(host)) argv.push_back(std::move(f));
    auto p = Subprocess::Start(net_->Wrap(host, argv), {}, (root_ / (name + ".log")).string());
    ASSERT_TRUE(p.ok()) << p.status();
    agents_.erase(name);
    agents_.emplace(name, std::move(*p));
  }

  // Runs `muster ARGS...` on the coordinator's host with the cluster's keys; its stdout.
  StatusOr<std::string> Muster(std::vector<std::string> args) {
    std::vector<std::string> argv = {MUSTER_BIN, "--log-level", "error"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--coordinator", Endpoint(), "--keys", keys_});
    return RunCommand(net_->Wrap(0, argv), std::chrono::seconds(20));
  }

  // `muster nodes --json` (an empty array when it fails).
  json Nodes() {
    auto out = Muster({"nodes", "--json"});
    if (!out.ok()) return json::array();
    json n = json::parse(*out, nullptr, false);
    return n.is_array() ? n : json::array();
  }
  int NodesUp() {
    int up = 0;
    for (const auto& n : Nodes()) up += n.value("state", "") == "up";
    return up;
  }
  // `muster status JOB --json` (an empty object when it fails).
  json JobStatus(const std::string& job) {
    auto out = Muster({"status", job, "--json"});
    if (!out.ok()) return json::object();
    json j = json::parse(*out, nullptr, false);
    if (j.is_array() && !j.empty()) return j[0];
    return j.is_object() ? j : json::object();
  }
  // `muster events JOB`, as printed ("" when it fails).
  std::string Events(const std::string& job) {
    auto out = Muster({"events", job});
    return out.ok() ? *out : "";
  }

  // Writes `text` to <root>/<name>.yaml; its path.
  std::filesystem::path WriteSpec(const std::string& name, const std::string& text) {
    std::filesystem::path p = root_ / (name + ".yaml");
    std::ofstream(p) << text;
    return p;
  }
  // `muster submit SPEC`: the job id, "" (and a test failure) when it fails.
  std::string Submit(const std::filesystem::path& spec) {
    auto out = Muster({"submit", spec.string()});
    EXPECT_TRUE(out.ok()) << out.status();
    if (!out.ok()) return "";
    std::string id = *out;
    while (!id.empty() && std::isspace(static_cast<unsigned char>(id.back()))) id.pop_back();
    return id;
  }

  // The tail of every log in the root directory (the coordinator's, restarted ones included,
  // and every agent's).
  std::string Logs() const {
    std::string s;
    std::vector<std::filesystem::path> logs;
    for (const auto& e : std::filesystem::directory_iterator(root_)) {
      if (e.path().extension() == ".log") logs.push_back(e.path());
    }
    std::sort(logs.begin(), logs.end());
    for (const auto& p : logs) {
      std::string t = ReadFileText(p);
      if (t.size() > 4000) t = "..." + t.substr(t.size() - 4000);
      s += "---- " + p.filename().string() + "\n" + t;
    }
    return s;
  }

  const std::vector<std::string> hosts_;
  const int port_;
  const std::string name_;
  std::unique_ptr<NetnsCluster> net_;
  std::filesystem::path root_;
  std::string keys_;
  std::optional<Subprocess> coordinator_;
  std::map<std::string, Subprocess> agents_;
};

}  // namespace muster::testing
