#pragma once

// FaultInjectionVolume: wraps a Volume and fails chosen operations, for tests (LevelDB's
// FaultInjectionTestEnv is the model). Faults:
//
//   kTornWrite   the write persists only its first half, then the "process dies": that call
//                and every later mutating call fail with Aborted (a crash, as seen from disk)
//   kShortWrite  the write reports (and does) half of what was asked; callers must loop
//   kNoSpace     the write fails with ENOSPC
//   kIoError     the write or read fails with EIO
//   kSyncError   fsync of a file or directory fails with EIO
//   kRenameError rename fails with EIO
//
// A fault applies to operations whose path contains `path_substring`, triggers after `skip`
// such operations have passed, and then fires once (or on every later match with `sticky`).
//
// Thread-safety: thread-safe.

#include <atomic>
#include <mutex>
#include <optional>

#include "checkpoint/volume.h"

namespace muster::checkpoint {

enum class FaultKind { kTornWrite, kShortWrite, kNoSpace, kIoError, kSyncError, kRenameError };

struct Fault {
  FaultKind kind;
  std::string path_substring;  // empty matches every path
  int skip = 0;                // matching operations let through first
  bool sticky = false;         // keep firing after the first time
  bool on_read = false;        // kIoError: fail reads instead of writes
  bool on_dir = false;         // kSyncError: fail directory fsyncs instead of file fsyncs
};

class FaultInjectionVolume final : public Volume {
 public:
  // `base` must outlive this object.
  explicit FaultInjectionVolume(Volume* base) : base_(base) {}

  void SetFault(Fault f);
  void ClearFault();
  // Leaves the crashed state a kTornWrite entered (a "restarted process").
  void Reset();
  bool crashed() const { return crashed_.load(); }
  // How many times a fault fired.
  int fired() const { return fired_.load(); }

  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                          bool direct) override;
  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path,
                                                          bool direct) override;
  Status CreateDirs(const std::string& path) override;
  Status SyncDir(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  StatusOr<std::vector<std::string>> ListDir(const std::string& path) override {
    return base_->ListDir(path);
  }
  bool Exists(const std::string& path) override { return base_->Exists(path); }
  bool IsLink(const std::string& path) override { return base_->IsLink(path); }
  StatusOr<uint64_t> FileSize(const std::string& path) override { return base_->FileSize(path); }
  StatusOr<double> AgeSeconds(const std::string& path) override { return base_->AgeSeconds(path); }
  Status DeleteFile(const std::string& path) override;
  Status RemoveAll(const std::string& path) override;

  // Used by the wrapped files. Returns the fault to apply to this operation, if any.
  std::optional<FaultKind> Check(const std::string& path, bool is_write, bool is_sync, bool is_read,
                                 bool is_rename, bool is_dir = false);
  Status CrashedError() const;
  void EnterCrash() { crashed_ = true; }

 private:
  Volume* base_;
  std::mutex mu_;
  std::optional<Fault> fault_;  // GUARDED_BY(mu_)
  int seen_ = 0;                // GUARDED_BY(mu_)
  std::atomic<bool> crashed_{false};
  std::atomic<int> fired_{0};
};

}  // namespace muster::checkpoint
