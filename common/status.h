#pragma once

// Status and StatusOr<T>: how every muster function reports failure. The set of codes is small
// and fixed (STYLE.md); the detail goes in the message. A Status maps 1:1 onto the wire's
// proto::Error (see wire.h).
//
// Thread-safety: values; copy freely.

#include <cstdlib>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace muster {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kNotFound = 2,
  kDeadlineExceeded = 3,
  kUnavailable = 4,
  kAborted = 5,
  kFailedPrecondition = 6,
  kDataLoss = 7,
  kInternal = 8,
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "DataLoss: shard-00001.bin: checksum mismatch" (or "OK").
  std::string ToString() const;

  // Returns a copy whose message is prefixed with `context: `, keeping the code.
  Status WithContext(std::string_view context) const;

  // Marks a status as deliberately ignored.
  void IgnoreError() const {}

  bool operator==(const Status& other) const = default;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

std::ostream& operator<<(std::ostream& os, const Status& s);

Status InvalidArgumentError(std::string message);
Status NotFoundError(std::string message);
Status DeadlineExceededError(std::string message);
Status UnavailableError(std::string message);
Status AbortedError(std::string message);
Status FailedPreconditionError(std::string message);
Status DataLossError(std::string message);
Status InternalError(std::string message);

// Builds "prefix: strerror(errno_value)" as an Internal, NotFound, ... status chosen from errno.
Status ErrnoStatus(int errno_value, std::string_view what);

// Holds either a T or a non-OK Status.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(const Status& status) : v_(status) {  // NOLINT: implicit by design
    if (status.ok()) v_ = Status(StatusCode::kInternal, "StatusOr built from an OK status");
  }
  StatusOr(Status&& status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) {
      v_ = Status(StatusCode::kInternal, "StatusOr built from an OK status");
    }
  }
  StatusOr(const T& value) : v_(value) {}        // NOLINT
  StatusOr(T&& value) : v_(std::move(value)) {}  // NOLINT
  template <typename U>
  requires(std::is_constructible_v<T, U&&> && !std::is_same_v<std::decay_t<U>, T> &&
           !std::is_same_v<std::decay_t<U>, Status>) StatusOr(U&& value)
      : v_(T(std::forward<U>(value))) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

  // REQUIRES: ok().
  const T& value() const& { return std::get<T>(v_); }
  T& value() & { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

 private:
  std::variant<Status, T> v_;
};

namespace internal {
inline Status AsStatus(const Status& s) { return s; }
template <typename T>
Status AsStatus(const StatusOr<T>& s) {
  return s.status();
}
}  // namespace internal

}  // namespace muster

#define MUSTER_CONCAT_INNER_(a, b) a##b
#define MUSTER_CONCAT_(a, b) MUSTER_CONCAT_INNER_(a, b)

#define MUSTER_RETURN_IF_ERROR(expr)                                      \
  do {                                                                    \
    ::muster::Status muster_status_ = ::muster::internal::AsStatus(expr); \
    if (!muster_status_.ok()) return muster_status_;                      \
  } while (0)

#define MUSTER_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

#define MUSTER_ASSIGN_OR_RETURN(lhs, expr) \
  MUSTER_ASSIGN_OR_RETURN_IMPL_(MUSTER_CONCAT_(muster_statusor_, __LINE__), lhs, expr)
