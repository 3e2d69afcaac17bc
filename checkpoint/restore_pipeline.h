#pragma once

// The read side of Checkpointer::Restore: a plan of what to read, and the pipeline that reads it.
//
// A restore is planned as windows: block-aligned byte ranges of one shard file, each at most one
// staging slot long and read with one call. A window carries runs, the contiguous pieces of it
// that land in a destination. RestorePlanBuilder makes windows from runs; ExecuteRestorePlan
// runs reader threads that take windows in order, read each (O_DIRECT where the volume allows:
// slots, offsets and lengths are aligned) into a free slot of a ring of staging buffers (pinned
// when device destinations are restored), check the xxh3 of every block on those staged bytes,
// and only then deliver the window's runs: a memcpy for host destinations, an asynchronous copy
// through the DeviceCopier for device ones, which overlaps the next reads. A slot is refilled
// only after the copies out of it are done, and the pipeline waits for every copy before it
// returns, even after an error.
//
// Host destinations keep one shortcut: the whole blocks of a window with one contiguous run
// are read straight into the destination (no staging copy) and checked there; only its partial
// edge blocks pass through a slot. Device bytes are never delivered before they are checked.
//
// Thread-safety: a plan is a plain value; ExecuteRestorePlan is called by one thread at a time
// per ring.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/device_copier.h"
#include "checkpoint/manifest.h"
#include "checkpoint/staging.h"
#include "checkpoint/volume.h"

namespace muster::checkpoint {

// `len` bytes at `file_off` of the window's shard go to `dst`, contiguous in both.
struct RestoreRun {
  uint64_t file_off = 0;
  uint64_t len = 0;
  char* dst = nullptr;
};

struct RestoreWindow {
  int shard = 0;
  uint64_t begin = 0;  // block-aligned
  uint64_t end = 0;    // block-aligned, or the shard's size
  size_t first_run = 0;
  size_t num_runs = 0;
  MemoryKind kind = MemoryKind::kHost;
  const std::string* tensor = nullptr;  // for error messages; owned by the manifest
};

struct RestorePlan {
  std::vector<RestoreRun> runs;
  std::vector<RestoreWindow> windows;
  uint64_t max_window = 0;  // bytes of the largest window: the slot size
  uint64_t run_bytes = 0;   // bytes delivered in all
  // The first run the builder refused (a shard that does not exist, a byte range that wraps
  // around or ends past its shard); ExecuteRestorePlan returns it without reading anything.
  Status error;
};

// Builds a plan. Runs of one tensor slice are added in increasing file order; a run joins the
// current window when it is in the same shard, for the same tensor and kind of memory, starts in
// or right after the window's last block, and the window stays within `window_bytes`. Runs are
// split at multiples of `window_bytes` in the file. A run outside its shard file is refused
// (RestorePlan::error), never wrapped around.
class RestorePlanBuilder {
 public:
  // REQUIRES: window_bytes is a positive multiple of the manifest's block size.
  RestorePlanBuilder(const Manifest& m, uint64_t window_bytes);

  void AddRun(int shard, uint64_t file_off, uint64_t len, char* dst, MemoryKind kind,
              const std::string* tensor);
  RestorePlan Take() { return std::move(plan_); }

 private:
  void AddPiece(int shard, uint64_t file_off, uint64_t len, char* dst, MemoryKind kind,
                const std::string* tensor);
  const Manifest& m_;
  uint64_t window_bytes_;
  RestorePlan plan_;
};

struct RestoreIo {
  const Manifest* manifest = nullptr;
  int64_t step = 0;
  // Per shard index: a buffered file, and an O_DIRECT one where available (may be absent).
  std::map<int, ReadableFile*> files;
  std::map<int, ReadableFile*> direct_files;
  int threads = 1;
  int slots = 0;  // staging slots; 0: threads, plus 2 when there are device windows
  StagingBuffer* ring = nullptr;
  DeviceCopier* device = nullptr;  // REQUIRES: set when the plan has device windows
};

// Reads and delivers `plan`. The first error wins: DataLoss naming the tensor and step for a
// block that fails its checksum or a short file; the volume's or the device's error otherwise.
// A plan whose windows or runs fall outside their shard files (or the plan's own error) is
// refused before anything is read.
Status ExecuteRestorePlan(const RestorePlan& plan, const RestoreIo& io);

}  // namespace muster::checkpoint
