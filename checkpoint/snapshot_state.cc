#include "checkpoint/snapshot_state.h"

#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint/manifest.h"

namespace muster::checkpoint {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxIndexBytes = 64u << 20;

struct Entry {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape, offsets, lengths;
  bool replicated = false;
  uint64_t at = 0, bytes = 0;
};

Status CheckBox(const std::string& what, const std::vector<int64_t>& shape,
                const std::vector<int64_t>& offsets, const std::vector<int64_t>& lengths) {
  if (offsets.size() != shape.size() || lengths.size() != shape.size()) {
    return InvalidArgumentError(what + ": box rank does not match the shape's");
  }
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0 || offsets[d] < 0 || lengths[d] < 0 || offsets[d] > shape[d] ||
        lengths[d] > shape[d] - offsets[d]) {
      return InvalidArgumentError(what + ": dimension " + std::to_string(d) +
                                  " is outside the shape");
    }
  }
  if (!CheckedNumElements(shape)) return InvalidArgumentError(what + ": shape is too large");
  return Status::Ok();
}

StatusOr<std::vector<int64_t>> Ints(const json& j, const std::string& what) {
  if (!j.is_array() || j.size() > 64) return DataLossError("snapshot state: " + what + " is bad");
  std::vector<int64_t> out;
  for (const auto& v : j) {
    if (!v.is_number_integer()) return DataLossError("snapshot state: " + what + " is bad");
    out.push_back(v.get<int64_t>());
  }
  return out;
}

}  // namespace

StatusOr<std::string> EncodeSnapshotState(const SaveState& state) {
  std::string out;
  MUSTER_RETURN_IF_ERROR(EncodeSnapshotStateInto(state, &out));
  return out;
}

namespace {

bool SameLayout(const TensorRef& a, const TensorRef& b) {
  return a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.offsets == b.offsets &&
         a.lengths == b.lengths && a.replicated == b.replicated && a.memory == b.memory;
}

}  // namespace

Status EncodeSnapshotStateParts(const SaveState& state, std::string* head,
                                std::vector<SnapshotSpan>* spans, SnapshotIndexCache* cache) {
  // The index: {"metadata_bytes":N,"tensors":[...]}, the tensors' array built (or reused) alone.
  auto write_head = [&](const std::string& tensors) {
    std::string idx = "{\"metadata_bytes\":" + std::to_string(state.metadata.size()) +
                      ",\"tensors\":" + tensors + "}";
    head->clear();
    uint32_t n = static_cast<uint32_t>(idx.size());
    for (int i = 0; i < 4; ++i) head->push_back(static_cast<char>((n >> (8 * i)) & 0xff));
    head->append(idx);
  };
  if (cache != nullptr && cache->valid && cache->layout.size() == state.tensors.size()) {
    bool same = true;
    for (size_t i = 0; same && i < state.tensors.size(); ++i) {
      same = SameLayout(state.tensors[i], cache->layout[i]);
    }
    if (same) {
      // Checked when the cached index was built; only the data pointers are new.
      spans->clear();
      spans->reserve(state.tensors.size());
      for (size_t i = 0; i < state.tensors.size(); ++i) {
        const TensorRef& t = state.tensors[i];
        if (cache->bytes[i] > 0 && !t.data) {
          return InvalidArgumentError("snapshot: tensor '" + t.name + "' has no data pointer");
        }
        spans->push_back({t.data, cache->bytes[i]});
      }
      write_head(cache->tensors);
      return Status::Ok();
    }
  }
  if (cache != nullptr) cache->valid = false;
  json tensors = json::array();
  std::set<std::string> names;
  uint64_t pos = 0;
  spans->clear();
  spans->reserve(state.tensors.size());
  for (const TensorRef& t : state.tensors) {
    std::string what = "snapshot: tensor '" + t.name + "'";
    if (t.name.empty()) return InvalidArgumentError("snapshot: a tensor has an empty name");
    if (!names.insert(t.name).second) return InvalidArgumentError(what + " is given twice");
    if (t.memory == MemoryKind::kCuda) {
      return FailedPreconditionError(what + " is in CUDA memory; snapshots hold host tensors only");
    }
    std::vector<int64_t> off = t.offsets, len = t.lengths;
    if (off.empty() && len.empty()) {
      off.assign(t.shape.size(), 0);
      len = t.shape;
    }
    MUSTER_RETURN_IF_ERROR(CheckBox(what, t.shape, off, len));
    uint64_t bytes = static_cast<uint64_t>(NumElements(len)) * DTypeSize(t.dtype);
    if (bytes > 0 && !t.data) return InvalidArgumentError(what + " has no data pointer");
    tensors.push_back({{"name", t.name},
                       {"dtype", DTypeName(t.dtype)},
                       {"shape", t.shape},
                       {"offsets", off},
                       {"lengths", len},
                       {"replicated", t.replicated},
                       {"at", pos},
                       {"bytes", bytes}});
    pos += bytes;
    spans->push_back({t.data, bytes});
  }
  std::string dumped = tensors.dump();
  write_head(dumped);
  if (cache != nullptr) {
    cache->layout = state.tensors;
    cache->bytes.clear();
    for (size_t i = 0; i < cache->layout.size(); ++i) {
      cache->layout[i].data = nullptr;
      cache->bytes.push_back((*spans)[i].bytes);
    }
    cache->tensors = std::move(dumped);
    cache->valid = true;
  }
  return Status::Ok();
}

Status EncodeSnapshotStateInto(const SaveState& state, std::string* out_ptr,
                               SnapshotIndexCache* cache) {
  std::string& out = *out_ptr;
  std::string head;
  std::vector<SnapshotSpan> spans;
  MUSTER_RETURN_IF_ERROR(EncodeSnapshotStateParts(state, &head, &spans, cache));
  uint64_t total = head.size() + state.metadata.size();
  for (const SnapshotSpan& s : spans) total += s.bytes;
  out.clear();
  out.reserve(total);
  out += head;
  // Appended in order ("at" is the running sum): one copy, no zero fill first.
  for (const SnapshotSpan& s : spans) {
    if (s.bytes > 0) out.append(static_cast<const char*>(s.data), s.bytes);
  }
  out += state.metadata;
  return Status::Ok();
}

namespace {

// The payload's index, checked field by field, and the parts it describes.
struct ParsedIndex {
  std::vector<std::pair<std::string, Entry>> tensors;  // in index order
  std::map<std::string, size_t> by_name;
  std::string_view data;      // the tensors' bytes, then the metadata
  uint64_t tensor_bytes = 0;  // where the metadata starts in `data`
};

StatusOr<ParsedIndex> ParseIndex(std::string_view payload) {
  if (payload.size() < 4) return DataLossError("snapshot state: shorter than its index length");
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= uint32_t{static_cast<unsigned char>(payload[i])} << (8 * i);
  if (n > kMaxIndexBytes || n > payload.size() - 4) {
    return DataLossError("snapshot state: index length " + std::to_string(n) +
                         " does not fit the payload");
  }
  json index = json::parse(payload.substr(4, n), nullptr, /*allow_exceptions=*/false);
  if (!index.is_object() || !index.contains("tensors") || !index["tensors"].is_array() ||
      !index.contains("metadata_bytes") || !index["metadata_bytes"].is_number_unsigned()) {
    return DataLossError("snapshot state: the index is not a valid object");
  }
  ParsedIndex out;
  out.data = payload.substr(4 + n);
  uint64_t meta_bytes = index["metadata_bytes"].get<uint64_t>();
  if (meta_bytes > out.data.size()) return DataLossError("snapshot state: metadata does not fit");
  const uint64_t tensor_bytes = out.data.size() - meta_bytes;
  out.tensor_bytes = tensor_bytes;
  for (const json& t : index["tensors"]) {
    if (!t.is_object() || !t.contains("name") || !t["name"].is_string() || !t.contains("dtype") ||
        !t["dtype"].is_string() || !t.contains("replicated") || !t["replicated"].is_boolean() ||
        !t.contains("at") || !t["at"].is_number_unsigned() || !t.contains("bytes") ||
        !t["bytes"].is_number_unsigned() || !t.contains("shape") || !t.contains("offsets") ||
        !t.contains("lengths")) {
      return DataLossError("snapshot state: a tensor entry is malformed");
    }
    std::string name = t["name"].get<std::string>();
    Entry e;
    auto dt = ParseDType(t["dtype"].get<std::string>());
    if (!dt.ok()) return DataLossError("snapshot state: tensor '" + name + "': bad dtype");
    e.dtype = *dt;
    MUSTER_ASSIGN_OR_RETURN(e.shape, Ints(t["shape"], "shape of '" + name + "'"));
    MUSTER_ASSIGN_OR_RETURN(e.offsets, Ints(t["offsets"], "offsets of '" + name + "'"));
    MUSTER_ASSIGN_OR_RETURN(e.lengths, Ints(t["lengths"], "lengths of '" + name + "'"));
    Status box = CheckBox("snapshot state: tensor '" + name + "'", e.shape, e.offsets, e.lengths);
    if (!box.ok()) return DataLossError(box.message());
    e.replicated = t["replicated"].get<bool>();
    e.at = t["at"].get<uint64_t>();
    e.bytes = t["bytes"].get<uint64_t>();
    auto elems = CheckedNumElements(e.lengths);
    if (!elems || static_cast<uint64_t>(*elems) > UINT64_MAX / DTypeSize(e.dtype) ||
        static_cast<uint64_t>(*elems) * DTypeSize(e.dtype) != e.bytes || e.at > tensor_bytes ||
        e.bytes > tensor_bytes - e.at) {
      return DataLossError("snapshot state: tensor '" + name + "' has a byte range of " +
                           std::to_string(e.bytes) + " at " + std::to_string(e.at) +
                           " that does not match its box or the payload");
    }
    if (!out.by_name.emplace(name, out.tensors.size()).second) {
      return DataLossError("snapshot state: tensor '" + name + "' appears twice");
    }
    out.tensors.emplace_back(name, std::move(e));
  }
  return out;
}

}  // namespace

StatusOr<std::vector<SnapshotTensorInfo>> ReadSnapshotIndex(std::string_view payload,
                                                            std::string* metadata) {
  MUSTER_ASSIGN_OR_RETURN(ParsedIndex index, ParseIndex(payload));
  std::vector<SnapshotTensorInfo> out;
  out.reserve(index.tensors.size());
  for (const auto& [name, e] : index.tensors) {
    out.push_back({.name = name,
                   .dtype = e.dtype,
                   .shape = e.shape,
                   .offsets = e.offsets,
                   .lengths = e.lengths,
                   .replicated = e.replicated,
                   .bytes = e.bytes});
  }
  if (metadata) *metadata = std::string(index.data.substr(index.tensor_bytes));
  return out;
}

Status RestoreSnapshotState(std::string_view payload, const std::vector<RestoreRequest>& requests,
                            std::string* metadata) {
  MUSTER_ASSIGN_OR_RETURN(ParsedIndex index, ParseIndex(payload));
  const std::string_view data = index.data;
  const uint64_t tensor_bytes = index.tensor_bytes;
  // Check every request before copying any byte.
  std::vector<const Entry*> found;
  for (const RestoreRequest& r : requests) {
    std::string what = "snapshot restore: tensor '" + r.name + "'";
    auto it = index.by_name.find(r.name);
    if (it == index.by_name.end()) return NotFoundError(what + " is not in the snapshot");
    const Entry& e = index.tensors[it->second].second;
    if (r.memory == MemoryKind::kCuda) {
      return FailedPreconditionError(what + ": CUDA destinations are not supported by snapshots");
    }
    if (r.dtype != e.dtype) {
      return InvalidArgumentError(what + " was saved as " + std::string(DTypeName(e.dtype)) +
                                  ", not " + std::string(DTypeName(r.dtype)));
    }
    std::vector<int64_t> off = r.offsets, len = r.lengths;
    if (off.empty() && len.empty()) {
      off.assign(e.shape.size(), 0);
      len = e.shape;
    }
    if (off != e.offsets || len != e.lengths) {
      return InvalidArgumentError(what + ": the requested slice differs from the one this rank " +
                                  "saved; restore other layouts from the volume");
    }
    MUSTER_RETURN_IF_ERROR(
        CheckRestoreCapacity(r, r.offsets.empty() && r.lengths.empty(), e.bytes, what));
    if (e.bytes > 0 && !r.data) return InvalidArgumentError(what + " has no destination");
    found.push_back(&e);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    if (found[i]->bytes > 0) {
      std::memcpy(requests[i].data, data.data() + found[i]->at, found[i]->bytes);
    }
  }
  if (metadata) *metadata = std::string(data.substr(tensor_bytes));
  return Status::Ok();
}

}  // namespace muster::checkpoint
