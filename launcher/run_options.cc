#include "launcher/run_options.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "common/strings.h"

namespace muster::launcher {
namespace {

StatusOr<int> ParsePositiveInt(const std::string& what, const std::string& text) {
  std::optional<int64_t> v = ParseInt64(text);
  if (!v || *v <= 0 || *v > 1000000) {
    return InvalidArgumentError(what + ": '" + text + "' is not a positive integer");
  }
  return static_cast<int>(*v);
}

}  // namespace

StatusOr<std::map<std::string, std::string>> ResolveExports(
    const std::vector<std::string>& exports, const std::vector<std::string>& environ) {
  std::map<std::string, std::string> out;
  for (const auto& x : exports) {
    size_t eq = x.find('=');
    if (eq != std::string::npos) {
      out[x.substr(0, eq)] = x.substr(eq + 1);
      continue;
    }
    auto it = std::find_if(environ.begin(), environ.end(), [&](const std::string& kv) {
      return kv.size() > x.size() && kv.compare(0, x.size(), x) == 0 && kv[x.size()] == '=';
    });
    if (it == environ.end()) {
      return InvalidArgumentError("-x " + x + ": " + x +
                                  " is not set in this environment (use -x " + x + "=VALUE)");
    }
    out[x] = it->substr(x.size() + 1);
  }
  return out;
}

const char* RunUsage() {
  return R"(Usage: muster run [options] [--] PROG [ARGS...]

Starts PROG as a job of N ranks with the env contract (RANK, WORLD_SIZE, LOCAL_RANK, ...,
MASTER_ADDR/MASTER_PORT, OMPI_COMM_WORLD_*, MUSTER_*) and a rendezvous store.

Options:
  -np N, -n N            number of ranks (default: all slots; without hosts, the CPU count)
  -H host[:slots],...    hosts and their slots (a host without ':slots' has 1)
  --hostfile FILE        lines 'host slots=N' (Open MPI format)
  -x VAR[=VAL]           export VAR (from this environment, or set to VAL) to every rank
  --tag-output           prefix each output line with [rank]
  --timeout S            stop the job after S seconds (exit code 124)
  --grace S              after a failure, SIGKILL ranks still running S seconds after SIGTERM
                         (default 3)
  --log-dir DIR          also write each rank's output to DIR/rank-<R>.log
  --checkpoint-dir DIR   MUSTER_CHECKPOINT_DIR for the ranks
  --job-id ID            MUSTER_JOB_ID (default: generated)
  --coordinator EP       run on the coordinator's node agents as an interactive job
                         (default: $MUSTER_COORDINATOR; -H names the agents' nodes, every
                         node gets the same number of ranks); same output and exit codes
  --keys DIR             keys for the coordinator (default: $MUSTER_KEYS, else ~/.muster)

Exit code: 0 if every rank exits 0; else the code of the first rank to fail (128 + signal if
it was killed), named in one summary line; 124 on --timeout; 128 + S when interrupted by
signal S; 126/127 when PROG cannot be executed / is not found; 2 for a bad command line.
)";
}

StatusOr<std::chrono::milliseconds> ParseSeconds(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v) || v < 0 || v > 1e7) {
    return InvalidArgumentError(flag + ": '" + text + "' is not a number of seconds");
  }
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(v * 1000)));
}

StatusOr<std::vector<HostSlots>> ParseHostList(const std::string& list) {
  std::vector<HostSlots> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = TrimCopy(item, " \t\r");
    if (item.empty()) return InvalidArgumentError("-H '" + list + "': empty host name");
    HostSlots h;
    size_t colon = item.rfind(':');
    if (colon != std::string::npos && item.find(':') == colon) {  // not an IPv6 address
      h.host = item.substr(0, colon);
      MUSTER_ASSIGN_OR_RETURN(h.slots, ParsePositiveInt("-H " + item, item.substr(colon + 1)));
    } else {
      h.host = item;
    }
    if (h.host.empty()) return InvalidArgumentError("-H '" + item + "': empty host name");
    out.push_back(h);
  }
  if (out.empty()) return InvalidArgumentError("-H: no hosts given");
  return out;
}

StatusOr<std::vector<HostSlots>> ParseHostfile(const std::string& text, const std::string& path) {
  std::vector<HostSlots> out;
  std::stringstream ss(text);
  std::string line;
  int lineno = 0;
  while (std::getline(ss, line)) {
    ++lineno;
    if (size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::stringstream words(line);
    std::string word;
    HostSlots h;
    bool first = true;
    while (words >> word) {
      std::string where = path + ":" + std::to_string(lineno);
      if (first) {
        h.host = word;
        first = false;
      } else if (word.rfind("slots=", 0) == 0) {
        MUSTER_ASSIGN_OR_RETURN(h.slots, ParsePositiveInt(where, word.substr(6)));
      } else if (word.rfind("max_slots=", 0) == 0 || word.rfind("max-slots=", 0) == 0) {
        MUSTER_RETURN_IF_ERROR(ParsePositiveInt(where, word.substr(10)).status());
      } else {
        return InvalidArgumentError(where + ": unknown word '" + word +
                                    "' (expected 'host slots=N')");
      }
    }
    if (!first) out.push_back(h);
  }
  if (out.empty()) return InvalidArgumentError(path + ": no hosts in hostfile");
  return out;
}

bool IsLocalHost(const std::string& host) {
  if (host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0) return true;
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return false;
  std::string me(name);
  if (host == me) return true;
  // "node7" names "node7.cluster.example" and the other way round.
  auto short_name = [](const std::string& s) { return s.substr(0, s.find('.')); };
  return short_name(host) == short_name(me) &&
         (host.find('.') == std::string::npos || me.find('.') == std::string::npos);
}

StatusOr<RunOptions> ParseRunArgs(const std::vector<std::string>& args) {
  RunOptions o;
  size_t i = 0;
  // The value of option `name`: "--name=value" or the next word.
  auto value = [&](const std::string& name,
                   std::optional<std::string> inline_value) -> StatusOr<std::string> {
    if (inline_value) return *inline_value;
    if (i + 1 >= args.size()) return InvalidArgumentError(name + " needs a value");
    return args[++i];
  };
  for (; i < args.size(); ++i) {
    std::string word = args[i];
    if (word == "--") {
      ++i;
      break;
    }
    if (word.empty() || word[0] != '-' || word == "-") break;  // the program
    std::optional<std::string> inline_value;
    if (word.rfind("--", 0) == 0) {
      if (size_t eq = word.find('='); eq != std::string::npos) {
        inline_value = word.substr(eq + 1);
        word.resize(eq);
      }
    }
    if (word == "-np" || word == "-n" || word == "--np") {
      MUSTER_ASSIGN_OR_RETURN(std::string v, value(word, inline_value));
      MUSTER_ASSIGN_OR_RETURN(o.np, ParsePositiveInt(word, v));
    } else if (word == "-H" || word == "--host") {
      MUSTER_ASSIGN_OR_RETURN(std::string v, value(word, inline_value));
      MUSTER_ASSIGN_OR_RETURN(auto hosts, ParseHostList(v));
      o.hosts.insert(o.hosts.end(), hosts.begin(), hosts.end());
    } else if (word == "--hostfile" || word == "--machinefile") {
      MUSTER_ASSIGN_OR_RETURN(std::string path, value(word, inline_value));
      std::ifstream in(path);
      if (!in) return NotFoundError("--hostfile " + path + ": cannot open");
      std::stringstream text;
      text << in.rdbuf();
      MUSTER_ASSIGN_OR_RETURN(auto hosts, ParseHostfile(text.str(), path));
      o.hosts.insert(o.hosts.end(), hosts.begin(), hosts.end());
    } else if (word == "-x") {
      MUSTER_ASSIGN_OR_RETURN(std::string v, value(word, inline_value));
      if (v.empty() || v[0] == '=') return InvalidArgumentError("-x '" + v + "': no variable name");
      o.exports.push_back(v);
    } else if (word == "--tag-output") {
      o.tag_output = true;
    } else if (word == "--timeout") {
      MUSTER_ASSIGN_OR_RETURN(std::string v, value(word, inline_value));
      MUSTER_ASSIGN_OR_RETURN(auto t, ParseSeconds(word, v));
      if (t.count() <= 0) return InvalidArgumentError("--timeout must be more than 0 seconds");
      o.timeout = t;
    } else if (word == "--grace") {
      MUSTER_ASSIGN_OR_RETURN(std::string v, value(word, inline_value));
      MUSTER_ASSIGN_OR_RETURN(o.grace, ParseSeconds(word, v));
    } else if (word == "--log-dir") {
      MUSTER_ASSIGN_OR_RETURN(o.log_dir, value(word, inline_value));
    } else if (word == "--checkpoint-dir") {
      MUSTER_ASSIGN_OR_RETURN(o.checkpoint_dir, value(word, inline_value));
    } else if (word == "--job-id") {
      MUSTER_ASSIGN_OR_RETURN(o.job_id, value(word, inline_value));
    } else if (word == "--coordinator") {
      MUSTER_ASSIGN_OR_RETURN(o.coordinator, value(word, inline_value));
    } else if (word == "--keys") {
      MUSTER_ASSIGN_OR_RETURN(o.keys_dir, value(word, inline_value));
    } else if (word == "--insecure") {
      o.insecure = true;
    } else {
      return InvalidArgumentError("unknown option '" + word + "' (see muster run --help)");
    }
  }
  o.program.assign(args.begin() + static_cast<std::ptrdiff_t>(std::min(i, args.size())),
                   args.end());
  if (o.program.empty()) return InvalidArgumentError("no program given: muster run [options] PROG");
  return o;
}

}  // namespace muster::launcher
