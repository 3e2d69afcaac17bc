// libFuzzer target: the rendezvous store's request handling (collectives/rendezvous_server.h), fed
// the envelopes a rank's code could send. Each input is a sequence of envelopes (u16
// little-endian length, then that many bytes) handled in one scope, as if off the socket:
// RendezvousServer::HandleRequest, without the socket, on a reactor that is not running (parked
// requests stay parked; closing the scope at the end answers them). Small limits make the
// bounds reachable. Each run checks:
//   - every request is answered (at once, or when the scope closes), exactly once;
//   - no reply is bigger than the message size limit;
//   - the scope's byte count stays within 0..max_scope_bytes, and nothing stays parked.
// Built by `make fuzz` with clang++-14 -fsanitize=fuzzer,address.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "collectives/rendezvous_server.h"
#include "common/logging.h"
#include "common/wire.h"

namespace {

using muster::collectives::RendezvousServer;

constexpr int64_t kMaxMessageBytes = 8 << 10;

struct Harness {
  Harness() : reactor("store-fuzz") {
    muster::log::InitLogging("off").IgnoreError();
    RendezvousServer::Options o;
    o.endpoint = "inproc://store-fuzz";
    o.insecure = true;
    o.max_message_bytes = kMaxMessageBytes;
    o.max_key_bytes = 64;
    o.max_keys_per_request = 32;
    o.max_scope_bytes = 32 << 10;
    o.max_scope_entries = 64;
    o.max_parked_per_scope = 16;
    auto s = RendezvousServer::Create(reactor, nullptr, o);
    if (!s.ok()) abort();
    server = std::move(*s);
  }
  muster::Reactor reactor;
  std::unique_ptr<RendezvousServer> server;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* h = new Harness();
  if (!h->server->AddScope("j", 0).ok()) abort();
  size_t pos = 0;
  int requests = 0;
  int64_t answered = 0;
  auto reply = [&answered](muster::proto::Envelope e) {
    ++answered;
    if (static_cast<int64_t>(muster::SerializeEnvelope(e).size()) > kMaxMessageBytes) abort();
  };
  while (pos + 2 <= size && requests < 256) {
    size_t len = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    len = std::min(len, size - pos);
    auto env = muster::ParseEnvelope(data + pos, len);
    pos += len;
    if (!env.ok()) continue;
    ++requests;
    if (env->has_store_request()) {
      // Mostly the open scope; attempt 1 is never open.
      auto* scope = env->mutable_store_request()->mutable_scope();
      scope->set_job("j");
      scope->set_attempt(scope->attempt() & 1);
    }
    muster::PeerInfo peer;
    peer.user_id = "anonymous";
    h->server->HandleRequest(peer, std::move(*env), reply);
    int64_t bytes = h->server->scope_bytes("j", 0);
    if (bytes < 0 || bytes > (32 << 10)) abort();
  }
  h->server->RemoveScope("j", 0);
  if (h->server->parked() != 0) abort();
  if (answered != requests) abort();
  return 0;
}
