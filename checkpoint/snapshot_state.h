#pragma once

// A rank's checkpoint state as the payload of an in-memory snapshot (checkpoint/snapshot_frame.h):
// the tensors it passes to Checkpointer::Save, with their layout, and its opaque metadata, in one
// byte string; and the way back into a rank's memory.
//
// Payload layout (little-endian): u32 index length | index (JSON: per tensor its name, dtype,
// global shape, this rank's box, replicated flag, byte offset and length in the data part;
// and the metadata's length) | data part: the tensors' bytes back to back, then the metadata.
//
// Unlike a volume checkpoint, a snapshot is restored by the rank that saved it (same world size,
// same slices): RestoreSnapshotState copies each requested tensor whose box equals the saved box
// (or the whole tensor, for a whole or replicated one). Re-sharding to another world size goes
// through the volume.
//
// Thread-safety: pure functions (they read and write the callers' buffers).

#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "common/status.h"

namespace muster::checkpoint {

// The payload for `state`. InvalidArgument for a state Checkpointer::Save would refuse (a
// duplicate or empty name, a box outside the shape, a missing data pointer);
// FailedPrecondition for a CUDA tensor (snapshots copy host memory only, for now).
struct SnapshotIndexCache;
StatusOr<std::string> EncodeSnapshotState(const SaveState& state);
// The same into `out` (its capacity is reused: a caller that keeps the buffer between snapshots
// pays for no new pages). `out` is unspecified after an error.
Status EncodeSnapshotStateInto(const SaveState& state, std::string* out,
                               SnapshotIndexCache* cache = nullptr);

// Where one tensor's bytes of a SaveState are, in this process.
struct SnapshotSpan {
  const void* data = nullptr;
  uint64_t bytes = 0;
};
// The payload of `state` in parts, without copying a tensor: `head` (the index's length and the
// index), then each tensor's bytes in order (`spans`), then state.metadata. The same checks as
// EncodeSnapshotStateInto; its payload is head, the spans' bytes and the metadata, concatenated.
//
// `cache`, when given, keeps the last index encoded: a rank snapshots the same tensors every
// step, so while the layout (every tensor's name, dtype, shape, box, replication and memory
// kind, in order) is that of the last call, the index's list of tensors is reused instead of
// built again (with nlohmann::json, most of a rank's CPU per snapshot); the metadata's size,
// which changes from step to step, is written each time. A cache is not safe to use from two
// threads at once.
struct SnapshotIndexCache {
  std::vector<TensorRef> layout;  // data pointers cleared
  std::vector<uint64_t> bytes;    // each tensor's
  std::string tensors;            // the index's "tensors" array, encoded
  bool valid = false;
};
Status EncodeSnapshotStateParts(const SaveState& state, std::string* head,
                                std::vector<SnapshotSpan>* spans,
                                SnapshotIndexCache* cache = nullptr);

// One tensor of a payload, as its index describes it.
struct SnapshotTensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape, offsets, lengths;  // the global shape and this rank's box
  bool replicated = false;
  uint64_t bytes = 0;
};

// The tensors `payload` holds, in its index's order, and (when given) its metadata; every field
// checked as RestoreSnapshotState checks it (DataLoss naming what is malformed). Copies no
// tensor bytes: a caller sizes its destinations from this before restoring.
StatusOr<std::vector<SnapshotTensorInfo>> ReadSnapshotIndex(std::string_view payload,
                                                            std::string* metadata = nullptr);

// Copies the requested tensors out of `payload` (which may come from another node: every
// field is checked before a byte is copied; DataLoss names what is malformed). NotFound for a
// tensor not in it; InvalidArgument for a dtype or box that does not match the saved one;
// FailedPrecondition for a CUDA destination. On success `metadata` (when given) receives the
// saved metadata.
Status RestoreSnapshotState(std::string_view payload, const std::vector<RestoreRequest>& requests,
                            std::string* metadata = nullptr);

}  // namespace muster::checkpoint
