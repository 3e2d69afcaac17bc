#include "checkpoint/snapshot_frame.h"

#include <cstring>

#include "checkpoint/manifest.h"  // Xxh3
#include "common/little_endian.h"
#include "common/path_name.h"

namespace muster::checkpoint {
namespace {

Status CheckKey(const SnapshotKey& key) {
  if (key.step < 0)
    return InvalidArgumentError("snapshot: step " + std::to_string(key.step) + " is negative");
  if (key.attempt < 0) {
    return InvalidArgumentError("snapshot: attempt " + std::to_string(key.attempt) +
                                " is negative");
  }
  if (key.world_size < 1 || key.world_size > kMaxSnapshotWorldSize) {
    return InvalidArgumentError("snapshot: world size " + std::to_string(key.world_size) +
                                " is outside 1.." + std::to_string(kMaxSnapshotWorldSize));
  }
  if (key.rank < 0 || key.rank >= key.world_size) {
    return InvalidArgumentError("snapshot: rank " + std::to_string(key.rank) + " is outside 0.." +
                                std::to_string(key.world_size - 1));
  }
  return Status::Ok();
}

Status AsDataLoss(const Status& s) { return s.ok() ? s : DataLossError(s.message()); }

}  // namespace

StatusOr<std::string> EncodeSnapshotFrame(const SnapshotKey& key, std::string_view payload) {
  MUSTER_ASSIGN_OR_RETURN(std::string out, EncodeSnapshotPrefix(key, payload));
  out.append(payload);
  return out;
}

StatusOr<std::string> EncodeSnapshotPrefix(const SnapshotKey& key, std::string_view payload) {
  return EncodeSnapshotPrefix(key, payload.size(), Xxh3(payload.data(), payload.size()));
}

StatusOr<std::string> EncodeSnapshotPrefix(const SnapshotKey& key, uint64_t payload_length,
                                           uint64_t payload_xxh3) {
  MUSTER_RETURN_IF_ERROR(CheckKey(key));
  MUSTER_RETURN_IF_ERROR(ValidatePathName(key.job, "snapshot job id"));
  std::string out;
  out.reserve(kSnapshotHeaderBytes + key.job.size());
  out.append(kSnapshotMagic, 4);
  AppendLe<uint16_t>(out, kSnapshotFrameVersion);
  AppendLe<uint16_t>(out, static_cast<uint16_t>(key.job.size()));
  AppendLe<int64_t>(out, key.step);
  AppendLe<int32_t>(out, key.attempt);
  AppendLe<int32_t>(out, key.rank);
  AppendLe<int32_t>(out, key.world_size);
  AppendLe<uint32_t>(out, 0);
  AppendLe<uint64_t>(out, payload_length);
  AppendLe<uint64_t>(out, payload_xxh3);
  out.append(key.job);
  return out;
}

StatusOr<SnapshotHeader> DecodeSnapshotHeader(std::string_view in, uint64_t max_payload) {
  if (in.size() != kSnapshotHeaderBytes) {
    return DataLossError("snapshot: header is " + std::to_string(in.size()) + " bytes, not " +
                         std::to_string(kSnapshotHeaderBytes));
  }
  if (std::memcmp(in.data(), kSnapshotMagic, 4) != 0) {
    return DataLossError("snapshot: bad magic " + QuoteForError(in.substr(0, 4)));
  }
  uint16_t version = LoadLe<uint16_t>(in, 4);
  if (version != kSnapshotFrameVersion) {
    return DataLossError("snapshot: unknown version " + std::to_string(version));
  }
  SnapshotHeader h;
  h.job_length = LoadLe<uint16_t>(in, 6);
  if (h.job_length == 0 || h.job_length > kMaxPathNameLength) {
    return DataLossError("snapshot: job id length " + std::to_string(h.job_length) +
                         " is outside 1.." + std::to_string(kMaxPathNameLength));
  }
  h.key.step = LoadLe<int64_t>(in, 8);
  h.key.attempt = LoadLe<int32_t>(in, 16);
  h.key.rank = LoadLe<int32_t>(in, 20);
  h.key.world_size = LoadLe<int32_t>(in, 24);
  MUSTER_RETURN_IF_ERROR(AsDataLoss(CheckKey(h.key)));
  if (uint32_t reserved = LoadLe<uint32_t>(in, 28); reserved != 0) {
    return DataLossError("snapshot: reserved field is " + std::to_string(reserved) + ", not 0");
  }
  h.payload_length = LoadLe<uint64_t>(in, 32);
  if (h.payload_length > max_payload) {
    return DataLossError("snapshot: payload of " + std::to_string(h.payload_length) +
                         " bytes exceeds the limit of " + std::to_string(max_payload));
  }
  h.payload_xxh3 = LoadLe<uint64_t>(in, 40);
  return h;
}

namespace {

// The key of `header` with `job`, once the job id and the payload's checksum hold.
StatusOr<SnapshotKey> CheckBody(const SnapshotHeader& header, std::string_view job,
                                std::string_view payload, bool hash = true) {
  if (job.size() != header.job_length || payload.size() != header.payload_length) {
    return DataLossError("snapshot: body is " + std::to_string(job.size() + payload.size()) +
                         " bytes, the header says " +
                         std::to_string(uint64_t{header.job_length} + header.payload_length));
  }
  SnapshotKey key = header.key;
  key.job = std::string(job);
  MUSTER_RETURN_IF_ERROR(AsDataLoss(ValidatePathName(key.job, "snapshot job id")));
  if (hash && Xxh3(payload.data(), payload.size()) != header.payload_xxh3) {
    return DataLossError("snapshot: payload of job " + key.job + " rank " +
                         std::to_string(key.rank) + " step " + std::to_string(key.step) +
                         " fails its xxh3 checksum");
  }
  return key;
}

}  // namespace

StatusOr<SnapshotFrame> DecodeSnapshotBody(const SnapshotHeader& header, std::string_view body) {
  uint64_t want = uint64_t{header.job_length} + header.payload_length;
  if (body.size() != want) {
    return DataLossError("snapshot: body is " + std::to_string(body.size()) +
                         " bytes, the header says " + std::to_string(want));
  }
  SnapshotFrame f;
  MUSTER_ASSIGN_OR_RETURN(
      f.key, CheckBody(header, body.substr(0, header.job_length), body.substr(header.job_length)));
  f.payload_xxh3 = header.payload_xxh3;
  f.payload = std::string(body.substr(header.job_length));
  return f;
}

StatusOr<SnapshotFrame> DecodeSnapshotParts(const SnapshotHeader& header, std::string_view job,
                                            std::string&& payload) {
  SnapshotFrame f;
  MUSTER_ASSIGN_OR_RETURN(f.key, CheckBody(header, job, payload));
  f.payload_xxh3 = header.payload_xxh3;
  f.payload = std::move(payload);
  return f;
}

StatusOr<SnapshotFrame> DecodeSnapshotPartsChecked(const SnapshotHeader& header,
                                                   std::string_view job, std::string&& payload) {
  SnapshotFrame f;
  MUSTER_ASSIGN_OR_RETURN(f.key, CheckBody(header, job, payload, /*hash=*/false));
  f.payload_xxh3 = header.payload_xxh3;
  f.payload = std::move(payload);
  return f;
}

StatusOr<SnapshotFrame> DecodeSnapshotFrameInPlace(std::string&& bytes, uint64_t max_payload) {
  std::string in = std::move(bytes);
  if (in.size() < kSnapshotHeaderBytes) {
    return DataLossError("snapshot: frame of " + std::to_string(in.size()) +
                         " bytes is shorter than its header");
  }
  std::string_view view(in);
  MUSTER_ASSIGN_OR_RETURN(SnapshotHeader h,
                          DecodeSnapshotHeader(view.substr(0, kSnapshotHeaderBytes), max_payload));
  std::string_view body = view.substr(kSnapshotHeaderBytes);
  if (body.size() != uint64_t{h.job_length} + h.payload_length) {
    return DataLossError("snapshot: body is " + std::to_string(body.size()) +
                         " bytes, the header says " +
                         std::to_string(uint64_t{h.job_length} + h.payload_length));
  }
  SnapshotFrame f;
  MUSTER_ASSIGN_OR_RETURN(f.key,
                          CheckBody(h, body.substr(0, h.job_length), body.substr(h.job_length)));
  f.payload_xxh3 = h.payload_xxh3;
  in.erase(0, kSnapshotHeaderBytes + h.job_length);  // a move within the buffer
  f.payload = std::move(in);
  return f;
}

StatusOr<SnapshotFrame> DecodeSnapshotFrame(std::string_view bytes, uint64_t max_payload) {
  if (bytes.size() < kSnapshotHeaderBytes) {
    return DataLossError("snapshot: frame of " + std::to_string(bytes.size()) +
                         " bytes is shorter than its header");
  }
  MUSTER_ASSIGN_OR_RETURN(SnapshotHeader h,
                          DecodeSnapshotHeader(bytes.substr(0, kSnapshotHeaderBytes), max_payload));
  return DecodeSnapshotBody(h, bytes.substr(kSnapshotHeaderBytes));
}

}  // namespace muster::checkpoint
