// `muster keys init [--dir DIR] [--force]`

#include <iostream>

#include "cli/commands.h"
#include "common/curve.h"
#include "common/logging.h"

namespace muster::cli {

void AddKeysCommands(CLI::App& app, Runner* runner) {
  auto* keys = app.add_subcommand("keys", "Manage CURVE keys");
  keys->require_subcommand(1);
  auto* init = keys->add_subcommand(
      "init", "Write a coordinator key pair, a client key pair and an authorized-keys list");
  auto dir = std::make_shared<std::string>();
  auto force = std::make_shared<bool>(false);
  init->add_option("--dir", *dir, "Keys directory (default: $MUSTER_KEYS, else ~/.muster)");
  init->add_flag("--force", *force, "Replace existing keys");
  init->callback([=] {
    *runner = [=] {
      KeysDir kd = KeysDir::Resolve(*dir);
      Status st = InitKeysDir(kd, *force);
      if (!st.ok()) {
        log::Get("cli")->error("keys init: {}", st.ToString());
        return 1;
      }
      std::cout << "wrote keys to " << kd.dir.string() << ":\n"
                << "  coordinator.key   the coordinator's key pair (secret, 0600)\n"
                << "  coordinator.pub   its public key: give it to agents and users\n"
                << "  client.key        a client key pair for this user (secret, 0600)\n"
                << "  authorized_keys   keys the coordinator accepts (holds the client key)\n";
      return 0;
    };
  });
}

}  // namespace muster::cli
