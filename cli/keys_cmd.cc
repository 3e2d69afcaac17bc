// `muster keys init|add|list|migrate`

#include <iostream>

#include "cli/commands.h"
#include "common/curve.h"
#include "common/logging.h"

namespace muster::cli {

void AddKeysCommands(CLI::App& app, Runner* runner) {
  auto* keys = app.add_subcommand("keys", "Manage CURVE keys and their roles (docs/security.md)");
  keys->require_subcommand(1);
  {
    auto* init = keys->add_subcommand(
        "init",
        "Write a coordinator key pair, an admin key for this CLI, an agent key and the "
        "authorized-keys list");
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
                  << "  client.key        an admin key for this CLI (secret, 0600)\n"
                  << "  agent.key         an agent key for the agents (secret, 0600)\n"
                  << "  authorized_keys   keys the coordinator accepts, with their roles\n"
                  << "add a key per user or node: muster keys add --role client|agent --name N\n";
        return 0;
      };
    });
  }
  {
    auto* add = keys->add_subcommand(
        "add", "Make a key pair with a role and add its public key to authorized_keys");
    auto dir = std::make_shared<std::string>();
    auto role = std::make_shared<std::string>();
    auto name = std::make_shared<std::string>();
    auto out = std::make_shared<std::string>();
    auto scope = std::make_shared<KeyScope>();
    add->add_option("--dir", *dir, "Keys directory (default: $MUSTER_KEYS, else ~/.muster)");
    add->add_option("--role", *role, "admin, client or agent")
        ->required()
        ->check(CLI::IsMember({"admin", "client", "agent"}));
    add->add_option("--name", *name, "The key's name (a user, or a node for an agent key)")
        ->required();
    add->add_option("--out", *out, "Where to write the key pair (default: DIR/NAME.key)");
    add->add_option("--node", scope->nodes,
                    "Agent keys: a node name the key may register (repeat for more; default: any "
                    "name)");
    add->add_option("--provider", scope->provider,
                    "Agent keys: the provider every node it registers must have (default: any)");
    add->add_option("--island", scope->island,
                    "Agent keys: the island every node it registers must have (default: any)");
    add->callback([=] {
      *runner = [=] {
        KeysDir kd = KeysDir::Resolve(*dir);
        auto r = ParseKeyRole(*role);
        if (!r.ok()) {
          std::cerr << "muster keys add: " << r.status().message() << "\n";
          return 2;
        }
        std::filesystem::path file =
            out->empty() ? kd.dir / (*name + ".key") : std::filesystem::path(*out);
        auto pair = AddKey(kd, *name, *r, file, *scope);
        if (!pair.ok()) {
          std::cerr << "muster keys add: " << pair.status().message() << "\n";
          return pair.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
        }
        std::cout << "wrote " << file.string() << " (secret, 0600): key '" << *name << "', role "
                  << *role << (scope->empty() ? "" : ", scope " + scope->ToString())
                  << "\nadded its public key to " << kd.authorized_keys().string()
                  << " (a running coordinator picks it up within 2 s)\n";
        if (*r == KeyRole::kAgent) {
          std::cout << "on the node: muster agent --key " << file.filename().string() << " --name "
                    << *name << " ... (with coordinator.pub in its --keys dir)\n";
        }
        return 0;
      };
    });
  }
  {
    auto* list = keys->add_subcommand(
        "list", "The keys of authorized_keys: name, role, an agent key's scope, public key");
    auto dir = std::make_shared<std::string>();
    list->add_option("--dir", *dir, "Keys directory (default: $MUSTER_KEYS, else ~/.muster)");
    list->callback([=] {
      *runner = [=] {
        KeysDir kd = KeysDir::Resolve(*dir);
        auto keys = LoadAuthorizedKeys(kd.authorized_keys());
        if (!keys.ok()) {
          std::cerr << "muster keys list: " << keys.status().message() << "\n";
          return 1;
        }
        std::cout << fmt::format("{:<20} {:<7} {:<12} {}\n", "NAME", "ROLE", "KEY", "SCOPE");
        for (const auto& k : *keys) {
          std::string scope =
              k.role == KeyRole::kAgent || k.role == KeyRole::kLegacy ? k.scope.ToString() : "-";
          std::cout << fmt::format("{:<20} {:<7} {:<12} {}\n", k.name, KeyRoleName(k.role),
                                   k.public_key.substr(0, 8) + "...", scope);
        }
        return 0;
      };
    });
  }
  {
    auto* migrate = keys->add_subcommand(
        "migrate",
        "Give every authorized key without a role (from before roles) a role, and make "
        "agent.key for the agents");
    auto dir = std::make_shared<std::string>();
    auto role = std::make_shared<std::string>("admin");
    migrate->add_option("--dir", *dir, "Keys directory (default: $MUSTER_KEYS, else ~/.muster)");
    migrate->add_option("--role", *role, "Role for keys without one")
        ->check(CLI::IsMember({"admin", "client", "agent"}))
        ->capture_default_str();
    migrate->callback([=] {
      *runner = [=] {
        KeysDir kd = KeysDir::Resolve(*dir);
        auto changed = MigrateKeysDir(kd, *ParseKeyRole(*role));
        if (!changed.ok()) {
          std::cerr << "muster keys migrate: " << changed.status().message() << "\n";
          return 1;
        }
        std::cout << "gave " << *changed << " key(s) the role " << *role << " in "
                  << kd.authorized_keys().string() << "\n"
                  << "agents now use " << kd.agent_key().string()
                  << " (role agent): copy it to the nodes and restart their agents; a node name "
                     "bound to the old key must be moved (docs/security.md)\n";
        return 0;
      };
    });
  }
}

}  // namespace muster::cli
