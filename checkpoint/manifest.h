#pragma once

// Manifest: what one committed checkpoint holds (docs/checkpoint-format.md, version 1). It is
// the MANIFEST file of a step directory: JSON followed by a trailer line carrying the xxh3 of
// the JSON, so a torn or edited manifest is detected rather than half-parsed.
//
// Thread-safety: plain values.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace muster::checkpoint {

inline constexpr int kFormatVersion = 1;
inline constexpr char kManifestName[] = "MANIFEST";
inline constexpr char kLatestName[] = "LATEST";

// Limits a reader applies to what it finds on a volume (docs/checkpoint-format.md, "What a
// reader checks"). Everything read from a volume is untrusted: a MANIFEST or LATEST over its
// limit is refused by its size before any of it is read.
inline constexpr uint64_t kMaxManifestBytes = uint64_t{64} << 20;
inline constexpr uint64_t kMaxLatestBytes = 4096;
inline constexpr uint64_t kMaxBlockSize = uint64_t{256} << 20;
inline constexpr int kMaxWorldSize = 1 << 20;
inline constexpr size_t kMaxTensorDims = 64;
// Pairs of slices compared for overlap in one manifest; a layout that needs more is refused
// (row, column and 2-D grid shardings need about one comparison per slice).
inline constexpr uint64_t kMaxOverlapComparisons = uint64_t{1} << 26;

// A tensor's element type: common/dtype.h, shared with the collectives. A MANIFEST records it
// by DTypeName.
using muster::DType;
using muster::DTypeName;
using muster::DTypeSize;
using muster::ParseDType;

// One stored piece of a tensor: the box [offsets, offsets + lengths) of the global shape,
// stored row-major and contiguous at [byte_offset, byte_offset + byte_length) of a shard file.
struct StoredSlice {
  int shard = 0;  // index into Manifest::shards
  std::vector<int64_t> offsets;
  std::vector<int64_t> lengths;
  uint64_t byte_offset = 0;
  uint64_t byte_length = 0;
};

struct TensorEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  bool replicated = false;
  std::vector<StoredSlice> slices;
};

struct ShardEntry {
  int rank = 0;
  std::string file;  // relative to the step directory
  uint64_t size = 0;
  // xxh3-64 of each block_size block of the file (the last one may be short).
  std::vector<uint64_t> block_xxh3;
  std::string metadata;  // the rank's opaque user metadata
};

struct Manifest {
  int version = kFormatVersion;
  int64_t step = 0;
  int world_size = 1;
  uint64_t block_size = 1 << 20;
  int64_t created_unix_ms = 0;
  std::vector<ShardEntry> shards;
  std::vector<TensorEntry> tensors;

  const TensorEntry* Find(const std::string& name) const;
  uint64_t TotalBytes() const;
  // Rank 0's metadata, or empty.
  std::string UserMetadata() const { return shards.empty() ? "" : shards[0].metadata; }
};

std::string SerializeManifest(const Manifest& m);

// What ParseManifest checks beyond the structure.
enum class ManifestScope {
  // A whole checkpoint's MANIFEST: every tensor is covered exactly (no overlap, no gap).
  kComplete,
  // One rank's report of its own slices before the commit: coverage is checked later, by the
  // committing rank over every report.
  kRankReport,
};

// DataLoss if the checksum trailer does not match, the JSON is malformed, or a value is out of
// range: block_size in (0, kMaxBlockSize], world_size in [1, kMaxWorldSize], every shard's rank
// in [0, world_size) and its file a plain unique name, one checksum per block, every size,
// offset and length non-negative and free of overflow, every slice inside its tensor and its
// byte range inside its shard file, unique tensor names, and (kComplete) exact coverage naming
// the tensor that is not. InvalidArgument for an unsupported version or bytes over
// kMaxManifestBytes.
StatusOr<Manifest> ParseManifest(const std::string& bytes,
                                 ManifestScope scope = ManifestScope::kComplete);

// The checks of ParseManifest on an already-built manifest.
Status ValidateManifest(const Manifest& m, ManifestScope scope = ManifestScope::kComplete);

// LATEST's contents: "step-N" and optional trailing whitespace. DataLoss for anything else,
// including more than kMaxLatestBytes.
StatusOr<int64_t> ParseLatest(const std::string& bytes);

// "step-000000100" and back.
std::string StepDirName(int64_t step);
// Parses "step-N" (committed) and "step-N.tmp" (in progress); nullopt for other names.
std::optional<int64_t> ParseStepDirName(const std::string& name, bool* incomplete);
std::string ShardFileName(int rank);

// Number of elements of a box. REQUIRES: the product fits (true of every validated manifest's
// shapes and slices); CheckedNumElements is the checked form.
int64_t NumElements(const std::vector<int64_t>& lengths);
// The product of `dims`, or nullopt when a dim is negative or the product exceeds INT64_MAX.
std::optional<int64_t> CheckedNumElements(const std::vector<int64_t>& dims);

uint64_t Xxh3(const void* data, size_t n);
std::string HexU64(uint64_t v);

}  // namespace muster::checkpoint
