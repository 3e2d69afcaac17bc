#pragma once

// JobSpec: what a user submits (`muster submit job.yaml`), parsed from YAML and validated.
// Every field is documented in docs/job-spec.md. Validation reports every error at once, each
// naming the file, line and field:
//
//   job.yaml:4: nodes: must be an integer >= 1, not "four"
//   job.yaml:9: placement.island: must be required, preferred or any, not "some"
//
// A spec is untrusted input (any client key may submit one, as YAML or as a proto JobSpec), so
// every field is bounded (the limits below, also in docs/job-spec.md), numbers are parsed
// without exceptions or recursion, the time and memory spent on a spec are linear in its size,
// and a key given twice in a mapping is refused (yaml-cpp would silently keep the first).
//
// Thread-safety: values and free functions; no shared state.

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/proto/coordinator.pb.h"
#include "common/status.h"
#include "coordinator/scheduler.h"

namespace muster::coordinator {

// Bounds on the fields of a JobSpec, applied to YAML and wire specs alike.
inline constexpr size_t kMaxJobNameBytes = 63;  // the job id `name-N` becomes a path
inline constexpr size_t kMaxCommandArgs = 4096;
inline constexpr size_t kMaxArgBytes = 128 << 10;  // Linux MAX_ARG_STRLEN; also per NAME=value
inline constexpr size_t kMaxEnvVars = 4096;
inline constexpr size_t kMaxEnvNameBytes = 256;
// argv and env together: under ARG_MAX with room for the env contract.
inline constexpr size_t kMaxExecBytes = 1 << 20;
inline constexpr int kMaxNodes = 100000;
inline constexpr int kMaxRanksPerNode = 1024;
inline constexpr int kMaxGpusPerNode = 1024;
inline constexpr size_t kMaxLabelBytes = 128;  // gpu_type, a provider, checkpoint.volume
inline constexpr size_t kMaxProviders = 64;
inline constexpr size_t kMaxHostBytes = 253;  // a node name (a DNS name at most)
inline constexpr int kMaxPriority = 1000000;
inline constexpr int kMaxCheckpointKeep = 100000;
inline constexpr int kMaxRestarts = 100000;
inline constexpr int64_t kMaxEverySteps = int64_t{1} << 50;
inline constexpr std::chrono::seconds kMaxDuration{365LL * 24 * 3600};
inline constexpr size_t kMaxJobSpecBytes = 1 << 20;  // YAML text

// `notice_signal: SIGTERM` (opt-in): on a preemption notice the agent also sends the ranks this
// signal, so programs that checkpoint on a signal (HF Trainer, Lightning, submitit) work
// unchanged. The spec carries it as this job env entry (the ranks see it too).
inline constexpr std::string_view kNoticeSignalEnv = "MUSTER_NOTICE_SIGNAL";

struct JobSpec {
  std::string name;
  // argv. A YAML string becomes {"/bin/sh", "-c", string}; a YAML list is the argv itself.
  std::vector<std::string> command;
  std::map<std::string, std::string> env;
  int nodes = 1;
  int ranks_per_node = 1;
  std::string gpu_type;  // empty: any
  int gpus_per_node = 0;
  std::vector<std::string> providers;  // empty: any
  IslandPolicy island = IslandPolicy::kAny;
  int priority = 0;
  // checkpoint: volume (required if the section is present), every (steps, or a duration),
  // keep (the number of committed checkpoints kept).
  std::string checkpoint_volume;
  int64_t checkpoint_every_steps = 0;
  std::chrono::seconds checkpoint_every_time{0};
  int checkpoint_keep = 3;
  // checkpoint.snapshot_every_steps: every this many steps each rank's state also goes to the
  // memory of its node's agent (node_agent/snapshots/); 0: none.
  int64_t snapshot_every_steps = 0;
  int max_restarts = 3;
  std::chrono::seconds restart_backoff{10};
  std::chrono::seconds time_limit{0};  // 0: none
  // Pinned nodes in node-rank order (`muster run -H`); not part of the YAML.
  std::vector<std::string> hosts;
  // `muster run` through the coordinator: cancelled when its client stops asking about it, and
  // each rank's stdout and stderr are kept apart for it. Not part of the YAML.
  bool interactive = false;
};

// Parses and validates `text`; `filename` prefixes each error. InvalidArgument with one line per
// error (at most 100 lines, then a count of the rest).
StatusOr<JobSpec> ParseJobSpec(std::string_view text, std::string_view filename = "job.yaml");
// Reads `path` and parses it. NotFound if it cannot be read.
StatusOr<JobSpec> LoadJobSpecFile(const std::string& path);

// Checks a spec that did not come from YAML (from the wire): the same rules, without lines.
// ParseJobSpec applies exactly these checks to what it parsed.
Status ValidateJobSpec(const JobSpec& spec);

// "90s", "15m", "2h", "1h30m", "1d" or a bare integer (seconds), at most kMaxDuration.
// InvalidArgument otherwise.
StatusOr<std::chrono::seconds> ParseDuration(std::string_view text);
std::string FormatDuration(std::chrono::seconds d);

// The wire form (proto::JobSpec, what SubmitRequest.spec and the database carry). FromProto
// applies ValidateJobSpec: a wire spec is as untrusted as YAML. ToProto(FromProto(p)) keeps
// every field a valid `p` has.
proto::JobSpec JobSpecToProto(const JobSpec& spec);
StatusOr<JobSpec> JobSpecFromProto(const proto::JobSpec& spec);

// The scheduler's view of the spec.
JobRequest ToJobRequest(const JobSpec& spec, const std::string& id, uint64_t seq);

}  // namespace muster::coordinator
