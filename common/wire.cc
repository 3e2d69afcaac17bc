#include "common/wire.h"

namespace muster {

proto::Error StatusToError(const Status& status) {
  proto::Error e;
  e.set_code(static_cast<proto::Code>(static_cast<int>(status.code())));
  e.set_message(status.message());
  return e;
}

Status ErrorToStatus(const proto::Error& error) {
  int code = static_cast<int>(error.code());
  if (code < 0 || code > static_cast<int>(StatusCode::kInternal)) {
    return InternalError("unknown wire error code " + std::to_string(code) + ": " +
                         error.message());
  }
  return Status(static_cast<StatusCode>(code), error.message());
}

proto::Envelope ErrorEnvelope(uint64_t request_id, const Status& status) {
  proto::Envelope env;
  env.set_request_id(request_id);
  *env.mutable_error() = StatusToError(status);
  return env;
}

StatusOr<proto::Envelope> ParseEnvelope(const void* data, size_t size) {
  proto::Envelope env;
  if (size > static_cast<size_t>(INT32_MAX) || !env.ParseFromArray(data, static_cast<int>(size))) {
    return InvalidArgumentError("malformed envelope: " + std::to_string(size) +
                                " bytes are not a muster.proto.Envelope");
  }
  if (env.payload_case() == proto::Envelope::PAYLOAD_NOT_SET) {
    return InvalidArgumentError("envelope " + std::to_string(env.request_id()) +
                                " has no payload (or one this build does not know)");
  }
  return env;
}

std::string SerializeEnvelope(const proto::Envelope& envelope) {
  return envelope.SerializeAsString();
}

}  // namespace muster
