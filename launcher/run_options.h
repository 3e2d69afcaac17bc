#pragma once

// RunOptions: what `muster run` was asked to do, and the parsing of its command line and host
// lists (Open MPI's `-H host:slots,...` and hostfile `host slots=N` forms).
//
// Thread-safety: values and pure functions.

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::launcher {

// Exit codes of `muster run` beyond those of the ranks (a failed rank's own code, or 128 + its
// signal, is passed through).
inline constexpr int kExitUsage = 2;         // bad command line, host list or hostfile
inline constexpr int kExitTimeout = 124;     // --timeout passed (as coreutils timeout(1))
inline constexpr int kExitCannotExec = 126;  // a rank's program exists but cannot run
inline constexpr int kExitNotFound = 127;    // a rank's program was not found
// Interrupted by SIGINT/SIGTERM/SIGHUP S (forwarded to the ranks): 128 + S.

struct HostSlots {
  std::string host;
  int slots = 1;
};

struct RunOptions {
  int np = 0;                        // 0: every slot of the hosts (or this machine's CPU count)
  std::vector<HostSlots> hosts;      // -H and --hostfile, in order; empty: localhost
  std::vector<std::string> exports;  // -x VAR or VAR=VAL (ResolveExports)
  bool tag_output = false;
  std::optional<std::chrono::milliseconds> timeout;
  std::chrono::milliseconds grace{3000};
  std::string log_dir;         // per-rank logs rank-<R>.log when set
  std::string checkpoint_dir;  // MUSTER_CHECKPOINT_DIR
  std::string job_id;          // MUSTER_JOB_ID; generated when empty
  // --coordinator (or $MUSTER_COORDINATOR): run as an interactive job on the coordinator's
  // node agents (launcher/remote_run.h) instead of on this machine.
  std::string coordinator;
  std::string keys_dir;              // --keys: client.key + coordinator.pub
  bool insecure = false;             // --insecure: no CURVE to the coordinator (tests only)
  std::vector<std::string> program;  // PROG ARGS...
};

// The help text of `muster run`'s options.
const char* RunUsage();

// Parses the words after `muster run`. Options come first; the first word that is not an
// option (or everything after `--`) is the program and its arguments. InvalidArgument, with
// the offending word, for anything malformed; hostfiles are read here (NotFound if missing).
StatusOr<RunOptions> ParseRunArgs(const std::vector<std::string>& args);

// The variables -x asks for, by name: "NAME=VALUE" as given, "NAME" with its value in
// `environ` ("K=V" entries: the launcher's own environment). The one reading of -x, for local
// and coordinator runs. InvalidArgument naming NAME when `environ` does not set it.
StatusOr<std::map<std::string, std::string>> ResolveExports(
    const std::vector<std::string>& exports, const std::vector<std::string>& environ);

// "a:2,b,c:4" -> {a,2},{b,1},{c,4} (Open MPI's -H).
StatusOr<std::vector<HostSlots>> ParseHostList(const std::string& list);
// Lines "host [slots=N] [max_slots=M]"; '#' starts a comment; a host without slots has 1.
StatusOr<std::vector<HostSlots>> ParseHostfile(const std::string& text, const std::string& path);

// True for names that mean this machine: localhost, 127.x.y.z, ::1, and this host's name.
bool IsLocalHost(const std::string& host);

// Parses seconds ("2", "0.5") into milliseconds. InvalidArgument for negatives and junk.
StatusOr<std::chrono::milliseconds> ParseSeconds(const std::string& flag, const std::string& text);

}  // namespace muster::launcher
