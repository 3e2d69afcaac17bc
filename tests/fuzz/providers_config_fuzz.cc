// libFuzzer target: the providers file (coordinator/providers/provider_config.h), read by the
// coordinator at start. Beyond "no crash, no leak, no hang": a refusal is InvalidArgument with
// a bounded message, and an accepted config holds only what the parser promises (unique
// names, known kinds, limits in range, absolute volume paths, no shell metacharacters in the
// Slurm values that become sbatch arguments).
// Built by `make fuzz` with clang++-14 -fsanitize=fuzzer,address.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string_view>

#include "common/logging.h"
#include "coordinator/providers/provider_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool quiet = [] { return muster::log::InitLogging("off").ok(); }();
  (void)quiet;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto cfg = muster::coordinator::providers::ParseProvidersConfig(text, "providers.yaml");
  if (!cfg.ok()) {
    if (cfg.status().code() != muster::StatusCode::kInvalidArgument) abort();
    if (cfg.status().message().size() > (64 << 10)) abort();
    return 0;
  }
  std::set<std::string> names;
  for (const auto& p : cfg->providers) {
    if (!names.insert(p.name).second) abort();
    if (p.kind != "static" && p.kind != "local" && p.kind != "slurm") abort();
    if (p.max_nodes < 1 || p.max_pending_requests < 1 || p.max_tries < 1) abort();
    if (p.idle_timeout.count() < 0 || p.request_timeout.count() < 100) abort();
    for (const auto& [vol, path] : p.node.volumes) {
      if (path.empty() || path[0] != '/') abort();
    }
    for (const auto& v : {p.slurm.partition, p.slurm.gres, p.slurm.time_limit}) {
      if (v.find_first_of(" \t\n'\"\\$`;") != std::string::npos) abort();
    }
  }
  return 0;
}
