#pragma once

// Names that become paths. A job id, a volume name, a checkpoint's step directory or file name
// may come from a peer, a report or a MANIFEST: before one is joined to a directory (a volume
// root, a work directory) it must be a plain name that cannot leave that directory.
//
// A valid path name is 1 to kMaxPathNameLength bytes of [A-Za-z0-9._-], and neither "." nor
// "..". So it has no '/', no NUL, no control or non-ASCII byte, and cannot be absolute. A
// valid relative path is 1 to kMaxRelativePathDepth such names joined by single '/'s.
//
// Thread-safety: pure functions.

#include <cstddef>
#include <string>
#include <string_view>

#include "common/status.h"

namespace muster {

inline constexpr size_t kMaxPathNameLength = 128;
inline constexpr size_t kMaxRelativePathDepth = 16;

// InvalidArgument naming `what` ("job id", "file name") and the offending name (escaped) when
// `name` is not a valid path name.
[[nodiscard]] Status ValidatePathName(std::string_view name, std::string_view what);

// InvalidArgument when `path` is not a valid relative path ("job/step-000000010/MANIFEST").
[[nodiscard]] Status ValidateRelativePath(std::string_view path, std::string_view what);

// `s` quoted for an error message: printable ASCII as is, other bytes as \xNN, at most 80
// bytes of it.
std::string QuoteForError(std::string_view s);

}  // namespace muster
