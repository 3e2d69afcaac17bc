// libFuzzer target: the coordinator's message handling. Each input is a sequence of envelopes
// (u16 little-endian length, then that many bytes), fed to one long-lived Coordinator (real
// SQLite state under a temp dir, injected clock advanced per message) as if they came off the
// wire, with Tick() between them. Nodes are registered first so that submits, reports and
// polls reach deep state. The envelope's request_id picks the caller (mod 5): 0 a keyless caller
// with every right (as the seed nodes registered), then an admin, two clients and an agent key,
// so the role and ownership checks are fuzzed too. Built by `make fuzz` with clang++-14
// -fsanitize=fuzzer,address.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>

#include "common/logging.h"
#include "common/wire.h"
#include "coordinator/coordinator.h"

namespace {

using muster::coordinator::Coordinator;
using muster::coordinator::CoordinatorOptions;
using muster::coordinator::TimePoint;

TimePoint g_now = TimePoint{} + std::chrono::hours(500000);

Coordinator* Instance() {
  static Coordinator* c = [] {
    muster::log::InitLogging("off").IgnoreError();
    auto dir = std::filesystem::temp_directory_path() / ("muster-fuzz-" + std::to_string(getpid()));
    std::filesystem::remove_all(dir);
    // Removed when the run ends normally (-max_total_time, -runs); kept after a crash.
    static std::filesystem::path g_dir = dir;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(g_dir, ec);
    });
    auto store = muster::coordinator::CoordinatorDb::Open(dir);
    if (!store.ok()) abort();
    CoordinatorOptions o;
    o.clock = [] { return g_now; };
    o.heartbeat_timeout = std::chrono::milliseconds(3000);
    // Kept logs on (coordinator/log_keeper.h), small caps: fuzzed log chunks and log requests
    // reach the copies.
    o.log_keep_dir = dir / "logs";
    o.log_keep.job_bytes = 1 << 20;
    o.log_keep.total_bytes = 8 << 20;
    auto coord = Coordinator::Create(std::move(*store), o);
    if (!coord.ok()) abort();
    Coordinator* raw = coord->release();
    for (int i = 0; i < 4; ++i) {
      muster::proto::Envelope e;
      auto* l = e.mutable_agent_register()->mutable_labels();
      l->set_name("n" + std::to_string(i));
      l->set_provider(i < 3 ? "aws" : "gcp");
      l->set_island("a");
      l->set_gpus(8);
      l->set_slots(8);
      l->add_volumes()->set_name("ckpt");
      raw->Handle("fuzz", std::move(e), [](muster::proto::Envelope) {});
    }
    return raw;
  }();
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Coordinator* c = Instance();
  size_t pos = 0;
  int messages = 0;
  while (pos + 2 <= size && messages++ < 64) {
    size_t len = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    len = std::min(len, size - pos);
    auto env = muster::ParseEnvelope(data + pos, len);
    pos += len;
    g_now += std::chrono::milliseconds(len * 7);
    if (!env.ok()) continue;
    using muster::KeyRole;
    static const muster::coordinator::Caller kCallers[] = {
        {"fuzz", "", KeyRole::kLegacy, ""},
        {"admin", "AdminKey000000000000000000000000000000000", KeyRole::kAdmin, ""},
        {"alice", "AliceKey000000000000000000000000000000000", KeyRole::kClient, ""},
        {"bob", "BobKey00000000000000000000000000000000000", KeyRole::kClient, ""},
        {"agent", "AgentKey000000000000000000000000000000000", KeyRole::kAgent, ""},
    };
    const auto& caller = kCallers[env->request_id() % 5];
    c->Handle(caller, std::move(*env), [](muster::proto::Envelope reply) {
      // A reply must always be serializable.
      (void)muster::SerializeEnvelope(reply);
    });
    c->Tick();
  }
  return 0;
}
