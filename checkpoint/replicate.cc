#include "checkpoint/replicate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/manifest.h"
#include "common/logging.h"

namespace muster::checkpoint {

namespace {

// The source's MANIFEST may claim shards of any size that its block checksums agree with (a
// hostile source can make up terabytes of them): the copy is refused up front when the
// destination's file system cannot hold what is still to copy and keep kReplicateReserveBytes
// free, instead of filling the disk until ENOSPC.
Status CheckRoomFor(const Manifest& m, Volume* dst, const std::string& dst_dir,
                    const std::string& tmp, int64_t step) {
  MUSTER_ASSIGN_OR_RETURN(std::optional<uint64_t> avail, dst->AvailableBytes(dst_dir));
  if (!avail) return Status::Ok();
  uint64_t need = 0;
  for (const auto& shard : m.shards) {
    auto have = dst->FileSize(JoinPath(tmp, shard.file));  // a resumed copy's finished shards
    if (have.ok() && *have == shard.size) continue;
    need += std::min<uint64_t>(shard.size, UINT64_MAX - need);
  }
  if (need > *avail || *avail - need < kReplicateReserveBytes) {
    return FailedPreconditionError(fmt::format(
        "replicate: step {} needs {} bytes at the destination and its file system has {} free "
        "(a copy must leave {} free); nothing was copied",
        step, need, *avail, kReplicateReserveBytes));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<ReplicateReport> Replicate(Volume* src, const std::string& src_dir, Volume* dst,
                                    const std::string& dst_dir, int64_t step) {
  ReplicateReport report;
  report.step = step;
  // The source is untrusted (another provider's volume): its MANIFEST is size-capped and
  // validated before anything is allocated or created at the destination, and the bytes that
  // were validated are the ones committed there.
  std::string manifest_bytes;
  auto loaded = LoadManifest(src, src_dir, step, &manifest_bytes);
  if (!loaded.ok()) return loaded.status().WithContext("replicate: the source's MANIFEST");
  const Manifest& m = *loaded;

  MUSTER_RETURN_IF_ERROR(dst->CreateDirs(dst_dir));
  if (dst->Exists(StepPath(dst_dir, step))) {
    Status st = VerifyStep(dst, dst_dir, step);
    if (!st.ok()) return st.WithContext("replicate: the destination's copy is corrupt");
    report.already_present = true;
    MUSTER_RETURN_IF_ERROR(UpdateLatest(dst, dst_dir, step));
    return report;
  }
  const std::string tmp = TmpStepPath(dst_dir, step);
  // A link planted in place of the temp directory would take the copy wherever it points.
  if (dst->IsLink(tmp)) MUSTER_RETURN_IF_ERROR(dst->RemoveAll(tmp));
  MUSTER_RETURN_IF_ERROR(CheckRoomFor(m, dst, dst_dir, tmp, step));
  MUSTER_RETURN_IF_ERROR(dst->CreateDirs(tmp));
  const std::string sdir = StepPath(src_dir, step);
  const uint64_t chunk = std::max<uint64_t>(m.block_size, (32 << 20) / m.block_size * m.block_size);
  std::unique_ptr<char[]> buf(new (std::nothrow) char[chunk]);
  if (!buf) {
    return UnavailableError("replicate: no memory for a " + std::to_string(chunk) +
                            "-byte copy buffer");
  }
  for (const auto& shard : m.shards) {
    const std::string to = JoinPath(tmp, shard.file);
    if (dst->Exists(to) && VerifyShardFile(dst, to, m, shard, false).ok()) {
      report.shards_resumed++;
      continue;
    }
    MUSTER_ASSIGN_OR_RETURN(auto in, src->NewReadableFile(JoinPath(sdir, shard.file), false));
    MUSTER_ASSIGN_OR_RETURN(uint64_t size, in->Size());
    if (size != shard.size) {
      return DataLossError("replicate: step " + std::to_string(step) + ": source " + shard.file +
                           " has " + std::to_string(size) + " bytes, the manifest says " +
                           std::to_string(shard.size));
    }
    MUSTER_ASSIGN_OR_RETURN(auto out, dst->NewWritableFile(to, /*direct=*/false));
    for (uint64_t off = 0; off < size; off += chunk) {
      size_t n = std::min<uint64_t>(chunk, size - off);
      MUSTER_RETURN_IF_ERROR(in->Read(off, buf.get(), n));
      Status st = CheckBlocks(m, shard, off, buf.get(), n);
      if (!st.ok()) return st.WithContext("replicate: the source is corrupt");
      MUSTER_RETURN_IF_ERROR(out->Write(off, buf.get(), n));
    }
    MUSTER_RETURN_IF_ERROR(out->Sync());
    MUSTER_RETURN_IF_ERROR(out->Close());
    Status st = VerifyShardFile(dst, to, m, shard, /*drop_cache=*/true);
    if (!st.ok()) return st.WithContext("replicate: read-back at the destination");
    report.shards_copied++;
    report.bytes_copied += size;
  }
  // Only shard files the manifest names travel with the commit.
  MUSTER_ASSIGN_OR_RETURN(auto names, dst->ListDir(tmp));
  for (const auto& n : names) {
    bool known = false;
    for (const auto& s : m.shards) known |= s.file == n;
    if (!known) MUSTER_RETURN_IF_ERROR(dst->RemoveAll(JoinPath(tmp, n)));
  }
  {
    MUSTER_ASSIGN_OR_RETURN(auto f, dst->NewWritableFile(JoinPath(tmp, kManifestName), false));
    MUSTER_RETURN_IF_ERROR(f->Write(0, manifest_bytes.data(), manifest_bytes.size()));
    MUSTER_RETURN_IF_ERROR(f->Sync());
    MUSTER_RETURN_IF_ERROR(f->Close());
  }
  MUSTER_RETURN_IF_ERROR(dst->SyncDir(tmp));
  MUSTER_RETURN_IF_ERROR(dst->Rename(tmp, StepPath(dst_dir, step)));
  MUSTER_RETURN_IF_ERROR(dst->SyncDir(dst_dir));
  MUSTER_RETURN_IF_ERROR(UpdateLatest(dst, dst_dir, step));
  log::Get("ckpt.replicate")
      ->info("replicated step {} to {} ({} shards copied, {} resumed)", step, dst_dir,
             report.shards_copied, report.shards_resumed);
  return report;
}

}  // namespace muster::checkpoint
