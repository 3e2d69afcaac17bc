#include "coordinator/job_spec.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "common/rank_env.h"

namespace muster::coordinator {

namespace {

constexpr int kMaxNodes = 100000;
constexpr int kMaxRanksPerNode = 1024;

// Collects "file:line: field: message" errors.
class Errors {
 public:
  explicit Errors(std::string_view file) : file_(file) {}
  void Add(const YAML::Node& at, std::string_view field, std::string message) {
    int line = at.IsDefined() ? at.Mark().line + 1 : 0;
    Add(line, field, std::move(message));
  }
  void Add(int line, std::string_view field, std::string message) {
    if (line > 0) {
      lines_.emplace_back(line, fmt::format("{}:{}: {}: {}", file_, line, field, message));
    } else {
      lines_.emplace_back(0, fmt::format("{}: {}: {}", file_, field, message));
    }
  }
  bool empty() const { return lines_.empty(); }
  Status ToStatus() const {
    std::string msg =
        fmt::format("invalid job spec ({} error{}):", lines_.size(), lines_.size() == 1 ? "" : "s");
    auto sorted = lines_;
    std::stable_sort(sorted.begin(), sorted.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& l : sorted) msg += "\n  " + l.second;
    return InvalidArgumentError(msg);
  }

 private:
  std::string file_;
  std::vector<std::pair<int, std::string>> lines_;  // (line, text)
};

// The key node of `name` in `map` (for errors about a whole section), or an undefined node.
YAML::Node KeyOf(const YAML::Node& map, const std::string& name) {
  for (auto it = map.begin(); it != map.end(); ++it) {
    if (it->first.IsScalar() && it->first.Scalar() == name) return it->first;
  }
  return YAML::Node(YAML::NodeType::Undefined);
}

std::string Shown(const YAML::Node& n) {
  if (n.IsScalar()) return "\"" + n.Scalar() + "\"";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "null";
}

bool GetInt(const YAML::Node& n, std::string_view field, int64_t lo, int64_t hi, int64_t* out,
            Errors* errs) {
  if (n.IsScalar()) {
    try {
      size_t used = 0;
      long long v = std::stoll(n.Scalar(), &used, 10);
      if (used == n.Scalar().size() && v >= lo && v <= hi) {
        *out = v;
        return true;
      }
    } catch (const std::exception&) {
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
            fmt::format("must be a duration like 90s, 15m, 2h or 1h30m, not {}", Shown(n)));
  return false;
}

// Rejects keys outside `known`, suggesting the closest one.
void CheckKeys(const YAML::Node& map, std::string_view prefix,
               const std::vector<std::string>& known, Errors* errs) {
  for (auto it = map.begin(); it != map.end(); ++it) {
    std::string key = it->first.IsScalar() ? it->first.Scalar() : "?";
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    std::string hint;
    for (const auto& k : known) {
      // A cheap closeness: shares a 3-character prefix or differs in length by at most 1 with
      // the same first letter.
      if (key.size() >= 3 && k.rfind(key.substr(0, 3), 0) == 0) hint = k;
    }
    errs->Add(it->first, std::string(prefix) + key,
              "unknown field" + (hint.empty() ? "" : fmt::format(" (did you mean {}?)", hint)) +
                  fmt::format("; known: {}", fmt::join(known, ", ")));
  }
}

const std::regex& NameRe() {
  static const std::regex re("[a-z0-9][a-z0-9._-]{0,62}");
  return re;
}
const std::regex& EnvRe() {
  static const std::regex re("[A-Za-z_][A-Za-z0-9_]*");
  return re;
}

}  // namespace

StatusOr<std::chrono::seconds> ParseDuration(std::string_view text) {
  static const std::regex whole("[0-9]+");
  static const std::regex parts("([0-9]+)([smhd])");
  std::string s(text);
  if (std::regex_match(s, whole)) {
    if (s.size() > 12) return InvalidArgumentError("duration too long: " + s);
    return std::chrono::seconds(std::stoll(s));
  }
  if (s.empty() || s.size() > 32) return InvalidArgumentError("bad duration '" + s + "'");
  int64_t total = 0;
  size_t pos = 0;
  for (std::sregex_iterator it(s.begin(), s.end(), parts), end; it != end; ++it) {
    if (static_cast<size_t>(it->position()) != pos) {
      return InvalidArgumentError("bad duration '" + s + "'");
    }
    int64_t v = std::stoll((*it)[1].str());
    if (v > 1000000000) return InvalidArgumentError("duration too long: " + s);
    switch ((*it)[2].str()[0]) {
      case 's':
        total += v;
        break;
      case 'm':
        total += v * 60;
        break;
      case 'h':
        total += v * 3600;
        break;
      case 'd':
        total += v * 86400;
        break;
    }
    pos += it->length();
  }
  if (pos != s.size()) return InvalidArgumentError("bad duration '" + s + "'");
  return std::chrono::seconds(total);
}

std::string FormatDuration(std::chrono::seconds d) {
  int64_t s = d.count();
  if (s == 0) return "0s";
  std::string out;
  if (s >= 3600) out += fmt::format("{}h", s / 3600), s %= 3600;
  if (s >= 60) out += fmt::format("{}m", s / 60), s %= 60;
  if (s > 0) out += fmt::format("{}s", s);
  return out;
}

StatusOr<JobSpec> ParseJobSpec(std::string_view text, std::string_view filename) {
  Errors errs(filename);
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    errs.Add(e.mark.line >= 0 ? e.mark.line + 1 : 0, "yaml", e.msg);
    return errs.ToStatus();
  }
  if (!root.IsMap()) {
    errs.Add(root, "(top level)", "must be a mapping of job fields, not " + Shown(root));
    return errs.ToStatus();
  }
  JobSpec spec;
  try {
    CheckKeys(root, "",
              {"name", "command", "env", "nodes", "ranks_per_node", "gpu_type", "gpus_per_node",
               "placement", "priority", "checkpoint", "restart", "time_limit", "notice_signal"},
              &errs);
    if (auto n = root["name"]; !n) {
      errs.Add(0, "name", "is required");
    } else if (GetString(n, "name", &spec.name, &errs) && !std::regex_match(spec.name, NameRe())) {
      errs.Add(n, "name",
               fmt::format("must be 1-63 of a-z 0-9 . _ - starting with a letter or digit, not "
                           "\"{}\"",
                           spec.name));
    }
    if (auto n = root["command"]; !n) {
      errs.Add(0, "command", "is required");
    } else if (n.IsScalar()) {
      if (n.Scalar().empty()) {
        errs.Add(n, "command", "must not be empty");
      } else {
        spec.command = {"/bin/sh", "-c", n.Scalar()};
      }
    } else if (n.IsSequence()) {
      for (size_t i = 0; i < n.size(); ++i) {
        std::string arg;
        if (GetString(n[i], fmt::format("command[{}]", i), &arg, &errs))
          spec.command.push_back(arg);
      }
      if (n.size() == 0) errs.Add(n, "command", "must not be an empty list");
    } else {
      errs.Add(n, "command",
               "must be a string (run by /bin/sh -c) or a list (argv), not " + Shown(n));
    }
    if (auto n = root["env"]) {
      if (!n.IsMap()) {
        errs.Add(n, "env", "must be a mapping of NAME: value, not " + Shown(n));
      } else {
        for (auto it = n.begin(); it != n.end(); ++it) {
          std::string key = it->first.IsScalar() ? it->first.Scalar() : "";
          std::string field = "env." + key;
          if (!std::regex_match(key, EnvRe())) {
            errs.Add(it->first, field, "is not a valid environment variable name");
            continue;
          }
          std::string value;
          if (GetString(it->second, field, &value, &errs)) spec.env[key] = value;
        }
      }
    }
    int64_t v = 0;
    if (auto n = root["nodes"]; n && GetInt(n, "nodes", 1, kMaxNodes, &v, &errs)) spec.nodes = v;
    if (auto n = root["ranks_per_node"];
        n && GetInt(n, "ranks_per_node", 1, kMaxRanksPerNode, &v, &errs))
      spec.ranks_per_node = v;
    if (auto n = root["gpus_per_node"]; n && GetInt(n, "gpus_per_node", 0, 1024, &v, &errs))
      spec.gpus_per_node = v;
    if (auto n = root["gpu_type"]) GetString(n, "gpu_type", &spec.gpu_type, &errs);
    if (auto n = root["priority"]; n && GetInt(n, "priority", -1000000, 1000000, &v, &errs))
      spec.priority = v;
    if (auto n = root["time_limit"]) GetDuration(n, "time_limit", &spec.time_limit, &errs);
    if (auto n = root["notice_signal"]) {
      // Carried to the agent (and the ranks) as a job env entry: no new wire field.
      std::string name = n.IsScalar() ? n.Scalar() : "";
      if (name == "true") name = "SIGTERM";
      if (name.rfind("SIG", 0) != 0) name = "SIG" + name;
      static const std::set<std::string> kSignals = {"SIGTERM", "SIGINT", "SIGHUP",
                                                     "SIGUSR1", "SIGUSR2", "SIGQUIT"};
      if (n.IsScalar() && n.Scalar() == "false") {
        // off, as without the field
      } else if (kSignals.count(name)) {
        spec.env[std::string(kNoticeSignalEnv)] = name;
      } else {
        errs.Add(n, "notice_signal",
                 "must be true, false or one of SIGTERM SIGINT SIGHUP SIGUSR1 SIGUSR2 SIGQUIT, "
                 "not " + Shown(n));
      }
    }
    if (auto p = root["placement"]) {
      if (!p.IsMap()) {
        errs.Add(p, "placement", "must be a mapping (providers, island, hosts), not " + Shown(p));
      } else {
        CheckKeys(p, "placement.", {"providers", "island", "hosts"}, &errs);
        if (auto n = p["hosts"]) {
          if (n.IsSequence()) {
            for (size_t i = 0; i < n.size(); ++i) {
              std::string s;
              if (GetString(n[i], fmt::format("placement.hosts[{}]", i), &s, &errs))
                spec.hosts.push_back(s);
            }
          } else {
            errs.Add(n, "placement.hosts", "must be a list of node names, not " + Shown(n));
          }
        }
        if (auto n = p["providers"]) {
          if (n.IsScalar()) {
            spec.providers = {n.Scalar()};
          } else if (n.IsSequence()) {
            for (size_t i = 0; i < n.size(); ++i) {
              std::string s;
              if (GetString(n[i], fmt::format("placement.providers[{}]", i), &s, &errs))
                spec.providers.push_back(s);
            }
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
                       fmt::format("must be required, preferred or any, not \"{}\"", s));
            }
          }
        }
      }
    }
    if (auto c = root["checkpoint"]) {
      if (!c.IsMap()) {
        errs.Add(c, "checkpoint", "must be a mapping (volume, every, keep), not " + Shown(c));
      } else {
        CheckKeys(c, "checkpoint.", {"volume", "every", "keep"}, &errs);
        if (auto n = c["volume"]) {
          GetString(n, "checkpoint.volume", &spec.checkpoint_volume, &errs);
          if (spec.checkpoint_volume.empty()) errs.Add(n, "checkpoint.volume", "is empty");
        } else {
          errs.Add(KeyOf(root, "checkpoint"), "checkpoint.volume",
                   "is required when checkpoint is given");
        }
        if (auto n = c["every"]) {
          static const std::regex steps("[0-9]+");
          if (n.IsScalar() && std::regex_match(n.Scalar(), steps)) {
            GetInt(n, "checkpoint.every", 1, int64_t{1} << 50, &spec.checkpoint_every_steps, &errs);
          } else {
            GetDuration(n, "checkpoint.every", &spec.checkpoint_every_time, &errs);
          }
        }
        if (auto n = c["keep"]; n && GetInt(n, "checkpoint.keep", 1, 100000, &v, &errs))
          spec.checkpoint_keep = v;
      }
    }
    if (auto r = root["restart"]) {
      if (!r.IsMap()) {
        errs.Add(r, "restart", "must be a mapping (max_restarts, backoff), not " + Shown(r));
      } else {
        CheckKeys(r, "restart.", {"max_restarts", "backoff"}, &errs);
        if (auto n = r["max_restarts"];
            n && GetInt(n, "restart.max_restarts", 0, 100000, &v, &errs))
          spec.max_restarts = v;
        if (auto n = r["backoff"]) GetDuration(n, "restart.backoff", &spec.restart_backoff, &errs);
      }
    }
    if (auto p = root["placement"]; p && p.IsMap() && p["hosts"] && !spec.hosts.empty() &&
                                    static_cast<int>(spec.hosts.size()) != spec.nodes) {
      errs.Add(
          p["hosts"], "placement.hosts",
          fmt::format("names {} node(s) for a job of {} node(s)", spec.hosts.size(), spec.nodes));
    }
  } catch (const YAML::Exception& e) {
    errs.Add(e.mark.line >= 0 ? e.mark.line + 1 : 0, "yaml", e.msg);
  }
  if (!errs.empty()) return errs.ToStatus();
  return spec;
}

StatusOr<JobSpec> LoadJobSpecFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return ErrnoStatus(errno, "cannot read job spec " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str().size() > (1 << 20)) return InvalidArgumentError(path + ": job spec over 1 MiB");
  return ParseJobSpec(ss.str(), path);
}

Status ValidateJobSpec(const JobSpec& s) {
  Errors errs("job spec");
  if (!std::regex_match(s.name, NameRe())) errs.Add(0, "name", "must be 1-63 of a-z 0-9 . _ -");
  if (s.command.empty()) errs.Add(0, "command", "is required");
  for (const auto& [k, v] : s.env) {
    if (!std::regex_match(k, EnvRe())) errs.Add(0, "env." + k, "is not a valid variable name");
  }
  // A name of the env contract (muster sets it) or an unknown MUSTER_* name (a typo).
  if (Status st = CheckJobEnv(s.env); !st.ok()) errs.Add(0, "env", st.message());
  if (s.nodes < 1 || s.nodes > kMaxNodes) errs.Add(0, "nodes", "must be in [1, 100000]");
  if (s.ranks_per_node < 1 || s.ranks_per_node > kMaxRanksPerNode)
    errs.Add(0, "ranks_per_node", "must be in [1, 1024]");
  if (s.gpus_per_node < 0 || s.gpus_per_node > 1024)
    errs.Add(0, "gpus_per_node", "must be in [0, 1024]");
  if (s.max_restarts < 0) errs.Add(0, "restart.max_restarts", "must be >= 0");
  if (s.checkpoint_keep < 1) errs.Add(0, "checkpoint.keep", "must be >= 1");
  if (s.time_limit.count() < 0) errs.Add(0, "time_limit", "must be >= 0");
  if (!s.hosts.empty() && static_cast<int>(s.hosts.size()) != s.nodes)
    errs.Add(0, "hosts", fmt::format("{} hosts for {} nodes", s.hosts.size(), s.nodes));
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
  return r;
}

}  // namespace muster::coordinator
