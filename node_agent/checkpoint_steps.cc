#include "node_agent/checkpoint_steps.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/manifest.h"
#include "checkpoint/volume.h"

namespace muster::node_agent {

namespace fs = std::filesystem;

namespace {

// The step directories of `job_dir` that are not incomplete, newest first.
std::vector<int64_t> CommittedLookingSteps(const std::string& job_dir) {
  std::vector<int64_t> steps;
  std::error_code ec;
  for (fs::directory_iterator it(job_dir, ec), end; !ec && it != end; it.increment(ec)) {
    bool incomplete = false;
    auto step = checkpoint::ParseStepDirName(it->path().filename().string(), &incomplete);
    if (step && !incomplete) steps.push_back(*step);
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

}  // namespace

Status StepIsGood(const std::string& job_dir, int64_t step) {
  return GoodStepBytes(job_dir, step).status();
}

StatusOr<uint64_t> GoodStepBytes(const std::string& job_dir, int64_t step) {
  // A step directory reached through a symlink is not this job's.
  struct stat st {};
  std::string step_dir = checkpoint::StepPath(job_dir, step);
  if (::lstat(step_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return NotFoundError("step " + std::to_string(step) + " in " + job_dir + " does not exist");
  }
  // checkpoint/'s own test of a good step: MANIFEST and shard files are opened without
  // following links and without blocking, and only regular files count.
  auto m = checkpoint::CheckStep(checkpoint::LocalVolume(), job_dir, step,
                                 checkpoint::StepCheck::kFiles);
  if (!m.ok()) return m.status();
  return m->TotalBytes();
}

std::vector<int64_t> GoodSteps(const std::string& job_dir, size_t limit) {
  std::vector<int64_t> out;
  for (int64_t step : CommittedLookingSteps(job_dir)) {
    if (!StepIsGood(job_dir, step).ok()) continue;
    out.push_back(step);
    if (limit > 0 && out.size() >= limit) break;
  }
  return out;
}

ResumeChoice ChooseResumeStep(const std::string& job_dir, int64_t requested) {
  ResumeChoice c;
  if (requested < 0) return c;
  Status st = StepIsGood(job_dir, requested);
  if (st.ok()) {
    c.step = requested;
    return c;
  }
  c.problem = st.message();
  auto good = GoodSteps(job_dir, 1);
  if (!good.empty()) c.step = good[0];
  return c;
}

StatusOr<std::vector<int64_t>> PruneSteps(const std::string& job_dir, int keep) {
  std::vector<int64_t> removed;
  if (keep <= 0) return removed;
  if (GoodSteps(job_dir, 1).empty()) return removed;
  // checkpoint::CollectGarbage counts only good steps and never removes the newest one; a
  // step directory that is not good is left alone, and so are incomplete ones (a save or a
  // copy in progress: incomplete_below 0).
  checkpoint::RetentionPolicy policy;
  policy.keep_last = keep;
  policy.keep_every = 0;
  auto report = checkpoint::CollectGarbage(checkpoint::LocalVolume(), job_dir, policy,
                                           /*incomplete_below=*/0);
  if (!report.ok()) return report.status();
  removed = report->removed_committed;
  std::sort(removed.begin(), removed.end());
  return removed;
}

}  // namespace muster::node_agent
