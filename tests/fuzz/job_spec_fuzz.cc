// libFuzzer target: job specs, the coordinator's most exposed input. The first byte picks the
// path: even, the rest is YAML text for ParseJobSpec; odd, the rest is a serialized proto
// JobSpec for JobSpecFromProto (what a client may send instead of YAML). Beyond "no crash, no
// leak, no hang", each run checks the invariants the coordinator relies on:
//   - a spec the YAML path accepts also passes ValidateJobSpec, the wire path's check;
//   - an accepted spec survives the proto round trip unchanged in what the scheduler sees;
//   - an error is InvalidArgument and its message stays small.
// Built by `make fuzz` with clang++-14 -fsanitize=fuzzer,address.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common/logging.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_spec.h"

namespace {

using muster::StatusCode;
using muster::coordinator::JobSpec;

// 100 error lines of a few hundred bytes each, and the header.
constexpr size_t kMaxErrorBytes = 64 << 10;

void CheckRefusal(const muster::Status& s) {
  if (s.code() != StatusCode::kInvalidArgument) abort();
  if (s.message().size() > kMaxErrorBytes) abort();
}

void CheckAccepted(const JobSpec& spec) {
  if (!muster::coordinator::ValidateJobSpec(spec).ok()) abort();
  auto back = muster::coordinator::JobSpecFromProto(muster::coordinator::JobSpecToProto(spec));
  if (!back.ok()) abort();
  if (back->name != spec.name || back->command != spec.command || back->env != spec.env ||
      back->nodes != spec.nodes || back->ranks_per_node != spec.ranks_per_node ||
      back->hosts != spec.hosts || back->time_limit != spec.time_limit ||
      back->checkpoint_keep != spec.checkpoint_keep) {
    abort();
  }
  (void)muster::coordinator::ToJobRequest(spec, spec.name + "-1", 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool init = [] {
    muster::log::InitLogging("off").IgnoreError();
    return true;
  }();
  (void)init;
  if (size == 0) return 0;
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if ((data[0] & 1) == 0) {
    auto spec = muster::coordinator::ParseJobSpec(rest, "fuzz.yaml");
    if (spec.ok()) {
      CheckAccepted(*spec);
    } else {
      CheckRefusal(spec.status());
    }
  } else {
    muster::proto::JobSpec p;
    if (!p.ParseFromArray(rest.data(), static_cast<int>(rest.size()))) return 0;
    auto spec = muster::coordinator::JobSpecFromProto(p);
    if (spec.ok()) {
      CheckAccepted(*spec);
    } else {
      CheckRefusal(spec.status());
    }
  }
  return 0;
}
