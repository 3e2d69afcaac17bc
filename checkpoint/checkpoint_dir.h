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

struct StepInfo {
  int64_t step = 0;
  bool committed = false;  // has a MANIFEST that parses and checks
  std::string path;
  std::string problem;  // why a step that looks committed is not usable (bad MANIFEST)
  uint64_t bytes = 0;   // sum of the shard sizes (committed only)
  int world_size = 0;   // committed only
  double age_s = 0;
};

// Every step directory, committed or not, sorted by step (incomplete after committed for the
// same step). NotFound if `dir` does not exist.
StatusOr<std::vector<StepInfo>> ListSteps(Volume* v, const std::string& dir);

StatusOr<Manifest> LoadManifest(Volume* v, const std::string& dir, int64_t step);

// The newest step whose directory is committed (has a valid MANIFEST). LATEST names the same
// step unless a crash fell between the directory's rename and LATEST's; the scan is the truth.
// NotFound when there is none.
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
// newer committed step.
Status UpdateLatest(Volume* v, const std::string& dir, int64_t step);

// Keep the newest `keep_last` committed steps, plus every step divisible by `keep_every`
// (0: none). keep_last must be >= 1: the newest committed step is never removed.
struct RetentionPolicy {
  int keep_last = 3;
  int64_t keep_every = 0;
};

struct GcReport {
  std::vector<int64_t> removed_committed;
  std::vector<std::string> removed_incomplete;
};

// Applies `policy` and removes incomplete directories (step-N.tmp) whose step is below
// `incomplete_below` (pass INT64_MAX for all). A committed directory is first renamed to
// step-N.tmp, so a crash mid-removal leaves an incomplete directory, never a committed one
// with missing shards.
StatusOr<GcReport> CollectGarbage(Volume* v, const std::string& dir, RetentionPolicy policy,
                                  int64_t incomplete_below);

// Drops the page cache of a step's shard files (benchmarks measure cold reads).
Status DropStepCache(Volume* v, const std::string& dir, int64_t step);

std::string StepPath(const std::string& dir, int64_t step);
std::string TmpStepPath(const std::string& dir, int64_t step);

}  // namespace muster::checkpoint
