#pragma once

// Adopt: turns a finished checkpoint written by another tool — a Hugging Face Trainer
// `checkpoint-N` directory, torch.save files, or a torch.distributed.checkpoint (DCP)
// FileSystemWriter directory — into a committed muster step, so it is verified, replicated and
// resumed from like a native one (`muster ckpt adopt`, `muster.adopt`).
//
// The step holds every regular file of the source directory, each as a u8 tensor named
// "file:<relative path>" of the file's length, packed into shard-00000.bin (4096-aligned, per
// block xxh3 checksums) with a MANIFEST of world size 1, committed the way Checkpointer commits
// (step-N.tmp, fsync, rename, parent fsync, LATEST). Rank 0's user metadata is
// "muster-adopt/1\n" followed by JSON {"format", "source", "files"}; ExtractAdopted (or
// muster.extract) writes the files back out for the tool to resume from.
//
// A half-written source is refused, naming what is missing. Completeness, per format (the
// first that applies):
//   hf     (trainer_state.json, config.json, adapter_config.json, any *.safetensors, or a
//          directory named checkpoint-N): trainer_state.json must exist and parse as JSON (the
//          Trainer writes it after the weights); model weights must exist — model.safetensors,
//          pytorch_model.bin, adapter_model.safetensors or adapter_model.bin, or an index
//          (*.safetensors.index.json, pytorch_model.bin.index.json) whose every shard exists.
//   dcp    (.metadata, .metadata.tmp or any *.distcp): .metadata must exist and be non-empty
//          (the writer renames it into place last) and at least one *.distcp must exist.
//   torch  (any *.pt, *.pth or *.bin): every such file must be a whole zip archive (torch.save's
//          format since 1.6: the end-of-central-directory record is present at the end).
// In every format, each *.safetensors file must be whole (its header parses and its tensors'
// data ends exactly at the end of the file) and each *.bin/*.pt/*.pth a whole zip archive.
// Files are read as they are; symlinks and other special files are refused.
//
// Thread-safety: functions of their arguments; the caller must not run two adopts of the same
// step into one directory at once.

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/volume.h"
#include "common/status.h"

namespace muster::checkpoint {

inline constexpr char kAdoptMetadataMagic[] = "muster-adopt/1\n";
inline constexpr char kAdoptFilePrefix[] = "file:";

struct AdoptOptions {
  std::string source;   // the directory to adopt
  std::string job_dir;  // the job's checkpoint directory (holds LATEST)
  // The step to commit it as; -1: from the source (checkpoint-N's N, else trainer_state.json's
  // global_step), InvalidArgument when neither names one.
  int64_t step = -1;
  uint64_t block_size = 1 << 20;
  Volume* volume = nullptr;  // default LocalVolume(); used for the job directory
};

struct AdoptReport {
  int64_t step = 0;
  std::string format;  // "hf", "dcp" or "torch"
  std::vector<std::string> files;
  uint64_t bytes = 0;
};

// Checks that `source` is a finished checkpoint of a known format (rules above) and returns the
// format and its files (relative paths, sorted). InvalidArgument names what is missing or torn.
StatusOr<AdoptReport> CheckAdoptable(const std::string& source);

// CheckAdoptable, then commits the files as a step of options.job_dir. FailedPrecondition when
// the step is already committed there.
StatusOr<AdoptReport> Adopt(const AdoptOptions& options);

// Writes the files of an adopted step back into `dest` (created; files are replaced), each
// checked against the step's checksums as it is read. FailedPrecondition when the step was
// not adopted (it holds no files).
Status ExtractAdopted(Volume* v, const std::string& job_dir, int64_t step, const std::string& dest);

}  // namespace muster::checkpoint
