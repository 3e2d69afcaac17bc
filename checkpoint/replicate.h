#pragma once

// Replication of a committed checkpoint to a second volume (another provider's).
//
// Copy, verify, commit at the destination: shards are copied into <dst>/step-N.tmp/ with every
// block checked against the source manifest as it is read, fsynced, read back and checked
// again at the destination, and only then is the MANIFEST written, the directory renamed to
// step-N and LATEST moved. A partial copy is therefore never visible as committed. After a
// crash the copy resumes: shard files already complete and verified in step-N.tmp are kept.
//
// Thread-safety: one replication per destination step at a time.

#include <cstdint>
#include <string>

#include "checkpoint/volume.h"
#include "common/status.h"

namespace muster::checkpoint {

struct ReplicateReport {
  int64_t step = 0;
  bool already_present = false;  // the destination already had it committed (and verified)
  int shards_copied = 0;
  int shards_resumed = 0;  // found complete in the destination's step-N.tmp
  uint64_t bytes_copied = 0;
};

// What a copy leaves free on the destination's file system at least.
inline constexpr uint64_t kReplicateReserveBytes = uint64_t{64} << 20;

// Replicates committed `step` of `src_dir` on `src` into `dst_dir` on `dst`. NotFound when the
// step is not committed at the source; DataLoss when the source is corrupt (nothing is
// committed at the destination) or the destination already holds a corrupt copy;
// FailedPrecondition, before anything is written, when the destination's file system
// (Volume::AvailableBytes) cannot hold the shards still to copy plus kReplicateReserveBytes.
StatusOr<ReplicateReport> Replicate(Volume* src, const std::string& src_dir, Volume* dst,
                                    const std::string& dst_dir, int64_t step);

}  // namespace muster::checkpoint
