// `muster run [-np N] [-H host:slots,...] [--hostfile FILE] [-x VAR[=VAL]]... [--tag-output]
//  [--timeout S] [--grace S] [--] PROG ARGS...`: parsing is launcher::ParseRunArgs, the work is
// launcher::RunJob.

#include <iostream>

#include "cli/commands.h"
#include "launcher/launcher.h"
#include "launcher/run_options.h"

namespace muster::cli {

int RunMain(const std::vector<std::string>& args) {
  if (!args.empty() && (args[0] == "-h" || args[0] == "--help")) {
    std::cout << launcher::RunUsage();
    return 0;
  }
  auto options = launcher::ParseRunArgs(args);
  if (!options.ok()) {
    std::cerr << "muster run: " << options.status().message() << "\n";
    return launcher::kExitUsage;
  }
  return launcher::RunJob(*options);
}

void AddRunCommands(CLI::App& app, Runner* runner) {
  // Listed here for `muster --help`; main.cc hands `muster run ...` to RunMain before CLI11
  // parses, since CLI11 would take a `--` right after `run` for itself.
  auto* run = app.add_subcommand("run", "Run PROG as N ranks on this machine (like mpirun)");
  // Options such as -np are not CLI11-style; every word after `run` goes to ParseRunArgs.
  run->prefix_command();
  run->set_help_flag();
  run->footer(launcher::RunUsage());
  run->callback([run, runner] {
    std::vector<std::string> args = run->remaining();
    *runner = [args] { return RunMain(args); };
  });
}

}  // namespace muster::cli
