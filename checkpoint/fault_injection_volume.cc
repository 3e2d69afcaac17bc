#include "checkpoint/fault_injection_volume.h"

#include <errno.h>

#include <algorithm>
#include <filesystem>

namespace muster::checkpoint {

// What is durable of a file written through the volume: its bytes up to `synced_size`.
struct FaultInjectionVolume::FileState {
  std::string path;          // where it is now; empty once deleted or renamed over
  uint64_t synced_size = 0;  // its length at its last successful fsync
  bool dirty = true;         // created, written or truncated since that fsync
};

namespace {

// One entry of a saved directory tree (or a single file): `rel` is "" for the root itself.
struct Entry {
  std::string rel;
  bool dir = false;
  std::string data;
};

// A namespace change that is not durable yet.
struct Op {
  enum Kind { kCreate, kRename, kRemove } kind = kCreate;
  uint64_t id = 0;
  std::string path;  // kCreate, kRemove: the entry; kRename: the source (`from`)
  std::string to;    // kRename: the target
  // Directories whose fsync this change still waits for (its parent, or both for a rename).
  std::vector<std::string> unsynced;
  // kRemove: the removed tree; kRename: what `to` held before, if `overwrote`.
  std::vector<Entry> saved;
  bool overwrote = false;
};

Op MakeOp(Op::Kind kind, uint64_t id, std::string path, std::string to = "") {
  Op op;
  op.kind = kind;
  op.id = id;
  op.path = std::move(path);
  op.to = std::move(to);
  return op;
}

std::string Norm(const std::string& p) {
  std::string s = std::filesystem::path(p).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

std::string Parent(const std::string& normalized) { return Norm(ParentDir(normalized)); }

bool Under(const std::string& path, const std::string& prefix) {
  return path == prefix ||
         (path.size() > prefix.size() && path.compare(0, prefix.size(), prefix) == 0 &&
          path[prefix.size()] == '/');
}

void Rebase(std::string& path, const std::string& from, const std::string& to) {
  if (Under(path, from)) path = to + path.substr(from.size());
}

// The name an entry's path takes while change `id` has replaced or removed it: matches no real
// path, and comes back when `id` is undone.
std::string Shadow(uint64_t id, const std::string& path) {
  return "\x01" + std::to_string(id) + "\x01" + path;
}

}  // namespace

struct FaultInjectionVolume::Journal {
  std::vector<std::shared_ptr<FileState>> files;
  std::vector<Op> ops;  // oldest first
  uint64_t next_id = 1;

  // Moves every path of every recorded change under `from` to under `to`.
  void RebaseOps(const std::string& from, const std::string& to) {
    for (Op& op : ops) {
      Rebase(op.path, from, to);
      Rebase(op.to, from, to);
      for (auto& d : op.unsynced) Rebase(d, from, to);
    }
  }
  void RebaseFiles(const std::string& from, const std::string& to) {
    for (auto& f : files) Rebase(f->path, from, to);
  }
  void OrphanFiles(const std::string& under) {
    for (auto& f : files) {
      if (Under(f->path, under)) f->path.clear();
    }
  }
  FileState* Find(const std::string& path) {
    for (auto& f : files) {
      if (f->path == path) return f.get();
    }
    return nullptr;
  }
};

namespace {

// Reads `root`/`rel` (a file or a directory tree) from `v` as it would survive a crash: a file
// written through the volume keeps only its synced bytes.
Status SaveTree(Volume* v, FaultInjectionVolume::Journal& j, const std::string& root,
                const std::string& rel, std::vector<Entry>* out) {
  const std::string path = rel.empty() ? root : JoinPath(root, rel);
  if (v->IsLink(path)) return Status::Ok();  // not followed, and not brought back
  auto names = v->ListDir(path);
  if (names.ok()) {
    out->push_back({rel, true, ""});
    std::sort(names->begin(), names->end());
    for (const auto& n : *names) {
      MUSTER_RETURN_IF_ERROR(SaveTree(v, j, root, rel.empty() ? n : JoinPath(rel, n), out));
    }
    return Status::Ok();
  }
  MUSTER_ASSIGN_OR_RETURN(std::string data, ReadFileToString(v, path, uint64_t{1} << 30));
  if (auto* f = j.Find(Norm(path)); f && f->dirty && data.size() > f->synced_size) {
    data.resize(f->synced_size);
  }
  out->push_back({rel, false, std::move(data)});
  return Status::Ok();
}

Status WriteWhole(Volume* v, const std::string& path, const std::string& data) {
  MUSTER_ASSIGN_OR_RETURN(auto f, v->NewWritableFile(path, /*direct=*/false));
  MUSTER_RETURN_IF_ERROR(f->Write(0, data.data(), data.size()));
  MUSTER_RETURN_IF_ERROR(f->Sync());
  return f->Close();
}

Status RestoreTree(Volume* v, const std::string& root, const std::vector<Entry>& tree) {
  for (const Entry& e : tree) {
    const std::string path = e.rel.empty() ? root : JoinPath(root, e.rel);
    MUSTER_RETURN_IF_ERROR(e.dir ? v->CreateDirs(path) : WriteWhole(v, path, e.data));
  }
  return Status::Ok();
}

class FaultyWritableFile final : public WritableFileWrapper {
 public:
  FaultyWritableFile(FaultInjectionVolume* v, std::string path, std::unique_ptr<WritableFile> f,
                     std::shared_ptr<FaultInjectionVolume::FileState> state)
      : WritableFileWrapper(std::move(f)),
        v_(v),
        path_(std::move(path)),
        state_(std::move(state)) {}

  StatusOr<size_t> WriteAt(uint64_t offset, const void* data, size_t n) override {
    if (v_->crashed()) return v_->CrashedError();
    v_->NoteWrite(state_.get());
    auto fault = v_->Check(path_, true, false, false, false);
    if (fault) {
      switch (*fault) {
        case FaultKind::kTornWrite: {
          size_t half = n / 2;
          if (direct()) half = half / kDirectIoAlignment * kDirectIoAlignment;
          if (half > 0) (void)target()->Write(offset, data, half);
          v_->EnterCrash();
          return v_->CrashedError();
        }
        case FaultKind::kShortWrite: {
          size_t half = n / 2;
          if (direct()) half = half / kDirectIoAlignment * kDirectIoAlignment;
          if (half == 0) break;
          return target()->WriteAt(offset, data, half);
        }
        case FaultKind::kNoSpace:
          return ErrnoStatus(ENOSPC, "write " + path_);
        case FaultKind::kIoError:
          return ErrnoStatus(EIO, "write " + path_);
        default:
          break;
      }
    }
    return target()->WriteAt(offset, data, n);
  }
  Status Sync() override {
    if (v_->crashed()) return v_->CrashedError();
    v_->NoteSync(path_, /*dir=*/false);
    auto fault = v_->Check(path_, false, true, false, false);
    if (fault == FaultKind::kSyncError) return ErrnoStatus(EIO, "fsync " + path_);
    if (fault == FaultKind::kDroppedSync) return Status::Ok();
    MUSTER_RETURN_IF_ERROR(target()->Sync());
    return v_->NoteFileSynced(state_.get());
  }
  Status Truncate(uint64_t size) override {
    if (v_->crashed()) return v_->CrashedError();
    v_->NoteWrite(state_.get());
    return target()->Truncate(size);
  }

 private:
  FaultInjectionVolume* v_;
  std::string path_;
  std::shared_ptr<FaultInjectionVolume::FileState> state_;
};

class FaultyReadableFile final : public ReadableFileWrapper {
 public:
  FaultyReadableFile(FaultInjectionVolume* v, std::string path, std::unique_ptr<ReadableFile> f)
      : ReadableFileWrapper(std::move(f)), v_(v), path_(std::move(path)) {}
  StatusOr<size_t> ReadAt(uint64_t offset, void* dst, size_t n) override {
    if (v_->Check(path_, false, false, true, false)) return ErrnoStatus(EIO, "read " + path_);
    return target()->ReadAt(offset, dst, n);
  }

 private:
  FaultInjectionVolume* v_;
  std::string path_;
};

}  // namespace

FaultInjectionVolume::FaultInjectionVolume(Volume* base)
    : VolumeWrapper(base), journal_(std::make_unique<Journal>()) {}

FaultInjectionVolume::~FaultInjectionVolume() = default;

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

std::vector<SyncCall> FaultInjectionVolume::syncs() const {
  std::lock_guard<std::mutex> l(mu_);
  return syncs_;
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
    case FaultKind::kDroppedSync:
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

void FaultInjectionVolume::NoteWrite(FileState* f) {
  std::lock_guard<std::mutex> l(mu_);
  f->dirty = true;
}

void FaultInjectionVolume::NoteSync(const std::string& path, bool dir) {
  std::lock_guard<std::mutex> l(mu_);
  syncs_.push_back({path, dir});
}

Status FaultInjectionVolume::NoteFileSynced(FileState* f) {
  std::lock_guard<std::mutex> l(mu_);
  if (f->path.empty()) return Status::Ok();  // deleted: nothing of it is left to keep
  MUSTER_ASSIGN_OR_RETURN(f->synced_size, target()->FileSize(f->path));
  f->dirty = false;
  return Status::Ok();
}

StatusOr<std::unique_ptr<WritableFile>> FaultInjectionVolume::NewWritableFile(
    const std::string& path, bool direct) {
  if (crashed_) return CrashedError();
  const std::string p = Norm(path);
  const bool existed = target()->Exists(p);
  MUSTER_ASSIGN_OR_RETURN(auto f, target()->NewWritableFile(path, direct));
  auto state = std::make_shared<FileState>();
  state->path = p;
  {
    std::lock_guard<std::mutex> l(mu_);
    journal_->OrphanFiles(p);  // an earlier file of this name was truncated away
    journal_->files.push_back(state);
    if (!existed) {
      Op op = MakeOp(Op::kCreate, journal_->next_id++, p);
      op.unsynced = {Parent(p)};
      journal_->ops.push_back(std::move(op));
    }
  }
  return std::unique_ptr<WritableFile>(
      new FaultyWritableFile(this, path, std::move(f), std::move(state)));
}

StatusOr<std::unique_ptr<ReadableFile>> FaultInjectionVolume::NewReadableFile(
    const std::string& path, bool direct) {
  MUSTER_ASSIGN_OR_RETURN(auto f, target()->NewReadableFile(path, direct));
  return std::unique_ptr<ReadableFile>(new FaultyReadableFile(this, path, std::move(f)));
}

Status FaultInjectionVolume::CreateDirs(const std::string& path) {
  if (crashed_) return CrashedError();
  std::vector<std::string> missing;  // innermost first
  for (std::string p = Norm(path); !p.empty() && p != "/" && p != "." && !target()->Exists(p);
       p = Parent(p)) {
    missing.push_back(p);
  }
  MUSTER_RETURN_IF_ERROR(target()->CreateDirs(path));
  std::lock_guard<std::mutex> l(mu_);
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    Op op = MakeOp(Op::kCreate, journal_->next_id++, *it);
    op.unsynced = {Parent(*it)};
    journal_->ops.push_back(std::move(op));
  }
  return Status::Ok();
}

Status FaultInjectionVolume::SyncDir(const std::string& path) {
  if (crashed_) return CrashedError();
  NoteSync(path, /*dir=*/true);
  auto fault = Check(path, false, true, false, false, /*is_dir=*/true);
  if (fault == FaultKind::kSyncError) return ErrnoStatus(EIO, "fsync dir " + path);
  if (fault == FaultKind::kDroppedSync) return Status::Ok();
  MUSTER_RETURN_IF_ERROR(target()->SyncDir(path));
  const std::string p = Norm(path);
  std::lock_guard<std::mutex> l(mu_);
  auto& ops = journal_->ops;
  for (Op& op : ops) {
    op.unsynced.erase(std::remove(op.unsynced.begin(), op.unsynced.end(), p), op.unsynced.end());
  }
  ops.erase(
      std::remove_if(ops.begin(), ops.end(), [](const Op& op) { return op.unsynced.empty(); }),
      ops.end());
  return Status::Ok();
}

Status FaultInjectionVolume::Rename(const std::string& from, const std::string& to) {
  if (crashed_) return CrashedError();
  if (Check(from, false, false, false, true)) return ErrnoStatus(EIO, "rename " + from);
  const std::string f = Norm(from), t = Norm(to);
  std::lock_guard<std::mutex> l(mu_);
  Op op = MakeOp(Op::kRename, journal_->next_id, f, t);
  if (target()->Exists(t)) {
    op.overwrote = true;
    MUSTER_RETURN_IF_ERROR(SaveTree(target(), *journal_, t, "", &op.saved));
  }
  MUSTER_RETURN_IF_ERROR(target()->Rename(from, to));
  journal_->next_id++;
  // What `to` named is replaced (kept aside under a shadow name until this is undone); what
  // lived under `from` now lives under `to`.
  journal_->OrphanFiles(t);
  journal_->RebaseOps(t, Shadow(op.id, t));
  journal_->RebaseOps(f, t);
  journal_->RebaseFiles(f, t);
  op.unsynced = {Parent(f)};
  if (Parent(t) != Parent(f)) op.unsynced.push_back(Parent(t));
  journal_->ops.push_back(std::move(op));
  return Status::Ok();
}

Status FaultInjectionVolume::DeleteFile(const std::string& path) {
  return RemoveRecorded(path, /*tree=*/false);
}

Status FaultInjectionVolume::RemoveAll(const std::string& path) {
  return RemoveRecorded(path, /*tree=*/true);
}

Status FaultInjectionVolume::RemoveRecorded(const std::string& path, bool tree) {
  if (crashed_) return CrashedError();
  const std::string p = Norm(path);
  std::lock_guard<std::mutex> l(mu_);
  Op op = MakeOp(Op::kRemove, journal_->next_id, p);
  // A symbolic link is removed but not brought back by Crash(): a Volume cannot make one.
  const bool save = !target()->IsLink(p) && target()->Exists(p);
  if (save) MUSTER_RETURN_IF_ERROR(SaveTree(target(), *journal_, p, "", &op.saved));
  MUSTER_RETURN_IF_ERROR(tree ? target()->RemoveAll(path) : target()->DeleteFile(path));
  if (!save) return Status::Ok();
  journal_->next_id++;
  journal_->OrphanFiles(p);
  journal_->RebaseOps(p, Shadow(op.id, p));
  op.unsynced = {Parent(p)};
  journal_->ops.push_back(std::move(op));
  return Status::Ok();
}

Status FaultInjectionVolume::Crash() {
  std::lock_guard<std::mutex> l(mu_);
  Journal& j = *journal_;
  // Bytes first, while every path still names what it names now.
  for (const auto& f : j.files) {
    if (!f->dirty || f->path.empty() || !target()->Exists(f->path)) continue;
    MUSTER_ASSIGN_OR_RETURN(uint64_t size, target()->FileSize(f->path));
    if (size <= f->synced_size) continue;
    MUSTER_ASSIGN_OR_RETURN(std::string data,
                            ReadFileToString(target(), f->path, uint64_t{1} << 30));
    data.resize(f->synced_size);
    MUSTER_RETURN_IF_ERROR(WriteWhole(target(), f->path, data).WithContext("crash: truncate"));
  }
  // Then the namespace, newest change first: each undo leaves the names as they were just
  // before that change.
  while (!j.ops.empty()) {
    Op op = std::move(j.ops.back());
    j.ops.pop_back();
    switch (op.kind) {
      case Op::kCreate:
        MUSTER_RETURN_IF_ERROR(target()->RemoveAll(op.path).WithContext("crash: undo create"));
        break;
      case Op::kRename:
        MUSTER_RETURN_IF_ERROR(target()->Rename(op.to, op.path).WithContext("crash: undo rename"));
        if (op.overwrote) MUSTER_RETURN_IF_ERROR(RestoreTree(target(), op.to, op.saved));
        j.RebaseOps(op.to, op.path);
        j.RebaseOps(Shadow(op.id, op.to), op.to);
        break;
      case Op::kRemove:
        MUSTER_RETURN_IF_ERROR(RestoreTree(target(), op.path, op.saved));
        j.RebaseOps(Shadow(op.id, op.path), op.path);
        break;
    }
  }
  j.files.clear();
  fault_.reset();
  seen_ = 0;
  crashed_ = false;
  return Status::Ok();
}

}  // namespace muster::checkpoint
