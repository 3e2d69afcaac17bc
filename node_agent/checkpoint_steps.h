#pragma once

// What the agent checks on a job's checkpoint directory before it tells the coordinator about
// a step, and the retention it applies there. The coordinator's catalog records only steps that
// an agent found good on its volume, and an attempt never starts from a step that is not there:
//
//   - a commit line (`MUSTER_CHECKPOINT step=N`) is reported only when step N is good;
//   - a resume step that is not good on the volume where the attempt starts falls back to the
//     newest good step there, or to a fresh start when there is none;
//   - after a commit or a replica, the job's `checkpoint.keep` is applied with the retention
//     rule of checkpoint::CollectGarbage (the Checkpointer's), never removing the newest good
//     step, nor an incomplete directory (a save or a copy in progress).
//
// "Good" is checkpoint::CheckStep's (StepCheck::kFiles), and retention is
// checkpoint::CollectGarbage's, so the agent, the Checkpointer and `muster ckpt gc` agree.
//
// Every function reads the volume through checkpoint::LocalVolume, which follows no symlink and
// opens only regular files, without blocking on a FIFO planted in a job's directory.
// Thread-safe.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::node_agent {

// OK when `step` is a good checkpoint in the job's directory `job_dir` (the one holding LATEST
// and the step-N directories): a step-N directory (not a symlink) whose MANIFEST parses and
// validates and whose shard files are all regular files of the sizes it gives
// (checkpoint::CheckStep). Otherwise NotFound or DataLoss naming what is missing or wrong.
Status StepIsGood(const std::string& job_dir, int64_t step);
// StepIsGood, and the step's size: the sum of its MANIFEST's shard file sizes.
StatusOr<uint64_t> GoodStepBytes(const std::string& job_dir, int64_t step);

// The good steps of `job_dir`, newest first (empty when none, or no such directory).
// At most `limit` of them (0: all).
std::vector<int64_t> GoodSteps(const std::string& job_dir, size_t limit = 0);

// Where an attempt that was told to resume from `requested` (-1: fresh) starts on this volume.
struct ResumeChoice {
  int64_t step = -1;    // -1: fresh
  std::string problem;  // empty: `requested` is good (or fresh was asked); else why it is not
};
ResumeChoice ChooseResumeStep(const std::string& job_dir, int64_t requested);

// Keeps the newest `keep` good steps of `job_dir` (checkpoint::CollectGarbage's rule: only good
// steps count, the newest good step is never removed, a step that is not good is left for a
// human); leaves incomplete directories alone. `keep` <= 0:
// nothing is removed. The steps removed, oldest first.
StatusOr<std::vector<int64_t>> PruneSteps(const std::string& job_dir, int keep);

}  // namespace muster::node_agent
