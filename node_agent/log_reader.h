#pragma once

// Reads a rank's log file for a follower (`muster logs -f`, `muster run` against a coordinator)
// across the size-based rotation of node_agent/supervisor.h: PATH is the live part, PATH.1 the
// newest rotated part, PATH.2 the one before, and so on.
//
// A follower's position is a cursor {generation, offset}: the identity of the part its offset
// counts in (its inode number mixed with its birth time, which a rename keeps), and the
// offset. A rotation renames PATH to PATH.1, so a follower whose part was rotated is found
// again by that identity: it first reads the
// rest of that part, then moves to the next newer one at offset 0, and so loses nothing while
// its part is still kept. Only when its part was dropped (more rotations than kept parts since
// its last read) does it go on from the oldest kept part, and the chunk says data was skipped.
//
// Generation 0 is a follower that has none yet: offset 0 reads from the beginning of what is
// kept (the oldest part), -1 reads the tail of `max_bytes` of the live part, and any other
// offset (an older client's) counts in the live part as before (past its end restarts it).
//
// Every part is opened once per call and read through its descriptor, so a rotation racing
// the read cannot mix two parts' bytes. The birth time tells a new part from a dropped one
// whose inode number it reuses; on a filesystem that keeps no birth time a follower more than
// `keep` rotations behind may land in the newer part without `skipped`: it has lost data
// either way.
//
// Thread-safety: a free function; touches only the files.

#include <cstdint>
#include <filesystem>
#include <string>

#include "common/status.h"

namespace muster::node_agent {

struct LogCursor {
  uint64_t generation = 0;  // the part `offset` counts in; 0: the live part
  int64_t offset = 0;       // -1: the tail of max_bytes of the live part
};

struct LogRead {
  std::string data;
  LogCursor next;            // where the follower goes on from
  bool skipped = false;      // bytes between the cursor and `data` were dropped by rotation
  bool at_live_end = false;  // `next` is the end of the live part: nothing more to read now
};

// The most rotated parts looked at (PATH.1 .. PATH.kMaxParts).
inline constexpr int kMaxLogParts = 64;

// Reads at most `max_bytes` (> 0) from `cursor`. Errors, so that a reader can tell what to do
// (the coordinator's log copy gives up, or asks again; see LogFileError):
//   NotFound            the log does not exist (no part of it);
//   FailedPrecondition  it cannot be read: permission denied, or the live part is a symlink or
//                       not a regular file (refused, never followed);
//   DataLoss            an I/O error;
//   Unavailable         out of descriptors or memory for now: worth asking again;
//   Internal            any other error.
StatusOr<LogRead> ReadLog(const std::filesystem::path& path, LogCursor cursor, int64_t max_bytes);

// The Status for errno `err` of an operation on a log file, `what` naming it: ENOENT and
// ENOTDIR NotFound; EACCES and EPERM FailedPrecondition; EIO DataLoss; EINTR, EAGAIN, EMFILE,
// ENFILE and ENOMEM Unavailable; else as common/status.h's ErrnoStatus.
Status LogFileError(int err, const std::string& what);

}  // namespace muster::node_agent
