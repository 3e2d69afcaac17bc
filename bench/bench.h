#pragma once

// muster-bench: each benchmark registers a subcommand; every one prints a table with its
// anchor measured in the same run, and `--json` for machines. Timings are never pass/fail.

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace muster::bench {

using Runner = std::function<int()>;

// A fixed-width text table: Row() cells are printed under Columns().
class Table {
 public:
  explicit Table(std::vector<std::string> columns) : columns_(std::move(columns)) {}
  void Row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
  void Print() const;

 private:
  std::vector<std::string> columns_;
  std::vector<std::vector<std::string>> rows_;
};

std::string Fmt(double v, int precision = 2);

// The `muster` binary: `flag` if given, else beside muster-bench (or in ../bin), else "muster".
std::string FindMuster(const std::string& flag);

void AddRpcBench(CLI::App& app, Runner* runner);
void AddRendezvousBench(CLI::App& app, Runner* runner);
void AddAllreduceBench(CLI::App& app, Runner* runner);
void AddCkptBench(CLI::App& app, Runner* runner);
void AddLaunchBench(CLI::App& app, Runner* runner);
void AddSchedulerBench(CLI::App& app, Runner* runner);
void AddRecoveryBench(CLI::App& app, Runner* runner);
void AddCkptPyBench(CLI::App& app, Runner* runner);
void AddDashboardBench(CLI::App& app, Runner* runner);
void AddSnapshotBench(CLI::App& app, Runner* runner);
void AddSnapshotPathBench(CLI::App& app, Runner* runner);
void AddCoordinatorDiskBench(CLI::App& app, Runner* runner);

}  // namespace muster::bench
