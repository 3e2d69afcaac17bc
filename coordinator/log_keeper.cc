#include "coordinator/log_keeper.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <vector>

#include "common/logging.h"
#include "common/path_name.h"

namespace muster::coordinator {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPart = ".part";
constexpr const char* kTmp = ".tmp";
constexpr const char* kPrevPart = ".prev.part";

std::string DroppedLine(int64_t n, std::string_view why = "") {
  return fmt::format("[muster: {} bytes dropped{}]\n", n, why);
}

bool IsRankLog(const fs::path& p) {
  std::string name = p.filename().string();
  return name.rfind("rank-", 0) == 0 && p.extension() == ".log";
}

// Writes `data` to `path` through a temporary file and a rename (never half a file there).
Status WriteWhole(const fs::path& path, std::string_view data) {
  fs::path tmp = path;
  tmp += kTmp;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) return InternalError("cannot write " + tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return InternalError(fmt::format("cannot rename {}: {}", tmp.string(), ec.message()));
  return Status::Ok();
}

// Appends `len` bytes of `in` from `off` to `out`: copy_file_range (in the kernel), else
// read and write.
Status CopyRange(int in, int64_t off, int64_t len, int out, const fs::path& what) {
  while (len > 0) {
    loff_t o = off;
    ssize_t n = copy_file_range(in, &o, out, nullptr, static_cast<size_t>(len), 0);
    if (n < 0 && (errno == ENOSYS || errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP)) {
      char buf[64 << 10];
      n = pread(in, buf, static_cast<size_t>(std::min<int64_t>(len, sizeof(buf))), off);
      if (n > 0 && write(out, buf, static_cast<size_t>(n)) != n) n = -1;
    }
    if (n < 0)
      return InternalError(fmt::format("cannot copy {}: {}", what.string(), strerror(errno)));
    if (n == 0) return InternalError("cannot copy " + what.string() + ": shorter than expected");
    off += n;
    len -= n;
  }
  return Status::Ok();
}

Status WriteAll(int fd, std::string_view data, const fs::path& what) {
  while (!data.empty()) {
    ssize_t n = write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      return InternalError(fmt::format("cannot write {}: {}", what.string(), strerror(errno)));
    data.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

int64_t FileSize(const fs::path& p) {
  std::error_code ec;
  auto n = fs::file_size(p, ec);
  return ec ? 0 : static_cast<int64_t>(n);
}

}  // namespace

// `<job>/<attempt>/rank-<r>.log.part` or `.log.prev.part`: the copy it belongs to; nullopt for
// any other name (not ours).
std::optional<LogKeeper::CopyId> LogKeeper::PartCopy(const std::string& job, const fs::path& part) {
  std::string name = part.filename().string();
  for (std::string_view suffix : {std::string_view(kPrevPart), std::string_view(kPart)}) {
    if (name.size() > suffix.size() && name.ends_with(suffix)) {
      name.resize(name.size() - suffix.size());
      break;
    }
  }
  auto number = [](std::string_view s) -> std::optional<int> {
    if (s.empty() || s.size() > 7 ||
        !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return std::nullopt;
    return std::stoi(std::string(s));
  };
  if (!name.starts_with("rank-") || !name.ends_with(".log")) return std::nullopt;
  auto rank = number(std::string_view(name).substr(5, name.size() - 9));
  auto attempt = number(part.parent_path().filename().string());
  if (!rank || !attempt || part.parent_path().parent_path().filename() != job) return std::nullopt;
  if (!Validate(job, *attempt, *rank).ok()) return std::nullopt;
  return CopyId{job, *attempt, *rank};
}

Status LogKeeper::Validate(std::string_view job, int attempt, int rank) {
  MUSTER_RETURN_IF_ERROR(ValidatePathName(job, "job id"));
  if (attempt < 1 || attempt > kMaxAttempt) {
    return InvalidArgumentError(
        fmt::format("attempt {} is out of range 1..{}", attempt, kMaxAttempt));
  }
  if (rank < 0 || rank > kMaxRank) {
    return InvalidArgumentError(fmt::format("rank {} is out of range 0..{}", rank, kMaxRank));
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<LogKeeper>> LogKeeper::Open(const fs::path& dir, LogKeepLimits limits) {
  if (limits.job_bytes <= 0 || limits.total_bytes <= 0) {
    return InvalidArgumentError("kept logs: the per-job and total caps must be positive");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return InternalError(fmt::format("cannot create {}: {}", dir.string(), ec.message()));
  std::unique_ptr<LogKeeper> k(new LogKeeper(dir, limits));
  // Index what a previous coordinator kept; a copy it was writing when it stopped is dropped.
  std::vector<std::pair<fs::file_time_type, std::string>> order;
  std::set<CopyId> interrupted;
  for (const auto& j : fs::directory_iterator(dir, ec)) {
    std::string job = j.path().filename().string();
    if (!j.is_directory() || !ValidatePathName(job, "job id").ok()) continue;
    fs::file_time_type newest{};
    for (const auto& f : fs::recursive_directory_iterator(j.path(), ec)) {
      if (!f.is_regular_file()) continue;
      std::string ext = f.path().extension().string();
      if (ext == kPart || ext == kTmp) {
        // An interrupted copy's part files stay until the coordinator has asked for the copy
        // again (Begin starts them afresh) or given it up (Discard): a start that fails before
        // then finds them again next time.
        if (ext == kPart) {
          if (auto id = PartCopy(job, f.path())) {
            interrupted.insert(*id);
            continue;
          }
        }
        fs::remove(f.path(), ec);
        continue;
      }
      newest = std::max(newest, f.last_write_time(ec));
    }
    order.emplace_back(newest, job);
  }
  for (const auto& id : interrupted) {
    if (k->Has(id.job, id.attempt, id.rank)) {
      k->Discard(id);  // kept whole before the stop: the part files are leftovers
    } else {
      k->interrupted_.push_back(id);
    }
  }
  std::sort(order.begin(), order.end());
  for (const auto& [t, job] : order) {
    k->Reindex(job);
    k->jobs_[job].last_written = ++k->clock_;
  }
  k->ApplyTotalCap("");
  return k;
}

void LogKeeper::Discard(const CopyId& id) {
  if (!Validate(id.job, id.attempt, id.rank).ok()) return;
  fs::path part = RankPath(id.job, id.attempt, id.rank), prev = part;
  part += kPart;
  prev += kPrevPart;
  std::error_code ec;
  fs::remove(part, ec);
  fs::remove(prev, ec);
}

fs::path LogKeeper::RankPath(const std::string& job, int attempt, int rank) const {
  return dir_ / job / std::to_string(attempt) / fmt::format("rank-{}.log", rank);
}

int64_t LogKeeper::Share(int ranks) const {
  return std::max<int64_t>(1, limits_.job_bytes / std::max(1, ranks));
}

int64_t LogKeeper::job_bytes(const std::string& job) const {
  auto it = jobs_.find(job);
  return it == jobs_.end() ? 0 : it->second.bytes;
}

void LogKeeper::Reindex(const std::string& job) {
  int64_t bytes = 0;
  std::error_code ec;
  for (const auto& f : fs::recursive_directory_iterator(dir_ / job, ec)) {
    if (f.is_regular_file() && IsRankLog(f.path())) bytes += FileSize(f.path());
  }
  auto& idx = jobs_[job];
  total_ += bytes - idx.bytes;
  idx.bytes = bytes;
}

Status LogKeeper::Begin(const std::string& job, int attempt, int rank, int ranks) {
  MUSTER_RETURN_IF_ERROR(Validate(job, attempt, rank));
  fs::path p = RankPath(job, attempt, rank);
  std::error_code ec;
  fs::create_directories(p.parent_path(), ec);
  if (ec)
    return InternalError(
        fmt::format("cannot create {}: {}", p.parent_path().string(), ec.message()));
  fs::path part = p, prev = p;
  part += kPart;
  prev += kPrevPart;
  fs::remove(prev, ec);
  MUSTER_RETURN_IF_ERROR(WriteWhole(part, ""));
  writers_[p.string()] = Writer{std::max(1, ranks), 0, 0, 0};
  return Status::Ok();
}

void LogKeeper::Abandon(const std::string& job, int attempt, int rank) {
  if (!Validate(job, attempt, rank).ok()) return;
  fs::path p = RankPath(job, attempt, rank);
  if (writers_.erase(p.string()) == 0) return;
  fs::path part = p, prev = p;
  part += kPart;
  prev += kPrevPart;
  std::error_code ec;
  fs::remove(part, ec);
  fs::remove(prev, ec);
  // Directories left empty go too (a job none of whose ranks left a log).
  fs::remove(p.parent_path(), ec);
  fs::remove(p.parent_path().parent_path(), ec);
}

bool LogKeeper::Writing(const std::string& job, int attempt, int rank) const {
  if (!Validate(job, attempt, rank).ok()) return false;
  return writers_.count(RankPath(job, attempt, rank).string()) > 0;
}

StatusOr<std::map<std::string, LogKeeper::Writer>::iterator> LogKeeper::FindWriter(
    const std::string& job, int attempt, int rank) {
  auto it = writers_.find(RankPath(job, attempt, rank).string());
  if (it == writers_.end()) {
    return FailedPreconditionError(
        fmt::format("no copy of rank {} of {} attempt {} is being written", rank, job, attempt));
  }
  return it;
}

Status LogKeeper::Append(const std::string& job, int attempt, int rank, std::string_view data) {
  MUSTER_RETURN_IF_ERROR(Validate(job, attempt, rank));
  fs::path p = RankPath(job, attempt, rank);
  MUSTER_ASSIGN_OR_RETURN(auto it, FindWriter(job, attempt, rank));
  Writer& w = it->second;
  fs::path part = p, prev = p;
  part += kPart;
  prev += kPrevPart;
  {
    std::ofstream out(part, std::ios::binary | std::ios::app);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) return InternalError("cannot write " + part.string());
  }
  w.cur += static_cast<int64_t>(data.size());
  if (w.cur >= Share(w.ranks)) {
    // The current segment holds a whole share: the one before it is not needed any more.
    std::error_code ec;
    fs::rename(part, prev, ec);
    if (ec) return InternalError(fmt::format("cannot rename {}: {}", part.string(), ec.message()));
    w.dropped += w.prev;
    w.prev = w.cur;
    w.cur = 0;
  }
  return Status::Ok();
}

Status LogKeeper::Commit(const std::string& job, int attempt, int rank, const std::string& note) {
  MUSTER_RETURN_IF_ERROR(Validate(job, attempt, rank));
  fs::path p = RankPath(job, attempt, rank);
  MUSTER_ASSIGN_OR_RETURN(auto it, FindWriter(job, attempt, rank));
  Writer w = it->second;
  writers_.erase(it);
  fs::path part = p, prev = p, tmp = p;
  part += kPart;
  prev += kPrevPart;
  tmp += kTmp;
  // The tail of the share: all of the current segment, the end of the one before.
  int64_t keep = std::min(w.prev + w.cur, Share(w.ranks));
  int64_t skip = w.prev + w.cur - keep;  // < w.prev: the current segment is under a share
  int64_t dropped = w.dropped + skip;
  Status st = [&]() -> Status {
    int out = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0)
      return InternalError(fmt::format("cannot create {}: {}", tmp.string(), strerror(errno)));
    auto copy = [&]() -> Status {
      if (dropped > 0) MUSTER_RETURN_IF_ERROR(WriteAll(out, DroppedLine(dropped), tmp));
      for (const auto& [seg, off, len] :
           {std::tuple{prev, skip, w.prev - skip}, std::tuple{part, int64_t{0}, w.cur}}) {
        if (len <= 0) continue;
        int in = open(seg.c_str(), O_RDONLY | O_CLOEXEC);
        if (in < 0)
          return InternalError(fmt::format("cannot read {}: {}", seg.string(), strerror(errno)));
        Status c = CopyRange(in, off, len, out, seg);
        close(in);
        MUSTER_RETURN_IF_ERROR(c);
      }
      if (!note.empty()) {
        std::string line = "[muster: " + note + "]\n";
        if (w.cur + w.prev > 0 || dropped > 0) {
          // A note starts a line of its own.
          char last = '\n';
          const fs::path& seg = w.cur > 0 ? part : prev;
          int64_t at = (w.cur > 0 ? w.cur : w.prev) - 1;
          int in = at >= 0 ? open(seg.c_str(), O_RDONLY | O_CLOEXEC) : -1;
          if (in >= 0) {
            if (pread(in, &last, 1, at) != 1) last = '\n';
            close(in);
          }
          if (last != '\n') line.insert(line.begin(), '\n');
        }
        MUSTER_RETURN_IF_ERROR(WriteAll(out, line, tmp));
      }
      return Status::Ok();
    }();
    if (close(out) != 0 && copy.ok()) copy = InternalError("cannot write " + tmp.string());
    return copy;
  }();
  std::error_code ec;
  if (st.ok()) {
    fs::rename(tmp, p, ec);
    if (ec) st = InternalError(fmt::format("cannot rename {}: {}", tmp.string(), ec.message()));
  }
  fs::remove(part, ec);
  fs::remove(prev, ec);
  fs::remove(tmp, ec);
  MUSTER_RETURN_IF_ERROR(st);
  fs::path incomplete = p;
  incomplete.replace_extension(".incomplete");
  if (note.empty()) {
    fs::remove(incomplete, ec);
  } else {
    MUSTER_RETURN_IF_ERROR(WriteWhole(incomplete, ""));
  }
  Reindex(job);
  jobs_[job].last_written = ++clock_;
  ApplyJobCap(job, attempt);
  ApplyTotalCap(job);
  return Status::Ok();
}

void LogKeeper::ApplyJobCap(const std::string& job, int newest_attempt) {
  if (job_bytes(job) <= limits_.job_bytes) return;
  std::vector<int> attempts;
  std::error_code ec;
  for (const auto& a : fs::directory_iterator(dir_ / job, ec)) {
    std::string name = a.path().filename().string();
    if (!a.is_directory() || name.empty() || name.size() > 7 ||
        !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    int n = std::stoi(name);
    if (n < newest_attempt) attempts.push_back(n);
  }
  std::sort(attempts.begin(), attempts.end());
  for (int a : attempts) {
    for (const auto& f : fs::directory_iterator(dir_ / job / std::to_string(a), ec)) {
      if (!f.is_regular_file() || !IsRankLog(f.path())) continue;
      int64_t size = FileSize(f.path());
      std::string line =
          DroppedLine(size, ": the job's kept logs were over their cap, newer attempts kept");
      if (size <= static_cast<int64_t>(line.size())) continue;
      if (!WriteWhole(f.path(), line).ok()) continue;
    }
    Reindex(job);
    if (job_bytes(job) <= limits_.job_bytes) return;
  }
}

void LogKeeper::ApplyTotalCap(const std::string& keep_job) {
  while (total_ > limits_.total_bytes) {
    const std::string* oldest = nullptr;
    int64_t when = 0;
    for (const auto& [job, idx] : jobs_) {
      if (job == keep_job) continue;
      bool writing = false;
      std::string prefix = (dir_ / job).string() + "/";
      for (const auto& [path, w] : writers_) writing |= path.rfind(prefix, 0) == 0;
      if (writing) continue;
      if (oldest == nullptr || idx.last_written < when) {
        oldest = &job;
        when = idx.last_written;
      }
    }
    if (oldest == nullptr) return;
    std::string job = *oldest;
    std::error_code ec;
    fs::remove_all(dir_ / job, ec);
    log::Get("coord")->info("kept logs: evicted job {} ({} bytes; all kept logs over {} bytes)",
                            job, jobs_[job].bytes, limits_.total_bytes);
    total_ -= jobs_[job].bytes;
    jobs_.erase(job);
  }
}

bool LogKeeper::Has(const std::string& job, int attempt, int rank) const {
  if (!Validate(job, attempt, rank).ok()) return false;
  std::error_code ec;
  return fs::is_regular_file(RankPath(job, attempt, rank), ec);
}

bool LogKeeper::Complete(const std::string& job, int attempt, int rank) const {
  if (!Has(job, attempt, rank)) return false;
  fs::path incomplete = RankPath(job, attempt, rank);
  incomplete.replace_extension(".incomplete");
  std::error_code ec;
  return !fs::exists(incomplete, ec);
}

StatusOr<LogKeeper::Chunk> LogKeeper::Read(const std::string& job, int attempt, int rank,
                                           int64_t offset, int64_t max_bytes) const {
  MUSTER_RETURN_IF_ERROR(Validate(job, attempt, rank));
  fs::path p = RankPath(job, attempt, rank);
  std::ifstream in(p, std::ios::binary | std::ios::ate);
  if (!in) {
    return NotFoundError(
        fmt::format("no kept log of rank {} of {} attempt {}", rank, job, attempt));
  }
  int64_t size = in.tellg();
  max_bytes = std::max<int64_t>(1, max_bytes);
  int64_t start = offset < 0 ? std::max<int64_t>(0, size - max_bytes) : offset;
  if (start > size) start = 0;  // a cursor past the end (the copy was cut since): start over
  Chunk c;
  c.data.resize(static_cast<size_t>(std::min(max_bytes, size - start)));
  in.seekg(start);
  in.read(c.data.data(), static_cast<std::streamsize>(c.data.size()));
  if (!in) return InternalError("cannot read " + p.string());
  c.next_offset = start + static_cast<int64_t>(c.data.size());
  c.eof = c.next_offset >= size;
  return c;
}

}  // namespace muster::coordinator
