#pragma once

// Volume: the narrow storage seam every checkpoint byte goes through (LevelDB's Env is the
// model). LocalVolume is a POSIX file system; VolumeWrapper forwards every call to another Volume
// so a decorator overrides only what it changes; FaultInjectionVolume (fault_injection_volume.h)
// is one: it tears, shortens or fails writes and drops unsynced data in tests.
//
// Paths are plain strings; a Volume does not interpret them beyond handing them to the OS.
//
// Thread-safety: a Volume is thread-safe. A WritableFile or ReadableFile may be used from
// several threads at once for positioned I/O at disjoint offsets (pwrite/pread semantics).

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::checkpoint {

// I/O on O_DIRECT files must use buffers, offsets and lengths aligned to this.
inline constexpr size_t kDirectIoAlignment = 4096;

class WritableFile {
 public:
  virtual ~WritableFile() = default;

  // Writes up to `n` bytes at `offset`; returns how many were written (possibly fewer, like
  // pwrite). Callers loop; Write() below does so.
  virtual StatusOr<size_t> WriteAt(uint64_t offset, const void* data, size_t n) = 0;

  // Makes every byte written so far durable (fsync). After a failed Sync nothing written to
  // this file can be trusted.
  virtual Status Sync() = 0;

  // Sets the file's length.
  virtual Status Truncate(uint64_t size) = 0;

  virtual Status Close() = 0;

  // True if the file was opened with O_DIRECT (aligned I/O only).
  virtual bool direct() const = 0;

  // Writes all `n` bytes at `offset`, looping over short writes; a write that makes no
  // progress is an error.
  Status Write(uint64_t offset, const void* data, size_t n);
};

class ReadableFile {
 public:
  virtual ~ReadableFile() = default;

  // Reads up to `n` bytes at `offset` into `dst`; returns how many were read (0 at EOF).
  virtual StatusOr<size_t> ReadAt(uint64_t offset, void* dst, size_t n) = 0;

  virtual StatusOr<uint64_t> Size() = 0;

  // Hints that the file's cached pages may be dropped (benchmarks measure cold reads).
  virtual void DropCache() {}

  // True if the file was opened with O_DIRECT (aligned buffers, offsets and lengths only).
  virtual bool direct() const { return false; }

  // Reads exactly `n` bytes at `offset`; a short file is DataLoss.
  Status Read(uint64_t offset, void* dst, size_t n);
};

class Volume {
 public:
  virtual ~Volume() = default;

  // Creates (truncating) a file for writing. With `direct`, asks for O_DIRECT and falls back to
  // buffered I/O where the file system refuses it (see WritableFile::direct()).
  virtual StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                                  bool direct) = 0;
  // Opens a file for reading. With `direct`, asks for O_DIRECT (aligned reads only) and falls
  // back to buffered I/O where the file system refuses it (see ReadableFile::direct()).
  // Implementations open only regular files and never block on opening: LocalVolume refuses a
  // FIFO, device, directory or a symbolic link in the last component (FailedPrecondition).
  virtual StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path,
                                                                  bool direct) = 0;

  // Creates `path` and any missing parents; an existing directory is fine.
  virtual Status CreateDirs(const std::string& path) = 0;
  // fsyncs the directory itself (makes renames and creations in it durable).
  virtual Status SyncDir(const std::string& path) = 0;
  // Atomically renames a file or directory (rename(2)); the target must not be a non-empty dir.
  virtual Status Rename(const std::string& from, const std::string& to) = 0;
  // Names of the entries of a directory (no "." or ".."), unsorted.
  virtual StatusOr<std::vector<std::string>> ListDir(const std::string& path) = 0;
  virtual bool Exists(const std::string& path) = 0;
  // True if `path` itself is a symbolic link (not followed). Volumes without links say false.
  virtual bool IsLink(const std::string& path) { return false; }
  virtual StatusOr<uint64_t> FileSize(const std::string& path) = 0;
  // Seconds since the entry was last modified.
  virtual StatusOr<double> AgeSeconds(const std::string& path) = 0;
  virtual Status DeleteFile(const std::string& path) = 0;
  // Removes a directory tree; a missing one is fine.
  virtual Status RemoveAll(const std::string& path) = 0;
  // Bytes an unprivileged writer may still put on the file system that holds `path` (or its
  // nearest existing parent): statvfs's f_bavail x f_frsize. Volumes that cannot tell return
  // nullopt (no check is made against them).
  virtual StatusOr<std::optional<uint64_t>> AvailableBytes(const std::string& path) {
    return std::optional<uint64_t>();
  }
};

// Forwards every call to `target`; a subclass overrides what it changes (LevelDB's EnvWrapper).
// Owns nothing: `target` must outlive the wrapper. Thread-safe if `target` is.
class VolumeWrapper : public Volume {
 public:
  explicit VolumeWrapper(Volume* target) : target_(target) {}
  Volume* target() const { return target_; }

  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                          bool direct) override {
    return target_->NewWritableFile(path, direct);
  }
  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path,
                                                          bool direct) override {
    return target_->NewReadableFile(path, direct);
  }
  Status CreateDirs(const std::string& path) override { return target_->CreateDirs(path); }
  Status SyncDir(const std::string& path) override { return target_->SyncDir(path); }
  Status Rename(const std::string& from, const std::string& to) override {
    return target_->Rename(from, to);
  }
  StatusOr<std::vector<std::string>> ListDir(const std::string& path) override {
    return target_->ListDir(path);
  }
  bool Exists(const std::string& path) override { return target_->Exists(path); }
  bool IsLink(const std::string& path) override { return target_->IsLink(path); }
  StatusOr<uint64_t> FileSize(const std::string& path) override { return target_->FileSize(path); }
  StatusOr<double> AgeSeconds(const std::string& path) override {
    return target_->AgeSeconds(path);
  }
  Status DeleteFile(const std::string& path) override { return target_->DeleteFile(path); }
  Status RemoveAll(const std::string& path) override { return target_->RemoveAll(path); }
  StatusOr<std::optional<uint64_t>> AvailableBytes(const std::string& path) override {
    return target_->AvailableBytes(path);
  }

 private:
  Volume* target_;
};

// Forwarding bases for the files a VolumeWrapper hands out; each owns the file it wraps.
class WritableFileWrapper : public WritableFile {
 public:
  explicit WritableFileWrapper(std::unique_ptr<WritableFile> target) : target_(std::move(target)) {}
  StatusOr<size_t> WriteAt(uint64_t offset, const void* data, size_t n) override {
    return target_->WriteAt(offset, data, n);
  }
  Status Sync() override { return target_->Sync(); }
  Status Truncate(uint64_t size) override { return target_->Truncate(size); }
  Status Close() override { return target_->Close(); }
  bool direct() const override { return target_->direct(); }

 protected:
  WritableFile* target() const { return target_.get(); }

 private:
  std::unique_ptr<WritableFile> target_;
};

class ReadableFileWrapper : public ReadableFile {
 public:
  explicit ReadableFileWrapper(std::unique_ptr<ReadableFile> target) : target_(std::move(target)) {}
  StatusOr<size_t> ReadAt(uint64_t offset, void* dst, size_t n) override {
    return target_->ReadAt(offset, dst, n);
  }
  StatusOr<uint64_t> Size() override { return target_->Size(); }
  void DropCache() override { target_->DropCache(); }
  bool direct() const override { return target_->direct(); }

 protected:
  ReadableFile* target() const { return target_.get(); }

 private:
  std::unique_ptr<ReadableFile> target_;
};

// The process's local file system. Returns a process-wide instance (never destroyed).
Volume* LocalVolume();

// Convenience helpers over any Volume.
// Reads a whole (regular) file of at most `max_bytes`; a larger one is refused by its size
// before anything is allocated (InvalidArgument naming the file, its size and the limit).
StatusOr<std::string> ReadFileToString(Volume* v, const std::string& path,
                                       uint64_t max_bytes = uint64_t{64} << 20);
// Writes `path` durably and atomically: `path`.tmp, fsync, rename over `path`, fsync the parent.
Status WriteFileAtomic(Volume* v, const std::string& path, const std::string& contents);
// Joins two path pieces with one '/'.
std::string JoinPath(const std::string& a, const std::string& b);
std::string ParentDir(const std::string& path);

}  // namespace muster::checkpoint
