#include "coordinator/providers/provider_config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "coordinator/config_errors.h"

namespace muster::coordinator::providers {
namespace {

constexpr int kMaxNodes = 100000;
constexpr double kMaxSeconds = 7 * 24 * 3600;

using config::Errors;
using config::Shown;

void CheckKeys(const YAML::Node& map, const std::string& prefix,
               const std::vector<std::string>& known, Errors* errs) {
  std::set<std::string> seen;
  for (auto it = map.begin(); it != map.end(); ++it) {
    std::string key = it->first.IsScalar() ? it->first.Scalar() : "?";
    if (!seen.insert(key).second) {
      errs->Add(it->first, prefix + key, "given twice; keep one");
    } else if (std::find(known.begin(), known.end(), key) == known.end()) {
      errs->Add(it->first, prefix + key,
                fmt::format("unknown field; known: {}", fmt::join(known, ", ")));
    }
  }
}

void GetInt(const YAML::Node& n, const std::string& field, int lo, int hi, int* out, Errors* errs) {
  if (!n) return;
  if (n.IsScalar()) {
    const std::string& s = n.Scalar();
    int v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc() && end == s.data() + s.size() && v >= lo && v <= hi) {
      *out = v;
      return;
    }
  }
  errs->Add(n, field, fmt::format("must be an integer in [{}, {}], not {}", lo, hi, Shown(n)));
}

void GetSeconds(const YAML::Node& n, const std::string& field, double lo, Millis* out,
                Errors* errs) {
  if (!n) return;
  if (n.IsScalar()) {
    const std::string& s = n.Scalar();
    char* end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (!s.empty() && end == s.c_str() + s.size() && std::isfinite(v) && v >= lo &&
        v <= kMaxSeconds) {
      *out = Millis(static_cast<int64_t>(std::llround(v * 1000)));
      return;
    }
  }
  errs->Add(
      n, field,
      fmt::format("must be a number of seconds in [{}, {}], not {}", lo, kMaxSeconds, Shown(n)));
}

void GetString(const YAML::Node& n, const std::string& field, std::string* out, Errors* errs) {
  if (!n) return;
  if (n.IsScalar()) {
    *out = n.Scalar();
    return;
  }
  errs->Add(n, field, fmt::format("must be a string, not {}", Shown(n)));
}

// Names and labels end up in node names, sbatch arguments and file names.
bool IsToken(std::string_view s) {
  return !s.empty() && s.size() <= 32 &&
         std::all_of(s.begin(), s.end(),
                     [](char c) {
                       return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
                              c == '_';
                     }) &&
         s[0] >= 'a' && s[0] <= 'z';
}

void ParseNode(const YAML::Node& n, const std::string& f, NodeTemplate* t, Errors* errs) {
  if (!n.IsMap()) {
    errs->Add(n, f, fmt::format("must be a mapping, not {}", Shown(n)));
    return;
  }
  CheckKeys(n, f + ".", {"region", "island", "gpu_type", "gpus", "slots", "volumes"}, errs);
  GetString(n["region"], f + ".region", &t->region, errs);
  GetString(n["island"], f + ".island", &t->island, errs);
  GetString(n["gpu_type"], f + ".gpu_type", &t->gpu_type, errs);
  GetInt(n["gpus"], f + ".gpus", 0, 1024, &t->gpus, errs);
  GetInt(n["slots"], f + ".slots", 1, 4096, &t->slots, errs);
  if (auto v = n["volumes"]) {
    if (!v.IsMap()) {
      errs->Add(v, f + ".volumes", fmt::format("must map names to paths, not {}", Shown(v)));
    } else {
      for (auto it = v.begin(); it != v.end(); ++it) {
        std::string name = it->first.IsScalar() ? it->first.Scalar() : "";
        std::string field = f + ".volumes." + name;
        if (!IsToken(name)) {
          errs->Add(it->first, field, "a volume name is 1-32 of [a-z0-9_-], starting a-z");
        } else if (!it->second.IsScalar() || it->second.Scalar().empty() ||
                   it->second.Scalar()[0] != '/') {
          errs->Add(it->second, field,
                    fmt::format("must be an absolute path, not {}", Shown(it->second)));
        } else {
          t->volumes[name] = it->second.Scalar();
        }
      }
    }
  }
}

void ParseSlurm(const YAML::Node& n, const std::string& f, SlurmConfig* s, Errors* errs) {
  if (!n.IsMap()) {
    errs->Add(n, f, fmt::format("must be a mapping, not {}", Shown(n)));
    return;
  }
  CheckKeys(n, f + ".",
            {"partition", "gres", "time_limit", "signal_lead_s", "extra_args", "bin_dir",
             "work_dir", "agent_args"},
            errs);
  GetString(n["partition"], f + ".partition", &s->partition, errs);
  GetString(n["gres"], f + ".gres", &s->gres, errs);
  GetString(n["time_limit"], f + ".time_limit", &s->time_limit, errs);
  GetInt(n["signal_lead_s"], f + ".signal_lead_s", 0, 65535, &s->signal_lead_s, errs);
  GetString(n["bin_dir"], f + ".bin_dir", &s->bin_dir, errs);
  GetString(n["work_dir"], f + ".work_dir", &s->work_dir, errs);
  GetString(n["agent_args"], f + ".agent_args", &s->agent_args, errs);
  if (auto e = n["extra_args"]) {
    if (!e.IsSequence()) {
      errs->Add(e, f + ".extra_args", fmt::format("must be a list, not {}", Shown(e)));
    } else {
      for (size_t i = 0; i < e.size(); ++i) {
        std::string a;
        GetString(e[i], fmt::format("{}.extra_args[{}]", f, i), &a, errs);
        s->extra_args.push_back(a);
      }
    }
  }
  for (const auto& [field, value] :
       {std::pair{"partition", s->partition}, {"gres", s->gres}, {"time_limit", s->time_limit}}) {
    if (value.find_first_of(" \t\n'\"\\$`;") != std::string::npos) {
      errs->Add(n[field], f + "." + field,
                fmt::format("must not hold spaces or quotes: {}", Shown(n[field])));
    }
  }
}

}  // namespace

const ProviderConfig* ProvidersConfig::Find(std::string_view name) const {
  for (const auto& p : providers) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

StatusOr<ProvidersConfig> ParseProvidersConfig(std::string_view text, std::string_view file) {
  Errors errs(file, "providers config");
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    errs.Add(e.mark.line >= 0 ? e.mark.line + 1 : 0, "yaml", e.msg);
    return errs.ToStatus();
  }
  ProvidersConfig cfg;
  if (!root.IsMap()) {
    errs.Add(root, "providers", "the file must be a mapping with a `providers` list");
    return errs.ToStatus();
  }
  CheckKeys(root, "", {"providers"}, &errs);
  auto list = root["providers"];
  if (!list || !list.IsSequence() || list.size() == 0) {
    errs.Add(list ? list : root, "providers", "must be a non-empty list of providers");
    return errs.ToStatus();
  }
  std::set<std::string> names;
  for (size_t i = 0; i < list.size(); ++i) {
    const YAML::Node n = list[i];
    std::string f = fmt::format("providers[{}]", i);
    if (!n.IsMap()) {
      errs.Add(n, f, fmt::format("must be a mapping, not {}", Shown(n)));
      continue;
    }
    CheckKeys(
        n, f + ".",
        {"name", "kind", "max_nodes", "max_pending_requests", "idle_timeout_s", "request_timeout_s",
         "max_tries", "retry_backoff_s", "retry_backoff_max_s", "node", "work_dir", "slurm"},
        &errs);
    ProviderConfig p;
    if (!n["name"]) {
      errs.Add(n, f + ".name", "is required");
    } else {
      GetString(n["name"], f + ".name", &p.name, &errs);
      if (!IsToken(p.name)) {
        errs.Add(n["name"], f + ".name",
                 fmt::format("must be 1-32 of [a-z0-9_-] starting a-z, not {}", Shown(n["name"])));
      } else if (!names.insert(p.name).second) {
        errs.Add(n["name"], f + ".name", fmt::format("provider {} is defined twice", p.name));
      }
    }
    p.kind = "static";
    GetString(n["kind"], f + ".kind", &p.kind, &errs);
    if (p.kind != "static" && p.kind != "local" && p.kind != "slurm") {
      errs.Add(n["kind"], f + ".kind",
               fmt::format("must be static, local or slurm, not {}", Shown(n["kind"])));
    }
    GetInt(n["max_nodes"], f + ".max_nodes", 1, kMaxNodes, &p.max_nodes, &errs);
    GetInt(n["max_pending_requests"], f + ".max_pending_requests", 1, 1000, &p.max_pending_requests,
           &errs);
    GetSeconds(n["idle_timeout_s"], f + ".idle_timeout_s", 0, &p.idle_timeout, &errs);
    GetSeconds(n["request_timeout_s"], f + ".request_timeout_s", 0.1, &p.request_timeout, &errs);
    GetInt(n["max_tries"], f + ".max_tries", 1, 100, &p.max_tries, &errs);
    GetSeconds(n["retry_backoff_s"], f + ".retry_backoff_s", 0, &p.retry_backoff, &errs);
    GetSeconds(n["retry_backoff_max_s"], f + ".retry_backoff_max_s", 0, &p.retry_backoff_max,
               &errs);
    GetString(n["work_dir"], f + ".work_dir", &p.work_dir, &errs);
    if (auto node = n["node"]) ParseNode(node, f + ".node", &p.node, &errs);
    if (auto s = n["slurm"]) {
      if (p.kind != "slurm") {
        errs.Add(n["slurm"], f + ".slurm", "only a provider of kind slurm takes a slurm section");
      } else {
        ParseSlurm(s, f + ".slurm", &p.slurm, &errs);
      }
    }
    if (p.kind == "local" && p.work_dir.empty() && n["name"]) {
      errs.Add(n, f + ".work_dir", "is required for a local provider (its agents' directories)");
    }
    cfg.providers.push_back(std::move(p));
  }
  if (!errs.empty()) return errs.ToStatus();
  return cfg;
}

StatusOr<ProvidersConfig> LoadProvidersConfig(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return NotFoundError("cannot read providers config " + path.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseProvidersConfig(ss.str(), path.string());
}

}  // namespace muster::coordinator::providers
