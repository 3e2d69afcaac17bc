// libFuzzer target: a checkpoint directory's MANIFEST and LATEST, read from an untrusted volume
// (checkpoint/manifest.h). Each input is fed
//   - to ParseLatest as LATEST's contents;
//   - to ParseManifest as a whole MANIFEST (the checksum trailer rarely matches);
//   - to ParseManifest as the JSON body with a matching trailer appended, in both scopes, so
//     the JSON, the range checks and the coverage check (no gap, no overlap) are reached.
// Whatever parses must hold up for its readers: it serializes and parses back to the same
// manifest, and a restore plan of every stored slice stays inside the shard files. A violation
// traps. Built by `make fuzz` with clang++-14 -fsanitize=fuzzer,address.

#include <cstddef>
#include <cstdint>
#include <string>

#include "checkpoint/manifest.h"
#include "checkpoint/restore_pipeline.h"
#include "common/logging.h"

namespace {

using muster::checkpoint::Manifest;
using muster::checkpoint::ManifestScope;

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

void Exercise(const Manifest& m, ManifestScope scope) {
  // A manifest that validated serializes into one that validates again, unchanged.
  const std::string again = muster::checkpoint::SerializeManifest(m);
  auto back = muster::checkpoint::ParseManifest(again, scope);
  Check(back.ok());
  Check(back->shards.size() == m.shards.size() && back->tensors.size() == m.tensors.size());
  Check(muster::checkpoint::SerializeManifest(*back) == again);

  // What a restore of every stored slice would read: the plan never leaves the shard files.
  const uint64_t window =
      std::max<uint64_t>(m.block_size, (32 << 20) / m.block_size * m.block_size);
  muster::checkpoint::RestorePlanBuilder plan(m, window);
  uint64_t want = 0;
  char* const dst = reinterpret_cast<char*>(uintptr_t{1} << 20);  // never dereferenced
  for (const auto& t : m.tensors) {
    for (const auto& s : t.slices) {
      plan.AddRun(s.shard, s.byte_offset, s.byte_length, dst, muster::checkpoint::MemoryKind::kHost,
                  &t.name);
      want += s.byte_length;
    }
  }
  muster::checkpoint::RestorePlan p = plan.Take();
  Check(p.error.ok());
  Check(p.run_bytes == want);
  for (const auto& w : p.windows) {
    Check(w.shard >= 0 && static_cast<size_t>(w.shard) < m.shards.size());
    Check(w.begin <= w.end && w.end <= m.shards[w.shard].size && w.end - w.begin <= window);
    Check(w.first_run + w.num_runs <= p.runs.size());
    for (size_t i = 0; i < w.num_runs; ++i) {
      const auto& r = p.runs[w.first_run + i];
      Check(r.file_off >= w.begin && r.file_off + r.len <= w.end);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool init = [] {
    muster::log::InitLogging("off").IgnoreError();
    return true;
  }();
  (void)init;
  const std::string in(reinterpret_cast<const char*>(data), size);

  auto latest = muster::checkpoint::ParseLatest(in);
  if (latest.ok()) Check(*latest >= 0);

  auto raw = muster::checkpoint::ParseManifest(in);
  if (raw.ok()) Exercise(*raw, ManifestScope::kComplete);

  const std::string with_trailer =
      in + "\nxxh3:" + muster::checkpoint::HexU64(muster::checkpoint::Xxh3(in.data(), in.size())) +
      "\n";
  for (ManifestScope scope : {ManifestScope::kComplete, ManifestScope::kRankReport}) {
    auto m = muster::checkpoint::ParseManifest(with_trailer, scope);
    if (m.ok()) Exercise(*m, scope);
  }
  return 0;
}
