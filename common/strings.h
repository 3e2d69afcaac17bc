#pragma once

// Small text helpers shared by every module: trimming, strict integer parsing and reading one
// variable of the process environment. One definition each, so parsers of config files, job
// specs, hostlists, notice bodies and rank output agree on what "blank" and "a number" mean.
//
// Thread-safety: pure functions, except EnvValue, which reads the process environment
// (getenv: safe while no thread calls setenv/putenv).

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace muster {

// Blanks removed at both ends by Trim: space, tab, CR, LF.
inline constexpr std::string_view kBlanks = " \t\r\n";

// `s` without leading and trailing characters of `blanks`.
std::string_view Trim(std::string_view s, std::string_view blanks = kBlanks);
std::string TrimCopy(std::string_view s, std::string_view blanks = kBlanks);
// One end only.
std::string_view TrimLeft(std::string_view s, std::string_view blanks = kBlanks);
std::string_view TrimRight(std::string_view s, std::string_view blanks = kBlanks);

// A base-10 int64: an optional '-' and digits, nothing else (no '+', no blanks, no overflow).
// nullopt otherwise.
std::optional<int64_t> ParseInt64(std::string_view s);

// The value of environment variable `name`; nullopt when it is unset or empty.
std::optional<std::string> EnvValue(const char* name);

}  // namespace muster
