#pragma once

// Operations on a job's checkpoint directory (the one holding LATEST and the step-N
// directories), used by Checkpointer, `muster ckpt` and the coordinator's catalog. They need no
// running job: every function reads what is on the volume.
//
// Thread-safety: the functions are thread-safe; running gc on a directory that a job is saving
// into removes the save's incomplete directory and fails that save (never a committed one).

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/manifest.h"
#include "checkpoint/volume.h"

namespace muster::checkpoint {

// How closely a step is looked at before it counts as good (restorable).
enum class StepCheck {
  // Its MANIFEST parses and validates (ParseManifest, kComplete), and every shard file the
  // MANIFEST names is a regular file of exactly the size the MANIFEST says.
  kFiles,
  // kFiles, and every block of every shard matches its checksum (reads every byte).
  kChecksums,
};

// The one test of "is this step good", used by listing, LatestCommittedStep (so resume), verify,
// gc and the checkpointer's retention. Returns the step's manifest, or why it is not good:
// NotFound when there is no step-N directory; DataLoss (or the volume's error) naming the step
// and what is wrong with it otherwise.
StatusOr<Manifest> CheckStep(Volume* v, const std::string& dir, int64_t step, StepCheck check);

struct StepInfo {
  int64_t step = 0;
  bool committed = false;  // a good step: passes CheckStep
  std::string path;
  std::string problem;  // why a step directory that is not .tmp is not good
  uint64_t bytes = 0;   // sum of the shard sizes (committed only)
  int world_size = 0;   // committed only
  double age_s = 0;
};

// Every step directory, good or not, sorted by step (incomplete after committed for the same
// step), each checked with `check`. NotFound if `dir` does not exist.
StatusOr<std::vector<StepInfo>> ListSteps(Volume* v, const std::string& dir,
                                          StepCheck check = StepCheck::kFiles);

// Reads and validates the MANIFEST of `step` (at most kMaxManifestBytes, a regular file). With
// `raw`, also returns the bytes it parsed (what Replicate copies). Does not look at the shards.
StatusOr<Manifest> LoadManifest(Volume* v, const std::string& dir, int64_t step,
                                std::string* raw = nullptr);

// The step LATEST names (at most kMaxLatestBytes, a regular file). NotFound without LATEST;
// DataLoss when it does not name a step. A hint only: the scan is the truth.
StatusOr<int64_t> ReadLatest(Volume* v, const std::string& dir);

// The newest good step (CheckStep kFiles). LATEST names the same step unless a crash fell
// between the directory's rename and LATEST's, or the step was damaged since; the scan is the
// truth. NotFound when there is none.
StatusOr<int64_t> LatestCommittedStep(Volume* v, const std::string& dir);

// Reads every byte of every shard of `step` and checks sizes and block checksums. DataLoss
// names the step, the file, the block and the tensors stored in it.
Status VerifyStep(Volume* v, const std::string& dir, int64_t step);

// Reads a shard file and checks it against its manifest entry (size and every block).
Status VerifyShardFile(Volume* v, const std::string& path, const Manifest& m,
                       const ShardEntry& shard, bool drop_cache);

// Checks the blocks of `data`, which holds the shard's bytes [offset, offset + n), offset
// block-aligned. Returns DataLoss naming step, file, block and tensors on a mismatch.
Status CheckBlocks(const Manifest& m, const ShardEntry& shard, uint64_t offset, const char* data,
                   size_t n);

// Points LATEST at `step` (temp + fsync + rename + parent fsync) unless it already names a
// newer good step (CheckStep kFiles).
Status UpdateLatest(Volume* v, const std::string& dir, int64_t step);

// Keep the newest `keep_last` good steps, plus every good step divisible by `keep_every`
// (0: none). keep_last must be >= 1: the newest good step is never removed. Only good steps
// (CheckStep) count; with `verify_checksums` a step counts only if every checksum matches too.
struct RetentionPolicy {
  int keep_last = 3;
  int64_t keep_every = 0;
  bool verify_checksums = false;
};

struct GcReport {
  std::vector<int64_t> removed_committed;
  std::vector<std::string> removed_incomplete;
  std::vector<StepInfo> damaged;  // step-N directories that are not good: left for a human
};

// Applies `policy` and removes incomplete directories (step-N.tmp) whose step is below
// `incomplete_below` (pass INT64_MAX for all). A step directory that is not good (bad MANIFEST,
// missing or short shard, with verify_checksums a bad block) is neither counted nor removed.
// A good directory is first renamed to step-N.tmp, so a crash mid-removal leaves an incomplete
// directory, never a committed one with missing shards.
StatusOr<GcReport> CollectGarbage(Volume* v, const std::string& dir, RetentionPolicy policy,
                                  int64_t incomplete_below);

// Drops the page cache of a step's shard files (benchmarks measure cold reads).
Status DropStepCache(Volume* v, const std::string& dir, int64_t step);

std::string StepPath(const std::string& dir, int64_t step);
std::string TmpStepPath(const std::string& dir, int64_t step);

}  // namespace muster::checkpoint
