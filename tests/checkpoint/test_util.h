#pragma once

// Helpers shared by the checkpoint tests: deterministic tensor contents and temp directories.

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/manifest.h"

namespace muster::checkpoint::testing {

// The value of element `i` of tensor `salt` at `step`: any change of step, tensor or index
// changes it, so a restore that mixes steps or shards is caught.
inline uint32_t Value(int64_t step, uint32_t salt, int64_t i) {
  uint64_t x = (static_cast<uint64_t>(step) * 0x9E3779B97F4A7C15ull) ^ (uint64_t{salt} << 40) ^
               static_cast<uint64_t>(i);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

inline std::vector<uint32_t> Fill(int64_t step, uint32_t salt, int64_t first, int64_t n) {
  std::vector<uint32_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = Value(step, salt, first + i);
  return v;
}

// A fresh directory under the test temp dir, removed when destroyed.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/muster-ckpt-XXXXXX";
    path_ = ::mkdtemp(tmpl.data()) ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string sub(const std::string& s) const { return path_ + "/" + s; }

 private:
  std::string path_;
};

inline std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Rewrites the MANIFEST of committed `step` in `dir` as `edit` leaves it, with a matching
// checksum trailer: what a broken or hostile writer could leave on a volume. Returns false if
// the step could not be loaded.
inline bool EditManifest(const std::string& dir, int64_t step,
                         const std::function<void(Manifest&)>& edit) {
  auto m = LoadManifest(LocalVolume(), dir, step);
  if (!m.ok()) return false;
  edit(*m);
  std::ofstream f(StepPath(dir, step) + "/" + kManifestName, std::ios::binary | std::ios::trunc);
  f << SerializeManifest(*m);
  return static_cast<bool>(f);
}

// The xxh3 of each `block_size` block of `bytes` (the last one may be short).
inline std::vector<uint64_t> BlockHashes(const std::string& bytes, uint64_t block_size) {
  std::vector<uint64_t> out;
  for (uint64_t off = 0; off < bytes.size(); off += block_size) {
    out.push_back(Xxh3(bytes.data() + off, std::min<uint64_t>(block_size, bytes.size() - off)));
  }
  return out;
}

}  // namespace muster::checkpoint::testing
