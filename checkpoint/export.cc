#include "checkpoint/export.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <vector>

#include "checkpoint/adopt.h"
#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "checkpoint/manifest.h"

namespace muster::checkpoint {
namespace {

std::string SafetensorsDType(DType d) {
  switch (d) {
    case DType::kF32:
      return "F32";
    case DType::kF64:
      return "F64";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
    case DType::kU8:
      return "U8";
    case DType::kI8:
      return "I8";
    case DType::kBool:
      return "BOOL";
  }
  return "U8";
}

}  // namespace

bool IsLoraTensorName(const std::string& name) {
  for (const char* k : {"lora_a", "lora_b", "lora_A", "lora_B"}) {
    if (name.find(k) != std::string::npos) return true;
  }
  return false;
}

StatusOr<ExportReport> Export(const ExportOptions& options) {
  if (options.format != "safetensors") {
    return InvalidArgumentError("export: format '" + options.format +
                                "' is not one muster writes (safetensors)");
  }
  if (options.out.empty()) return InvalidArgumentError("export: no output file");
  Volume* v = options.volume ? options.volume : LocalVolume();
  int64_t step = options.step;
  if (step < 0) {
    MUSTER_ASSIGN_OR_RETURN(step, LatestCommittedStep(v, options.job_dir));
  }
  MUSTER_ASSIGN_OR_RETURN(Manifest m, LoadManifest(v, options.job_dir, step));
  if (m.UserMetadata().rfind(kAdoptMetadataMagic, 0) == 0) {
    return FailedPreconditionError("export: step " + std::to_string(step) +
                                   " was adopted: its files are already in their own format "
                                   "(muster.extract writes them out)");
  }

  struct Chosen {
    const TensorEntry* entry;
    std::string name;
    uint64_t bytes;
  };
  std::vector<Chosen> chosen;
  for (const auto& t : m.tensors) {
    if (!options.prefix.empty() && t.name.rfind(options.prefix, 0) != 0) continue;
    if (options.lora_only && !IsLoraTensorName(t.name)) continue;
    std::string name = t.name.substr(options.prefix.size());
    if (name.empty()) continue;
    chosen.push_back({&t, name, static_cast<uint64_t>(NumElements(t.shape)) * DTypeSize(t.dtype)});
  }
  if (chosen.empty()) {
    return InvalidArgumentError(
        "export: step " + std::to_string(step) + " has no tensor" +
        (options.prefix.empty() ? std::string() : " under prefix '" + options.prefix + "'") +
        (options.lora_only ? " with a LoRA name (lora_a/lora_b/lora_A/lora_B)" : ""));
  }

  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"},
                            {"muster_step", std::to_string(step)},
                            {"muster_world_size", std::to_string(m.world_size)}};
  uint64_t pos = 0;
  for (const auto& c : chosen) {
    if (header.contains(c.name)) {
      return InvalidArgumentError("export: two tensors are named '" + c.name + "'");
    }
    header[c.name] = {{"dtype", SafetensorsDType(c.entry->dtype)},
                      {"shape", c.entry->shape},
                      {"data_offsets", {pos, pos + c.bytes}}};
    pos += c.bytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string prelude(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) prelude[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  prelude += h;

  CheckpointerOptions co;
  co.dir = options.job_dir;
  co.volume = v;
  co.io_threads = 2;
  MUSTER_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(co));
  const std::string tmp = options.out + ".tmp";
  MUSTER_ASSIGN_OR_RETURN(auto f, LocalVolume()->NewWritableFile(tmp, false));
  MUSTER_RETURN_IF_ERROR(f->Write(0, prelude.data(), prelude.size()));
  uint64_t off = prelude.size();
  std::vector<char> buf;
  for (const auto& c : chosen) {
    buf.resize(std::max<uint64_t>(c.bytes, 1));
    MUSTER_RETURN_IF_ERROR(
        ck->Restore(step, {RestoreRequest::Whole(c.entry->name, c.entry->dtype, buf.data(),
                                                 static_cast<uint64_t>(c.bytes))}));
    MUSTER_RETURN_IF_ERROR(f->Write(off, buf.data(), c.bytes));
    off += c.bytes;
  }
  MUSTER_RETURN_IF_ERROR(f->Sync());
  MUSTER_RETURN_IF_ERROR(f->Close());
  MUSTER_RETURN_IF_ERROR(LocalVolume()->Rename(tmp, options.out));
  MUSTER_RETURN_IF_ERROR(LocalVolume()->SyncDir(ParentDir(options.out)));
  return ExportReport{.step = step, .tensors = static_cast<int>(chosen.size()), .bytes = off};
}

}  // namespace muster::checkpoint
