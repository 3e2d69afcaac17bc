#include "node_agent/log_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

namespace muster::node_agent {
namespace {

struct Part {
  int fd = -1;
  uint64_t gen = 0;  // PartGeneration; 0 for an absent live part
  int64_t size = 0;
};

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A part's identity: its inode number, mixed with its birth time where the filesystem keeps
// one (ext4, xfs, btrfs, tmpfs), since a deleted part's inode number is soon reused by a new
// file. Never 0 (0 is "no generation yet").
uint64_t PartGeneration(int fd, const struct stat& st) {
  uint64_t g = Mix(static_cast<uint64_t>(st.st_ino));
  struct statx sx;
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_BTIME, &sx) == 0 && (sx.stx_mask & STATX_BTIME)) {
    g ^= Mix(static_cast<uint64_t>(sx.stx_btime.tv_sec) * 1000000000ull + sx.stx_btime.tv_nsec);
  }
  return g == 0 ? 1 : g;
}

class Parts {
 public:
  ~Parts() {
    for (auto& p : parts_) {
      if (p.fd >= 0) ::close(p.fd);
    }
  }
  // Opens PATH, PATH.1, ... in that order; [0] is the live part. A rotation running at the
  // same time (another process's; the agent rotates and reads on one thread) renames from the
  // oldest part down, so it leaves at most one name missing at a time: the scan goes on past
  // one gap and stops at two.
  Status Open(const std::filesystem::path& path) {
    int missing = 0;
    for (int k = 0; k <= kMaxLogParts && missing < 2; ++k) {
      std::string name = k == 0 ? path.string() : path.string() + "." + std::to_string(k);
      int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
      struct stat st;
      if (fd >= 0 && ::fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        return LogFileError(e, "log file " + name);
      }
      if (fd >= 0 && !S_ISREG(st.st_mode)) {
        ::close(fd);
        if (k == 0)
          return FailedPreconditionError("log file " + name + " is not a regular file: not read");
        break;
      }
      if (fd < 0) {
        int e = errno;
        if (k == 0 && e == ELOOP)
          return FailedPreconditionError("log file " + name + " is a symlink: not read");
        // Only a part that is not there is a gap; any other error (permission denied, an I/O
        // error) is the answer, not a missing part.
        if (e != ENOENT && e != ENOTDIR && e != ELOOP) return LogFileError(e, "log file " + name);
        ++missing;
        continue;
      }
      missing = 0;
      parts_.push_back(Part{fd, PartGeneration(fd, st), st.st_size});
      if (k == 0) live_ = true;
    }
    if (parts_.empty()) return NotFoundError("no log file " + path.string());
    if (!live_) {
      // Between a rotation's rename and the new live part's creation: an empty live part.
      parts_.insert(parts_.begin(), Part{-1, 0, 0});
    }
    return Status::Ok();
  }
  const std::vector<Part>& parts() const { return parts_; }

 private:
  std::vector<Part> parts_;
  bool live_ = false;
};

StatusOr<std::string> ReadAt(int fd, int64_t off, int64_t n) {
  if (n <= 0 || fd < 0) return std::string();
  std::string data(static_cast<size_t>(n), '\0');
  int64_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, data.data() + got, static_cast<size_t>(n - got), off + got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return LogFileError(errno, "reading a log file");
    if (r == 0) break;  // truncated under us (a part rotated with keep 0)
    got += r;
  }
  data.resize(static_cast<size_t>(got));
  return data;
}

}  // namespace

Status LogFileError(int err, const std::string& what) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return NotFoundError(what + ": " + std::strerror(err));
    case EINTR:
    case EAGAIN:
    case EMFILE:
    case ENFILE:
    case ENOMEM:
      return UnavailableError(what + ": " + std::strerror(err));
    default:
      // EACCES/EPERM: FailedPrecondition; EIO: DataLoss; the rest Internal.
      return ErrnoStatus(err, what);
  }
}

StatusOr<LogRead> ReadLog(const std::filesystem::path& path, LogCursor cursor, int64_t max_bytes) {
  if (max_bytes <= 0) return InvalidArgumentError("max_bytes must be positive");
  Parts parts;
  MUSTER_RETURN_IF_ERROR(parts.Open(path));
  const auto& p = parts.parts();
  LogRead out;
  size_t k = 0;  // index into p: 0 is the live part
  int64_t off = cursor.offset;
  if (cursor.generation == 0 && off == 0) {
    k = p.size() - 1;  // from the beginning: the oldest part still kept
  } else if (cursor.generation == 0) {
    off = off < 0 ? std::max<int64_t>(0, p[0].size - max_bytes) : off > p[0].size ? 0 : off;
  } else {
    auto it =
        std::find_if(p.begin(), p.end(), [&](const Part& x) { return x.gen == cursor.generation; });
    if (it == p.end()) {
      // Its part was dropped: go on from the oldest part still kept.
      k = p.size() - 1;
      off = 0;
      out.skipped = true;
    } else {
      k = static_cast<size_t>(it - p.begin());
      if (off < 0) off = 0;
      if (off > p[k].size) {  // truncated in place (rotation that keeps no part)
        off = 0;
        out.skipped = true;
      }
    }
  }
  // A rotated part read to its end hands over to the next newer part, unless that is the
  // live part caught between a rotation's rename and its creation: the cursor then stays at
  // the end of the rotated part, which keeps its identity.
  auto can_advance = [&](size_t at, int64_t pos) {
    return at > 0 && pos >= p[at].size && p[at - 1].gen != 0;
  };
  while (can_advance(k, off)) {
    --k;
    off = 0;
  }
  int64_t n = std::min(max_bytes, p[k].size - off);
  MUSTER_ASSIGN_OR_RETURN(out.data, ReadAt(p[k].fd, off, n));
  off += static_cast<int64_t>(out.data.size());
  if (can_advance(k, off)) {
    --k;
    off = 0;
  }
  out.next = LogCursor{p[k].gen, off};
  out.at_live_end = off >= p[k].size && (k == 0 || (k == 1 && p[0].gen == 0));
  return out;
}

}  // namespace muster::node_agent
