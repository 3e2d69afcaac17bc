#pragma once

// FaultInjectionVolume: a VolumeWrapper that fails chosen operations and models what a power
// loss takes away, for tests (LevelDB's FaultInjectionTestEnv is the model).
//
// Faults (SetFault):
//
//   kTornWrite    the write persists only its first half, then the "process dies": that call
//                 and every later mutating call fail with Aborted (a crash, as seen from disk)
//   kShortWrite   the write reports (and does) half of what was asked; callers must loop
//   kNoSpace      the write fails with ENOSPC
//   kIoError      the write or read fails with EIO
//   kSyncError    fsync of a file or directory fails with EIO
//   kRenameError  rename fails with EIO
//   kDroppedSync  fsync of a file or directory reports success but makes nothing durable: a
//                 caller that "forgot" that sync (the commit-path sync tests remove each
//                 sync this way, one at a time)
//
// A fault applies to operations whose path contains `path_substring`, triggers after `skip`
// such operations have passed, and then fires once (or on every later match with `sticky`).
//
// Lost unsynced data (Crash): the volume remembers what is not yet durable, as a POSIX file
// system after a power loss may lose it:
//   - a file's bytes past its length at its last fsync through this volume (a file created
//     through it and never fsynced loses every byte);
//   - every create (file or directory), rename and delete whose parent directory has not been
//     fsynced (SyncDir) through this volume since; a rename needs both parents synced.
// Crash() drops all of it from the underlying volume (truncates the files, undoes the
// namespace changes, newest first) and leaves the volume usable: a rebooted machine. Files and
// directories that existed before they were touched through this volume count as durable.
// Limits: bytes of a synced file rewritten in place and not fsynced again are not rolled back
// (checkpoint files are written once); deleted and overwritten files are kept in memory until
// their delete is durable, so this is for test-sized directories; symbolic links are removed
// but not brought back.
//
// Thread-safety: thread-safe. Crash() must not run concurrently with other calls.

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/volume.h"

namespace muster::checkpoint {

enum class FaultKind {
  kTornWrite,
  kShortWrite,
  kNoSpace,
  kIoError,
  kSyncError,
  kRenameError,
  kDroppedSync,
};

struct Fault {
  FaultKind kind;
  std::string path_substring;  // empty matches every path
  int skip = 0;                // matching operations let through first
  bool sticky = false;         // keep firing after the first time
  bool on_read = false;        // kIoError: fail reads instead of writes
  bool on_dir = false;         // kSyncError, kDroppedSync: directory fsyncs instead of files'
};

// One fsync (of a file, or with `dir` of a directory) that reached the volume, in call order.
struct SyncCall {
  std::string path;
  bool dir = false;
};

class FaultInjectionVolume final : public VolumeWrapper {
 public:
  // `base` must outlive this object.
  explicit FaultInjectionVolume(Volume* base);
  ~FaultInjectionVolume() override;

  void SetFault(Fault f);
  void ClearFault();
  // Leaves the crashed state a kTornWrite entered (a "restarted process"). Unsynced data
  // stays as it is (the machine kept running).
  void Reset();
  bool crashed() const { return crashed_.load(); }
  // How many times a fault fired.
  int fired() const { return fired_.load(); }

  // A power loss and reboot: drops from the underlying volume every byte and every namespace
  // change that is not durable (see the file comment), then clears the fault, the crashed state
  // and the record, so that what is left counts as durable. An error means the underlying
  // volume refused a repair (the directory is then in an unknown state).
  Status Crash();

  // Every file and directory fsync made through this volume, in order (kDroppedSync ones too).
  std::vector<SyncCall> syncs() const;

  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                          bool direct) override;
  StatusOr<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path,
                                                          bool direct) override;
  Status CreateDirs(const std::string& path) override;
  Status SyncDir(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status DeleteFile(const std::string& path) override;
  Status RemoveAll(const std::string& path) override;

  // Used by the wrapped files. Returns the fault to apply to this operation, if any.
  std::optional<FaultKind> Check(const std::string& path, bool is_write, bool is_sync, bool is_read,
                                 bool is_rename, bool is_dir = false);
  Status CrashedError() const;
  void EnterCrash() { crashed_ = true; }

  struct FileState;  // what is durable of a file written through this volume
  struct Journal;    // namespace changes not yet durable
  // Used by the wrapped files.
  void NoteWrite(FileState* f);
  void NoteSync(const std::string& path, bool dir);
  Status NoteFileSynced(FileState* f);

 private:
  // DeleteFile (`tree` false) or RemoveAll, remembering what was removed until its parent is
  // synced.
  Status RemoveRecorded(const std::string& path, bool tree);

  mutable std::mutex mu_;
  std::optional<Fault> fault_;        // GUARDED_BY(mu_)
  int seen_ = 0;                      // GUARDED_BY(mu_)
  std::vector<SyncCall> syncs_;       // GUARDED_BY(mu_)
  std::unique_ptr<Journal> journal_;  // GUARDED_BY(mu_)
  std::atomic<bool> crashed_{false};
  std::atomic<int> fired_{0};
};

}  // namespace muster::checkpoint
