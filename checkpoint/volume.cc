#include "checkpoint/volume.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <system_error>

namespace muster::checkpoint {

Status WritableFile::Write(uint64_t offset, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    MUSTER_ASSIGN_OR_RETURN(size_t w, WriteAt(offset, p, n));
    if (w == 0) return InternalError("write made no progress at offset " + std::to_string(offset));
    if (w > n) return InternalError("write reported more bytes than asked");
    p += w;
    offset += w;
    n -= w;
  }
  return Status::Ok();
}

Status ReadableFile::Read(uint64_t offset, void* dst, size_t n) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    MUSTER_ASSIGN_OR_RETURN(size_t r, ReadAt(offset, p, n));
    if (r == 0) {
      return DataLossError("file ends before offset " + std::to_string(offset + n));
    }
    p += r;
    offset += r;
    n -= r;
  }
  return Status::Ok();
}

namespace {

class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(std::string path, int fd, bool direct)
      : path_(std::move(path)), fd_(fd), direct_(direct) {}
  ~PosixWritableFile() override {
    if (fd_ >= 0) ::close(fd_);
  }

  StatusOr<size_t> WriteAt(uint64_t offset, const void* data, size_t n) override {
    for (;;) {
      ssize_t w = ::pwrite(fd_, data, n, static_cast<off_t>(offset));
      if (w >= 0) return static_cast<size_t>(w);
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "write " + path_);
    }
  }
  Status Sync() override {
    if (::fdatasync(fd_) != 0) return ErrnoStatus(errno, "fsync " + path_);
    return Status::Ok();
  }
  Status Truncate(uint64_t size) override {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
      return ErrnoStatus(errno, "truncate " + path_);
    }
    return Status::Ok();
  }
  Status Close() override {
    int fd = fd_;
    fd_ = -1;
    if (fd >= 0 && ::close(fd) != 0) return ErrnoStatus(errno, "close " + path_);
    return Status::Ok();
  }
  bool direct() const override { return direct_; }

 private:
  std::string path_;
  int fd_;
  bool direct_;
};

class PosixReadableFile final : public ReadableFile {
 public:
  PosixReadableFile(std::string path, int fd, bool direct)
      : path_(std::move(path)), fd_(fd), direct_(direct) {}
  bool direct() const override { return direct_; }
  ~PosixReadableFile() override { ::close(fd_); }

  StatusOr<size_t> ReadAt(uint64_t offset, void* dst, size_t n) override {
    for (;;) {
      ssize_t r = ::pread(fd_, dst, n, static_cast<off_t>(offset));
      if (r >= 0) return static_cast<size_t>(r);
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "read " + path_);
    }
  }
  StatusOr<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return ErrnoStatus(errno, "stat " + path_);
    return static_cast<uint64_t>(st.st_size);
  }
  void DropCache() override { ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); }

 private:
  std::string path_;
  int fd_;
  bool direct_;
};

std::string FileKind(mode_t m) {
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISDIR(m)) return "a directory";
  if (S_ISCHR(m) || S_ISBLK(m)) return "a device";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISLNK(m)) return "a symbolic link";
  return "not a plain file";
}

Status OpenError(int err, const std::string& path) {
  if (err == ELOOP) {
    return FailedPreconditionError(path +
                                   " is a symbolic link; checkpoint files are read only "
                                   "as regular files");
  }
  return ErrnoStatus(err, "open " + path);
}

class PosixVolume final : public Volume {
 public:
  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                          bool direct) override {
    // O_NOFOLLOW: a link planted where a checkpoint file goes is never written through.
    int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW;
    int fd = -1;
    bool got_direct = false;
    if (direct) {
      fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
      got_direct = fd >= 0;
      if (fd < 0 && errno != EINVAL) return OpenError(errno, path);
    }
    if (fd < 0) fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) return OpenError(errno, path);
    return std::unique_ptr<WritableFile>(new PosixWritableFile(path, fd, got_direct));
  }

  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path,
                                                          bool direct) override {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: a checkpoint's files
    // are never links. Only a regular file is returned (then reads never block).
    const int flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW;
    int fd = -1;
    bool got_direct = false;
    if (direct) {
      fd = ::open(path.c_str(), flags | O_DIRECT);
      got_direct = fd >= 0;
      if (fd < 0 && errno != EINVAL) return OpenError(errno, path);
    }
    if (fd < 0) fd = ::open(path.c_str(), flags);
    if (fd < 0) return OpenError(errno, path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      Status s = ErrnoStatus(errno, "stat " + path);
      ::close(fd);
      return s;
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return FailedPreconditionError(path + " is not a regular file (" + FileKind(st.st_mode) +
                                     ")");
    }
    int fl = ::fcntl(fd, F_GETFL);
    if (fl >= 0) ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return std::unique_ptr<ReadableFile>(new PosixReadableFile(path, fd, got_direct));
  }

  Status CreateDirs(const std::string& path) override {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) return ErrnoStatus(ec.value(), "mkdir " + path);
    return Status::Ok();
  }

  Status SyncDir(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return ErrnoStatus(errno, "open dir " + path);
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0) return ErrnoStatus(err, "fsync dir " + path);
    return Status::Ok();
  }

  Status Rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      return ErrnoStatus(errno, "rename " + from + " -> " + to);
    }
    return Status::Ok();
  }

  StatusOr<std::vector<std::string>> ListDir(const std::string& path) override {
    DIR* d = ::opendir(path.c_str());
    if (!d) return ErrnoStatus(errno, "list " + path);
    std::vector<std::string> out;
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") out.push_back(std::move(n));
    }
    ::closedir(d);
    return out;
  }

  bool Exists(const std::string& path) override {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
  }

  bool IsLink(const std::string& path) override {
    struct stat st;
    return ::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
  }

  StatusOr<uint64_t> FileSize(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, "stat " + path);
    return static_cast<uint64_t>(st.st_size);
  }

  StatusOr<std::optional<uint64_t>> AvailableBytes(const std::string& path) override {
    std::filesystem::path p(path.empty() ? "." : path);
    struct statvfs vs;
    while (::statvfs(p.c_str(), &vs) != 0) {
      if (errno != ENOENT || !p.has_relative_path()) return ErrnoStatus(errno, "statvfs " + path);
      p = p.has_parent_path() && p.parent_path() != p ? p.parent_path()
                                                      : std::filesystem::path(".");
    }
    return std::optional<uint64_t>(static_cast<uint64_t>(vs.f_bavail) * vs.f_frsize);
  }

  StatusOr<double> AgeSeconds(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, "stat " + path);
    struct timespec now;
    ::clock_gettime(CLOCK_REALTIME, &now);
    return (now.tv_sec - st.st_mtim.tv_sec) + (now.tv_nsec - st.st_mtim.tv_nsec) / 1e9;
  }

  Status DeleteFile(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) return ErrnoStatus(errno, "unlink " + path);
    return Status::Ok();
  }

  Status RemoveAll(const std::string& path) override {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) return ErrnoStatus(ec.value(), "remove " + path);
    return Status::Ok();
  }
};

}  // namespace

Volume* LocalVolume() {
  static Volume* v = new PosixVolume();
  return v;
}

StatusOr<std::string> ReadFileToString(Volume* v, const std::string& path, uint64_t max_bytes) {
  MUSTER_ASSIGN_OR_RETURN(auto f, v->NewReadableFile(path, /*direct=*/false));
  MUSTER_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  if (size > max_bytes) {
    return InvalidArgumentError(path + " is " + std::to_string(size) +
                                " bytes, more than the limit of " + std::to_string(max_bytes) +
                                " for this file");
  }
  std::string out(size, '\0');
  MUSTER_RETURN_IF_ERROR(f->Read(0, out.data(), size));
  return out;
}

Status WriteFileAtomic(Volume* v, const std::string& path, const std::string& contents) {
  std::string tmp = path + ".tmp";
  {
    // A leftover (or planted) temp file or link goes first: the new one is created afresh.
    v->DeleteFile(tmp).IgnoreError();
    MUSTER_ASSIGN_OR_RETURN(auto f, v->NewWritableFile(tmp, /*direct=*/false));
    MUSTER_RETURN_IF_ERROR(f->Write(0, contents.data(), contents.size()));
    MUSTER_RETURN_IF_ERROR(f->Sync());
    MUSTER_RETURN_IF_ERROR(f->Close());
  }
  MUSTER_RETURN_IF_ERROR(v->Rename(tmp, path));
  return v->SyncDir(ParentDir(path));
}

std::string JoinPath(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}

std::string ParentDir(const std::string& path) {
  auto p = std::filesystem::path(path).parent_path().string();
  return p.empty() ? "." : p;
}

}  // namespace muster::checkpoint
