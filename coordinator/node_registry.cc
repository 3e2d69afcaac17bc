#include "coordinator/node_registry.h"

#include <fmt/format.h>

namespace muster::coordinator {

NodeRegistry::~NodeRegistry() {
  for (auto& [name, n] : nodes_) AnswerEmpty(*n);
}

void NodeRegistry::Restore(std::vector<NodeRecord> nodes, std::map<std::string, std::string> keys,
                           int64_t now_ms) {
  keys_ = std::move(keys);
  for (auto& rec : nodes) {
    auto n = std::make_unique<Node>();
    n->rec = std::move(rec);
    n->last_hb_ms = now_ms;
    std::string name = n->rec.labels.name();
    nodes_[name] = std::move(n);
  }
}

NodeRegistry::Node* NodeRegistry::Find(const std::string& name) {
  auto it = nodes_.find(name);
  return it == nodes_.end() ? nullptr : it->second.get();
}

const NodeRegistry::Node* NodeRegistry::Find(const std::string& name) const {
  auto it = nodes_.find(name);
  return it == nodes_.end() ? nullptr : it->second.get();
}

std::optional<std::string> NodeRegistry::BoundKey(const std::string& name) const {
  auto it = keys_.find(name);
  if (it == keys_.end()) return std::nullopt;
  return it->second;
}

bool NodeRegistry::MaySpeakFor(const std::string& name, const std::string& public_key) const {
  auto it = keys_.find(name);
  return it == keys_.end() || it->second == public_key;
}

void NodeRegistry::Bind(const std::string& name, const std::string& public_key) {
  keys_[name] = public_key;
}

void NodeRegistry::Unbind(const std::string& name) { keys_.erase(name); }

NodeRegistry::Node& NodeRegistry::Connect(const proto::NodeLabels& labels, KeyRole role,
                                          int64_t now_ms, bool* was_connected) {
  auto& slot = nodes_[labels.name()];
  if (slot == nullptr) slot = std::make_unique<Node>();
  Node& n = *slot;
  if (was_connected != nullptr) *was_connected = n.connected();
  n.rec.labels = labels;
  n.role = role;
  if (n.rec.state == proto::NODE_DOWN || n.rec.state == proto::NODE_STATE_UNSPECIFIED) {
    n.rec.state = proto::NODE_UP;
  }
  n.session = fmt::format("{}-{}", now_ms, next_session_++);
  n.last_hb_ms = now_ms;
  n.queue.clear();
  AnswerEmpty(n);
  return n;
}

StatusOr<NodeRegistry::Node*> NodeRegistry::FindSession(const std::string& name,
                                                        const std::string& session,
                                                        int64_t now_ms) {
  Node* n = Find(name);
  if (n == nullptr || !n->connected() || n->session != session) {
    return NotFoundError(fmt::format("no session {} for node {}: register again", session, name));
  }
  n->last_hb_ms = now_ms;
  return n;
}

void NodeRegistry::Disconnect(Node& node) {
  node.session.clear();
  node.queue.clear();
  AnswerEmpty(node);
}

void NodeRegistry::Enqueue(const std::string& name, proto::AgentAction action) {
  Node* n = Find(name);
  if (n == nullptr) return;
  n->queue.push_back(std::move(action));
  Flush(*n);
}

std::vector<proto::AgentAction> NodeRegistry::TakeQueue(Node& node) {
  std::vector<proto::AgentAction> out = std::move(node.queue);
  node.queue.clear();
  return out;
}

void NodeRegistry::Park(Node& node, Reply reply, int64_t deadline_ms) {
  AnswerEmpty(node);  // a newer poll replaces an older one
  node.poll = std::move(reply);
  node.poll_deadline_ms = deadline_ms;
  Flush(node);
}

void NodeRegistry::ExpirePolls(int64_t now_ms) {
  for (auto& [name, n] : nodes_) {
    if (n->poll && n->poll_deadline_ms <= now_ms) AnswerEmpty(*n);
  }
}

void NodeRegistry::AnswerEmpty(Node& node) {
  if (!node.poll) return;
  Reply r = std::move(*node.poll);
  node.poll.reset();
  proto::Envelope e;
  e.mutable_agent_actions();
  r(std::move(e));
}

void NodeRegistry::Flush(Node& node) {
  if (!node.poll || node.queue.empty()) return;
  proto::Envelope e;
  for (auto& a : node.queue) *e.mutable_agent_actions()->add_actions() = std::move(a);
  node.queue.clear();
  Reply r = std::move(*node.poll);
  node.poll.reset();
  r(std::move(e));
}

void NodeRegistry::Remove(const std::string& name) {
  auto it = nodes_.find(name);
  if (it == nodes_.end()) return;
  AnswerEmpty(*it->second);
  nodes_.erase(it);
}

}  // namespace muster::coordinator
