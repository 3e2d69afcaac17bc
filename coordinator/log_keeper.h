#pragma once

// LogKeeper: the coordinator's own copies of finished attempts' rank logs, so `muster logs` of a
// finished job still works once the nodes that ran it are released or lost. The coordinator
// collects a node's rank logs of an attempt when the attempt ends there (coordinator/
// log_collect.cc, through FetchLog/AgentLogChunk); this class holds the files:
//
//   <dir>/<job>/<attempt>/rank-<r>.log        a kept copy (plain text, what the rank wrote)
//   <dir>/<job>/<attempt>/rank-<r>.incomplete  (empty) the copy ended with a note: not all in
//   <dir>/<job>/<attempt>/rank-<r>.log.part and .prev.part: being written (found at Open: a
//                                              crash mid-copy; Open lists that rank in
//                                              interrupted(), so the copy can be asked again;
//                                              they stay until Begin starts it afresh or
//                                              Discard gives it up)
//
// Bounded twice:
//   - per job (`job_bytes`): a rank's copy keeps the tail of `job_bytes / ranks` bytes of its
//     log, and says where it cut with a first line "[muster: N bytes dropped]". When a new
//     attempt's copies bring the job over `job_bytes`, the older attempts' copies are cut down
//     to that line alone (oldest attempt first).
//   - in total (`total_bytes`): once every copy together is over it, whole jobs are evicted,
//     the job whose copies were written least recently first (never the job being written).
// The index (bytes per job, when last written) is derived from the directory at Open, so the
// copies and their bounds survive a restart.
//
// Every name that becomes a path is validated (common/path_name.h): a job id is a plain name
// (no '/', no ".."), an attempt is 1..kMaxAttempt, a rank 0..kMaxRank.
//
// Thread-safety: none; the coordinator's reactor thread. File operations are local: an append
// writes one chunk (at most 1 MiB), a commit copies at most the rank's share plus a chunk in the
// kernel, a read reads at most what it is asked (at most 1 MiB).

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace muster::coordinator {

struct LogKeepLimits {
  int64_t job_bytes = int64_t{64} << 20;
  int64_t total_bytes = int64_t{2} << 30;
};

class LogKeeper {
 public:
  static constexpr int kMaxAttempt = 1000000;
  static constexpr int kMaxRank = 1000000;

  // Creates `dir` if needed, removes copies left half written, and indexes what is there.
  static StatusOr<std::unique_ptr<LogKeeper>> Open(const std::filesystem::path& dir,
                                                   LogKeepLimits limits);

  // A copy that was being written when the previous coordinator stopped (found at Open).
  struct CopyId {
    std::string job;
    int attempt = 0;
    int rank = 0;
    auto operator<=>(const CopyId&) const = default;
  };
  // The copies Open found half written (each has no kept file), in order. Their part files
  // stay until Begin asks for the copy afresh or Discard gives it up, so a coordinator that
  // stops before either still finds them at its next Open.
  const std::vector<CopyId>& interrupted() const { return interrupted_; }
  // Removes the part files of a copy that will not be asked again.
  void Discard(const CopyId& id);

  // InvalidArgument unless (job, attempt, rank) can name a file under the directory.
  static Status Validate(std::string_view job, int attempt, int rank);

  // Starts (again) the copy of one rank's log; `ranks` is the attempt's number of ranks (the
  // rank's share of job_bytes). Drops a copy being written of the same rank.
  Status Begin(const std::string& job, int attempt, int rank, int ranks);
  // Appends `data` to the copy being written, keeping only the tail of the rank's share.
  Status Append(const std::string& job, int attempt, int rank, std::string_view data);
  // The copy is complete: it becomes readable (rank-<r>.log), with `note` (if not empty) as
  // its last line "[muster: <note>]". Then the job cap and the total cap are applied.
  Status Commit(const std::string& job, int attempt, int rank, const std::string& note = "");
  // Drops the copy being written (nothing to keep: the node had no log of the rank).
  void Abandon(const std::string& job, int attempt, int rank);
  // Whether a copy of the rank is being written.
  bool Writing(const std::string& job, int attempt, int rank) const;

  // Whether a copy of the rank is kept (committed; perhaps with a note, see Complete).
  bool Has(const std::string& job, int attempt, int rank) const;
  // Whether it is kept and was committed with no note (rank-<r>.incomplete marks the others).
  bool Complete(const std::string& job, int attempt, int rank) const;
  struct Chunk {
    std::string data;
    int64_t next_offset = 0;
    bool eof = false;  // `data` reaches the end of the copy
  };
  // Reads at most `max_bytes` from `offset` (-1: the tail of max_bytes). NotFound when no copy
  // of the rank is kept.
  StatusOr<Chunk> Read(const std::string& job, int attempt, int rank, int64_t offset,
                       int64_t max_bytes) const;

  int64_t total_bytes() const { return total_; }
  int64_t job_bytes(const std::string& job) const;
  const std::filesystem::path& dir() const { return dir_; }

 private:
  // A copy being written is two segments, like the agent's own rotation: the current one
  // (.part) and the one before it (.prev.part). When the current one reaches the rank's share
  // it replaces the one before, which is dropped: no byte is ever rewritten while chunks come,
  // and the two hold at least the last `share` bytes. Commit stitches the tail of the share
  // into the kept file once (copy_file_range: in the kernel, at most share + one chunk).
  struct Writer {
    int ranks = 1;
    int64_t dropped = 0;  // bytes of segments dropped so far
    int64_t prev = 0;     // bytes in .prev.part
    int64_t cur = 0;      // bytes in .part
  };
  struct JobIndex {
    int64_t bytes = 0;
    int64_t last_written = 0;  // an order: larger is more recent
  };
  LogKeeper(std::filesystem::path dir, LogKeepLimits limits)
      : dir_(std::move(dir)), limits_(limits) {}
  std::filesystem::path RankPath(const std::string& job, int attempt, int rank) const;
  int64_t Share(int ranks) const;
  // The copy of that rank being written; FailedPrecondition when none is.
  StatusOr<std::map<std::string, Writer>::iterator> FindWriter(const std::string& job, int attempt,
                                                               int rank);
  void ApplyJobCap(const std::string& job, int newest_attempt);
  void ApplyTotalCap(const std::string& keep_job);
  void Reindex(const std::string& job);
  static std::optional<CopyId> PartCopy(const std::string& job, const std::filesystem::path& part);

  std::filesystem::path dir_;
  LogKeepLimits limits_;
  std::map<std::string, Writer> writers_;  // by RankPath
  std::map<std::string, JobIndex> jobs_;
  std::vector<CopyId> interrupted_;
  int64_t total_ = 0;
  int64_t clock_ = 0;
};

}  // namespace muster::coordinator
