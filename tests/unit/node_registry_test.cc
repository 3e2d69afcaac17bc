// The coordinator's node registry (coordinator/node_registry.h): key bindings, sessions, action
// delivery through heartbeats and parked polls, every poll answered exactly once.

#include "coordinator/node_registry.h"

#include <gtest/gtest.h>

namespace muster::coordinator {
namespace {

proto::NodeLabels Labels(const std::string& name, const std::string& provider = "aws") {
  proto::NodeLabels l;
  l.set_name(name);
  l.set_provider(provider);
  return l;
}

proto::AgentAction StopOf(const std::string& job) {
  proto::AgentAction a;
  a.mutable_stop()->set_job_id(job);
  return a;
}

// A parked poll's answers.
struct PollLog {
  std::vector<proto::Envelope> answers;
  NodeRegistry::Reply Reply() {
    return [this](proto::Envelope e) { answers.push_back(std::move(e)); };
  }
  size_t actions(size_t i) const { return answers.at(i).agent_actions().actions_size(); }
};

TEST(NodeRegistryTest, KeyBindings) {
  NodeRegistry r;
  EXPECT_FALSE(r.BoundKey("n0"));
  EXPECT_TRUE(r.MaySpeakFor("n0", "K1")) << "an unbound name: any agent key";
  r.Bind("n0", "K1");
  EXPECT_EQ(r.BoundKey("n0"), "K1");
  EXPECT_TRUE(r.MaySpeakFor("n0", "K1"));
  EXPECT_FALSE(r.MaySpeakFor("n0", "K2"));
  r.Unbind("n0");
  EXPECT_TRUE(r.MaySpeakFor("n0", "K2"));
}

TEST(NodeRegistryTest, SessionsAreUniqueAndOnlyTheCurrentOneIsFound) {
  NodeRegistry r;
  bool was = true;
  auto& n = r.Connect(Labels("n0"), KeyRole::kAgent, 1000, &was);
  EXPECT_FALSE(was);
  EXPECT_EQ(n.rec.state, proto::NODE_UP);
  EXPECT_EQ(n.role, KeyRole::kAgent);
  std::string s1 = n.session;
  auto found = r.FindSession("n0", s1, 2000);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ((*found)->last_hb_ms, 2000);
  std::string s2 = r.Connect(Labels("n0", "gcp"), KeyRole::kAgent, 1000, &was).session;
  EXPECT_TRUE(was);
  EXPECT_NE(s1, s2) << "same clock, another session";
  EXPECT_EQ(r.Find("n0")->rec.labels.provider(), "gcp") << "labels replaced";
  EXPECT_EQ(r.FindSession("n0", s1, 3000).status().code(), StatusCode::kNotFound);
  EXPECT_NE(r.FindSession("n0", s1, 3000).status().message().find("register again"),
            std::string::npos);
  EXPECT_EQ(r.FindSession("nx", s2, 3000).status().code(), StatusCode::kNotFound);
  r.Disconnect(*r.Find("n0"));
  EXPECT_FALSE(r.Find("n0")->connected());
  EXPECT_EQ(r.FindSession("n0", s2, 3000).status().code(), StatusCode::kNotFound);
}

TEST(NodeRegistryTest, ADrainingNodeStaysDrainingAcrossSessions) {
  NodeRegistry r;
  NodeRecord down, draining;
  down.labels = Labels("d");
  down.state = proto::NODE_DOWN;
  draining.labels = Labels("r");
  draining.state = proto::NODE_DRAINING;
  r.Restore({down, draining}, {{"d", "K"}}, 500);
  EXPECT_EQ(r.size(), 2u);
  EXPECT_FALSE(r.Find("d")->connected()) << "restored nodes wait for their agents";
  EXPECT_EQ(r.Find("d")->last_hb_ms, 500);
  EXPECT_EQ(r.BoundKey("d"), "K");
  EXPECT_EQ(r.Connect(Labels("d"), KeyRole::kAgent, 600, nullptr).rec.state, proto::NODE_UP);
  EXPECT_EQ(r.Connect(Labels("r"), KeyRole::kAgent, 600, nullptr).rec.state, proto::NODE_DRAINING);
}

TEST(NodeRegistryTest, ActionsGoToTheParkedPollOrTheNextHeartbeat) {
  NodeRegistry r;
  auto& n = r.Connect(Labels("n0"), KeyRole::kAgent, 0, nullptr);
  r.Enqueue("n0", StopOf("a"));
  r.Enqueue("nobody", StopOf("x"));  // dropped
  auto q = r.TakeQueue(n);
  ASSERT_EQ(q.size(), 1u);
  EXPECT_EQ(q[0].stop().job_id(), "a");
  EXPECT_TRUE(r.TakeQueue(n).empty());

  PollLog p;
  r.Park(n, p.Reply(), 100);
  EXPECT_TRUE(p.answers.empty()) << "nothing queued: parked";
  r.Enqueue("n0", StopOf("b"));
  ASSERT_EQ(p.answers.size(), 1u);
  EXPECT_EQ(p.actions(0), 1u);
  EXPECT_TRUE(n.queue.empty());

  r.Enqueue("n0", StopOf("c"));
  PollLog p2;
  r.Park(n, p2.Reply(), 100);
  ASSERT_EQ(p2.answers.size(), 1u) << "queued actions answer a new poll at once";
  EXPECT_EQ(p2.actions(0), 1u);
}

TEST(NodeRegistryTest, EveryPollIsAnsweredExactlyOnce) {
  PollLog replaced, expired, reconnected, lost, at_exit;
  {
    NodeRegistry r;
    auto& n = r.Connect(Labels("n0"), KeyRole::kAgent, 0, nullptr);
    r.Park(n, replaced.Reply(), 100);
    r.Park(n, expired.Reply(), 100);
    EXPECT_EQ(replaced.answers.size(), 1u) << "a newer poll replaces an older one";
    r.ExpirePolls(99);
    EXPECT_TRUE(expired.answers.empty());
    r.ExpirePolls(100);
    EXPECT_EQ(expired.answers.size(), 1u);
    r.ExpirePolls(200);
    EXPECT_EQ(expired.answers.size(), 1u);

    r.Park(n, reconnected.Reply(), 1000);
    r.Enqueue("n0", StopOf("old"));  // answered at once
    EXPECT_EQ(reconnected.answers.size(), 1u);
    PollLog before;
    r.Park(n, before.Reply(), 1000);
    n.queue.push_back(StopOf("stale"));
    auto& again = r.Connect(Labels("n0"), KeyRole::kAgent, 10, nullptr);
    ASSERT_EQ(before.answers.size(), 1u);
    EXPECT_EQ(before.actions(0), 0u) << "a new session drops the old one's poll";
    EXPECT_TRUE(again.queue.empty()) << "and its queue";

    r.Park(again, lost.Reply(), 1000);
    again.queue.push_back(StopOf("x"));
    r.Disconnect(again);
    ASSERT_EQ(lost.answers.size(), 1u);
    EXPECT_EQ(lost.actions(0), 0u);
    EXPECT_TRUE(again.queue.empty());

    auto& last = r.Connect(Labels("n0"), KeyRole::kAgent, 20, nullptr);
    r.Park(last, at_exit.Reply(), 1000);
    EXPECT_TRUE(at_exit.answers.empty());
  }
  EXPECT_EQ(at_exit.answers.size(), 1u) << "answered when the registry goes";
  for (PollLog* p : {&replaced, &expired, &reconnected, &lost, &at_exit}) {
    EXPECT_EQ(p->answers.size(), 1u);
  }
}

TEST(NodeRegistryTest, ARemovedNodeIsGoneItsPollAnsweredAndItsKeyStillBound) {
  PollLog poll;
  NodeRegistry r;
  r.Bind("n0", "KEY");
  auto& n = r.Connect(Labels("n0"), KeyRole::kAgent, 0, nullptr);
  r.Park(n, poll.Reply(), 1000);
  r.Remove("n0");
  EXPECT_EQ(r.Find("n0"), nullptr);
  EXPECT_EQ(r.size(), 0u);
  ASSERT_EQ(poll.answers.size(), 1u);
  EXPECT_EQ(poll.actions(0), 0u);
  EXPECT_EQ(r.BoundKey("n0"), std::optional<std::string>("KEY"));
  r.Remove("n0");  // unknown: nothing
}

}  // namespace
}  // namespace muster::coordinator
