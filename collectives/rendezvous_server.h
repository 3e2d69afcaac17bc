#pragma once

// RendezvousServer: the rendezvous store of muster jobs, served over ZeroMQ on a host's Reactor
// (the launcher's, or the node-rank-0 agent's).
//
// Keys live in scopes, one per job attempt, so a restarted attempt never reads a stale value.
// The host opens a scope with AddScope(job, attempt) before starting that attempt's ranks and
// hands every rank the returned credentials in MUSTER_RDZV_KEY (see RdzvCredentials in
// collectives/rendezvous_client.h for the format), and closes it with RemoveScope when the attempt
// ends: parked waiters then get Aborted and the attempt's client key stops being accepted.
//
// Security: under CURVE each scope has its own client key pair, authorized in the server's ZAP
// domain with the scope as its name; the server takes the scope of a request from the key that
// made the connection and refuses a request naming any other, so the ranks of one attempt
// cannot read or write another's keys. With `insecure` (loudly logged) the scope comes from
// the request and must be open.
//
// Waiting operations (get, wait, barrier, gather) are parked on the server and answered exactly
// once, when their keys are set, the barrier or gather fills, their timeout (a reactor timer)
// fires, or the scope closes. Nothing polls: one request, one reply. A gather
// (RendezvousStore::AllGather) keeps each rank's entry once, builds and serializes the assembled
// reply once when the last rank arrives, and sends those bytes to every parked request
// (RpcServer::ReplyWith: one copy each, into its message): N requests and N replies for an
// allgather of N ranks, where a get of N keys by every rank would cost the server N^2 entries to
// copy and encode.
//
// Batches: a node agent's relay (collectives/rendezvous_relay.h) stands for its node's ranks.
// It enters a barrier for several callers with one request (StoreBarrier.arrivals) and
// contributes several ranks' entries to a gather with one request (StoreGather.batch); each is
// parked as one request, answered once, and on a timeout or error withdrawn as a whole. The
// checks are those of the callers it stands for (a rank twice, a barrier over-filled, ...).
//
// Every request is untrusted (any rank's code sends them): keys and names are bounded, get and
// wait lists too, a reply that would pass the message size limit is an error instead, add
// refuses to overflow, and what one scope may hold (bytes, entries, parked requests) is capped
// by Options. A request past a bound gets an InvalidArgument or FailedPrecondition reply naming
// it; the server's work per request is linear in the request (or in the keys it wakes).
// A negative timeout counts as 0 (answered at once); a longer one than max_timeout is cut.
//
// Thread-safety: Create and the destructor run on the reactor thread (or before Start/after
// Stop). AddScope and RemoveScope are thread-safe (they hop onto the reactor when it runs).
// Everything else happens on the reactor thread.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "collectives/rendezvous_store.h"
#include "common/curve.h"
#include "common/reactor.h"
#include "common/rpc.h"
#include "common/status.h"

namespace muster::collectives {

inline constexpr char kRendezvousZapDomain[] = "muster-rdzv";

class RendezvousServer {
 public:
  struct Options {
    // "tcp://0.0.0.0:*" serves every interface on a port chosen by the kernel.
    std::string endpoint = "tcp://127.0.0.1:*";
    // Serve without CURVE (logged as INSECURE); `authenticator` may then be null.
    bool insecure = false;
    // The server's key pair; generated if empty.
    KeyPair server_key;
    std::string zap_domain = kRendezvousZapDomain;
    int64_t max_message_bytes = kDefaultMaxMessageBytes;
    // Longer waits are cut to this.
    std::chrono::milliseconds max_timeout = std::chrono::hours(24);
    // Keys, barrier names and gather names: 1..max_key_bytes.
    size_t max_key_bytes = 4096;
    // Keys of one get or wait.
    size_t max_keys_per_request = 1 << 17;
    // What one scope may hold: bytes of keys, values, names and gather entries; keys, barriers
    // and gathers together; requests parked at once.
    int64_t max_scope_bytes = int64_t{1} << 30;
    size_t max_scope_entries = 1 << 20;
    size_t max_parked_per_scope = 1 << 18;
  };

  // Binds `options.endpoint` on `reactor`. Unless insecure, `authenticator` must be the
  // ZapAuthenticator of the reactor's context (not owned; outlives the server).
  // REQUIRES: on the reactor thread or before reactor.Start().
  static StatusOr<std::unique_ptr<RendezvousServer>> Create(Reactor& reactor,
                                                            ZapAuthenticator* authenticator,
                                                            Options options);
  // Answers every parked waiter with Aborted. REQUIRES: on the reactor thread or after Stop.
  ~RendezvousServer();

  // Opens the scope of one job attempt and returns the credentials its ranks connect with
  // (the MUSTER_RDZV_KEY value): "insecure" when serving insecure, else
  // "v1,<server public key>,<client public key>,<client secret key>". Opening an open scope
  // returns the same credentials. `job` must be non-empty, at most 128 bytes, without '/',
  // ',' or whitespace.
  // `client_key`, when given, is the key pair the scope's ranks use (a node agent derives it
  // from the coordinator's per-attempt key, so agents on other nodes can hand it out too);
  // otherwise one is generated.
  StatusOr<std::string> AddScope(const std::string& job, uint64_t attempt,
                                 const KeyPair* client_key = nullptr);
  // Sets `key` in an open scope as a rank's `set` would (parked waiters wake): the host's own
  // messages to the ranks, e.g. the agent's checkpoint request. NotFound when the scope is not
  // open.
  Status Set(const std::string& job, uint64_t attempt, const std::string& key,
             const std::string& value);
  // Closes a scope: its waiters get Aborted, its keys are dropped, its client key is revoked.
  void RemoveScope(const std::string& job, uint64_t attempt);

  // The endpoint bound, port resolved ("tcp://127.0.0.1:40123"); this is MUSTER_RDZV_ENDPOINT
  // (with the wildcard address replaced by one the ranks can reach).
  const std::string& endpoint() const { return endpoint_; }
  const std::string& public_key() const { return options_.server_key.public_key; }
  bool insecure() const { return options_.insecure; }

  // Callers parked now (for tests and metrics): a relay's request for several of its node's
  // callers (a batched barrier or gather) counts each. Reactor thread, or via Reactor::Call.
  size_t parked() const { return parked_callers_; }
  // Requests parked now. Reactor thread, or via Reactor::Call.
  size_t parked_requests() const { return waiters_.size(); }
  // Bytes held by the scope (keys, values, names, gather entries); -1 if it is not open.
  // Reactor thread, or via Reactor::Call.
  int64_t scope_bytes(const std::string& job, uint64_t attempt) const;

  // Handles one request as if it came from `peer` over the server's socket, answering through
  // `reply` (now, or later for a parked request). This is what the socket calls; tests and the
  // fuzzer call it directly. REQUIRES: on the reactor thread, or the reactor not running.
  void HandleRequest(const PeerInfo& peer, proto::Envelope&& request, RpcServer::Reply reply);

 private:
  struct Waiter;
  struct BarrierState {
    int n = 0;
    bool done = false;
    int arrived = 0;  // callers in the barrier now (a relay's request stands for several)
    // Waiter -> the callers it stands for (a map: a timed-out waiter leaves in O(1)).
    std::unordered_map<uint64_t, int> waiters;
  };
  struct GatherState {
    int n = 0;
    bool done = false;
    int arrived = 0;
    std::vector<std::string> values;  // by rank; dropped when done
    std::vector<uint64_t> waiter_of;  // by rank: the parked contributor, 0 if none
  };
  struct Scope {
    std::string name;  // "<job>/<attempt>"
    KeyPair client_key;
    std::unordered_map<std::string, std::string> kv;
    // Key -> the waiters that still miss it (a set: a timed-out waiter leaves in O(1)).
    std::unordered_map<std::string, std::unordered_set<uint64_t>> watchers;
    std::map<std::string, BarrierState> barriers;
    std::map<std::string, GatherState> gathers;
    int64_t bytes = 0;  // see Options::max_scope_bytes
    size_t parked = 0;  // waiters of this scope
  };

  RendezvousServer(Reactor& reactor, ZapAuthenticator* authenticator, Options options);
  template <typename F>
  auto OnReactor(const char* name, F fn) -> decltype(fn());
  Status CheckKey(const char* op, const std::string& key) const;
  // OK if the scope can take `more_bytes` and `more_entries` more.
  Status CheckRoom(const Scope& scope, int64_t more_bytes, size_t more_entries) const;
  // CheckRoom for setting `key` to a value of `value_bytes`.
  Status CheckSet(const Scope& scope, const std::string& key, size_t value_bytes) const;
  Status CheckPark(const Scope& scope) const;
  Status Dispatch(Scope& scope, proto::StoreRequest& req, RpcServer::Reply& reply);
  void SetKey(Scope& scope, const std::string& key, std::string value);
  void Park(Scope& scope, std::vector<std::string> keys, bool with_values, int64_t timeout_ms,
            RpcServer::Reply reply);
  void ParkBarrier(Scope& scope, const proto::StoreBarrier& b, RpcServer::Reply reply);
  Status ParkGather(Scope& scope, proto::StoreGather& g, RpcServer::Reply& reply);
  void CompleteGather(Scope& scope, const std::string& name, GatherState& state);
  // Answers waiter `id`: with `status` if not OK, else with `result` if given (the same bytes
  // for every waiter of a gather), else with the values (get) or nothing (wait, barrier).
  void Finish(uint64_t id, const Status& status,
              const std::shared_ptr<const SerializedReply>& result = nullptr);
  std::chrono::milliseconds ClampTimeout(int64_t timeout_ms) const;

  Reactor& reactor_;
  ZapAuthenticator* authenticator_;
  Options options_;
  std::unique_ptr<RpcServer> rpc_;
  std::string endpoint_;

  // Reactor thread only.
  std::map<std::string, Scope> scopes_;  // by name
  std::unordered_map<uint64_t, std::unique_ptr<Waiter>> waiters_;
  uint64_t next_waiter_ = 1;
  size_t parked_callers_ = 0;
};

}  // namespace muster::collectives
