#pragma once

// NodeRegistry: the coordinator's agents. For each node: its record (labels, admin state,
// quarantine; what the database keeps), its session (who speaks for it now; empty: not
// connected), its last heartbeat, the actions queued for it and the long poll it parked; and, for
// each node name, the agent key it is bound to (docs/security.md: the first key that registers a
// name owns it).
//
// Delivery: Enqueue appends an action to the node's queue and answers its parked poll at once;
// a heartbeat takes the queue instead. Actions of a node that is not connected wait for its next
// session; a new session (Connect) or a lost one (Disconnect) drops them: the agent that comes
// back reconciles what it runs with what the coordinator wants.
//
// It does no I/O and reads no clock (time is passed in): the coordinator persists records and
// bindings in its database before it changes them here. Every parked poll is answered exactly
// once (with actions, empty at a deadline or when replaced, or empty at destruction).
//
// Thread-safety: none; the coordinator uses it from its reactor thread only.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/curve.h"
#include "common/proto/envelope.pb.h"
#include "common/status.h"
#include "coordinator/coordinator_db.h"

namespace muster::coordinator {

class NodeRegistry {
 public:
  using Reply = std::function<void(proto::Envelope)>;

  struct Node {
    NodeRecord rec;
    std::string session;            // empty: not connected
    KeyRole role = KeyRole::kNone;  // of the key it registered with; kNone until it registers
    int64_t last_hb_ms = 0;
    std::vector<proto::AgentAction> queue;
    std::optional<Reply> poll;
    int64_t poll_deadline_ms = 0;

    const std::string& name() const { return rec.labels.name(); }
    bool connected() const { return !session.empty(); }
  };
  using Map = std::map<std::string, std::unique_ptr<Node>>;

  NodeRegistry() = default;
  // Answers every parked poll with no actions.
  ~NodeRegistry();
  NodeRegistry(const NodeRegistry&) = delete;
  NodeRegistry& operator=(const NodeRegistry&) = delete;

  // After a restart: the stored nodes, none connected, each given until now + the heartbeat
  // timeout to come back (last_hb_ms = now_ms); `keys`: node name -> bound z85 key.
  void Restore(std::vector<NodeRecord> nodes, std::map<std::string, std::string> keys,
               int64_t now_ms);

  // nullptr if unknown.
  Node* Find(const std::string& name);
  const Node* Find(const std::string& name) const;
  // By name.
  Map::iterator begin() { return nodes_.begin(); }
  Map::iterator end() { return nodes_.end(); }
  Map::const_iterator begin() const { return nodes_.begin(); }
  Map::const_iterator end() const { return nodes_.end(); }
  size_t size() const { return nodes_.size(); }

  // --- key bindings ---
  // The z85 key `name` is bound to; nullopt if none.
  std::optional<std::string> BoundKey(const std::string& name) const;
  // True if `public_key` may speak for `name`: the name is unbound or bound to that key.
  bool MaySpeakFor(const std::string& name, const std::string& public_key) const;
  // REQUIRES: the caller has made the binding durable (CoordinatorDb::BindNodeKey) first.
  void Bind(const std::string& name, const std::string& public_key);
  void Unbind(const std::string& name);

  // --- sessions ---
  // A new session for the node `labels` names (created if new, not connected, with
  // state NODE_UP): labels and role replaced, NODE_DOWN (or unset) becomes NODE_UP (draining
  // stays), the queue dropped, a parked poll answered empty, last_hb_ms = now_ms. The session id
  // is unique in this registry. `*was_connected`: it had a session before.
  Node& Connect(const proto::NodeLabels& labels, KeyRole role, int64_t now_ms, bool* was_connected);
  // The node whose current session is `session`, its heartbeat marked now. NotFound ("register
  // again") for an unknown node, a node not connected or another session. Does not check keys
  // (MaySpeakFor).
  StatusOr<Node*> FindSession(const std::string& name, const std::string& session, int64_t now_ms);
  // The node's session ends: the queue is dropped and a parked poll answered empty.
  void Disconnect(Node& node);

  // --- actions ---
  // Queues `action` for `name` and answers its parked poll; dropped for an unknown node.
  void Enqueue(const std::string& name, proto::AgentAction action);
  // Hands over (and clears) the node's queue (a heartbeat's reply).
  std::vector<proto::AgentAction> TakeQueue(Node& node);
  // Parks an agent's long poll until `deadline_ms`, answered at once if actions are queued. A
  // poll it replaces is answered empty.
  void Park(Node& node, Reply reply, int64_t deadline_ms);
  // Answers (empty) every parked poll whose deadline is <= now_ms.
  void ExpirePolls(int64_t now_ms);
  // Forgets a node (its provider took it back): its parked poll is answered empty; its key
  // binding stays.
  void Remove(const std::string& name);

 private:
  static void AnswerEmpty(Node& node);
  static void Flush(Node& node);

  Map nodes_;
  std::map<std::string, std::string> keys_;  // node name -> bound z85 key
  uint64_t next_session_ = 1;
};

}  // namespace muster::coordinator
