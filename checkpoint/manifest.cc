#include "checkpoint/manifest.h"

#include <xxhash.h>

#include <cinttypes>
#include <cstdio>
#include <nlohmann/json.hpp>

namespace muster::checkpoint {

namespace {
constexpr const char* kDTypeNames[] = {"f32", "f64", "f16", "bf16", "i32",
                                       "i64", "u8",  "i8",  "bool"};
constexpr size_t kDTypeSizes[] = {4, 8, 2, 2, 4, 8, 1, 1, 1};
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

size_t DTypeSize(DType d) { return kDTypeSizes[static_cast<int>(d)]; }
std::string_view DTypeName(DType d) { return kDTypeNames[static_cast<int>(d)]; }

StatusOr<DType> ParseDType(std::string_view name) {
  for (int i = 0; i < static_cast<int>(std::size(kDTypeNames)); ++i) {
    if (name == kDTypeNames[i]) return static_cast<DType>(i);
  }
  return InvalidArgumentError("unknown dtype '" + std::string(name) + "'");
}

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

static Status CheckManifest(const Manifest& m) {
  if (m.world_size <= 0) return DataLossError("manifest: world_size must be positive");
  if (m.block_size == 0) return DataLossError("manifest: block_size is 0");
  for (const auto& s : m.shards) {
    uint64_t blocks = (s.size + m.block_size - 1) / m.block_size;
    if (s.block_xxh3.size() != blocks) {
      return DataLossError("manifest: " + s.file + " has " + std::to_string(s.block_xxh3.size()) +
                           " block checksums for " + std::to_string(blocks) + " blocks");
    }
  }
  for (const auto& t : m.tensors) {
    for (int64_t d : t.shape)
      if (d < 0) return DataLossError("manifest: tensor '" + t.name + "' has a negative dim");
    for (const auto& s : t.slices) {
      if (s.shard < 0 || s.shard >= static_cast<int>(m.shards.size())) {
        return DataLossError("manifest: tensor '" + t.name + "' names a missing shard");
      }
      if (s.offsets.size() != t.shape.size() || s.lengths.size() != t.shape.size()) {
        return DataLossError("manifest: tensor '" + t.name + "' slice rank mismatch");
      }
      for (size_t d = 0; d < t.shape.size(); ++d) {
        if (s.offsets[d] < 0 || s.lengths[d] < 0 || s.offsets[d] + s.lengths[d] > t.shape[d]) {
          return DataLossError("manifest: tensor '" + t.name + "' slice out of bounds");
        }
      }
      if (static_cast<uint64_t>(NumElements(s.lengths)) * DTypeSize(t.dtype) != s.byte_length ||
          s.byte_offset + s.byte_length > m.shards[s.shard].size) {
        return DataLossError("manifest: tensor '" + t.name + "' byte range is inconsistent");
      }
    }
  }
  return Status::Ok();
}

StatusOr<Manifest> ParseManifest(const std::string& bytes) {
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
    auto j = nlohmann::json::parse(body);
    if (j.at("format").get<std::string>() != "muster-checkpoint") {
      return DataLossError("manifest: not a muster checkpoint");
    }
    m.version = j.at("version").get<int>();
    if (m.version != kFormatVersion) {
      return InvalidArgumentError("manifest: format version " + std::to_string(m.version) +
                                  " is not supported (this build reads version " +
                                  std::to_string(kFormatVersion) + ")");
    }
    m.step = j.at("step").get<int64_t>();
    m.world_size = j.at("world_size").get<int>();
    m.block_size = j.at("block_size").get<uint64_t>();
    m.created_unix_ms = j.at("created_unix_ms").get<int64_t>();
    for (const auto& s : j.at("shards")) {
      ShardEntry e;
      e.rank = s.at("rank").get<int>();
      e.file = s.at("file").get<std::string>();
      if (e.file.find('/') != std::string::npos || e.file == ".." || e.file.empty()) {
        return DataLossError("manifest: bad shard file name '" + e.file + "'");
      }
      e.size = s.at("size").get<uint64_t>();
      for (const auto& h : s.at("block_xxh3")) {
        e.block_xxh3.push_back(std::stoull(h.get<std::string>(), nullptr, 16));
      }
      MUSTER_ASSIGN_OR_RETURN(e.metadata, Unhex(s.at("metadata_hex").get<std::string>()));
      m.shards.push_back(std::move(e));
    }
    for (const auto& t : j.at("tensors")) {
      TensorEntry e;
      e.name = t.at("name").get<std::string>();
      auto dt = ParseDType(t.at("dtype").get<std::string>());
      if (!dt.ok()) return DataLossError("manifest: " + dt.status().message());
      e.dtype = *dt;
      e.shape = t.at("shape").get<std::vector<int64_t>>();
      e.replicated = t.at("replicated").get<bool>();
      for (const auto& s : t.at("slices")) {
        StoredSlice sl;
        sl.shard = s.at("shard").get<int>();
        sl.offsets = s.at("offsets").get<std::vector<int64_t>>();
        sl.lengths = s.at("lengths").get<std::vector<int64_t>>();
        sl.byte_offset = s.at("byte_offset").get<uint64_t>();
        sl.byte_length = s.at("byte_length").get<uint64_t>();
        e.slices.push_back(std::move(sl));
      }
      m.tensors.push_back(std::move(e));
    }
  } catch (const std::exception& e) {
    return DataLossError(std::string("manifest: malformed: ") + e.what());
  }
  MUSTER_RETURN_IF_ERROR(CheckManifest(m));
  return m;
}

}  // namespace muster::checkpoint
