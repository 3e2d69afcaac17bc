#pragma once

// Helpers shared by the checkpoint tests: deterministic tensor contents and temp directories.

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

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

}  // namespace muster::checkpoint::testing
