#include "coordinator/job_spec.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_map>

#include "common/rank_env.h"
#include "common/strings.h"
#include "coordinator/config_errors.h"

namespace muster::coordinator {

namespace {

using config::Clip;
using config::Errors;
using config::Quoted;
using config::Shown;

// The key node of `name` in `map` (for errors about a whole section), or an undefined node.
YAML::Node KeyOf(const YAML::Node& map, const std::string& name) {
  for (auto it = map.begin(); it != map.end(); ++it) {
    if (it->first.IsScalar() && it->first.Scalar() == name) return it->first;
  }
  return YAML::Node(YAML::NodeType::Undefined);
}

bool IsDigits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A decimal integer with an optional sign ('+' too, which YAML allows), nothing else; nullopt if
// not one or out of int64.
std::optional<int64_t> ParseSignedInt(std::string_view s) {
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  if (s.empty() || s[0] == '+') return std::nullopt;
  return muster::ParseInt64(s);
}

bool IsLower(char c) { return c >= 'a' && c <= 'z'; }
bool IsAlpha(char c) { return IsLower(c) || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// 1..max bytes of letters, digits and `extra`.
bool IsToken(std::string_view s, size_t max, std::string_view extra) {
  if (s.empty() || s.size() > max) return false;
  return std::all_of(s.begin(), s.end(), [&](char c) {
    return IsAlpha(c) || IsDigit(c) || extra.find(c) != std::string_view::npos;
  });
}

bool IsJobName(std::string_view s) {
  if (s.empty() || s.size() > kMaxJobNameBytes || !(IsLower(s[0]) || IsDigit(s[0]))) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return IsLower(c) || IsDigit(c) || c == '.' || c == '_' || c == '-';
  });
}

bool IsEnvName(std::string_view s) {
  if (s.empty() || s.size() > kMaxEnvNameBytes || IsDigit(s[0])) return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return IsAlpha(c) || IsDigit(c) || c == '_'; });
}

std::string EnvField(std::string_view name) { return "env." + Clip(name); }

// The line of a field in the YAML text, 0 when unknown (a spec from the wire).
using LineOf = std::function<int(const std::string& field)>;

// The value checks shared by ParseJobSpec and ValidateJobSpec. Presence (name, command) is the
// caller's: the YAML path says more about a missing or mistyped field than "is required".
void CheckFields(const JobSpec& s, const LineOf& line_of, Errors* errs) {
  auto add = [&](const std::string& field, std::string message) {
    errs->Add(line_of(field), field, std::move(message));
  };
  auto range = [&](const std::string& field, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) add(field, fmt::format("must be in [{}, {}], not {}", lo, hi, v));
  };
  auto duration = [&](const std::string& field, std::chrono::seconds d) {
    if (d.count() < 0 || d > kMaxDuration) {
      add(field, fmt::format("must be a duration from 0s to {}, not {} s",
                             FormatDuration(kMaxDuration), d.count()));
    }
  };
  if (!s.name.empty() && !IsJobName(s.name)) {
    add("name", fmt::format("must be 1-{} of a-z 0-9 . _ - starting with a letter or digit, not {}",
                            kMaxJobNameBytes, Quoted(s.name)));
  }
  size_t exec_bytes = 0;
  if (s.command.size() > kMaxCommandArgs) {
    add("command", fmt::format("has {} arguments; at most {}", s.command.size(), kMaxCommandArgs));
  } else {
    for (size_t i = 0; i < s.command.size(); ++i) {
      const std::string& a = s.command[i];
      std::string field = fmt::format("command[{}]", i);
      exec_bytes += a.size() + 1;
      if (a.size() > kMaxArgBytes) {
        add(field, fmt::format("is {} bytes; at most {}", a.size(), kMaxArgBytes));
      } else if (a.find('\0') != std::string::npos) {
        add(field, "contains a NUL byte");
      } else if (i == 0 && a.empty()) {
        add(field, "the program must not be empty");
      }
    }
  }
  if (s.env.size() > kMaxEnvVars) {
    add("env", fmt::format("has {} variables; at most {}", s.env.size(), kMaxEnvVars));
  } else {
    for (const auto& [k, v] : s.env) {
      std::string field = EnvField(k);
      exec_bytes += k.size() + v.size() + 2;
      if (!IsEnvName(k)) {
        add(field, fmt::format("is not a valid environment variable name (1-{} of A-Z a-z 0-9 _, "
                               "not starting with a digit)",
                               kMaxEnvNameBytes));
      } else if (k.size() + 1 + v.size() > kMaxArgBytes) {
        add(field, fmt::format("NAME=value is {} bytes; at most {}", k.size() + 1 + v.size(),
                               kMaxArgBytes));
      } else if (v.find('\0') != std::string::npos) {
        add(field, "contains a NUL byte");
      }
    }
  }
  if (exec_bytes > kMaxExecBytes) {
    add("command", fmt::format("command and env are {} bytes together; at most {}", exec_bytes,
                               kMaxExecBytes));
  }
  range("nodes", s.nodes, 1, kMaxNodes);
  range("ranks_per_node", s.ranks_per_node, 1, kMaxRanksPerNode);
  range("gpus_per_node", s.gpus_per_node, 0, kMaxGpusPerNode);
  if (!s.gpu_type.empty() && !IsToken(s.gpu_type, kMaxLabelBytes, "._-")) {
    add("gpu_type", fmt::format("must be 1-{} of A-Z a-z 0-9 . _ -, not {}", kMaxLabelBytes,
                                Quoted(s.gpu_type)));
  }
  range("priority", s.priority, -kMaxPriority, kMaxPriority);
  range("spares", s.spares, 0, kMaxNodes);
  if (s.spares > 0 && s.nodes >= 1 && s.nodes <= kMaxNodes && s.spares <= kMaxNodes &&
      s.nodes + s.spares > kMaxNodes) {
    add("spares", fmt::format("nodes + spares is {}; at most {}", s.nodes + s.spares, kMaxNodes));
  }
  if (s.spares > 0 && !s.hosts.empty()) {
    add("spares",
        "cannot be held for a gang pinned to named hosts (placement.hosts, muster run -H)");
  }
  if (s.providers.size() > kMaxProviders) {
    add("placement.providers",
        fmt::format("names {} providers; at most {}", s.providers.size(), kMaxProviders));
  } else {
    for (size_t i = 0; i < s.providers.size(); ++i) {
      if (!IsToken(s.providers[i], kMaxLabelBytes, "._-")) {
        add(fmt::format("placement.providers[{}]", i),
            fmt::format("must be 1-{} of A-Z a-z 0-9 . _ -, not {}", kMaxLabelBytes,
                        Quoted(s.providers[i])));
      }
    }
  }
  if (!s.hosts.empty()) {
    if (s.hosts.size() != static_cast<size_t>(s.nodes)) {
      add("placement.hosts",
          fmt::format("names {} node(s) for a job of {} node(s)", s.hosts.size(), s.nodes));
    }
    if (s.hosts.size() <= static_cast<size_t>(kMaxNodes)) {
      std::unordered_map<std::string_view, size_t> seen;
      for (size_t i = 0; i < s.hosts.size(); ++i) {
        std::string field = fmt::format("placement.hosts[{}]", i);
        if (!IsToken(s.hosts[i], kMaxHostBytes, "._:-")) {
          add(field, fmt::format("must be a node name of 1-{} of A-Z a-z 0-9 . _ : -, not {}",
                                 kMaxHostBytes, Quoted(s.hosts[i])));
        } else if (auto [it, fresh] = seen.emplace(s.hosts[i], i); !fresh) {
          add(field, fmt::format("names node {} again (also placement.hosts[{}]); a node holds "
                                 "one node rank of a job",
                                 Quoted(s.hosts[i]), it->second));
        }
      }
    }
  }
  if (!s.checkpoint_volume.empty() && !IsToken(s.checkpoint_volume, kMaxLabelBytes, "._-")) {
    add("checkpoint.volume", fmt::format("must be 1-{} of A-Z a-z 0-9 . _ -, not {}",
                                         kMaxLabelBytes, Quoted(s.checkpoint_volume)));
  }
  range("checkpoint.every", s.checkpoint_every_steps, 0, kMaxEverySteps);
  duration("checkpoint.every", s.checkpoint_every_time);
  if (s.checkpoint_every_steps > 0 && s.checkpoint_every_time.count() > 0) {
    add("checkpoint.every", "is a number of steps or a duration, not both");
  }
  range("checkpoint.keep", s.checkpoint_keep, 1, kMaxCheckpointKeep);
  range("checkpoint.snapshot_every_steps", s.snapshot_every_steps, 0, kMaxEverySteps);
  if (s.snapshot_every_steps > 0 && s.checkpoint_volume.empty()) {
    add("checkpoint.snapshot_every_steps", "needs checkpoint.volume (snapshots fall back to it)");
  }
  range("restart.max_restarts", s.max_restarts, 0, kMaxRestarts);
  duration("restart.backoff", s.restart_backoff);
  duration("time_limit", s.time_limit);
}

bool GetInt(const YAML::Node& n, std::string_view field, int64_t lo, int64_t hi, int64_t* out,
            Errors* errs) {
  if (n.IsScalar()) {
    auto v = ParseSignedInt(n.Scalar());
    if (v && *v >= lo && *v <= hi) {
      *out = *v;
      return true;
    }
  }
  errs->Add(n, field, fmt::format("must be an integer in [{}, {}], not {}", lo, hi, Shown(n)));
  return false;
}

bool GetString(const YAML::Node& n, std::string_view field, std::string* out, Errors* errs) {
  if (!n.IsScalar()) {
    errs->Add(n, field, fmt::format("must be a string, not {}", Shown(n)));
    return false;
  }
  *out = n.Scalar();
  return true;
}

bool GetDuration(const YAML::Node& n, std::string_view field, std::chrono::seconds* out,
                 Errors* errs) {
  if (n.IsScalar()) {
    auto d = ParseDuration(n.Scalar());
    if (d.ok()) {
      *out = *d;
      return true;
    }
  }
  errs->Add(n, field,
            fmt::format("must be a duration like 90s, 15m, 2h or 1h30m (at most {}), not {}",
                        FormatDuration(kMaxDuration), Shown(n)));
  return false;
}

// Rejects keys outside `known`, suggesting the closest one, and keys given twice (yaml-cpp
// keeps both pairs and answers lookups with the first).
void CheckKeys(const YAML::Node& map, std::string_view prefix,
               const std::vector<std::string>& known, Errors* errs) {
  std::unordered_map<std::string, int> first_line;
  for (auto it = map.begin(); it != map.end(); ++it) {
    if (!it->first.IsScalar()) {
      errs->Add(it->first, std::string(prefix) + "?",
                fmt::format("a field name must be a string, not {}", Shown(it->first)));
      continue;
    }
    const std::string& key = it->first.Scalar();
    int line = it->first.Mark().line + 1;
    if (auto [at, fresh] = first_line.emplace(key, line); !fresh) {
      errs->Add(line, std::string(prefix) + Clip(key),
                fmt::format("given twice (lines {} and {}); keep one", at->second, line));
      continue;
    }
    if (known.empty() || std::find(known.begin(), known.end(), key) != known.end()) continue;
    std::string hint;
    for (const auto& k : known) {
      // A cheap closeness: shares a 3-character prefix.
      if (key.size() >= 3 && k.rfind(key.substr(0, 3), 0) == 0) hint = k;
    }
    errs->Add(it->first, std::string(prefix) + Clip(key),
              "unknown field" + (hint.empty() ? "" : fmt::format(" (did you mean {}?)", hint)) +
                  fmt::format("; known: {}", fmt::join(known, ", ")));
  }
}

// Reads a list of strings into `out`, at most `max` of them, recording each element's line.
void GetStringList(const YAML::Node& n, const std::string& field, size_t max,
                   std::vector<std::string>* out, std::unordered_map<std::string, int>* lines,
                   Errors* errs) {
  if (n.size() > max) {
    errs->Add(n, field, fmt::format("has {} entries; at most {}", n.size(), max));
    return;
  }
  size_t i = 0;
  for (auto it = n.begin(); it != n.end(); ++it, ++i) {
    std::string s, f = fmt::format("{}[{}]", field, i);
    if (GetString(*it, f, &s, errs)) {
      (*lines)[f] = it->Mark().line + 1;
      out->push_back(std::move(s));
    }
  }
}

}  // namespace

StatusOr<std::chrono::seconds> ParseDuration(std::string_view text) {
  auto bad = [&] {
    return InvalidArgumentError(
        fmt::format("bad duration {} (like 90s, 15m, 2h, 1h30m, 1d or seconds, at most {})",
                    Quoted(text), FormatDuration(kMaxDuration)));
  };
  if (text.empty() || text.size() > 32) return bad();
  int64_t total = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t digits = pos;
    while (digits < text.size() && IsDigit(text[digits])) ++digits;
    if (digits == pos) return bad();
    auto v = ParseSignedInt(text.substr(pos, digits - pos));
    if (!v) return bad();
    int64_t unit = 1;
    if (digits < text.size()) {
      switch (text[digits]) {
        case 's':
          unit = 1;
          break;
        case 'm':
          unit = 60;
          break;
        case 'h':
          unit = 3600;
          break;
        case 'd':
          unit = 86400;
          break;
        default:
          return bad();
      }
      ++digits;
    } else if (pos != 0) {
      return bad();  // "1h30": a bare number only on its own
    }
    // Each part is at most kMaxDuration, so neither the product nor the sum can overflow.
    if (*v > kMaxDuration.count() / unit) return bad();
    total += *v * unit;
    if (total > kMaxDuration.count()) return bad();
    pos = digits;
  }
  return std::chrono::seconds(total);
}

std::string FormatDuration(std::chrono::seconds d) {
  int64_t s = d.count();
  if (s == 0) return "0s";
  std::string out;
  if (s < 0) out += "-", s = -s;
  if (s >= 86400 && s % 86400 == 0) return out + fmt::format("{}d", s / 86400);
  if (s >= 3600) out += fmt::format("{}h", s / 3600), s %= 3600;
  if (s >= 60) out += fmt::format("{}m", s / 60), s %= 60;
  if (s > 0) out += fmt::format("{}s", s);
  return out;
}

StatusOr<JobSpec> ParseJobSpec(std::string_view text, std::string_view filename) {
  Errors errs(filename, "job spec");
  if (text.size() > kMaxJobSpecBytes) {
    errs.Add(0, "(file)",
             fmt::format("is {} bytes; a job spec is at most {}", text.size(), kMaxJobSpecBytes));
    return errs.ToStatus();
  }
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    errs.Add(e.mark.line >= 0 ? e.mark.line + 1 : 0, "yaml", e.msg);
    return errs.ToStatus();
  } catch (const std::exception& e) {
    errs.Add(0, "yaml", e.what());
    return errs.ToStatus();
  }
  if (!root.IsMap()) {
    errs.Add(root, "(top level)", "must be a mapping of job fields, not " + Shown(root));
    return errs.ToStatus();
  }
  JobSpec spec;
  // Where each field was, for the checks shared with specs from the wire.
  std::unordered_map<std::string, int> lines;
  auto note = [&](const std::string& field, const YAML::Node& n) {
    lines[field] = n.Mark().line + 1;
  };
  try {
    CheckKeys(
        root, "",
        {"name", "command", "env", "nodes", "ranks_per_node", "gpu_type", "gpus_per_node",
         "placement", "priority", "checkpoint", "restart", "time_limit", "notice_signal", "spares"},
        &errs);
    if (auto n = root["name"]; !n) {
      errs.Add(0, "name", "is required");
    } else if (GetString(n, "name", &spec.name, &errs)) {
      note("name", n);
      if (spec.name.empty()) errs.Add(n, "name", "must not be empty");
    }
    if (auto n = root["command"]; !n) {
      errs.Add(0, "command", "is required");
    } else if (n.IsScalar()) {
      if (n.Scalar().empty()) {
        errs.Add(n, "command", "must not be empty");
      } else {
        spec.command = {"/bin/sh", "-c", n.Scalar()};
        note("command", n);
        note("command[2]", n);
      }
    } else if (n.IsSequence()) {
      note("command", n);
      GetStringList(n, "command", kMaxCommandArgs, &spec.command, &lines, &errs);
      if (n.size() == 0) errs.Add(n, "command", "must not be an empty list");
    } else {
      errs.Add(n, "command",
               "must be a string (run by /bin/sh -c) or a list (argv), not " + Shown(n));
    }
    if (auto n = root["env"]) {
      if (!n.IsMap()) {
        errs.Add(n, "env", "must be a mapping of NAME: value, not " + Shown(n));
      } else if (n.size() > kMaxEnvVars) {
        errs.Add(n, "env", fmt::format("has {} variables; at most {}", n.size(), kMaxEnvVars));
      } else {
        note("env", n);
        CheckKeys(n, "env.", {}, &errs);
        for (auto it = n.begin(); it != n.end(); ++it) {
          if (!it->first.IsScalar()) continue;  // reported by CheckKeys
          const std::string& key = it->first.Scalar();
          std::string value;
          if (GetString(it->second, EnvField(key), &value, &errs)) {
            note(EnvField(key), it->first);
            // A name of the env contract, or an unknown MUSTER_* name: refused here with its
            // line, as ValidateJobSpec refuses it on the wire path.
            if (Status st = CheckJobEnv({{key, value}}); !st.ok()) {
              std::string why(st.message());
              if (why.rfind("env: ", 0) == 0) why.erase(0, 5);
              errs.Add(it->first, EnvField(key), why);
            }
            spec.env.emplace(key, std::move(value));
          }
        }
      }
    }
    int64_t v = 0;
    if (auto n = root["nodes"]; n && GetInt(n, "nodes", 1, kMaxNodes, &v, &errs)) spec.nodes = v;
    if (auto n = root["ranks_per_node"];
        n && GetInt(n, "ranks_per_node", 1, kMaxRanksPerNode, &v, &errs))
      spec.ranks_per_node = v;
    if (auto n = root["gpus_per_node"];
        n && GetInt(n, "gpus_per_node", 0, kMaxGpusPerNode, &v, &errs))
      spec.gpus_per_node = v;
    if (auto n = root["gpu_type"]; n && GetString(n, "gpu_type", &spec.gpu_type, &errs)) {
      note("gpu_type", n);
    }
    if (auto n = root["priority"];
        n && GetInt(n, "priority", -kMaxPriority, kMaxPriority, &v, &errs))
      spec.priority = v;
    if (auto n = root["spares"]; n && GetInt(n, "spares", 0, kMaxNodes, &v, &errs)) {
      spec.spares = static_cast<int>(v);
      note("spares", n);
    }
    if (auto n = root["time_limit"]) GetDuration(n, "time_limit", &spec.time_limit, &errs);
    if (auto n = root["notice_signal"]) {
      // Carried to the agent (and the ranks) as a job env entry: no new wire field.
      std::string name = n.IsScalar() ? n.Scalar() : "";
      if (name == "true") name = "SIGTERM";
      if (name.rfind("SIG", 0) != 0) name = "SIG" + name;
      static const std::set<std::string> kSignals = {"SIGTERM", "SIGINT",  "SIGHUP",
                                                     "SIGUSR1", "SIGUSR2", "SIGQUIT"};
      if (n.IsScalar() && n.Scalar() == "false") {
        // off, as without the field
      } else if (kSignals.count(name)) {
        spec.env[std::string(kNoticeSignalEnv)] = name;
      } else {
        errs.Add(n, "notice_signal",
                 "must be true, false or one of SIGTERM SIGINT SIGHUP SIGUSR1 SIGUSR2 SIGQUIT, "
                 "not " +
                     Shown(n));
      }
    }
    if (auto p = root["placement"]) {
      if (!p.IsMap()) {
        errs.Add(p, "placement", "must be a mapping (providers, island, hosts), not " + Shown(p));
      } else {
        CheckKeys(p, "placement.", {"providers", "island", "hosts"}, &errs);
        if (auto n = p["hosts"]) {
          if (n.IsSequence()) {
            note("placement.hosts", n);
            GetStringList(n, "placement.hosts", kMaxNodes, &spec.hosts, &lines, &errs);
          } else {
            errs.Add(n, "placement.hosts", "must be a list of node names, not " + Shown(n));
          }
        }
        if (auto n = p["providers"]) {
          if (n.IsScalar()) {
            spec.providers = {n.Scalar()};
            note("placement.providers", n);
            note("placement.providers[0]", n);
          } else if (n.IsSequence()) {
            note("placement.providers", n);
            GetStringList(n, "placement.providers", kMaxProviders, &spec.providers, &lines, &errs);
          } else {
            errs.Add(n, "placement.providers", "must be a list of provider names, not " + Shown(n));
          }
        }
        if (auto n = p["island"]) {
          std::string s;
          if (GetString(n, "placement.island", &s, &errs)) {
            auto pol = ParseIslandPolicy(s);
            if (pol.ok()) {
              spec.island = *pol;
            } else {
              errs.Add(n, "placement.island",
                       fmt::format("must be required, preferred or any, not {}", Quoted(s)));
            }
          }
        }
      }
    }
    if (auto c = root["checkpoint"]) {
      if (!c.IsMap()) {
        errs.Add(c, "checkpoint",
                 "must be a mapping (volume, every, keep, snapshot_every_steps), not " + Shown(c));
      } else {
        CheckKeys(c, "checkpoint.", {"volume", "every", "keep", "snapshot_every_steps"}, &errs);
        if (auto n = c["volume"]) {
          if (GetString(n, "checkpoint.volume", &spec.checkpoint_volume, &errs)) {
            note("checkpoint.volume", n);
            if (spec.checkpoint_volume.empty()) errs.Add(n, "checkpoint.volume", "is empty");
          }
        } else {
          errs.Add(KeyOf(root, "checkpoint"), "checkpoint.volume",
                   "is required when checkpoint is given");
        }
        if (auto n = c["every"]) {
          if (n.IsScalar() && IsDigits(n.Scalar())) {
            GetInt(n, "checkpoint.every", 1, kMaxEverySteps, &spec.checkpoint_every_steps, &errs);
          } else if (GetDuration(n, "checkpoint.every", &spec.checkpoint_every_time, &errs) &&
                     spec.checkpoint_every_time.count() == 0) {
            errs.Add(n, "checkpoint.every", "must be at least 1s");
          }
        }
        if (auto n = c["keep"]; n && GetInt(n, "checkpoint.keep", 1, kMaxCheckpointKeep, &v, &errs))
          spec.checkpoint_keep = v;
        if (auto n = c["snapshot_every_steps"]) {
          GetInt(n, "checkpoint.snapshot_every_steps", 1, kMaxEverySteps,
                 &spec.snapshot_every_steps, &errs);
        }
      }
    }
    if (auto r = root["restart"]) {
      if (!r.IsMap()) {
        errs.Add(r, "restart", "must be a mapping (max_restarts, backoff), not " + Shown(r));
      } else {
        CheckKeys(r, "restart.", {"max_restarts", "backoff"}, &errs);
        if (auto n = r["max_restarts"];
            n && GetInt(n, "restart.max_restarts", 0, kMaxRestarts, &v, &errs))
          spec.max_restarts = v;
        if (auto n = r["backoff"]) GetDuration(n, "restart.backoff", &spec.restart_backoff, &errs);
      }
    }
  } catch (const YAML::Exception& e) {
    errs.Add(e.mark.line >= 0 ? e.mark.line + 1 : 0, "yaml", e.msg);
  }
  CheckFields(
      spec,
      [&](const std::string& field) {
        auto it = lines.find(field);
        return it == lines.end() ? 0 : it->second;
      },
      &errs);
  if (!errs.empty()) return errs.ToStatus();
  return spec;
}

StatusOr<JobSpec> LoadJobSpecFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return ErrnoStatus(errno, "cannot read job spec " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str().size() > kMaxJobSpecBytes) {
    return InvalidArgumentError(path + ": job spec over 1 MiB");
  }
  return ParseJobSpec(ss.str(), path);
}

Status ValidateJobSpec(const JobSpec& s) {
  Errors errs("job spec", "job spec");
  if (s.name.empty()) errs.Add(0, "name", "is required");
  if (s.command.empty()) errs.Add(0, "command", "is required");
  CheckFields(
      s, [](const std::string&) { return 0; }, &errs);
  // A name of the env contract (muster sets it) or an unknown MUSTER_* name (a typo).
  if (Status st = CheckJobEnv(s.env); !st.ok()) errs.Add(0, "env", st.message());
  if (!errs.empty()) return errs.ToStatus();
  return Status::Ok();
}

JobRequest ToJobRequest(const JobSpec& spec, const std::string& id, uint64_t seq) {
  JobRequest r;
  r.id = id;
  r.nodes = spec.nodes;
  r.ranks_per_node = spec.ranks_per_node;
  r.gpu_type = spec.gpu_type;
  r.gpus_per_node = spec.gpus_per_node;
  r.providers = spec.providers;
  r.island = spec.island;
  r.priority = spec.priority;
  r.seq = seq;
  r.checkpoint_volume = spec.checkpoint_volume;
  r.hosts = spec.hosts;
  r.time_limit = spec.time_limit;
  r.spares = spec.spares;
  return r;
}

// ---------------------------------------------------------------------------------------------
// The wire form

proto::JobSpec JobSpecToProto(const JobSpec& s) {
  proto::JobSpec p;
  p.set_name(s.name);
  for (const auto& c : s.command) p.add_command(c);
  for (const auto& [k, v] : s.env) (*p.mutable_env())[k] = v;
  p.set_nodes(s.nodes);
  p.set_ranks_per_node(s.ranks_per_node);
  p.set_gpu_type(s.gpu_type);
  p.set_gpus_per_node(s.gpus_per_node);
  for (const auto& pr : s.providers) p.add_providers(pr);
  p.set_island(std::string(IslandPolicyName(s.island)));
  p.set_priority(s.priority);
  p.set_checkpoint_volume(s.checkpoint_volume);
  p.set_checkpoint_every_steps(s.checkpoint_every_steps);
  p.set_checkpoint_every_s(s.checkpoint_every_time.count());
  p.set_checkpoint_keep(s.checkpoint_keep);
  p.set_snapshot_every_steps(s.snapshot_every_steps);
  p.set_max_restarts(s.max_restarts);
  p.set_restart_backoff_s(s.restart_backoff.count());
  p.set_time_limit_s(s.time_limit.count());
  for (const auto& h : s.hosts) p.add_hosts(h);
  p.set_interactive(s.interactive);
  p.set_spares(s.spares);
  return p;
}

StatusOr<JobSpec> JobSpecFromProto(const proto::JobSpec& p) {
  JobSpec s;
  s.name = p.name();
  s.command.assign(p.command().begin(), p.command().end());
  for (const auto& [k, v] : p.env()) s.env[k] = v;
  s.nodes = p.nodes();
  s.ranks_per_node = p.ranks_per_node();
  s.gpu_type = p.gpu_type();
  s.gpus_per_node = p.gpus_per_node();
  s.providers.assign(p.providers().begin(), p.providers().end());
  if (!p.island().empty()) {
    MUSTER_ASSIGN_OR_RETURN(s.island, ParseIslandPolicy(p.island()));
  }
  s.priority = p.priority();
  s.checkpoint_volume = p.checkpoint_volume();
  s.checkpoint_every_steps = p.checkpoint_every_steps();
  s.checkpoint_every_time = std::chrono::seconds(p.checkpoint_every_s());
  s.checkpoint_keep = p.checkpoint_keep();
  s.snapshot_every_steps = p.snapshot_every_steps();
  s.max_restarts = p.max_restarts();
  s.restart_backoff = std::chrono::seconds(p.restart_backoff_s());
  s.time_limit = std::chrono::seconds(p.time_limit_s());
  s.hosts.assign(p.hosts().begin(), p.hosts().end());
  s.interactive = p.interactive();
  s.spares = p.spares();
  MUSTER_RETURN_IF_ERROR(ValidateJobSpec(s));
  return s;
}

}  // namespace muster::coordinator
