#pragma once

// Each `muster` subcommand registers itself on the CLI11 app and returns the function that
// runs it. cli/ parses and dispatches only: the work happens in the component libraries.

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace muster::cli {

// Runs the parsed subcommand and returns the process exit code.
using Runner = std::function<int()>;

// Each adds its subcommand(s) to `app` and sets `*runner` when one is chosen.
void AddKeysCommands(CLI::App& app, Runner* runner);
void AddCkptCommands(CLI::App& app, Runner* runner);
void AddRunCommands(CLI::App& app, Runner* runner);
// `muster run` with the words after `run` (mpirun syntax, parsed by launcher::ParseRunArgs).
int RunMain(const std::vector<std::string>& args);
void AddCoordinatorCommands(CLI::App& app, Runner* runner);
void AddAgentCommands(CLI::App& app, Runner* runner);
void AddDemoCommands(CLI::App& app, Runner* runner);

}  // namespace muster::cli
