#pragma once

// RankEnv: the env contract of a rank (docs/env-contract.md) as one type. It is the only place
// that knows the names and formats of the variables muster gives a rank:
//
//   - the writers (the node agent, `muster run`) fill a RankEnv and call ComposeRankEnviron(),
//     which puts ToEnviron() over the job's own env over the writer's inherited environment;
//   - the readers (collectives, the rendezvous client, the checkpointer, runtime::JobContext, the
//     examples) call RankEnv::FromProcessEnviron() and read the fields.
//
// FromEnviron(ToEnviron(e)) == e for every valid `e` (tests/unit/rank_env_test.cc).
//
// Reading is strict about what it knows and lenient about what it does not:
//   - a malformed value of a contract variable (RANK=abc, RANK >= WORLD_SIZE, MASTER_PORT=70000,
//     MUSTER_CONTROL_FD=-1, ...) is InvalidArgument naming the variable and the value;
//   - a MUSTER_* name that is neither in the contract nor a known knob is reported in
//     `unknown` (FromProcessEnviron logs a warning) and is NOT an error: a rank program built
//     against this library must keep running under a newer agent that adds a variable. Typos
//     in what users write are caught where users write them: CheckJobEnv() (the job spec's
//     `env`, `muster run -x`) rejects them;
//   - torchrun variables muster does not set (TORCHELASTIC_RUN_ID, GROUP_WORLD_SIZE, ...) are
//     ignored; an empty value counts as unset (MUSTER_RESUME_STEP= means "starting fresh").
//
// Absent variables take the values of a job of one rank (rank 0 of 1, one node), so a program
// started by hand still runs; RANK without WORLD_SIZE (or the reverse) is an error. Under
// mpirun (no RANK) the OMPI_COMM_WORLD_* aliases are read instead.
//
// Thread-safety: a value type. FromProcessEnviron reads the process environment (getenv is
// not safe against a concurrent setenv).

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace muster {

struct RankEnv {
  // torchrun's names.
  int rank = 0;              // RANK (OMPI_COMM_WORLD_RANK): the global rank
  int world_size = 1;        // WORLD_SIZE (OMPI_COMM_WORLD_SIZE)
  int local_rank = 0;        // LOCAL_RANK (OMPI_COMM_WORLD_LOCAL_RANK): rank on this node
  int local_world_size = 1;  // LOCAL_WORLD_SIZE: ranks per node (default: world_size)
  int node_rank = 0;         // NODE_RANK and GROUP_RANK
  int nnodes = 1;            // NNODES
  std::string master_addr;   // MASTER_ADDR; empty: unset
  int master_port = 0;       // MASTER_PORT, 1..65535; 0: unset
  // TORCHELASTIC_RESTART_COUNT is not a field: it is attempt - 1 (0 for attempt 0).

  // CUDA_VISIBLE_DEVICES: nullopt leaves it alone; "" hides every GPU (a node without GPUs).
  std::optional<std::string> cuda_visible_devices;

  // muster's names.
  std::string job_id;                         // MUSTER_JOB_ID
  int attempt = 0;                            // MUSTER_ATTEMPT (0 under `muster run`)
  std::string rdzv_endpoint;                  // MUSTER_RDZV_ENDPOINT, tcp://HOST:PORT
  std::string rdzv_key;                       // MUSTER_RDZV_KEY ("insecure" or "v1,...")
  std::string checkpoint_dir;                 // MUSTER_CHECKPOINT_DIR; empty: no volume
  std::optional<int64_t> resume_step;         // MUSTER_RESUME_STEP; nullopt: fresh
  std::optional<int64_t> checkpoint_every;    // MUSTER_CHECKPOINT_EVERY (> 0)
  std::optional<int64_t> checkpoint_every_s;  // MUSTER_CHECKPOINT_EVERY_S (> 0)
  std::string preempt_file;                   // MUSTER_PREEMPT_FILE; empty: none
  // In-memory snapshots (the job spec's checkpoint.snapshot_every_steps): every this many steps
  // a rank hands its checkpoint state to its agent over the Unix socket at snapshot_socket
  // (checkpoint/snapshot_channel.h). Both unset when the job or the agent has none.
  std::optional<int64_t> snapshot_every;  // MUSTER_SNAPSHOT_EVERY (> 0)
  std::string snapshot_socket;            // MUSTER_SNAPSHOT_SOCKET; empty: none
  // Resume from the in-memory snapshot of this step of this attempt, held by the agent at
  // snapshot_socket (runtime::JobContext::RestoreSnapshot); resume_step is then the volume's
  // step, the fallback. Both set or both unset.
  std::optional<int64_t> resume_snapshot_step;     // MUSTER_RESUME_SNAPSHOT_STEP (>= 0)
  std::optional<int64_t> resume_snapshot_attempt;  // MUSTER_RESUME_SNAPSHOT_ATTEMPT (>= 0)
  std::string node;                                // MUSTER_NODE (agents only)
  std::string provider;                            // MUSTER_PROVIDER (agents only)
  // MUSTER_CONTROL_FD: the write end of the rank's control channel to its agent or launcher
  // (runtime/control_channel.h); -1: none.
  int control_fd = -1;

  // The network interface the rank's peers are reached through, found by the agent's launch
  // preflight (node_agent/preflight.h); empty: unknown. Written as GLOO_SOCKET_IFNAME=<name>
  // and NCCL_SOCKET_IFNAME==<name> (NCCL's '=' asks for that exact name, not a prefix), but
  // ComposeRankEnviron never overrides either variable where the user (job env, or the writer's
  // own environment) set it. Read back from GLOO_SOCKET_IFNAME, whatever its form.
  std::string socket_ifname;

  // Knobs a user may set (job spec `env`, `-x`, or the launcher's own environment); muster
  // never sets them, and ToEnviron writes them only when set.
  std::string coll_backend;                // MUSTER_COLL_BACKEND: gloo, nccl, mpi
  std::optional<int64_t> coll_timeout_ms;  // MUSTER_COLL_TIMEOUT_MS (> 0)

  bool operator==(const RankEnv&) const = default;

  // True when a muster writer (agent or launcher) started this rank: it has a store to meet in.
  bool has_rendezvous() const { return !rdzv_endpoint.empty(); }

  // InvalidArgument naming the first field out of range (rank >= world_size, ...).
  Status Validate() const;

  // Every variable of the contract, aliases included (GROUP_RANK, OMPI_COMM_WORLD_*,
  // TORCHELASTIC_RESTART_COUNT). Unset optional fields are left out; the MUSTER_* strings are
  // always written (empty when unset), as the contract promises.
  // REQUIRES: Validate().ok()
  std::map<std::string, std::string> ToEnviron() const;

  // Parses and validates. `unknown`, when given, receives the MUSTER_* names found that
  // neither the contract nor the knobs know, sorted.
  static StatusOr<RankEnv> FromEnviron(const std::map<std::string, std::string>& env,
                                       std::vector<std::string>* unknown = nullptr);
  // The same over this process's environment; logs one warning per unknown MUSTER_* name.
  static StatusOr<RankEnv> FromProcessEnviron();

  // Names the contract owns: the writers set them, so they are never inherited from the
  // writer's own environment and a job's `env` may not set them. Aliases included.
  static bool IsContractName(std::string_view name);
  // MUSTER_* names a user may set for ranks: MUSTER_COLL_BACKEND, MUSTER_COLL_TIMEOUT_MS,
  // MUSTER_LOG_LEVEL, MUSTER_NOTICE_SIGNAL, MUSTER_RDZV_DIRECT. (The CLI's MUSTER_COORDINATOR and
  // MUSTER_KEYS are known too, but are the writer's own settings: never inherited by ranks.)
  static bool IsKnobName(std::string_view name);
};

// A rank's whole environment, "KEY=VALUE" sorted by key: `inherited` ("KEY=VALUE" each: the
// agent's or launcher's own environment) without the contract's names and without MUSTER_*
// names other than the knobs; then `job_env` over it; then `env.ToEnviron()` over both, except
// GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, which the first two keep where they set them.
// REQUIRES: env.Validate().ok()
std::vector<std::string> ComposeRankEnviron(const std::vector<std::string>& inherited,
                                            const std::map<std::string, std::string>& job_env,
                                            const RankEnv& env);

// What a user may put in a job's `env` (job spec) or `muster run -x`: InvalidArgument for a
// contract name ("RANK is set by muster for every rank") or an unknown MUSTER_* name (a typo of
// MUSTER_CHECKPOINT_EVERY is an error at submit, not a silent no-op at run time), or a name
// that is empty or holds '='.
Status CheckJobEnv(const std::map<std::string, std::string>& job_env);

// This process's environment as "KEY=VALUE" strings.
std::vector<std::string> ProcessEnviron();

}  // namespace muster
