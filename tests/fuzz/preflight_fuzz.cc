// What a launch preflight reads from its peers through the attempt's store
// (node_agent/preflight.h): round-1 entries and round-2 failure lists. Never crashes; what is
// accepted re-encodes to something that decodes the same, and the verdict names a valid rank.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "node_agent/preflight.h"

using muster::node_agent::Blame;
using muster::node_agent::DecodeFailures;
using muster::node_agent::EncodeFailures;
using muster::node_agent::PreflightPeer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int nnodes = 1 + data[0] % 64;
  std::string in(reinterpret_cast<const char*>(data + 1), size - 1);
  if (auto p = PreflightPeer::Decode(in); p.ok()) {
    auto q = PreflightPeer::Decode(p->Encode());
    if (!q.ok() || q->probe_port != p->probe_port || q->node != p->node) std::abort();
  }
  auto f = DecodeFailures(in, nnodes);
  if (!f.ok()) return 0;
  auto g = DecodeFailures(EncodeFailures(*f), nnodes);
  if (!g.ok() || g->size() != f->size()) std::abort();
  auto b = Blame(nnodes, *f);
  if (b.has_value() != !f->empty() || (b && (*b < 0 || *b >= nnodes))) std::abort();
  return 0;
}
