#include "common/path_name.h"

#include <fmt/format.h>

namespace muster {

namespace {

bool NameByte(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

}  // namespace

std::string QuoteForError(std::string_view s) {
  constexpr size_t kShown = 80;
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < kShown; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  out += '"';
  if (s.size() > kShown) out += fmt::format("... ({} bytes)", s.size());
  return out;
}

Status ValidatePathName(std::string_view name, std::string_view what) {
  auto bad = [&](std::string_view why) {
    return InvalidArgumentError(
        fmt::format("{} {} is not a valid name: {}", what, QuoteForError(name), why));
  };
  if (name.empty()) return bad("it is empty");
  if (name.size() > kMaxPathNameLength) {
    return bad(fmt::format("longer than {} bytes", kMaxPathNameLength));
  }
  if (name == "." || name == "..") return bad("\".\" and \"..\" are not names");
  for (char c : name) {
    if (c == '/') return bad("it contains '/'");
    if (c == '\0') return bad("it contains a NUL byte");
    if (!NameByte(c)) return bad("only A-Z a-z 0-9 . _ - are allowed");
  }
  return Status::Ok();
}

Status ValidateRelativePath(std::string_view path, std::string_view what) {
  auto bad = [&](std::string_view why) {
    return InvalidArgumentError(
        fmt::format("{} {} is not a valid relative path: {}", what, QuoteForError(path), why));
  };
  if (path.empty()) return bad("it is empty");
  if (path.front() == '/') return bad("it is absolute");
  size_t depth = 0;
  size_t start = 0;
  for (;;) {
    size_t slash = path.find('/', start);
    std::string_view part = path.substr(
        start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    if (++depth > kMaxRelativePathDepth) {
      return bad(fmt::format("more than {} components", kMaxRelativePathDepth));
    }
    if (part.empty()) return bad("it has an empty component");
    if (Status st = ValidatePathName(part, "component"); !st.ok()) {
      return bad(st.message());
    }
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return Status::Ok();
}

}  // namespace muster
