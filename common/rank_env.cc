#include "common/rank_env.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <limits>
#include <set>

#include "common/logging.h"

extern char** environ;

namespace muster {
namespace {

// The socket interface variables (RankEnv::socket_ifname): not contract names, since a user
// may set them.
constexpr std::string_view kGlooIfname = "GLOO_SOCKET_IFNAME";
constexpr std::string_view kNcclIfname = "NCCL_SOCKET_IFNAME";

// Every name ToEnviron may write, and the names read as aliases.
const std::set<std::string_view>& ContractNames() {
  static const std::set<std::string_view> kNames = {
      "RANK",
      "WORLD_SIZE",
      "LOCAL_RANK",
      "LOCAL_WORLD_SIZE",
      "NODE_RANK",
      "GROUP_RANK",
      "NNODES",
      "MASTER_ADDR",
      "MASTER_PORT",
      "TORCHELASTIC_RESTART_COUNT",
      "OMPI_COMM_WORLD_RANK",
      "OMPI_COMM_WORLD_SIZE",
      "OMPI_COMM_WORLD_LOCAL_RANK",
      "CUDA_VISIBLE_DEVICES",
      "MUSTER_JOB_ID",
      "MUSTER_ATTEMPT",
      "MUSTER_RDZV_ENDPOINT",
      "MUSTER_RDZV_KEY",
      "MUSTER_CHECKPOINT_DIR",
      "MUSTER_RESUME_STEP",
      "MUSTER_CHECKPOINT_EVERY",
      "MUSTER_CHECKPOINT_EVERY_S",
      "MUSTER_PREEMPT_FILE",
      "MUSTER_SNAPSHOT_EVERY",
      "MUSTER_SNAPSHOT_SOCKET",
      "MUSTER_RESUME_SNAPSHOT_STEP",
      "MUSTER_RESUME_SNAPSHOT_ATTEMPT",
      "MUSTER_NODE",
      "MUSTER_PROVIDER",
      "MUSTER_CONTROL_FD",
  };
  return kNames;
}

const std::set<std::string_view>& KnobNames() {
  static const std::set<std::string_view> kNames = {"MUSTER_COLL_BACKEND", "MUSTER_COLL_TIMEOUT_MS",
                                                    "MUSTER_LOG_LEVEL", "MUSTER_NOTICE_SIGNAL",
                                                    "MUSTER_RDZV_DIRECT"};
  return kNames;
}

// The CLI's own settings: known (no warning, allowed in a job's env) but, being the writer's
// configuration, never inherited by its ranks.
bool IsCliName(std::string_view name) {
  return name == "MUSTER_COORDINATOR" || name == "MUSTER_KEYS";
}

bool IsMusterName(std::string_view name) { return name.rfind("MUSTER_", 0) == 0; }

// The value of `name`, or nullopt when it is absent or empty.
std::optional<std::string> Lookup(const std::map<std::string, std::string>& env, const char* name) {
  auto it = env.find(name);
  if (it == env.end() || it->second.empty()) return std::nullopt;
  return it->second;
}

// A decimal integer in [min, max], digits only (no sign, no spaces).
StatusOr<int64_t> ParseNumber(const char* name, const std::string& value, int64_t min, int64_t max,
                              std::string_view what) {
  int64_t v = 0;
  auto r = std::from_chars(value.data(), value.data() + value.size(), v);
  bool digits = !value.empty() && std::all_of(value.begin(), value.end(),
                                              [](char c) { return c >= '0' && c <= '9'; });
  if (!digits || r.ec != std::errc() || r.ptr != value.data() + value.size() || v < min ||
      v > max) {
    return InvalidArgumentError(std::string(name) + "='" + value + "' is not " + std::string(what));
  }
  return v;
}

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();

// Reads `name` (or, when absent, `alias`) into `*out` as an int in [min, kMaxInt]; leaves
// `*out` alone when both are absent. Sets `*present`.
Status ReadInt(const std::map<std::string, std::string>& env, const char* name, const char* alias,
               int64_t min, std::string_view what, int* out, bool* present = nullptr) {
  const char* used = name;
  auto v = Lookup(env, name);
  if (!v && alias != nullptr) {
    v = Lookup(env, alias);
    used = alias;
  }
  if (present != nullptr) *present = v.has_value();
  if (!v) return Status::Ok();
  MUSTER_ASSIGN_OR_RETURN(int64_t n, ParseNumber(used, *v, min, kMaxInt, what));
  *out = static_cast<int>(n);
  return Status::Ok();
}

Status ReadInt64(const std::map<std::string, std::string>& env, const char* name, int64_t min,
                 std::string_view what, std::optional<int64_t>* out) {
  auto v = Lookup(env, name);
  if (!v) return Status::Ok();
  MUSTER_ASSIGN_OR_RETURN(int64_t n, ParseNumber(name, *v, min, kMaxInt64, what));
  *out = n;
  return Status::Ok();
}

std::string ValueOr(const std::map<std::string, std::string>& env, const char* name) {
  auto it = env.find(name);
  return it == env.end() ? std::string() : it->second;
}

std::map<std::string, std::string> ToMap(const std::vector<std::string>& kvs) {
  std::map<std::string, std::string> m;
  for (const auto& kv : kvs) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) continue;
    m[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return m;
}

}  // namespace

bool RankEnv::IsContractName(std::string_view name) { return ContractNames().count(name) > 0; }

bool RankEnv::IsKnobName(std::string_view name) { return KnobNames().count(name) > 0; }

Status RankEnv::Validate() const {
  auto bad = [](std::string what) { return InvalidArgumentError(std::move(what)); };
  if (world_size < 1) return bad("WORLD_SIZE=" + std::to_string(world_size) + " is below 1");
  if (rank < 0 || rank >= world_size) {
    return bad("RANK=" + std::to_string(rank) +
               " is not below WORLD_SIZE=" + std::to_string(world_size));
  }
  if (local_world_size < 1) {
    return bad("LOCAL_WORLD_SIZE=" + std::to_string(local_world_size) + " is below 1");
  }
  if (local_rank < 0 || local_rank >= local_world_size) {
    return bad("LOCAL_RANK=" + std::to_string(local_rank) +
               " is not below LOCAL_WORLD_SIZE=" + std::to_string(local_world_size));
  }
  if (nnodes < 1) return bad("NNODES=" + std::to_string(nnodes) + " is below 1");
  if (node_rank < 0 || node_rank >= nnodes) {
    return bad("NODE_RANK=" + std::to_string(node_rank) +
               " is not below NNODES=" + std::to_string(nnodes));
  }
  if (master_port < 0 || master_port > 65535) {
    return bad("MASTER_PORT=" + std::to_string(master_port) + " is not a port");
  }
  if (attempt < 0) return bad("MUSTER_ATTEMPT=" + std::to_string(attempt) + " is negative");
  if (resume_step && *resume_step < 0) {
    return bad("MUSTER_RESUME_STEP=" + std::to_string(*resume_step) + " is negative");
  }
  if (checkpoint_every && *checkpoint_every <= 0) {
    return bad("MUSTER_CHECKPOINT_EVERY=" + std::to_string(*checkpoint_every) + " is not positive");
  }
  if (checkpoint_every_s && *checkpoint_every_s <= 0) {
    return bad("MUSTER_CHECKPOINT_EVERY_S=" + std::to_string(*checkpoint_every_s) +
               " is not positive");
  }
  if (snapshot_every && *snapshot_every <= 0) {
    return bad("MUSTER_SNAPSHOT_EVERY=" + std::to_string(*snapshot_every) + " is not positive");
  }
  if (resume_snapshot_step.has_value() != resume_snapshot_attempt.has_value()) {
    return bad("MUSTER_RESUME_SNAPSHOT_STEP and MUSTER_RESUME_SNAPSHOT_ATTEMPT go together");
  }
  if ((resume_snapshot_step && *resume_snapshot_step < 0) ||
      (resume_snapshot_attempt && *resume_snapshot_attempt < 0)) {
    return bad("MUSTER_RESUME_SNAPSHOT_STEP/ATTEMPT must not be negative");
  }
  if (resume_snapshot_step && snapshot_socket.empty()) {
    return bad("MUSTER_RESUME_SNAPSHOT_STEP is set without MUSTER_SNAPSHOT_SOCKET");
  }
  if (control_fd < -1) {
    return bad("MUSTER_CONTROL_FD=" + std::to_string(control_fd) + " is not a file descriptor");
  }
  if (coll_timeout_ms && *coll_timeout_ms <= 0) {
    return bad("MUSTER_COLL_TIMEOUT_MS=" + std::to_string(*coll_timeout_ms) + " is not positive");
  }
  for (const auto* s : {&job_id, &rdzv_endpoint, &rdzv_key, &checkpoint_dir, &preempt_file, &node,
                        &snapshot_socket, &provider, &master_addr, &coll_backend, &socket_ifname}) {
    if (s->find('\0') != std::string::npos) {
      return bad("an env contract value holds a NUL byte");
    }
  }
  return Status::Ok();
}

std::map<std::string, std::string> RankEnv::ToEnviron() const {
  std::map<std::string, std::string> env;
  auto num = [](int64_t v) { return std::to_string(v); };
  env["RANK"] = num(rank);
  env["WORLD_SIZE"] = num(world_size);
  env["LOCAL_RANK"] = num(local_rank);
  env["LOCAL_WORLD_SIZE"] = num(local_world_size);
  env["NODE_RANK"] = num(node_rank);
  env["GROUP_RANK"] = num(node_rank);
  env["NNODES"] = num(nnodes);
  if (!master_addr.empty()) env["MASTER_ADDR"] = master_addr;
  if (master_port > 0) env["MASTER_PORT"] = num(master_port);
  env["TORCHELASTIC_RESTART_COUNT"] = num(attempt > 0 ? attempt - 1 : 0);
  env["OMPI_COMM_WORLD_RANK"] = num(rank);
  env["OMPI_COMM_WORLD_SIZE"] = num(world_size);
  env["OMPI_COMM_WORLD_LOCAL_RANK"] = num(local_rank);
  if (cuda_visible_devices) env["CUDA_VISIBLE_DEVICES"] = *cuda_visible_devices;
  env["MUSTER_JOB_ID"] = job_id;
  env["MUSTER_ATTEMPT"] = num(attempt);
  env["MUSTER_RDZV_ENDPOINT"] = rdzv_endpoint;
  env["MUSTER_RDZV_KEY"] = rdzv_key;
  env["MUSTER_CHECKPOINT_DIR"] = checkpoint_dir;
  env["MUSTER_RESUME_STEP"] = resume_step ? num(*resume_step) : "";
  if (checkpoint_every) env["MUSTER_CHECKPOINT_EVERY"] = num(*checkpoint_every);
  if (checkpoint_every_s) env["MUSTER_CHECKPOINT_EVERY_S"] = num(*checkpoint_every_s);
  if (!preempt_file.empty()) env["MUSTER_PREEMPT_FILE"] = preempt_file;
  if (snapshot_every) env["MUSTER_SNAPSHOT_EVERY"] = num(*snapshot_every);
  if (!snapshot_socket.empty()) env["MUSTER_SNAPSHOT_SOCKET"] = snapshot_socket;
  if (resume_snapshot_step) env["MUSTER_RESUME_SNAPSHOT_STEP"] = num(*resume_snapshot_step);
  if (resume_snapshot_attempt) {
    env["MUSTER_RESUME_SNAPSHOT_ATTEMPT"] = num(*resume_snapshot_attempt);
  }
  if (!node.empty()) env["MUSTER_NODE"] = node;
  if (!provider.empty()) env["MUSTER_PROVIDER"] = provider;
  if (control_fd >= 0) env["MUSTER_CONTROL_FD"] = num(control_fd);
  if (!socket_ifname.empty()) {
    env[std::string(kGlooIfname)] = socket_ifname;
    env[std::string(kNcclIfname)] = "=" + socket_ifname;
  }
  if (!coll_backend.empty()) env["MUSTER_COLL_BACKEND"] = coll_backend;
  if (coll_timeout_ms) env["MUSTER_COLL_TIMEOUT_MS"] = num(*coll_timeout_ms);
  return env;
}

StatusOr<RankEnv> RankEnv::FromEnviron(const std::map<std::string, std::string>& env,
                                       std::vector<std::string>* unknown) {
  RankEnv e;
  constexpr std::string_view kCount = "a non-negative integer";
  constexpr std::string_view kPositive = "a positive integer";
  bool have_rank = false, have_world = false, have_lws = false;
  MUSTER_RETURN_IF_ERROR(
      ReadInt(env, "RANK", "OMPI_COMM_WORLD_RANK", 0, kCount, &e.rank, &have_rank));
  MUSTER_RETURN_IF_ERROR(
      ReadInt(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", 1, kPositive, &e.world_size, &have_world));
  if (have_rank != have_world) {
    return InvalidArgumentError(have_rank ? "RANK is set but WORLD_SIZE is not"
                                          : "WORLD_SIZE is set but RANK is not");
  }
  MUSTER_RETURN_IF_ERROR(
      ReadInt(env, "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", 0, kCount, &e.local_rank));
  e.local_world_size = e.world_size;
  MUSTER_RETURN_IF_ERROR(
      ReadInt(env, "LOCAL_WORLD_SIZE", nullptr, 1, kPositive, &e.local_world_size, &have_lws));
  MUSTER_RETURN_IF_ERROR(ReadInt(env, "NODE_RANK", "GROUP_RANK", 0, kCount, &e.node_rank));
  MUSTER_RETURN_IF_ERROR(ReadInt(env, "NNODES", nullptr, 1, kPositive, &e.nnodes));
  e.master_addr = ValueOr(env, "MASTER_ADDR");
  MUSTER_RETURN_IF_ERROR(
      ReadInt(env, "MASTER_PORT", nullptr, 1, "a port (1-65535)", &e.master_port));
  if (e.master_port > 65535) {
    return InvalidArgumentError("MASTER_PORT='" + ValueOr(env, "MASTER_PORT") +
                                "' is not a port (1-65535)");
  }
  if (auto it = env.find("CUDA_VISIBLE_DEVICES"); it != env.end()) {
    e.cuda_visible_devices = it->second;
  }
  e.job_id = ValueOr(env, "MUSTER_JOB_ID");
  MUSTER_RETURN_IF_ERROR(ReadInt(env, "MUSTER_ATTEMPT", nullptr, 0, kCount, &e.attempt));
  e.rdzv_endpoint = ValueOr(env, "MUSTER_RDZV_ENDPOINT");
  e.rdzv_key = ValueOr(env, "MUSTER_RDZV_KEY");
  e.checkpoint_dir = ValueOr(env, "MUSTER_CHECKPOINT_DIR");
  MUSTER_RETURN_IF_ERROR(ReadInt64(env, "MUSTER_RESUME_STEP", 0, kCount, &e.resume_step));
  MUSTER_RETURN_IF_ERROR(
      ReadInt64(env, "MUSTER_CHECKPOINT_EVERY", 1, kPositive, &e.checkpoint_every));
  MUSTER_RETURN_IF_ERROR(
      ReadInt64(env, "MUSTER_CHECKPOINT_EVERY_S", 1, kPositive, &e.checkpoint_every_s));
  e.preempt_file = ValueOr(env, "MUSTER_PREEMPT_FILE");
  MUSTER_RETURN_IF_ERROR(ReadInt64(env, "MUSTER_SNAPSHOT_EVERY", 1, kPositive, &e.snapshot_every));
  e.snapshot_socket = ValueOr(env, "MUSTER_SNAPSHOT_SOCKET");
  MUSTER_RETURN_IF_ERROR(
      ReadInt64(env, "MUSTER_RESUME_SNAPSHOT_STEP", 0, kCount, &e.resume_snapshot_step));
  MUSTER_RETURN_IF_ERROR(
      ReadInt64(env, "MUSTER_RESUME_SNAPSHOT_ATTEMPT", 0, kCount, &e.resume_snapshot_attempt));
  e.node = ValueOr(env, "MUSTER_NODE");
  e.provider = ValueOr(env, "MUSTER_PROVIDER");
  MUSTER_RETURN_IF_ERROR(
      ReadInt(env, "MUSTER_CONTROL_FD", nullptr, 0, "a file descriptor number", &e.control_fd));
  e.coll_backend = ValueOr(env, "MUSTER_COLL_BACKEND");
  e.socket_ifname = ValueOr(env, kGlooIfname.data());
  MUSTER_RETURN_IF_ERROR(
      ReadInt64(env, "MUSTER_COLL_TIMEOUT_MS", 1, kPositive, &e.coll_timeout_ms));
  MUSTER_RETURN_IF_ERROR(e.Validate());
  if (unknown != nullptr) {
    unknown->clear();
    for (const auto& [k, v] : env) {
      if (IsMusterName(k) && !IsContractName(k) && !IsKnobName(k) && !IsCliName(k)) {
        unknown->push_back(k);
      }
    }
  }
  return e;
}

StatusOr<RankEnv> RankEnv::FromProcessEnviron() {
  std::vector<std::string> unknown;
  MUSTER_ASSIGN_OR_RETURN(RankEnv e, FromEnviron(ToMap(ProcessEnviron()), &unknown));
  if (!unknown.empty()) {
    // Once per process: every library that reads the contract calls this.
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      auto logger = log::Get("env");
      for (const auto& name : unknown) {
        logger->warn("{} is not a variable of muster's env contract; ignored", name);
      }
    }
  }
  return e;
}

std::vector<std::string> ComposeRankEnviron(const std::vector<std::string>& inherited,
                                            const std::map<std::string, std::string>& job_env,
                                            const RankEnv& env) {
  std::map<std::string, std::string> all;
  for (auto& [k, v] : ToMap(inherited)) {
    if (RankEnv::IsContractName(k) || (IsMusterName(k) && !RankEnv::IsKnobName(k))) continue;
    all[k] = std::move(v);
  }
  for (const auto& [k, v] : job_env) all[k] = v;
  for (auto& [k, v] : env.ToEnviron()) {
    if ((k == kGlooIfname || k == kNcclIfname) && all.count(k)) continue;  // the user's choice
    all[k] = std::move(v);
  }
  std::vector<std::string> out;
  out.reserve(all.size());
  for (const auto& [k, v] : all) out.push_back(k + "=" + v);
  return out;
}

Status CheckJobEnv(const std::map<std::string, std::string>& job_env) {
  for (const auto& [k, v] : job_env) {
    if (k.empty() || k.find('=') != std::string::npos || k.find('\0') != std::string::npos) {
      return InvalidArgumentError("env: '" + k + "' is not a variable name");
    }
    if (RankEnv::IsContractName(k)) {
      return InvalidArgumentError("env: " + k +
                                  " is set by muster for every rank (docs/env-contract.md)");
    }
    if (IsMusterName(k) && !RankEnv::IsKnobName(k) && !IsCliName(k)) {
      return InvalidArgumentError("env: " + k +
                                  " is not a MUSTER_ variable muster knows (docs/env-contract.md)");
    }
  }
  return Status::Ok();
}

std::vector<std::string> ProcessEnviron() {
  std::vector<std::string> out;
  for (char** e = environ; e && *e; ++e) out.emplace_back(*e);
  return out;
}

}  // namespace muster
