#include "examples/finetune/state_store.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>

#include "common/logging.h"

namespace muster::finetune {
namespace {

constexpr char kMagic[8] = {'M', 'S', 'T', 'R', 'T', 'N', 'S', '1'};

int DtypeCode(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return 0;
    case torch::kFloat64:
      return 1;
    case torch::kInt64:
      return 2;
    case torch::kUInt8:
      return 3;
    case torch::kBFloat16:
      return 4;
    case torch::kFloat16:
      return 5;
    default:
      return -1;
  }
}

std::optional<torch::ScalarType> DtypeFromCode(int code) {
  switch (code) {
    case 0:
      return torch::kFloat32;
    case 1:
      return torch::kFloat64;
    case 2:
      return torch::kInt64;
    case 3:
      return torch::kUInt8;
    case 4:
      return torch::kBFloat16;
    case 5:
      return torch::kFloat16;
    default:
      return std::nullopt;
  }
}

template <typename T>
void Put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(v));
}

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  template <typename T>
  bool Get(T* v) {
    if (in_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(v, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool Bytes(size_t n, std::string_view* out) {
    if (in_.size() - pos_ < n) return false;
    *out = in_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  bool done() const { return pos_ == in_.size(); }

 private:
  std::string_view in_;
  size_t pos_ = 0;
};

std::string Hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

Status WriteFileDurably(const std::filesystem::path& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, "open " + path.string());
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      return ErrnoStatus(e, "write " + path.string());
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    return ErrnoStatus(e, "fsync " + path.string());
  }
  if (::close(fd) != 0) return ErrnoStatus(errno, "close " + path.string());
  return Status::Ok();
}

Status FsyncDir(const std::filesystem::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "open " + dir.string());
  int rc = ::fsync(fd);
  int e = errno;
  ::close(fd);
  if (rc != 0) return ErrnoStatus(e, "fsync " + dir.string());
  return Status::Ok();
}

StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return InternalError("read failed: " + path.string());
  return ss.str();
}

}  // namespace

std::string EncodeTensors(const NamedTensors& tensors) {
  std::string out(kMagic, sizeof(kMagic));
  Put<uint64_t>(out, tensors.size());
  for (const auto& [name, tensor] : tensors) {
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    int code = DtypeCode(t.scalar_type());
    MUSTER_CHECK(code >= 0) << "unsupported dtype for tensor " << name;
    Put<uint32_t>(out, static_cast<uint32_t>(name.size()));
    out.append(name);
    Put<uint8_t>(out, static_cast<uint8_t>(code));
    Put<uint32_t>(out, static_cast<uint32_t>(t.dim()));
    for (int64_t d : t.sizes()) Put<int64_t>(out, d);
    uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    Put<uint64_t>(out, nbytes);
    out.append(static_cast<const char*>(t.data_ptr()), nbytes);
  }
  Put<uint64_t>(out, XXH3_64bits(out.data(), out.size()));
  return out;
}

StatusOr<NamedTensors> DecodeTensors(const std::string& bytes) {
  if (bytes.size() < sizeof(kMagic) + 16 || std::memcmp(bytes.data(), kMagic, sizeof(kMagic))) {
    return DataLossError("not a tensors file (bad magic or truncated)");
  }
  uint64_t want;
  std::memcpy(&want, bytes.data() + bytes.size() - 8, 8);
  if (XXH3_64bits(bytes.data(), bytes.size() - 8) != want) {
    return DataLossError("tensors file checksum mismatch");
  }
  Reader r(std::string_view(bytes).substr(sizeof(kMagic), bytes.size() - sizeof(kMagic) - 8));
  uint64_t count;
  if (!r.Get(&count)) return DataLossError("truncated tensor count");
  NamedTensors out;
  for (uint64_t i = 0; i < count; ++i) {
    uint32_t name_len, ndim;
    uint8_t code;
    std::string_view name;
    if (!r.Get(&name_len) || !r.Bytes(name_len, &name) || !r.Get(&code) || !r.Get(&ndim) ||
        ndim > 16) {
      return DataLossError("truncated tensor header");
    }
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) {
      if (!r.Get(&d) || d < 0) return DataLossError("bad shape for " + std::string(name));
    }
    auto dtype = DtypeFromCode(code);
    if (!dtype) return DataLossError("unknown dtype code for " + std::string(name));
    uint64_t nbytes;
    std::string_view data;
    if (!r.Get(&nbytes) || !r.Bytes(nbytes, &data)) {
      return DataLossError("truncated data for " + std::string(name));
    }
    torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(*dtype));
    if (static_cast<uint64_t>(t.numel()) * t.element_size() != nbytes) {
      return DataLossError("size mismatch for " + std::string(name));
    }
    std::memcpy(t.data_ptr(), data.data(), nbytes);
    out.emplace_back(std::string(name), std::move(t));
  }
  if (!r.done()) return DataLossError("trailing bytes after the last tensor");
  return out;
}

std::string DigestTensors(const NamedTensors& tensors) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  for (const auto& [name, tensor] : tensors) {
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    XXH3_64bits_update(st, name.data(), name.size());
    int64_t code = DtypeCode(t.scalar_type());
    XXH3_64bits_update(st, &code, sizeof(code));
    for (int64_t d : t.sizes()) XXH3_64bits_update(st, &d, sizeof(d));
    XXH3_64bits_update(st, t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  }
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return Hex64(h);
}

std::filesystem::path FileStateStore::StepDir(int64_t step) const {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%09lld", static_cast<long long>(step));
  return dir_ / name;
}

Status FileStateStore::Save(int64_t step, const NamedTensors& tensors,
                            const std::string& metadata) {
  if (rank_ != 0) return Status::Ok();  // replicated state: rank 0 speaks for the job
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) return InternalError("create " + dir_.string() + ": " + ec.message());
  const fs::path final_dir = StepDir(step);
  if (fs::exists(final_dir)) {
    return FailedPreconditionError("checkpoint " + final_dir.string() +
                                   " already exists; committed steps are never rewritten");
  }
  const fs::path tmp = final_dir.string() + ".tmp";
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return InternalError("create " + tmp.string() + ": " + ec.message());
  MUSTER_RETURN_IF_ERROR(WriteFileDurably(tmp / "tensors.bin", EncodeTensors(tensors)));
  MUSTER_RETURN_IF_ERROR(WriteFileDurably(tmp / "METADATA", metadata));
  MUSTER_RETURN_IF_ERROR(FsyncDir(tmp));
  if (::rename(tmp.c_str(), final_dir.c_str()) != 0) {
    return ErrnoStatus(errno, "rename " + tmp.string());
  }
  MUSTER_RETURN_IF_ERROR(FsyncDir(dir_));
  const fs::path latest_tmp = dir_ / "LATEST.tmp";
  MUSTER_RETURN_IF_ERROR(WriteFileDurably(latest_tmp, std::to_string(step) + "\n"));
  if (::rename(latest_tmp.c_str(), (dir_ / "LATEST").c_str()) != 0) {
    return ErrnoStatus(errno, "rename " + latest_tmp.string());
  }
  return FsyncDir(dir_);
}

StatusOr<std::optional<int64_t>> FileStateStore::LatestStep() {
  auto text = ReadFile(dir_ / "LATEST");
  if (!text.ok()) return std::optional<int64_t>();
  try {
    size_t used = 0;
    int64_t step = std::stoll(*text, &used);
    if (step < 0) throw std::invalid_argument("negative");
    return std::optional<int64_t>(step);
  } catch (const std::exception&) {
    return DataLossError((dir_ / "LATEST").string() + " does not hold a step number");
  }
}

StatusOr<SavedState> FileStateStore::Restore(int64_t step) {
  const auto dir = StepDir(step);
  if (!std::filesystem::is_directory(dir)) {
    return NotFoundError("no committed checkpoint at step " + std::to_string(step) + " (" +
                         dir.string() + ")");
  }
  MUSTER_ASSIGN_OR_RETURN(std::string bytes, ReadFile(dir / "tensors.bin"));
  auto tensors = DecodeTensors(bytes);
  if (!tensors.ok()) return tensors.status().WithContext(dir.string());
  MUSTER_ASSIGN_OR_RETURN(std::string metadata, ReadFile(dir / "METADATA"));
  return SavedState{step, std::move(*tensors), std::move(metadata)};
}

}  // namespace muster::finetune
