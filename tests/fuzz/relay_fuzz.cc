// libFuzzer target: the rendezvous relay's handling of what a rank sends on its node's local
// socket (collectives/rendezvous_relay.h). Each input is a peer address (u8 length, then that
// many bytes: ZeroMQ's "host:uid:gid:pid", which the relay parses for the pid it admits) and a
// sequence of envelopes (u16 little-endian length, then that many bytes) handled as if off the
// socket: RendezvousRelay::HandleLocal, on a reactor that is not running, with a store that
// is not there (requests forwarded upstream stay pending; batches wait for their window).
// Closing the relay at the end answers them. Each run checks:
//   - every request is answered (at once, or when the relay closes), exactly once;
//   - a pid the admit function refuses never gets a request upstream.
// Built by `make fuzz` with clang++-14 -fsanitize=fuzzer,address.

#include <stdlib.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "collectives/rendezvous_relay.h"
#include "common/logging.h"
#include "common/wire.h"

namespace {

using muster::collectives::RendezvousRelay;

std::string* g_dir = nullptr;  // removed at exit

struct Harness {
  Harness() : reactor("relay-fuzz") {
    muster::log::InitLogging("off").IgnoreError();
    std::string templ = "/tmp/relay-fuzz-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) abort();
    dir = templ;
    g_dir = new std::string(dir);
    std::atexit([] { std::filesystem::remove_all(*g_dir); });
  }
  muster::Reactor reactor;
  std::string dir;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* h = new Harness();
  if (size < 1) return 0;
  size_t alen = std::min<size_t>(data[0], size - 1);
  std::string address(reinterpret_cast<const char*>(data + 1), alen);
  size_t pos = 1 + alen;
  bool admitted_any = false;
  RendezvousRelay::Options o;
  o.socket_parent = h->dir;
  o.upstream_endpoint = "ipc://" + h->dir + "/nobody-listens";
  o.credentials.insecure = true;
  o.job = "j";
  o.attempt = 0;
  o.local_ranks = {0, 1, 2, 3};
  o.max_message_bytes = 8 << 10;
  // Admits even pids only.
  o.admit = [&admitted_any](pid_t pid) -> muster::Status {
    if (pid % 2 != 0) return muster::FailedPreconditionError("odd pid");
    admitted_any = true;
    return muster::Status::Ok();
  };
  auto relay = RendezvousRelay::Create(h->reactor, o);
  if (!relay.ok()) {
    fprintf(stderr, "relay_fuzz: %s\n", relay.status().ToString().c_str());
    abort();
  }
  int requests = 0;
  int64_t answered = 0;
  auto reply = [&answered](muster::proto::Envelope) { ++answered; };
  while (pos + 2 <= size && requests < 256) {
    size_t len = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    len = std::min(len, size - pos);
    auto env = muster::ParseEnvelope(data + pos, len);
    pos += len;
    if (!env.ok()) continue;
    ++requests;
    if (env->has_store_request() && (env->request_id() & 1) == 0) {
      // Mostly the relay's scope.
      auto* scope = env->mutable_store_request()->mutable_scope();
      scope->set_job("j");
      scope->set_attempt(0);
    }
    muster::PeerInfo peer;
    peer.user_id = "anonymous";
    peer.address = address;
    (*relay)->HandleLocal(peer, std::move(*env), reply);
  }
  if (!admitted_any && (*relay)->stats().upstream_requests != 0) abort();
  relay->reset();  // answers what is pending
  if (answered != requests) abort();
  return 0;
}
