#pragma once

// Conversions between muster values and the wire (common/proto/envelope.proto).

#include <string>

#include "common/proto/envelope.pb.h"
#include "common/status.h"

namespace muster {

// One to one: ErrorToStatus(StatusToError(s)) == s for every Status.
proto::Error StatusToError(const Status& status);
Status ErrorToStatus(const proto::Error& error);

// An envelope carrying `status` as its error payload, answering `request_id`.
proto::Envelope ErrorEnvelope(uint64_t request_id, const Status& status);

// Parses bytes off the wire. Malformed bytes or an envelope without a payload give
// InvalidArgument; never throws.
StatusOr<proto::Envelope> ParseEnvelope(const void* data, size_t size);
std::string SerializeEnvelope(const proto::Envelope& envelope);

}  // namespace muster
