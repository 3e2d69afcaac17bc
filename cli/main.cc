// The `muster` binary: parses arguments and dispatches to a subcommand. No logic lives here.

#include <CLI/CLI.hpp>
#include <iostream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "common/logging.h"

int main(int argc, char** argv) {
  CLI::App app{"muster: multi-node GPU training orchestrator", "muster"};
  app.set_version_flag("--version", std::string("muster ") + MUSTER_VERSION);
  std::string log_level;
  app.add_option("--log-level", log_level,
                 "trace, debug, info, warn, error, critical or off (default: $MUSTER_LOG_LEVEL "
                 "or info)");
  app.require_subcommand(1);

  muster::cli::Runner runner;
  muster::cli::AddKeysCommands(app, &runner);
  muster::cli::AddCkptCommands(app, &runner);
  muster::cli::AddRunCommands(app, &runner);
  muster::cli::AddCoordinatorCommands(app, &runner);
  muster::cli::AddAgentCommands(app, &runner);
  muster::cli::AddDemoCommands(app, &runner);

  // `muster [--log-level L] run ...`: every word after `run` is the launcher's (mpirun syntax),
  // a leading `--` included, which CLI11 would otherwise take as its own separator.
  int word = 1;
  while (word < argc && std::string(argv[word]).rfind("--log-level", 0) == 0) {
    std::string a = argv[word];
    if (a == "--log-level" && word + 1 < argc) {
      log_level = argv[word + 1];
      word += 2;
    } else if (a.rfind("--log-level=", 0) == 0) {
      log_level = a.substr(12);
      ++word;
    } else {
      break;
    }
  }
  if (word < argc && std::string(argv[word]) == "run") {
    if (auto st = muster::log::InitLogging(log_level); !st.ok()) {
      std::cerr << "muster: " << st.message() << "\n";
      return 2;
    }
    return muster::cli::RunMain(std::vector<std::string>(argv + word + 1, argv + argc));
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (auto st = muster::log::InitLogging(log_level); !st.ok()) {
    std::cerr << "muster: " << st.message() << "\n";
    return 2;
  }
  if (!runner) {
    std::cerr << app.help();
    return 2;
  }
  return runner();
}
