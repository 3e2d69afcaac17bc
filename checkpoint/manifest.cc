#include "checkpoint/manifest.h"

#include <xxhash.h>

#include <algorithm>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>

namespace muster::checkpoint {

namespace {
constexpr char kTrailer[] = "\nxxh3:";

std::string Hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() * 2);
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

StatusOr<std::string> Unhex(const std::string& s) {
  if (s.size() % 2) return DataLossError("odd-length hex string");
  auto v = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::string out(s.size() / 2, '\0');
  for (size_t i = 0; i < out.size(); ++i) {
    int hi = v(s[2 * i]), lo = v(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return DataLossError("bad hex digit");
    out[i] = static_cast<char>(hi * 16 + lo);
  }
  return out;
}
}  // namespace

uint64_t Xxh3(const void* data, size_t n) { return XXH3_64bits(data, n); }

std::string HexU64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

int64_t NumElements(const std::vector<int64_t>& lengths) {
  int64_t n = 1;
  for (int64_t l : lengths) n *= l;
  return n;
}

const TensorEntry* Manifest::Find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

uint64_t Manifest::TotalBytes() const {
  uint64_t n = 0;
  for (const auto& s : shards) n += s.size;
  return n;
}

std::string StepDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%09" PRId64, step);
  return buf;
}

std::optional<int64_t> ParseStepDirName(const std::string& name, bool* incomplete) {
  if (name.rfind("step-", 0) != 0) return std::nullopt;
  std::string rest = name.substr(5);
  bool tmp = false;
  if (rest.size() > 4 && rest.compare(rest.size() - 4, 4, ".tmp") == 0) {
    tmp = true;
    rest.resize(rest.size() - 4);
  }
  if (rest.empty() || rest.size() > 18) return std::nullopt;
  for (char c : rest)
    if (c < '0' || c > '9') return std::nullopt;
  if (incomplete) *incomplete = tmp;
  return std::stoll(rest);
}

std::string ShardFileName(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "shard-%05d.bin", rank);
  return buf;
}

std::string SerializeManifest(const Manifest& m) {
  using nlohmann::json;
  json j;
  j["format"] = "muster-checkpoint";
  j["version"] = m.version;
  j["step"] = m.step;
  j["world_size"] = m.world_size;
  j["block_size"] = m.block_size;
  j["created_unix_ms"] = m.created_unix_ms;
  json shards = json::array();
  for (const auto& s : m.shards) {
    json hashes = json::array();
    for (uint64_t h : s.block_xxh3) hashes.push_back(HexU64(h));
    shards.push_back({{"rank", s.rank},
                      {"file", s.file},
                      {"size", s.size},
                      {"block_xxh3", hashes},
                      {"metadata_hex", Hex(s.metadata)}});
  }
  j["shards"] = shards;
  json tensors = json::array();
  for (const auto& t : m.tensors) {
    json slices = json::array();
    for (const auto& s : t.slices) {
      slices.push_back({{"shard", s.shard},
                        {"offsets", s.offsets},
                        {"lengths", s.lengths},
                        {"byte_offset", s.byte_offset},
                        {"byte_length", s.byte_length}});
    }
    tensors.push_back({{"name", t.name},
                       {"dtype", DTypeName(t.dtype)},
                       {"shape", t.shape},
                       {"replicated", t.replicated},
                       {"slices", slices}});
  }
  j["tensors"] = tensors;
  std::string body = j.dump(1);
  return body + kTrailer + HexU64(Xxh3(body.data(), body.size())) + "\n";
}

namespace {

using nlohmann::json;

std::string TensorWhere(const TensorEntry& t) { return "manifest: tensor '" + t.name + "'"; }

// Integers from the JSON, range-checked: nlohmann's get<> casts out-of-range values silently.
StatusOr<uint64_t> JsonU64(const json& j, const char* what) {
  if (j.is_number_unsigned()) return j.get<uint64_t>();
  if (j.is_number_integer()) {
    return DataLossError(std::string("manifest: ") + what + " must not be negative");
  }
  return DataLossError(std::string("manifest: ") + what + " is not an unsigned 64-bit integer");
}

StatusOr<int64_t> JsonI64(const json& j, const char* what) {
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) {
      return DataLossError(std::string("manifest: ") + what + " is out of range");
    }
    return static_cast<int64_t>(v);
  }
  if (j.is_number_integer()) return j.get<int64_t>();
  return DataLossError(std::string("manifest: ") + what + " is not a 64-bit integer");
}

StatusOr<int> JsonInt(const json& j, const char* what) {
  MUSTER_ASSIGN_OR_RETURN(int64_t v, JsonI64(j, what));
  if (v < INT_MIN || v > INT_MAX) {
    return DataLossError(std::string("manifest: ") + what + " is out of range");
  }
  return static_cast<int>(v);
}

StatusOr<std::vector<int64_t>> JsonDims(const json& j, const char* what) {
  if (!j.is_array()) return DataLossError(std::string("manifest: ") + what + " is not an array");
  if (j.size() > kMaxTensorDims) {
    return DataLossError(std::string("manifest: ") + what + " has " + std::to_string(j.size()) +
                         " dimensions, more than " + std::to_string(kMaxTensorDims));
  }
  std::vector<int64_t> out;
  out.reserve(j.size());
  for (const auto& e : j) {
    MUSTER_ASSIGN_OR_RETURN(int64_t v, JsonI64(e, what));
    out.push_back(v);
  }
  return out;
}

StatusOr<uint64_t> ParseHash(const json& j) {
  if (!j.is_string()) return DataLossError("manifest: a block checksum is not a string");
  const std::string& h = j.get_ref<const std::string&>();
  if (h.empty() || h.size() > 16) return DataLossError("manifest: bad block checksum '" + h + "'");
  uint64_t v = 0;
  for (char c : h) {
    int d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      d = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      d = c - 'A' + 10;
    } else {
      return DataLossError("manifest: bad block checksum '" + h + "'");
    }
    v = v << 4 | static_cast<uint64_t>(d);
  }
  return v;
}

bool PlainFileName(const std::string& f) {
  if (f.empty() || f.size() > 255 || f == "." || f == "..") return false;
  for (char c : f)
    if (c == '/' || c == '\0') return false;
  return true;
}

// Checks that the non-empty slices of `t` do not overlap. Sweeps along the dimension in which
// the slices are cut the most, so a row-, column- or grid-sharded tensor costs about one
// comparison per slice; `*budget` bounds the comparisons of a whole manifest.
Status CheckNoOverlap(const TensorEntry& t, uint64_t* budget) {
  const size_t nd = t.shape.size();
  std::vector<const StoredSlice*> v;
  for (const auto& s : t.slices) {
    if (NumElements(s.lengths) > 0) v.push_back(&s);
  }
  if (v.size() < 2) return Status::Ok();
  if (nd == 0) return DataLossError(TensorWhere(t) + ": a scalar is stored more than once");
  size_t dim = 0, most = 0;
  for (size_t d = 0; d < nd; ++d) {
    std::vector<int64_t> offs;
    offs.reserve(v.size());
    for (const auto* s : v) offs.push_back(s->offsets[d]);
    std::sort(offs.begin(), offs.end());
    const size_t distinct = std::unique(offs.begin(), offs.end()) - offs.begin();
    if (distinct > most) {
      most = distinct;
      dim = d;
    }
  }
  std::sort(v.begin(), v.end(), [dim](const StoredSlice* a, const StoredSlice* b) {
    return a->offsets[dim] < b->offsets[dim];
  });
  auto show = [](const StoredSlice& s) {
    std::string r = "[";
    for (size_t d = 0; d < s.offsets.size(); ++d) {
      r += (d ? "," : "") + std::to_string(s.offsets[d]) + "+" + std::to_string(s.lengths[d]);
    }
    return r + "]";
  };
  std::vector<const StoredSlice*> active;
  for (const StoredSlice* s : v) {
    const int64_t lo = s->offsets[dim];
    size_t keep = 0;
    for (const StoredSlice* a : active) {
      if (a->offsets[dim] + a->lengths[dim] <= lo) continue;  // ended before s begins
      active[keep++] = a;
      if (*budget == 0) {
        return DataLossError(TensorWhere(t) + ": its " + std::to_string(t.slices.size()) +
                             " slices are laid out too irregularly to check for overlap");
      }
      --*budget;
      bool overlap = true;
      for (size_t d = 0; d < nd && overlap; ++d) {
        overlap = std::max(a->offsets[d], s->offsets[d]) <
                  std::min(a->offsets[d] + a->lengths[d], s->offsets[d] + s->lengths[d]);
      }
      if (overlap) {
        return DataLossError(TensorWhere(t) + ": slices " + show(*a) + " and " + show(*s) +
                             " overlap, so part of the tensor is stored twice and part of it " +
                             "is missing");
      }
    }
    active.resize(keep);
    active.push_back(s);
  }
  return Status::Ok();
}

}  // namespace

std::optional<int64_t> CheckedNumElements(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  return n;
}

Status ValidateManifest(const Manifest& m, ManifestScope scope) {
  if (m.version != kFormatVersion) {
    return InvalidArgumentError("manifest: format version " + std::to_string(m.version) +
                                " is not supported (this build reads version " +
                                std::to_string(kFormatVersion) + ")");
  }
  if (m.step < 0) return DataLossError("manifest: step is negative");
  if (m.world_size <= 0 || m.world_size > kMaxWorldSize) {
    return DataLossError("manifest: world_size " + std::to_string(m.world_size) +
                         " is outside [1, " + std::to_string(kMaxWorldSize) + "]");
  }
  if (m.block_size == 0 || m.block_size > kMaxBlockSize) {
    return DataLossError("manifest: block_size " + std::to_string(m.block_size) +
                         " is outside [1, " + std::to_string(kMaxBlockSize) + "]");
  }
  std::set<std::string> files;
  std::set<int> ranks;
  for (const auto& s : m.shards) {
    if (!PlainFileName(s.file))
      return DataLossError("manifest: bad shard file name '" + s.file + "'");
    if (!files.insert(s.file).second) {
      return DataLossError("manifest: shard file '" + s.file + "' is named twice");
    }
    if (s.rank < 0 || s.rank >= m.world_size) {
      return DataLossError("manifest: " + s.file + " belongs to rank " + std::to_string(s.rank) +
                           ", outside world size " + std::to_string(m.world_size));
    }
    if (!ranks.insert(s.rank).second) {
      return DataLossError("manifest: rank " + std::to_string(s.rank) + " has two shards");
    }
    if (s.size > static_cast<uint64_t>(INT64_MAX)) {
      return DataLossError("manifest: " + s.file + " size " + std::to_string(s.size) +
                           " is out of range");
    }
    const uint64_t blocks = s.size / m.block_size + (s.size % m.block_size != 0);
    if (s.block_xxh3.size() != blocks) {
      return DataLossError("manifest: " + s.file + " has " + std::to_string(s.block_xxh3.size()) +
                           " block checksums for " + std::to_string(blocks) + " blocks");
    }
  }
  std::set<std::string> names;
  uint64_t budget = kMaxOverlapComparisons;
  for (const auto& t : m.tensors) {
    if (!names.insert(t.name).second) {
      return DataLossError(TensorWhere(t) + " is listed twice");
    }
    if (t.shape.size() > kMaxTensorDims) {
      return DataLossError(TensorWhere(t) + " has more than " + std::to_string(kMaxTensorDims) +
                           " dimensions");
    }
    for (int64_t d : t.shape)
      if (d < 0) return DataLossError(TensorWhere(t) + " has a negative dim");
    const int64_t es = static_cast<int64_t>(DTypeSize(t.dtype));
    std::optional<int64_t> total = CheckedNumElements(t.shape);
    int64_t total_bytes = 0;
    if (!total || __builtin_mul_overflow(*total, es, &total_bytes)) {
      return DataLossError(TensorWhere(t) + ": its shape's size overflows 64 bits");
    }
    uint64_t covered = 0;
    for (const auto& s : t.slices) {
      if (s.shard < 0 || s.shard >= static_cast<int>(m.shards.size())) {
        return DataLossError(TensorWhere(t) + " names a missing shard");
      }
      if (s.offsets.size() != t.shape.size() || s.lengths.size() != t.shape.size()) {
        return DataLossError(TensorWhere(t) + ": slice rank mismatch");
      }
      for (size_t d = 0; d < t.shape.size(); ++d) {
        // off <= shape and len <= shape - off: no overflow on the way.
        if (s.offsets[d] < 0 || s.lengths[d] < 0 || s.offsets[d] > t.shape[d] ||
            s.lengths[d] > t.shape[d] - s.offsets[d]) {
          return DataLossError(TensorWhere(t) + ": slice out of bounds in dimension " +
                               std::to_string(d));
        }
      }
      // Inside the shape, so neither product can overflow.
      const int64_t elems = NumElements(s.lengths);
      const uint64_t bytes = static_cast<uint64_t>(elems) * static_cast<uint64_t>(es);
      const ShardEntry& shard = m.shards[s.shard];
      uint64_t end = 0;
      if (bytes != s.byte_length || __builtin_add_overflow(s.byte_offset, s.byte_length, &end) ||
          end > shard.size) {
        return DataLossError(TensorWhere(t) + ": byte range [" + std::to_string(s.byte_offset) +
                             ", +" + std::to_string(s.byte_length) + ") is inconsistent with " +
                             "its slice or outside " + shard.file + " (" +
                             std::to_string(shard.size) + " bytes)");
      }
      covered += static_cast<uint64_t>(elems);  // each <= total < 2^63: no wrap for 2^63 slices
      if (covered > static_cast<uint64_t>(*total) && scope == ManifestScope::kComplete) {
        return DataLossError(TensorWhere(t) + ": its slices hold more than its " +
                             std::to_string(*total) + " elements (they overlap)");
      }
    }
    if (scope != ManifestScope::kComplete) continue;
    if (covered != static_cast<uint64_t>(*total)) {
      return DataLossError(TensorWhere(t) + ": its slices cover " + std::to_string(covered) +
                           " of its " + std::to_string(*total) + " elements");
    }
    MUSTER_RETURN_IF_ERROR(CheckNoOverlap(t, &budget));
  }
  return Status::Ok();
}

StatusOr<Manifest> ParseManifest(const std::string& bytes, ManifestScope scope) {
  if (bytes.size() > kMaxManifestBytes) {
    return InvalidArgumentError("manifest: " + std::to_string(bytes.size()) +
                                " bytes, more than the limit of " +
                                std::to_string(kMaxManifestBytes));
  }
  size_t pos = bytes.rfind(kTrailer);
  if (pos == std::string::npos) return DataLossError("manifest: no checksum trailer (torn?)");
  std::string body = bytes.substr(0, pos);
  std::string want = bytes.substr(pos + sizeof(kTrailer) - 1);
  while (!want.empty() && want.back() == '\n') want.pop_back();
  if (HexU64(Xxh3(body.data(), body.size())) != want) {
    return DataLossError("manifest: checksum mismatch");
  }
  Manifest m;
  try {
    auto j = json::parse(body);
    if (!j.is_object()) return DataLossError("manifest: not a JSON object");
    if (j.at("format") != "muster-checkpoint") {
      return DataLossError("manifest: not a muster checkpoint");
    }
    MUSTER_ASSIGN_OR_RETURN(m.version, JsonInt(j.at("version"), "version"));
    if (m.version != kFormatVersion) {
      return InvalidArgumentError("manifest: format version " + std::to_string(m.version) +
                                  " is not supported (this build reads version " +
                                  std::to_string(kFormatVersion) + ")");
    }
    MUSTER_ASSIGN_OR_RETURN(m.step, JsonI64(j.at("step"), "step"));
    MUSTER_ASSIGN_OR_RETURN(m.world_size, JsonInt(j.at("world_size"), "world_size"));
    MUSTER_ASSIGN_OR_RETURN(m.block_size, JsonU64(j.at("block_size"), "block_size"));
    MUSTER_ASSIGN_OR_RETURN(m.created_unix_ms, JsonI64(j.at("created_unix_ms"), "created_unix_ms"));
    // Checked before the shards' checksums are read: the count of checksums depends on it.
    if (m.block_size == 0 || m.block_size > kMaxBlockSize) {
      return DataLossError("manifest: block_size " + std::to_string(m.block_size) +
                           " is outside [1, " + std::to_string(kMaxBlockSize) + "]");
    }
    const json& shards = j.at("shards");
    const json& tensors = j.at("tensors");
    if (!shards.is_array() || !tensors.is_array()) {
      return DataLossError("manifest: shards and tensors must be arrays");
    }
    for (const auto& s : shards) {
      ShardEntry e;
      MUSTER_ASSIGN_OR_RETURN(e.rank, JsonInt(s.at("rank"), "shard rank"));
      e.file = s.at("file").get<std::string>();
      if (!PlainFileName(e.file)) {
        return DataLossError("manifest: bad shard file name '" + e.file + "'");
      }
      MUSTER_ASSIGN_OR_RETURN(e.size, JsonU64(s.at("size"), "shard size"));
      const auto& hashes = s.at("block_xxh3");
      if (!hashes.is_array()) return DataLossError("manifest: block_xxh3 is not an array");
      e.block_xxh3.reserve(hashes.size());
      for (const auto& h : hashes) {
        MUSTER_ASSIGN_OR_RETURN(uint64_t v, ParseHash(h));
        e.block_xxh3.push_back(v);
      }
      MUSTER_ASSIGN_OR_RETURN(e.metadata, Unhex(s.at("metadata_hex").get<std::string>()));
      m.shards.push_back(std::move(e));
    }
    for (const auto& t : tensors) {
      TensorEntry e;
      e.name = t.at("name").get<std::string>();
      auto dt = ParseDType(t.at("dtype").get<std::string>());
      if (!dt.ok()) return DataLossError("manifest: " + dt.status().message());
      e.dtype = *dt;
      MUSTER_ASSIGN_OR_RETURN(e.shape, JsonDims(t.at("shape"), "shape"));
      e.replicated = t.at("replicated").get<bool>();
      const json& slices = t.at("slices");
      if (!slices.is_array()) return DataLossError("manifest: slices is not an array");
      for (const auto& s : slices) {
        StoredSlice sl;
        MUSTER_ASSIGN_OR_RETURN(sl.shard, JsonInt(s.at("shard"), "slice shard"));
        MUSTER_ASSIGN_OR_RETURN(sl.offsets, JsonDims(s.at("offsets"), "slice offsets"));
        MUSTER_ASSIGN_OR_RETURN(sl.lengths, JsonDims(s.at("lengths"), "slice lengths"));
        MUSTER_ASSIGN_OR_RETURN(sl.byte_offset, JsonU64(s.at("byte_offset"), "byte_offset"));
        MUSTER_ASSIGN_OR_RETURN(sl.byte_length, JsonU64(s.at("byte_length"), "byte_length"));
        e.slices.push_back(std::move(sl));
      }
      m.tensors.push_back(std::move(e));
    }
  } catch (const std::exception& e) {
    return DataLossError(std::string("manifest: malformed: ") + e.what());
  }
  MUSTER_RETURN_IF_ERROR(ValidateManifest(m, scope));
  return m;
}

StatusOr<int64_t> ParseLatest(const std::string& bytes) {
  if (bytes.size() > kMaxLatestBytes) {
    return DataLossError("LATEST: " + std::to_string(bytes.size()) + " bytes, more than " +
                         std::to_string(kMaxLatestBytes));
  }
  std::string name = bytes;
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ' || name.back() == '\r' ||
                           name.back() == '\t')) {
    name.pop_back();
  }
  bool incomplete = false;
  auto step = ParseStepDirName(name, &incomplete);
  if (!step || incomplete) {
    std::string shown = name.substr(0, 64);
    for (char& c : shown)
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
    return DataLossError("LATEST does not name a committed step: '" + shown + "'");
  }
  return *step;
}

}  // namespace muster::checkpoint
