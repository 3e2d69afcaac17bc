#include "checkpoint/checkpoint_dir.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <memory>
#include <new>
#include <set>

namespace muster::checkpoint {

std::string StepPath(const std::string& dir, int64_t step) {
  return JoinPath(dir, StepDirName(step));
}
std::string TmpStepPath(const std::string& dir, int64_t step) {
  return JoinPath(dir, StepDirName(step) + ".tmp");
}

StatusOr<Manifest> LoadManifest(Volume* v, const std::string& dir, int64_t step, std::string* raw) {
  std::string path = JoinPath(StepPath(dir, step), kManifestName);
  if (!v->Exists(StepPath(dir, step))) {
    return NotFoundError("step " + std::to_string(step) + " is not committed in " + dir);
  }
  auto bytes = ReadFileToString(v, path, kMaxManifestBytes);
  if (!bytes.ok()) return bytes.status().WithContext("step " + std::to_string(step));
  auto m = ParseManifest(*bytes);
  if (!m.ok()) return m.status().WithContext("step " + std::to_string(step));
  if (m->step != step) {
    return DataLossError("step " + std::to_string(step) + ": MANIFEST says step " +
                         std::to_string(m->step));
  }
  if (raw) *raw = std::move(*bytes);
  return m;
}

StatusOr<int64_t> ReadLatest(Volume* v, const std::string& dir) {
  MUSTER_ASSIGN_OR_RETURN(std::string bytes,
                          ReadFileToString(v, JoinPath(dir, kLatestName), kMaxLatestBytes));
  auto step = ParseLatest(bytes);
  if (!step.ok()) return step.status().WithContext(dir);
  return step;
}

StatusOr<Manifest> CheckStep(Volume* v, const std::string& dir, int64_t step, StepCheck check) {
  MUSTER_ASSIGN_OR_RETURN(Manifest m, LoadManifest(v, dir, step));
  const std::string sdir = StepPath(dir, step);
  for (const auto& s : m.shards) {
    const std::string path = JoinPath(sdir, s.file);
    if (check == StepCheck::kChecksums) {
      MUSTER_RETURN_IF_ERROR(VerifyShardFile(v, path, m, s, /*drop_cache=*/false));
      continue;
    }
    auto f = v->NewReadableFile(path, /*direct=*/false);
    if (!f.ok()) {
      return DataLossError("step " + std::to_string(step) + ": " + s.file +
                           " is not readable: " + f.status().ToString());
    }
    MUSTER_ASSIGN_OR_RETURN(uint64_t size, (*f)->Size());
    if (size != s.size) {
      return DataLossError("step " + std::to_string(step) + ": " + s.file + " has " +
                           std::to_string(size) + " bytes, the manifest says " +
                           std::to_string(s.size));
    }
  }
  return m;
}

StatusOr<std::vector<StepInfo>> ListSteps(Volume* v, const std::string& dir, StepCheck check) {
  if (!v->Exists(dir)) return NotFoundError("checkpoint directory " + dir + " does not exist");
  MUSTER_ASSIGN_OR_RETURN(auto names, v->ListDir(dir));
  std::vector<StepInfo> out;
  for (const auto& n : names) {
    bool incomplete = false;
    auto step = ParseStepDirName(n, &incomplete);
    if (!step) continue;
    StepInfo info;
    info.step = *step;
    info.path = JoinPath(dir, n);
    if (auto age = v->AgeSeconds(info.path); age.ok()) info.age_s = *age;
    if (!incomplete) {
      auto m = CheckStep(v, dir, *step, check);
      if (m.ok()) {
        info.committed = true;
        info.bytes = m->TotalBytes();
        info.world_size = m->world_size;
      } else {
        info.problem = m.status().message();
      }
    }
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const StepInfo& a, const StepInfo& b) {
    if (a.step != b.step) return a.step < b.step;
    return a.committed > b.committed;
  });
  return out;
}

StatusOr<int64_t> LatestCommittedStep(Volume* v, const std::string& dir) {
  MUSTER_ASSIGN_OR_RETURN(auto steps, ListSteps(v, dir));
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    if (it->committed) return it->step;
  }
  return NotFoundError("no committed checkpoint in " + dir);
}

Status CheckBlocks(const Manifest& m, const ShardEntry& shard, uint64_t offset, const char* data,
                   size_t n) {
  const uint64_t bs = m.block_size;
  for (uint64_t pos = 0; pos < n; pos += bs) {
    uint64_t block = (offset + pos) / bs;
    size_t len = std::min<uint64_t>(bs, n - pos);
    if (block >= shard.block_xxh3.size()) return DataLossError("block index out of range");
    if (Xxh3(data + pos, len) == shard.block_xxh3[block]) continue;
    // Name what the damage hits.
    uint64_t lo = block * bs, hi = lo + bs;
    std::string hit;
    int shard_index = static_cast<int>(&shard - m.shards.data());
    for (const auto& t : m.tensors) {
      for (const auto& s : t.slices) {
        if (s.shard == shard_index && s.byte_offset < hi && s.byte_offset + s.byte_length > lo) {
          hit += (hit.empty() ? "" : ", ") + ("'" + t.name + "'");
          break;
        }
      }
    }
    if (hit.empty()) hit = "(padding)";
    return DataLossError("step " + std::to_string(m.step) + ": tensor " + hit + ": " + shard.file +
                         " block " + std::to_string(block) + " fails its xxh3 checksum");
  }
  return Status::Ok();
}

Status VerifyShardFile(Volume* v, const std::string& path, const Manifest& m,
                       const ShardEntry& shard, bool drop_cache) {
  MUSTER_ASSIGN_OR_RETURN(auto f, v->NewReadableFile(path, /*direct=*/false));
  if (drop_cache) f->DropCache();
  MUSTER_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  if (size != shard.size) {
    return DataLossError("step " + std::to_string(m.step) + ": " + shard.file + " has " +
                         std::to_string(size) + " bytes, the manifest says " +
                         std::to_string(shard.size));
  }
  const uint64_t chunk = std::max<uint64_t>(m.block_size, (32 << 20) / m.block_size * m.block_size);
  std::unique_ptr<char[]> buf(new (std::nothrow) char[chunk]);
  if (!buf) {
    return UnavailableError("step " + std::to_string(m.step) + ": no memory for a " +
                            std::to_string(chunk) + "-byte read buffer");
  }
  for (uint64_t off = 0; off < size; off += chunk) {
    size_t n = std::min<uint64_t>(chunk, size - off);
    Status st = f->Read(off, buf.get(), n);
    if (!st.ok()) return st.WithContext("step " + std::to_string(m.step) + ": " + shard.file);
    MUSTER_RETURN_IF_ERROR(CheckBlocks(m, shard, off, buf.get(), n));
  }
  return Status::Ok();
}

Status VerifyStep(Volume* v, const std::string& dir, int64_t step) {
  return CheckStep(v, dir, step, StepCheck::kChecksums).status();
}

Status UpdateLatest(Volume* v, const std::string& dir, int64_t step) {
  std::string path = JoinPath(dir, kLatestName);
  if (v->Exists(path)) {
    // A damaged or unreadable LATEST, or one naming a step that is not good, is replaced.
    auto cur = ReadLatest(v, dir);
    if (cur.ok() && *cur > step && CheckStep(v, dir, *cur, StepCheck::kFiles).ok()) {
      return Status::Ok();
    }
  }
  return WriteFileAtomic(v, path, StepDirName(step) + "\n");
}

StatusOr<GcReport> CollectGarbage(Volume* v, const std::string& dir, RetentionPolicy policy,
                                  int64_t incomplete_below) {
  if (policy.keep_last < 1) return InvalidArgumentError("gc: keep_last must be at least 1");
  if (policy.keep_every < 0) return InvalidArgumentError("gc: keep_every must not be negative");
  MUSTER_ASSIGN_OR_RETURN(
      auto steps,
      ListSteps(v, dir, policy.verify_checksums ? StepCheck::kChecksums : StepCheck::kFiles));
  GcReport report;
  std::vector<int64_t> committed;
  // Only good steps count toward keep_last: a damaged newer step must not push the newest
  // good one out.
  for (const auto& s : steps) {
    if (s.committed) committed.push_back(s.step);
    if (!s.committed && !s.problem.empty()) report.damaged.push_back(s);
  }
  std::set<int64_t> keep;
  for (size_t i = committed.size() > static_cast<size_t>(policy.keep_last)
                      ? committed.size() - policy.keep_last
                      : 0;
       i < committed.size(); ++i) {
    keep.insert(committed[i]);
  }
  for (int64_t s : committed) {
    if (policy.keep_every > 0 && s % policy.keep_every == 0) keep.insert(s);
  }
  bool removed_any = false;
  for (int64_t s : committed) {
    if (keep.count(s)) continue;
    std::string tmp = TmpStepPath(dir, s);
    MUSTER_RETURN_IF_ERROR(v->RemoveAll(tmp));
    MUSTER_RETURN_IF_ERROR(v->Rename(StepPath(dir, s), tmp));
    MUSTER_RETURN_IF_ERROR(v->RemoveAll(tmp));
    report.removed_committed.push_back(s);
    removed_any = true;
  }
  for (const auto& s : steps) {
    if (s.committed || s.step >= incomplete_below) continue;
    // A step directory that is not good (bad MANIFEST, missing shard) is left for a human.
    if (!s.problem.empty()) continue;
    if (!v->Exists(s.path)) continue;
    MUSTER_RETURN_IF_ERROR(v->RemoveAll(s.path));
    report.removed_incomplete.push_back(s.path);
    removed_any = true;
  }
  if (removed_any) MUSTER_RETURN_IF_ERROR(v->SyncDir(dir));
  return report;
}

Status DropStepCache(Volume* v, const std::string& dir, int64_t step) {
  MUSTER_ASSIGN_OR_RETURN(Manifest m, LoadManifest(v, dir, step));
  for (const auto& s : m.shards) {
    MUSTER_ASSIGN_OR_RETURN(auto f,
                            v->NewReadableFile(JoinPath(StepPath(dir, step), s.file), false));
    f->DropCache();
  }
  return Status::Ok();
}

}  // namespace muster::checkpoint
