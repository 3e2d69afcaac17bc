// muster-bench: benchmarks that print tables beside their anchors (see docs/benchmarks.md).

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "bench/bench.h"
#include "common/logging.h"

namespace muster::bench {

void Table::Print() const {
  std::vector<size_t> w(columns_.size());
  for (size_t i = 0; i < columns_.size(); ++i) w[i] = columns_[i].size();
  for (const auto& r : rows_)
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  auto line = [&](const std::vector<std::string>& cells) {
    std::ostringstream os;
    for (size_t i = 0; i < w.size(); ++i) {
      std::string c = i < cells.size() ? cells[i] : "";
      os << (i ? "  " : "") << std::string(w[i] - c.size(), ' ') << c;
    }
    std::cout << os.str() << "\n";
  };
  line(columns_);
  size_t total = 0;
  for (size_t x : w) total += x + 2;
  std::cout << std::string(total - 2, '-') << "\n";
  for (const auto& r : rows_) line(r);
}

std::string Fmt(double v, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", precision, v);
  return buf;
}

std::string FindMuster(const std::string& flag) {
  if (!flag.empty()) return flag;
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path();
  for (auto candidate : {self / "muster", self / ".." / "bin" / "muster"}) {
    if (std::filesystem::exists(candidate, ec)) return candidate.lexically_normal().string();
  }
  return "muster";
}

}  // namespace muster::bench

int main(int argc, char** argv) {
  CLI::App app{"muster-bench: muster's benchmarks, each beside its anchor", "muster-bench"};
  app.require_subcommand(1);
  muster::bench::Runner runner;
  muster::bench::AddRpcBench(app, &runner);
  muster::bench::AddRendezvousBench(app, &runner);
  muster::bench::AddAllreduceBench(app, &runner);
  muster::bench::AddCkptBench(app, &runner);
  muster::bench::AddLaunchBench(app, &runner);
  muster::bench::AddSchedulerBench(app, &runner);
  muster::bench::AddDashboardBench(app, &runner);
  muster::bench::AddCoordinatorDiskBench(app, &runner);
  muster::bench::AddRecoveryBench(app, &runner);
  muster::bench::AddCkptPyBench(app, &runner);
  muster::bench::AddSnapshotBench(app, &runner);
  muster::bench::AddSnapshotPathBench(app, &runner);
  auto* all = app.add_subcommand("all", "Run every benchmark with its default settings");
  all->callback([&] {
    runner = [&] {
      int failures = 0;
      // Hidden subcommands (no group: helpers such as rendezvous-nodes) are not benchmarks.
      for (auto* sub : app.get_subcommands(
               [](CLI::App* a) { return a->get_name() != "all" && !a->get_group().empty(); })) {
        std::cout << "\n== " << sub->get_name() << " ==\n" << std::flush;
        failures += std::system((std::string(argv[0]) + " " + sub->get_name()).c_str()) != 0;
      }
      return failures ? 1 : 0;
    };
  });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  muster::log::InitLogging("").IgnoreError();
  return runner ? runner() : 2;
}
