#pragma once

// The dashboard's query strings: untrusted input (docs/security.md), parsed strictly so that a
// malformed query is a 400 naming what is wrong.
//
// Thread-safety: thread-safe (no state).

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>

#include "common/status.h"

namespace muster::coordinator::http {

// The query string `qs` (may be null) as name -> value, percent-decoded. InvalidArgument for a
// name outside `allowed`, a name given twice, bad percent-encoding, or more than 4096 bytes.
StatusOr<std::map<std::string, std::string>> ParseQuery(const char* qs,
                                                        std::initializer_list<const char*> allowed);

// The integer parameter `name` in [lo, hi], or `def` if absent. InvalidArgument naming it
// otherwise.
StatusOr<int64_t> IntParam(const std::map<std::string, std::string>& q, const std::string& name,
                           int64_t def, int64_t lo, int64_t hi);

}  // namespace muster::coordinator::http
