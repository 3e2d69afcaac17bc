#pragma once

// ProviderConfig: what the coordinator knows of each node provider, read from a YAML file at
// start (`muster coordinator --providers FILE`; docs/providers.md has the format). A provider
// of kind `static` is today's self-registering agents: nodes come and go by hand and are never
// requested or released. `local` starts `muster agent` processes on this machine; `slurm` asks
// a Slurm controller for allocations. With no file, every node is static.
//
// Errors name the file, the line and the field: "providers.yaml:7: providers[1].max_nodes: must
// be an integer in [1, 100000], not \"-1\"".
//
// Thread-safety: plain values.

#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace muster::coordinator::providers {

using Millis = std::chrono::milliseconds;

// The labels the nodes of a provider register with (every node of a provider is alike).
struct NodeTemplate {
  std::string region;
  std::string island;
  std::string gpu_type;
  int gpus = 0;
  int slots = 1;
  std::map<std::string, std::string> volumes;  // name -> path on the node
};

struct SlurmConfig {
  std::string partition;                // empty: the cluster's default partition
  std::string gres;                     // e.g. "gpu:h100:8"; empty: none
  std::string time_limit;               // sbatch --time; empty: the partition's default
  int signal_lead_s = 60;               // --signal=TERM@lead: muster's notice before the end
  std::vector<std::string> extra_args;  // further sbatch arguments, as given
  std::string bin_dir;                  // where sbatch/squeue/scancel are; empty: $PATH
  std::string work_dir;                 // batch scripts and their output
  std::string agent_args;               // appended to each `muster agent` line (e.g. --insecure)
};

struct ProviderConfig {
  std::string name;  // the provider label of its nodes, and the prefix of their names
  std::string kind;  // static | local | slurm
  int max_nodes = 8;
  int max_pending_requests = 2;
  Millis idle_timeout{std::chrono::minutes(5)};
  Millis request_timeout{std::chrono::minutes(10)};
  int max_tries = 3;  // tries of one request before it is given up (an event, a pending reason)
  Millis retry_backoff{std::chrono::seconds(5)};  // doubles after each failed try
  Millis retry_backoff_max{std::chrono::minutes(5)};
  NodeTemplate node;
  std::string work_dir;  // local: the agents' work directories go under it
  SlurmConfig slurm;

  bool OnDemand() const { return kind != "static"; }
};

struct ProvidersConfig {
  std::vector<ProviderConfig> providers;
  const ProviderConfig* Find(std::string_view name) const;
};

// Parses the YAML text of a providers file; `file` names it in errors.
StatusOr<ProvidersConfig> ParseProvidersConfig(std::string_view text, std::string_view file);
// Reads and parses `path`. NotFound if it cannot be read.
StatusOr<ProvidersConfig> LoadProvidersConfig(const std::filesystem::path& path);

}  // namespace muster::coordinator::providers
