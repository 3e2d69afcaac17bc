#include "checkpoint/adopt.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "checkpoint/manifest.h"
#include "common/logging.h"
#include "common/strings.h"

namespace muster::checkpoint {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

bool EndsWith(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

StatusOr<std::string> ReadSmallFile(const fs::path& p, size_t limit) {
  std::error_code ec;
  uint64_t size = fs::file_size(p, ec);
  if (ec) return ErrnoStatus(ec.value(), p.string());
  if (size > limit) {
    return InvalidArgumentError(p.string() + " is " + std::to_string(size) +
                                " bytes, more than the " + std::to_string(limit) + " expected");
  }
  std::ifstream in(p, std::ios::binary);
  std::string s(size, '\0');
  if (!in.read(s.data(), static_cast<std::streamsize>(size))) {
    return InvalidArgumentError("cannot read " + p.string());
  }
  return s;
}

// Reads `n` bytes at `offset` of `p`.
StatusOr<std::string> ReadAt(const fs::path& p, uint64_t offset, size_t n) {
  std::ifstream in(p, std::ios::binary);
  std::string s(n, '\0');
  in.seekg(static_cast<std::streamoff>(offset));
  if (!in.read(s.data(), static_cast<std::streamsize>(n))) {
    return InvalidArgumentError("cannot read " + std::to_string(n) + " bytes at " +
                                std::to_string(offset) + " of " + p.string());
  }
  return s;
}

// A safetensors file is whole when its 8-byte little-endian header length, the JSON header and
// the data its tensors name add up to the file's size.
Status CheckSafetensors(const fs::path& p, uint64_t size) {
  const std::string what = p.filename().string() + " is not a whole safetensors file: ";
  if (size < 8) return InvalidArgumentError(what + "shorter than its 8-byte header length");
  MUSTER_ASSIGN_OR_RETURN(std::string len_bytes, ReadAt(p, 0, 8));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(len_bytes[i]);
  if (n > size - 8 || n > (100u << 20)) {
    return InvalidArgumentError(what + "its header length " + std::to_string(n) +
                                " runs past the end of the file (" + std::to_string(size) +
                                " bytes)");
  }
  MUSTER_ASSIGN_OR_RETURN(std::string header, ReadAt(p, 8, n));
  json h = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (!h.is_object()) return InvalidArgumentError(what + "its header is not a JSON object");
  uint64_t end = 0;
  for (const auto& [name, t] : h.items()) {
    if (name == "__metadata__") continue;
    if (!t.is_object() || !t.contains("data_offsets") || !t["data_offsets"].is_array() ||
        t["data_offsets"].size() != 2 || !t["data_offsets"][1].is_number_unsigned()) {
      return InvalidArgumentError(what + "tensor '" + name + "' has no data_offsets");
    }
    end = std::max(end, t["data_offsets"][1].get<uint64_t>());
  }
  if (8 + n + end != size) {
    return InvalidArgumentError(what + "its tensors end at byte " + std::to_string(8 + n + end) +
                                " but the file has " + std::to_string(size) + " (torn write?)");
  }
  return Status::Ok();
}

// torch.save (since 1.6) writes a zip archive; a whole one ends with the end-of-central-
// directory record (signature PK\5\6) in its last 64 KiB + 22 bytes.
Status CheckZip(const fs::path& p, uint64_t size) {
  const std::string what = p.filename().string() + " is not a whole torch.save (zip) file: ";
  if (size < 22) return InvalidArgumentError(what + "too short");
  size_t tail = static_cast<size_t>(std::min<uint64_t>(size, 65536 + 22));
  MUSTER_ASSIGN_OR_RETURN(std::string t, ReadAt(p, size - tail, tail));
  for (size_t i = tail - 22 + 1; i-- > 0;) {
    if (t.compare(i, 4, "PK\x05\x06") == 0) return Status::Ok();
  }
  MUSTER_ASSIGN_OR_RETURN(std::string head, ReadAt(p, 0, 4));
  if (head.compare(0, 4, "PK\x03\x04") != 0) {
    return InvalidArgumentError(what +
                                "it is not a zip archive (torch.save's legacy format, which "
                                "cannot be checked for completeness: re-save it with torch >= "
                                "1.6)");
  }
  return InvalidArgumentError(what + "its end-of-archive record is missing (torn write?)");
}

bool HasFile(const std::vector<std::string>& files, const std::string& rel) {
  return std::binary_search(files.begin(), files.end(), rel);
}

Status CheckHf(const fs::path& src, const std::vector<std::string>& files) {
  const std::string what = "Hugging Face checkpoint " + src.string() + " is incomplete: ";
  if (!HasFile(files, "trainer_state.json")) {
    return InvalidArgumentError(what +
                                "trainer_state.json is missing (the Trainer writes it after "
                                "the weights: the save did not finish)");
  }
  MUSTER_ASSIGN_OR_RETURN(std::string ts, ReadSmallFile(src / "trainer_state.json", 256 << 20));
  if (!json::accept(ts)) {
    return InvalidArgumentError(what + "trainer_state.json is not valid JSON (torn write?)");
  }
  for (const char* single : {"model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                             "adapter_model.bin"}) {
    if (HasFile(files, single)) return Status::Ok();
  }
  for (const char* index_name : {"model.safetensors.index.json", "pytorch_model.bin.index.json"}) {
    if (!HasFile(files, index_name)) continue;
    MUSTER_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(src / index_name, 64 << 20));
    json index = json::parse(text, nullptr, false);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return InvalidArgumentError(what + index_name + " has no weight_map");
    }
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string() || !HasFile(files, file.get<std::string>())) {
        return InvalidArgumentError(what + (file.is_string() ? file.get<std::string>() : "?") +
                                    ", named by " + index_name + " for '" + tensor +
                                    "', is missing");
      }
    }
    return Status::Ok();
  }
  return InvalidArgumentError(what +
                              "no model weights (model.safetensors, pytorch_model.bin, "
                              "adapter_model.safetensors/.bin, or a *.index.json and its "
                              "shards)");
}

Status CheckDcp(const fs::path& src, const std::vector<std::string>& files) {
  const std::string what = "DCP checkpoint " + src.string() + " is incomplete: ";
  if (!HasFile(files, ".metadata")) {
    return InvalidArgumentError(what +
                                ".metadata is missing (the writer puts it in place last: the "
                                "save did not finish)");
  }
  std::error_code ec;
  if (fs::file_size(src / ".metadata", ec) == 0 || ec) {
    return InvalidArgumentError(what + ".metadata is empty");
  }
  bool any = std::any_of(files.begin(), files.end(),
                         [](const std::string& f) { return EndsWith(f, ".distcp"); });
  if (!any) return InvalidArgumentError(what + "it has .metadata but no *.distcp data files");
  return Status::Ok();
}

}  // namespace

StatusOr<AdoptReport> CheckAdoptable(const std::string& source) {
  std::error_code ec;
  fs::path src = fs::absolute(source, ec);
  if (ec || !fs::is_directory(src, ec)) {
    return InvalidArgumentError("adopt: " + source + " is not a directory");
  }
  AdoptReport report;
  std::vector<std::pair<std::string, uint64_t>> sized;
  for (auto it = fs::recursive_directory_iterator(src, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    const auto& e = *it;
    std::string rel = fs::relative(e.path(), src, ec).string();
    if (e.is_symlink(ec)) {
      return InvalidArgumentError("adopt: " + rel + " is a symlink: copy what it points to");
    }
    if (e.is_directory(ec)) continue;
    if (!e.is_regular_file(ec)) {
      return InvalidArgumentError("adopt: " + rel + " is not a regular file");
    }
    uint64_t size = e.file_size(ec);
    if (ec) return ErrnoStatus(ec.value(), "adopt: " + rel);
    sized.emplace_back(rel, size);
  }
  if (ec) return ErrnoStatus(ec.value(), "adopt: listing " + src.string());
  std::sort(sized.begin(), sized.end());
  for (const auto& [rel, size] : sized) {
    report.files.push_back(rel);
    report.bytes += size;
  }
  const auto& files = report.files;
  if (files.empty()) return InvalidArgumentError("adopt: " + src.string() + " is empty");

  auto any_of = [&](auto pred) { return std::any_of(files.begin(), files.end(), pred); };
  static const std::regex kHfDir(R"(checkpoint-(\d+))");
  bool hf = HasFile(files, "trainer_state.json") || HasFile(files, "config.json") ||
            HasFile(files, "adapter_config.json") ||
            any_of([](const std::string& f) { return EndsWith(f, ".safetensors"); }) ||
            std::regex_match(src.filename().string(), kHfDir);
  bool dcp = HasFile(files, ".metadata") || HasFile(files, ".metadata.tmp") ||
             any_of([](const std::string& f) { return EndsWith(f, ".distcp"); });
  bool torch_files = any_of([](const std::string& f) {
    return EndsWith(f, ".pt") || EndsWith(f, ".pth") || EndsWith(f, ".bin");
  });
  if (hf) {
    report.format = "hf";
    MUSTER_RETURN_IF_ERROR(CheckHf(src, files));
  } else if (dcp) {
    report.format = "dcp";
    MUSTER_RETURN_IF_ERROR(CheckDcp(src, files));
  } else if (torch_files) {
    report.format = "torch";
  } else {
    return InvalidArgumentError(
        "adopt: " + src.string() +
        " is not a checkpoint muster knows: a Hugging Face checkpoint-N (trainer_state.json and "
        "model files), a DCP directory (.metadata and *.distcp) or torch.save files (*.pt)");
  }
  for (const auto& [rel, size] : sized) {
    if (EndsWith(rel, ".safetensors")) {
      MUSTER_RETURN_IF_ERROR(CheckSafetensors(src / rel, size).WithContext("adopt"));
    } else if (EndsWith(rel, ".pt") || EndsWith(rel, ".pth") ||
               (EndsWith(rel, ".bin") && report.format != "dcp")) {
      MUSTER_RETURN_IF_ERROR(CheckZip(src / rel, size).WithContext("adopt"));
    }
  }
  // The step, when the source names one.
  std::smatch m;
  std::string base = src.filename().string();
  if (std::regex_match(base, m, kHfDir)) {
    std::optional<int64_t> step = ParseInt64(m[1].str());
    if (!step) return InvalidArgumentError("adopt: " + base + ": the step does not fit in 64 bits");
    report.step = *step;
  } else if (HasFile(files, "trainer_state.json")) {
    auto ts = ReadSmallFile(src / "trainer_state.json", 256 << 20);
    json j = ts.ok() ? json::parse(*ts, nullptr, false) : json();
    report.step = j.is_object() && j.contains("global_step") && j["global_step"].is_number_integer()
                      ? j["global_step"].get<int64_t>()
                      : -1;
  } else {
    report.step = -1;
  }
  return report;
}

StatusOr<AdoptReport> Adopt(const AdoptOptions& options) {
  MUSTER_ASSIGN_OR_RETURN(AdoptReport report, CheckAdoptable(options.source));
  if (options.step >= 0) report.step = options.step;
  if (report.step < 0) {
    return InvalidArgumentError("adopt: " + options.source +
                                " does not name its step (not checkpoint-N, no global_step in "
                                "trainer_state.json): pass --step N");
  }
  if (options.job_dir.empty()) return InvalidArgumentError("adopt: no job checkpoint directory");
  if (options.block_size == 0 || options.block_size % kDirectIoAlignment != 0) {
    return InvalidArgumentError("adopt: block size must be a positive multiple of 4096");
  }
  Volume* v = options.volume ? options.volume : LocalVolume();
  const std::string final_dir = StepPath(options.job_dir, report.step);
  if (v->Exists(JoinPath(final_dir, kManifestName))) {
    return FailedPreconditionError("adopt: step " + std::to_string(report.step) +
                                   " is already committed in " + options.job_dir);
  }
  const std::string tmp = TmpStepPath(options.job_dir, report.step);
  MUSTER_RETURN_IF_ERROR(v->RemoveAll(tmp));
  MUSTER_RETURN_IF_ERROR(v->CreateDirs(tmp));

  fs::path src = fs::absolute(options.source);
  Manifest m;
  m.step = report.step;
  m.world_size = 1;
  m.block_size = options.block_size;
  m.created_unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  ShardEntry shard;
  shard.rank = 0;
  shard.file = ShardFileName(0);
  json meta = {{"format", report.format}, {"source", src.string()}, {"files", report.files}};
  shard.metadata = std::string(kAdoptMetadataMagic) + meta.dump();

  // Stream every file into the shard through one block-sized buffer: each block is hashed and
  // written as it fills, so memory stays at one block whatever the checkpoint's size.
  MUSTER_ASSIGN_OR_RETURN(auto out, v->NewWritableFile(JoinPath(tmp, shard.file), false));
  const uint64_t bs = options.block_size;
  std::vector<char> block(bs);
  uint64_t fill = 0, pos = 0;  // bytes in `block`; bytes of the shard before it
  auto flush = [&]() -> Status {
    shard.block_xxh3.push_back(Xxh3(block.data(), fill));
    MUSTER_RETURN_IF_ERROR(out->Write(pos, block.data(), fill));
    pos += fill;
    fill = 0;
    return Status::Ok();
  };
  auto append = [&](const char* data, uint64_t n) -> Status {
    while (n > 0) {
      uint64_t k = std::min(n, bs - fill);
      if (data) {
        std::memcpy(block.data() + fill, data, k);
        data += k;
      } else {
        std::memset(block.data() + fill, 0, k);
      }
      fill += k;
      n -= k;
      if (fill == bs) MUSTER_RETURN_IF_ERROR(flush());
    }
    return Status::Ok();
  };
  std::vector<char> chunk(8 << 20);
  for (const auto& rel : report.files) {
    uint64_t start = pos + fill;
    std::ifstream in(src / rel, std::ios::binary);
    if (!in) return InvalidArgumentError("adopt: cannot open " + (src / rel).string());
    uint64_t size = 0;
    while (in) {
      in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
      uint64_t got = static_cast<uint64_t>(in.gcount());
      if (got == 0) break;
      MUSTER_RETURN_IF_ERROR(append(chunk.data(), got));
      size += got;
    }
    if (in.bad()) return InvalidArgumentError("adopt: reading " + (src / rel).string() + " failed");
    uint64_t end = start + size;
    uint64_t aligned = (end + kDirectIoAlignment - 1) / kDirectIoAlignment * kDirectIoAlignment;
    MUSTER_RETURN_IF_ERROR(append(nullptr, aligned - end));
    TensorEntry t;
    t.name = std::string(kAdoptFilePrefix) + rel;
    t.dtype = DType::kU8;
    t.shape = {static_cast<int64_t>(size)};
    t.replicated = true;
    t.slices.push_back(StoredSlice{.shard = 0,
                                   .offsets = {0},
                                   .lengths = {static_cast<int64_t>(size)},
                                   .byte_offset = start,
                                   .byte_length = size});
    m.tensors.push_back(std::move(t));
  }
  if (fill > 0) MUSTER_RETURN_IF_ERROR(flush());
  shard.size = pos;
  MUSTER_RETURN_IF_ERROR(out->Sync());
  MUSTER_RETURN_IF_ERROR(out->Close());
  m.shards.push_back(std::move(shard));

  std::string bytes = SerializeManifest(m);
  MUSTER_RETURN_IF_ERROR(ParseManifest(bytes).status());
  {
    MUSTER_ASSIGN_OR_RETURN(auto f, v->NewWritableFile(JoinPath(tmp, kManifestName), false));
    MUSTER_RETURN_IF_ERROR(f->Write(0, bytes.data(), bytes.size()));
    MUSTER_RETURN_IF_ERROR(f->Sync());
    MUSTER_RETURN_IF_ERROR(f->Close());
  }
  MUSTER_RETURN_IF_ERROR(v->SyncDir(tmp));
  MUSTER_RETURN_IF_ERROR(v->Rename(tmp, final_dir));
  MUSTER_RETURN_IF_ERROR(v->SyncDir(options.job_dir));
  MUSTER_RETURN_IF_ERROR(UpdateLatest(v, options.job_dir, report.step));
  log::Get("ckpt.write")
      ->info("adopted {} checkpoint {} as step {} ({} files, {} bytes)", report.format,
             src.string(), report.step, report.files.size(), report.bytes);
  return report;
}

Status ExtractAdopted(Volume* v, const std::string& job_dir, int64_t step,
                      const std::string& dest) {
  MUSTER_ASSIGN_OR_RETURN(Manifest m, LoadManifest(v, job_dir, step));
  if (m.UserMetadata().rfind(kAdoptMetadataMagic, 0) != 0) {
    return FailedPreconditionError("extract: step " + std::to_string(step) + " of " + job_dir +
                                   " was not adopted (it holds tensors, not files)");
  }
  CheckpointerOptions o;
  o.dir = job_dir;
  o.volume = v;
  o.io_threads = 2;
  MUSTER_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(o));
  constexpr int64_t kChunk = 32 << 20;
  std::vector<char> buf(kChunk);
  const std::string prefix = kAdoptFilePrefix;
  for (const auto& t : m.tensors) {
    if (t.name.rfind(prefix, 0) != 0) continue;
    std::string rel = t.name.substr(prefix.size());
    fs::path rp(rel);
    bool escapes = rp.is_absolute() ||
                   std::any_of(rp.begin(), rp.end(), [](const fs::path& c) { return c == ".."; });
    if (escapes) {
      return DataLossError("extract: step " + std::to_string(step) + " names file '" + rel +
                           "' outside its directory");
    }
    fs::path out_path = fs::path(dest) / rp;
    std::error_code ec;
    fs::create_directories(out_path.parent_path(), ec);
    if (ec) return ErrnoStatus(ec.value(), "extract: " + out_path.parent_path().string());
    std::string tmp = out_path.string() + ".tmp";
    MUSTER_ASSIGN_OR_RETURN(auto f, LocalVolume()->NewWritableFile(tmp, false));
    int64_t size = t.shape.empty() ? 0 : t.shape[0];
    for (int64_t off = 0; off < size; off += kChunk) {
      int64_t n = std::min(kChunk, size - off);
      RestoreRequest r;
      r.name = t.name;
      r.dtype = DType::kU8;
      r.offsets = {off};
      r.lengths = {n};
      r.data = buf.data();
      MUSTER_RETURN_IF_ERROR(ck->Restore(step, {r}));
      MUSTER_RETURN_IF_ERROR(f->Write(static_cast<uint64_t>(off), buf.data(), n));
    }
    MUSTER_RETURN_IF_ERROR(f->Sync());
    MUSTER_RETURN_IF_ERROR(f->Close());
    MUSTER_RETURN_IF_ERROR(LocalVolume()->Rename(tmp, out_path.string()));
  }
  return LocalVolume()->SyncDir(dest);
}

}  // namespace muster::checkpoint
