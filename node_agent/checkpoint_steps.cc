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

// A MANIFEST is JSON with one checksum per MiB of shard: 64 MiB describes petabytes.
constexpr off_t kMaxManifestBytes = 64 << 20;

// Reads a regular file that is no larger than `max`, never following a symlink and never
// blocking on a FIFO or device.
StatusOr<std::string> ReadRegularFile(const std::string& path, off_t max) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return ErrnoStatus(errno, path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return ErrnoStatus(e, path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return DataLossError(path + " is not a regular file");
  }
  if (st.st_size > max) {
    ::close(fd);
    return DataLossError(path + " is " + std::to_string(st.st_size) + " bytes, over the " +
                         std::to_string(max) + " a MANIFEST may have");
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(got);
  return out;
}

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
  const std::string name = "step " + std::to_string(step) + " in " + job_dir;
  std::string step_dir = checkpoint::StepPath(job_dir, step);
  struct stat st {};
  if (::lstat(step_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return NotFoundError(name + " does not exist");
  }
  auto bytes = ReadRegularFile(checkpoint::JoinPath(step_dir, "MANIFEST"), kMaxManifestBytes);
  if (!bytes.ok()) return bytes.status().WithContext(name);
  auto m = checkpoint::ParseManifest(*bytes);
  if (!m.ok()) return m.status().WithContext(name + ": MANIFEST");
  if (m->step != step) {
    return DataLossError(name + ": its MANIFEST says step " + std::to_string(m->step));
  }
  for (const auto& shard : m->shards) {
    if (shard.file.empty() || shard.file.find('/') != std::string::npos || shard.file == "." ||
        shard.file == "..") {
      return DataLossError(name + ": MANIFEST names shard file '" + shard.file +
                           "' outside the step directory");
    }
    std::string path = checkpoint::JoinPath(step_dir, shard.file);
    if (::lstat(path.c_str(), &st) != 0)
      return DataLossError(name + ": " + shard.file + " is missing");
    if (!S_ISREG(st.st_mode))
      return DataLossError(name + ": " + shard.file + " is not a regular file");
    if (static_cast<uint64_t>(st.st_size) != shard.size) {
      return DataLossError(name + ": " + shard.file + " has " + std::to_string(st.st_size) +
                           " bytes, the MANIFEST says " + std::to_string(shard.size));
    }
  }
  return Status::Ok();
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
  // Keep the newest `keep` good steps (the Checkpointer's keep_last rule, counting only good
  // steps); what is older goes. Nothing goes until `keep` good steps exist, so the newest good
  // step is never removed, whatever newer broken directories there are.
  auto kept = GoodSteps(job_dir, static_cast<size_t>(keep));
  if (kept.size() < static_cast<size_t>(keep)) return removed;
  int64_t oldest_kept = kept.back();
  Status first_error = Status::Ok();
  for (int64_t step : CommittedLookingSteps(job_dir)) {
    if (step >= oldest_kept) continue;
    // Renamed first, as checkpoint::CollectGarbage does: a crash mid-removal leaves an
    // incomplete directory, never a committed one with missing shards.
    std::string from = checkpoint::StepPath(job_dir, step);
    std::string to = checkpoint::TmpStepPath(job_dir, step);
    std::error_code ec;
    fs::rename(from, to, ec);
    if (!ec) fs::remove_all(to, ec);
    if (ec) {
      if (first_error.ok()) first_error = ErrnoStatus(ec.value(), "removing " + from);
      continue;
    }
    removed.push_back(step);
  }
  std::sort(removed.begin(), removed.end());
  if (removed.empty() && !first_error.ok()) return first_error;
  return removed;
}

}  // namespace muster::node_agent
