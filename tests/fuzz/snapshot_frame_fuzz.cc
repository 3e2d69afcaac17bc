// Snapshot frames from a rank or a peer agent (checkpoint/snapshot_frame.h): never crashes,
// whatever decodes re-encodes to the same bytes, and the store keeps it only within its limit.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "checkpoint/snapshot_frame.h"
#include "node_agent/snapshots/snapshot_store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  auto f = muster::checkpoint::DecodeSnapshotFrame(in, 1 << 16);
  if (in.size() >= muster::checkpoint::kSnapshotHeaderBytes) {
    (void)muster::checkpoint::DecodeSnapshotHeader(
        in.substr(0, muster::checkpoint::kSnapshotHeaderBytes), 1 << 16);
  }
  if (!f.ok()) return 0;
  auto back = muster::checkpoint::EncodeSnapshotFrame(f->key, f->payload);
  if (!back.ok() || *back != in) std::abort();
  muster::node_agent::SnapshotStore store({.memory_limit = 4096, .keep_steps = 2});
  (void)store.Put(*f);
  if (store.used_bytes() > 4096 || store.reserved_bytes() > 4096) std::abort();
  store.DropJob(f->key.job);
  if (store.used_bytes() != 0 || store.reserved_bytes() != 0) std::abort();
  return 0;
}
