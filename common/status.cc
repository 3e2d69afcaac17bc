#include "common/status.h"

#include <cerrno>
#include <cstring>

namespace muster {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kInvalidArgument:
      return "InvalidArgument";
    case StatusCode::kNotFound:
      return "NotFound";
    case StatusCode::kDeadlineExceeded:
      return "DeadlineExceeded";
    case StatusCode::kUnavailable:
      return "Unavailable";
    case StatusCode::kAborted:
      return "Aborted";
    case StatusCode::kFailedPrecondition:
      return "FailedPrecondition";
    case StatusCode::kDataLoss:
      return "DataLoss";
    case StatusCode::kInternal:
      return "Internal";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out(StatusCodeName(code_));
  out += ": ";
  out += message_;
  return out;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

std::ostream& operator<<(std::ostream& os, const Status& s) { return os << s.ToString(); }

Status InvalidArgumentError(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
Status NotFoundError(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
Status DeadlineExceededError(std::string m) {
  return {StatusCode::kDeadlineExceeded, std::move(m)};
}
Status UnavailableError(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
Status AbortedError(std::string m) { return {StatusCode::kAborted, std::move(m)}; }
Status FailedPreconditionError(std::string m) {
  return {StatusCode::kFailedPrecondition, std::move(m)};
}
Status DataLossError(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
Status InternalError(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

Status ErrnoStatus(int e, std::string_view what) {
  std::string msg = std::string(what) + ": " + std::strerror(e);
  switch (e) {
    case ENOENT:
      return NotFoundError(std::move(msg));
    case EINVAL:
    case ENAMETOOLONG:
      return InvalidArgumentError(std::move(msg));
    case ETIMEDOUT:
      return DeadlineExceededError(std::move(msg));
    case EAGAIN:
    case ECONNREFUSED:
    case EHOSTUNREACH:
      return UnavailableError(std::move(msg));
    case EACCES:
    case EPERM:
    case EEXIST:
    case ENOTEMPTY:
    case ENOSPC:
    case EDQUOT:
    case EROFS:
      return FailedPreconditionError(std::move(msg));
    case EIO:
      return DataLossError(std::move(msg));
    default:
      return InternalError(std::move(msg));
  }
}

}  // namespace muster
