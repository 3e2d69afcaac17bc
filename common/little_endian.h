#pragma once

// Fixed-width integers in little-endian byte order, for the binary headers muster writes and
// parses itself (snapshot frames, the snapshot data channel), whatever the host's order.
// LoadLe REQUIRES: at + sizeof(T) <= in.size() (callers check the length first).

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace muster {

template <typename T>
void AppendLe(std::string& out, T v) {
  char b[sizeof(T)];
  for (size_t i = 0; i < sizeof(T); ++i) {
    b[i] = static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff);
  }
  out.append(b, sizeof(T));
}

template <typename T>
T LoadLe(std::string_view in, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(in[at + i])) << (8 * i);
  }
  return static_cast<T>(v);
}

}  // namespace muster
