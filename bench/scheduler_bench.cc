// muster-bench scheduler: a full pass of the gang scheduler over N nodes and J pending jobs,
// and submit-to-placement latency, beside the anchor: the same feasibility question answered by
// scanning every node for every pending job (what a scheduler without label classes does).

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "bench/bench.h"
#include "coordinator/scheduler.h"

namespace muster::bench {
namespace {

using coordinator::Decisions;
using coordinator::IslandPolicy;
using coordinator::JobRequest;
using coordinator::NodeSpec;
using coordinator::Scheduler;
using WallClock = std::chrono::steady_clock;

const std::vector<std::string> kProviders = {"aws", "gcp", "azure", "lambda"};

double Ms(WallClock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

JobRequest RandomJob(std::mt19937_64& rng, uint64_t seq) {
  static const int kSizes[] = {1, 1, 2, 2, 4, 4, 8, 16, 32, 64};
  JobRequest j;
  j.id = "job-" + std::to_string(seq);
  j.seq = seq;
  j.nodes = kSizes[rng() % 10];
  j.ranks_per_node = 8;
  j.gpus_per_node = 8;
  j.gpu_type = rng() % 2 ? "h100" : "";
  j.priority = static_cast<int>(rng() % 4);
  j.island = static_cast<IslandPolicy>(rng() % 3);
  if (rng() % 2) {
    const auto& p = kProviders[rng() % kProviders.size()];
    j.providers = {p};
    j.checkpoint_volume = "vol-" + p;
  }
  j.time_limit = std::chrono::seconds(rng() % 3 ? 3600 + rng() % 7200 : 0);
  return j;
}

// The anchor: for every pending job, scan every node and count the free ones that fit, per
// provider. Feasibility only (no placement), so it is a lower bound for a per-node scheduler.
double ScanPassMs(const std::vector<coordinator::NodeView>& nodes,
                  const std::vector<JobRequest>& jobs) {
  auto t0 = WallClock::now();
  size_t placeable = 0;
  std::vector<int> per(kProviders.size());
  for (const auto& j : jobs) {
    std::fill(per.begin(), per.end(), 0);
    for (const auto& n : nodes) {
      if (!n.job.empty() || n.state != coordinator::NodeState::kUp) continue;
      if (!j.gpu_type.empty() && n.spec.gpu_type != j.gpu_type) continue;
      if (n.spec.gpus < j.gpus_per_node || n.spec.slots < j.ranks_per_node) continue;
      if (!j.checkpoint_volume.empty() && std::find(n.spec.volumes.begin(), n.spec.volumes.end(),
                                                    j.checkpoint_volume) == n.spec.volumes.end())
        continue;
      size_t p =
          std::find(kProviders.begin(), kProviders.end(), n.spec.provider) - kProviders.begin();
      if (!j.providers.empty() && j.providers[0] != n.spec.provider) continue;
      per[p]++;
    }
    placeable += *std::max_element(per.begin(), per.end()) >= j.nodes;
  }
  double ms = Ms(WallClock::now() - t0);
  if (placeable == jobs.size() + 1) std::cout << "";  // keep the loop
  return ms;
}

int Run(int n_nodes, int n_jobs, int ticks, bool json) {
  std::mt19937_64 rng(42);
  Scheduler s;
  for (int i = 0; i < n_nodes; ++i) {
    NodeSpec n;
    const auto& p = kProviders[i % kProviders.size()];
    n.name = "node-" + std::to_string(i);
    n.provider = p;
    n.region = p + "-1";
    n.island = "island-" + std::to_string((i / kProviders.size()) % 8);
    n.gpu_type = (i / 32) % 4 == 0 ? "a100" : "h100";
    n.gpus = 8;
    n.slots = 8;
    n.volumes = {"vol-" + p};
    s.UpsertNode(n);
  }
  uint64_t seq = 1;
  std::vector<std::string> running;
  std::vector<JobRequest> pending_reqs;
  auto submit = [&](JobRequest j) {
    pending_reqs.push_back(j);
    (void)s.Submit(j);
  };
  auto now = coordinator::TimePoint{} + std::chrono::hours(1000);
  for (int i = 0; i < n_jobs; ++i) submit(RandomJob(rng, seq++));
  auto t0 = WallClock::now();
  Decisions first = s.Schedule(now);
  double first_ms = Ms(WallClock::now() - t0);
  for (auto& p : first.placements) running.push_back(p.job);
  // Keep the queue at n_jobs pending.
  for (size_t i = 0; i < first.placements.size(); ++i) submit(RandomJob(rng, seq++));

  std::vector<double> pass_ms, latency_ms;
  size_t placed_total = 0;
  for (int t = 0; t < ticks; ++t) {
    now += std::chrono::seconds(10);
    // Some running jobs finish; as many new ones are submitted, plus one urgent small job whose
    // submit-to-placement latency we time.
    for (int k = 0; k < 20 && !running.empty(); ++k) {
      size_t i = rng() % running.size();
      (void)s.Release(running[i]);
      running[i] = running.back();
      running.pop_back();
    }
    for (int k = 0; k < 20; ++k) submit(RandomJob(rng, seq++));
    JobRequest urgent = RandomJob(rng, seq++);
    urgent.priority = 100;
    urgent.nodes = 1;
    urgent.providers.clear();
    urgent.checkpoint_volume.clear();
    urgent.gpu_type.clear();
    auto s0 = WallClock::now();
    (void)s.Submit(urgent);
    auto p0 = WallClock::now();
    Decisions d = s.Schedule(now);
    auto p1 = WallClock::now();
    pass_ms.push_back(Ms(p1 - p0));
    for (auto& p : d.placements) {
      running.push_back(p.job);
      if (p.job == urgent.id) latency_ms.push_back(Ms(p1 - s0));
    }
    // Victims of preemption stop at once in this simulation.
    for (auto& pr : d.preemptions) {
      (void)s.Requeue(pr.victim);
      running.erase(std::find(running.begin(), running.end(), pr.victim));
    }
    placed_total += d.placements.size();
  }
  size_t pending = s.Schedule(now).pending;

  // Anchor on the same model: the pending jobs' requests against the nodes.
  std::vector<JobRequest> still;
  for (const auto& j : pending_reqs)
    if (s.IsPending(j.id)) still.push_back(j);
  double scan_ms = ScanPassMs(s.Nodes(now), still);

  if (json) {
    nlohmann::json j = {{"nodes", n_nodes},
                        {"pending_jobs", pending},
                        {"pass_ms", Pct(pass_ms, 0.5)},
                        {"pass_p99_ms", Pct(pass_ms, 0.99)},
                        {"first_pass_ms", first_ms},
                        {"first_pass_placements", first.placements.size()},
                        {"submit_to_placement_p50_ms", Pct(latency_ms, 0.5)},
                        {"submit_to_placement_p99_ms", Pct(latency_ms, 0.99)},
                        {"anchor_node_scan_pass_ms", scan_ms},
                        {"ticks", ticks},
                        {"placements_in_ticks", placed_total}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << "scheduler pass: " << n_nodes << " nodes (4 providers x 8 islands, 2 GPU types), "
            << pending << " pending jobs, " << ticks << " passes\n\n";
  Table t({"measure", "p50 ms", "p99 ms", "note"});
  t.Row({"muster pass (steady)", Fmt(Pct(pass_ms, 0.5), 3), Fmt(Pct(pass_ms, 0.99), 3),
         std::to_string(placed_total) + " placements over the passes"});
  t.Row({"muster first pass", Fmt(first_ms, 3), "-",
         std::to_string(first.placements.size()) + " placements from an empty cluster"});
  t.Row({"submit -> placement", Fmt(Pct(latency_ms, 0.5), 3), Fmt(Pct(latency_ms, 0.99), 3),
         std::to_string(latency_ms.size()) + " urgent 1-node jobs"});
  t.Row({"anchor: per-node scan", Fmt(scan_ms, 3), "-",
         "feasibility only, every node for every pending job"});
  t.Print();
  return 0;
}

}  // namespace

void AddSchedulerBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand("scheduler", "Gang scheduler pass time at scale");
  auto nodes = std::make_shared<int>(10000);
  auto jobs = std::make_shared<int>(10000);
  auto ticks = std::make_shared<int>(50);
  auto json = std::make_shared<bool>(false);
  cmd->add_option("--nodes", *nodes, "Registered nodes")->check(CLI::Range(1, 1000000));
  cmd->add_option("--jobs", *jobs, "Pending jobs")->check(CLI::Range(1, 1000000));
  cmd->add_option("--passes", *ticks, "Timed passes")->check(CLI::Range(1, 100000));
  cmd->add_flag("--json", *json, "Print JSON");
  cmd->callback([=] { *runner = [=] { return Run(*nodes, *jobs, *ticks, *json); }; });
}

}  // namespace muster::bench
