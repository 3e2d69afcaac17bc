#include "checkpoint/fault_injection_volume.h"

#include <errno.h>

namespace muster::checkpoint {
namespace {

class FaultyWritableFile final : public WritableFile {
 public:
  FaultyWritableFile(FaultInjectionVolume* v, std::string path, std::unique_ptr<WritableFile> f)
      : v_(v), path_(std::move(path)), f_(std::move(f)) {}

  StatusOr<size_t> WriteAt(uint64_t offset, const void* data, size_t n) override {
    if (v_->crashed()) return v_->CrashedError();
    auto fault = v_->Check(path_, true, false, false, false);
    if (fault) {
      switch (*fault) {
        case FaultKind::kTornWrite: {
          size_t half = n / 2;
          if (f_->direct()) half = half / kDirectIoAlignment * kDirectIoAlignment;
          if (half > 0) (void)f_->Write(offset, data, half);
          v_->EnterCrash();
          return v_->CrashedError();
        }
        case FaultKind::kShortWrite: {
          size_t half = n / 2;
          if (f_->direct()) half = half / kDirectIoAlignment * kDirectIoAlignment;
          if (half == 0) break;
          return f_->WriteAt(offset, data, half);
        }
        case FaultKind::kNoSpace:
          return ErrnoStatus(ENOSPC, "write " + path_);
        case FaultKind::kIoError:
          return ErrnoStatus(EIO, "write " + path_);
        default:
          break;
      }
    }
    return f_->WriteAt(offset, data, n);
  }
  Status Sync() override {
    if (v_->crashed()) return v_->CrashedError();
    if (v_->Check(path_, false, true, false, false)) return ErrnoStatus(EIO, "fsync " + path_);
    return f_->Sync();
  }
  Status Truncate(uint64_t size) override {
    if (v_->crashed()) return v_->CrashedError();
    return f_->Truncate(size);
  }
  Status Close() override { return f_->Close(); }
  bool direct() const override { return f_->direct(); }

 private:
  FaultInjectionVolume* v_;
  std::string path_;
  std::unique_ptr<WritableFile> f_;
};

class FaultyReadableFile final : public ReadableFile {
 public:
  FaultyReadableFile(FaultInjectionVolume* v, std::string path, std::unique_ptr<ReadableFile> f)
      : v_(v), path_(std::move(path)), f_(std::move(f)) {}
  StatusOr<size_t> ReadAt(uint64_t offset, void* dst, size_t n) override {
    if (v_->Check(path_, false, false, true, false)) return ErrnoStatus(EIO, "read " + path_);
    return f_->ReadAt(offset, dst, n);
  }
  StatusOr<uint64_t> Size() override { return f_->Size(); }
  bool direct() const override { return f_->direct(); }

 private:
  FaultInjectionVolume* v_;
  std::string path_;
  std::unique_ptr<ReadableFile> f_;
};

}  // namespace

void FaultInjectionVolume::SetFault(Fault f) {
  std::lock_guard<std::mutex> l(mu_);
  fault_ = std::move(f);
  seen_ = 0;
}

void FaultInjectionVolume::ClearFault() {
  std::lock_guard<std::mutex> l(mu_);
  fault_.reset();
}

void FaultInjectionVolume::Reset() {
  ClearFault();
  crashed_ = false;
}

Status FaultInjectionVolume::CrashedError() const {
  return AbortedError("fault injection: the process crashed (torn write)");
}

std::optional<FaultKind> FaultInjectionVolume::Check(const std::string& path, bool is_write,
                                                     bool is_sync, bool is_read, bool is_rename,
                                                     bool is_dir) {
  std::lock_guard<std::mutex> l(mu_);
  if (!fault_) return std::nullopt;
  const Fault& f = *fault_;
  bool applies = false;
  switch (f.kind) {
    case FaultKind::kTornWrite:
    case FaultKind::kShortWrite:
    case FaultKind::kNoSpace:
      applies = is_write;
      break;
    case FaultKind::kIoError:
      applies = f.on_read ? is_read : is_write;
      break;
    case FaultKind::kSyncError:
      applies = is_sync && is_dir == f.on_dir;
      break;
    case FaultKind::kRenameError:
      applies = is_rename;
      break;
  }
  if (!applies) return std::nullopt;
  if (!f.path_substring.empty() && path.find(f.path_substring) == std::string::npos) {
    return std::nullopt;
  }
  if (seen_++ < f.skip) return std::nullopt;
  FaultKind k = f.kind;
  if (!f.sticky) fault_.reset();
  fired_++;
  return k;
}

StatusOr<std::unique_ptr<WritableFile>> FaultInjectionVolume::NewWritableFile(
    const std::string& path, bool direct) {
  if (crashed_) return CrashedError();
  MUSTER_ASSIGN_OR_RETURN(auto f, base_->NewWritableFile(path, direct));
  return std::unique_ptr<WritableFile>(new FaultyWritableFile(this, path, std::move(f)));
}

StatusOr<std::unique_ptr<ReadableFile>> FaultInjectionVolume::NewReadableFile(
    const std::string& path, bool direct) {
  MUSTER_ASSIGN_OR_RETURN(auto f, base_->NewReadableFile(path, direct));
  return std::unique_ptr<ReadableFile>(new FaultyReadableFile(this, path, std::move(f)));
}

Status FaultInjectionVolume::CreateDirs(const std::string& path) {
  if (crashed_) return CrashedError();
  return base_->CreateDirs(path);
}

Status FaultInjectionVolume::SyncDir(const std::string& path) {
  if (crashed_) return CrashedError();
  if (Check(path, false, true, false, false, /*is_dir=*/true)) {
    return ErrnoStatus(EIO, "fsync dir " + path);
  }
  return base_->SyncDir(path);
}

Status FaultInjectionVolume::Rename(const std::string& from, const std::string& to) {
  if (crashed_) return CrashedError();
  if (Check(from, false, false, false, true)) return ErrnoStatus(EIO, "rename " + from);
  return base_->Rename(from, to);
}

Status FaultInjectionVolume::DeleteFile(const std::string& path) {
  if (crashed_) return CrashedError();
  return base_->DeleteFile(path);
}

Status FaultInjectionVolume::RemoveAll(const std::string& path) {
  if (crashed_) return CrashedError();
  return base_->RemoveAll(path);
}

}  // namespace muster::checkpoint
