#pragma once

// Export: a committed step as a file the rest of the ecosystem loads (`muster ckpt export`).
//
// Today one format, safetensors (https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, __metadata__},
// padded with spaces to a multiple of 8, then the tensors' bytes back to back in header order.
// Tensors are written whole, in the manifest's order, each read through Checkpointer::Restore
// (every block checked against its checksum), so memory holds one tensor at a time.
//
// Selection: `prefix` keeps the tensors whose names start with it and strips it ("model/" turns
// muster.save's "model/fc.weight" into "fc.weight"); `lora_only` keeps the LoRA adapter tensors
// (names holding lora_a/lora_b/lora_A/lora_B, the C++ fine-tune's and PEFT's), so the file is a
// PEFT-style adapter. Adopted steps hold files, not tensors, and are refused.
//
// Thread-safety: a function of its arguments.

#include <cstdint>
#include <string>

#include "checkpoint/volume.h"
#include "common/status.h"

namespace muster::checkpoint {

struct ExportOptions {
  std::string job_dir;
  int64_t step = -1;  // -1: the newest committed step
  std::string format = "safetensors";
  std::string out;  // the file to write (replaced atomically)
  std::string prefix;
  bool lora_only = false;
  Volume* volume = nullptr;  // default LocalVolume(); for the job directory
};

struct ExportReport {
  int64_t step = 0;
  int tensors = 0;
  uint64_t bytes = 0;  // of the file
};

// InvalidArgument for an unknown format or a selection that keeps no tensor; NotFound for a
// missing step; FailedPrecondition for an adopted step; DataLoss for a damaged block.
StatusOr<ExportReport> Export(const ExportOptions& options);

// True for the names of LoRA adapter tensors.
bool IsLoraTensorName(const std::string& name);

}  // namespace muster::checkpoint
