// ProviderManager's state across a restart (provider_manager.h, "State across restarts"): saved
// by one manager, restored by a fresh one over fake providers, time passed in.

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "coordinator/providers/provider_manager.h"

namespace muster::coordinator::providers {
namespace {

using namespace std::chrono_literals;

const TimePoint kT0 = TimePoint(std::chrono::seconds(1'800'000'000));

// Records what it is asked; its tries never fail by themselves.
class FakeProvider : public Provider {
 public:
  explicit FakeProvider(ProviderConfig c) : config_(std::move(c)) {}
  const ProviderConfig& config() const override { return config_; }
  Status Request(const NodeGroupRequest& r) override {
    requests.push_back(r);
    persisted_when_asked.push_back(persisted ? *persisted : "");
    return Status::Ok();
  }
  void Cancel(uint64_t id) override { cancelled.push_back(id); }
  void Release(const std::string& node) override { released.push_back(node); }
  std::vector<RequestFailure> Poll() override { return {}; }
  // Adopts what `held` lists (as a previous process's ledger would) where `keep` says so.
  std::set<uint64_t> Adopt(ProviderLedger* ledger, const KeepFn& keep) override {
    for (const auto& [id, nodes] : held) {
      if (keep(id, nodes)) adopted.insert(id);
    }
    return adopted;
  }
  std::map<uint64_t, std::vector<std::string>> held;
  std::set<uint64_t> adopted;
  std::vector<NodeGroupRequest> requests;
  std::vector<uint64_t> cancelled;
  std::vector<std::string> released;
  const std::string* persisted = nullptr;         // the test's last persisted state
  std::vector<std::string> persisted_when_asked;  // its value at each Request

 private:
  ProviderConfig config_;
};

ProvidersConfig Config() {
  ProviderConfig p;
  p.name = "aws";
  p.kind = "local";
  p.max_nodes = 8;
  p.max_pending_requests = 1;
  p.idle_timeout = 30s;
  p.request_timeout = 60s;
  p.max_tries = 2;
  p.retry_backoff = 2s;
  p.retry_backoff_max = 600s;
  p.node.slots = 2;
  ProvidersConfig c;
  c.providers.push_back(p);
  return c;
}

// A manager over one fake provider; `fake` is set to it.
std::unique_ptr<ProviderManager> Manager(FakeProvider** fake) {
  auto p = std::make_unique<FakeProvider>(Config().providers[0]);
  *fake = p.get();
  std::map<std::string, std::unique_ptr<Provider>> m;
  m["aws"] = std::move(p);
  return std::make_unique<ProviderManager>(Config(), std::move(m));
}

JobRequest Job(const std::string& id, int nodes) {
  JobRequest j;
  j.id = id;
  j.nodes = nodes;
  j.ranks_per_node = 1;
  j.seq = 1;
  return j;
}

NodeView Node(const std::string& name, const std::string& job = "") {
  NodeView v;
  v.spec.name = name;
  v.spec.provider = "aws";
  v.spec.slots = 2;
  v.job = job;
  return v;
}

std::string Kinds(const ProviderManager::Output& out) {
  std::string s;
  for (const auto& e : out.events) s += e.kind + ": " + e.message + "\n";
  return s;
}

// A try in flight when the coordinator died counts as failed: retried after the backoff with
// the tries made before, under new names; given up after max_tries, and still given up after
// another restart.
TEST(ProviderStateTest, ATryInFlightCountsAsFailedAndTheTriesCarryOver) {
  FakeProvider* a = nullptr;
  auto before = Manager(&a);
  auto out = before->Tick({Job("j", 2)}, {}, kT0);
  ASSERT_EQ(a->requests.size(), 1u) << Kinds(out);
  EXPECT_EQ(a->requests[0].names, (std::vector<std::string>{"aws-1", "aws-2"}));
  auto saved = before->StateToSave();
  ASSERT_TRUE(saved.has_value());
  before->StateSaved(*saved);
  EXPECT_FALSE(before->StateToSave().has_value()) << "unchanged: nothing to save";

  FakeProvider* b = nullptr;
  auto after = Manager(&b);
  auto restored = after->RestoreState(*saved);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_TRUE(after->StateToSave().has_value()) << "the try now counted as failed is saved";
  out = after->Tick({Job("j", 2)}, {}, kT0 + 1s);
  EXPECT_TRUE(b->requests.empty()) << "no new request before the backoff: " << Kinds(out);
  EXPECT_NE(Kinds(out).find("provider_retry: request 1 to provider aws failed (try 1 of 2): the "
                            "coordinator restarted while the request was in flight"),
            std::string::npos)
      << Kinds(out);
  out = after->Tick({Job("j", 2)}, {}, kT0 + 4s);
  ASSERT_EQ(b->requests.size(), 1u) << Kinds(out);
  EXPECT_EQ(b->requests[0].names, (std::vector<std::string>{"aws-3", "aws-4"}))
      << "names are never handed out twice";
  EXPECT_GT(b->requests[0].id, 1u) << "request ids are not reused";
  EXPECT_NE(Kinds(out).find("(try 2)"), std::string::npos) << Kinds(out);

  // The second try dies with a second restart: that was the last try, the provider is given up.
  FakeProvider* c = nullptr;
  auto third = Manager(&c);
  ASSERT_TRUE(third->RestoreState(after->SaveState()).ok());
  out = third->Tick({Job("j", 2)}, {}, kT0 + 5s);
  EXPECT_NE(Kinds(out).find("provider_failed"), std::string::npos) << Kinds(out);
  EXPECT_NE(third->PendingReason("j").find("could not supply 2 nodes after 2 tries"),
            std::string::npos)
      << third->PendingReason("j");
  FakeProvider* d = nullptr;
  auto fourth = Manager(&d);
  ASSERT_TRUE(fourth->RestoreState(third->SaveState()).ok());
  out = fourth->Tick({Job("j", 2)}, {}, kT0 + 10s);
  EXPECT_TRUE(d->requests.empty()) << Kinds(out);
  EXPECT_NE(fourth->PendingReason("j").find("could not supply 2 nodes after 2 tries"),
            std::string::npos)
      << fourth->PendingReason("j");
}

// After a restart, a request whose try was in flight and that its provider still holds is
// adopted: not a failed try, and the nodes that register for it complete it (no second try, no
// cancel). An allocation holding a node the coordinator knows is adopted too; one nobody wants
// is not.
TEST(ProviderStateTest, AnAdoptedRequestIsCompletedByItsNodesWithoutANewTry) {
  FakeProvider* a = nullptr;
  auto before = Manager(&a);
  before->Tick({Job("j", 2)}, {}, kT0);
  ASSERT_EQ(a->requests.size(), 1u);
  const uint64_t id = a->requests[0].id;

  FakeProvider* b = nullptr;
  auto after = Manager(&b);
  ASSERT_TRUE(after->RestoreState(before->SaveState()).ok());
  b->held = {{id, {"aws-1", "aws-2"}}, {77, {"aws-9"}}, {78, {"aws-5"}}};
  auto events = after->Adopt(std::make_unique<MemoryProviderLedger>(), {"aws-5"});
  EXPECT_EQ(b->adopted, (std::set<uint64_t>{id, 78}));
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, "provider_adopted");
  EXPECT_NE(events[0].message.find("aws-1,aws-2"), std::string::npos) << events[0].message;
  // Its nodes register after the restart: theirs is the adopted request.
  auto out = after->Tick({Job("j", 2)}, {Node("aws-1"), Node("aws-2")}, kT0 + 1s);
  EXPECT_EQ(Kinds(out).find("provider_retry"), std::string::npos) << Kinds(out);
  EXPECT_NE(Kinds(out).find("node aws-1 up (provider aws, request " + std::to_string(id)),
            std::string::npos)
      << Kinds(out);
  EXPECT_TRUE(b->requests.empty()) << Kinds(out);
  EXPECT_TRUE(b->cancelled.empty());
  // Request ids never collide with an adopted allocation's.
  after->Tick({Job("k", 1)}, {Node("aws-1", "j"), Node("aws-2", "j")}, kT0 + 2s);
  ASSERT_EQ(b->requests.size(), 1u);
  EXPECT_GT(b->requests[0].id, 78u);
}

// An adopted request whose nodes never register is cancelled at its deadline (request_timeout
// from its try's start, before the restart) and retried, as any try.
TEST(ProviderStateTest, AnAdoptedRequestWhoseNodesNeverComeIsCancelledAtItsDeadline) {
  FakeProvider* a = nullptr;
  auto before = Manager(&a);
  before->Tick({Job("j", 2)}, {}, kT0);
  ASSERT_EQ(a->requests.size(), 1u);
  const uint64_t id = a->requests[0].id;
  FakeProvider* b = nullptr;
  auto after = Manager(&b);
  ASSERT_TRUE(after->RestoreState(before->SaveState()).ok());
  b->held = {{id, {"aws-1", "aws-2"}}};
  after->Adopt(std::make_unique<MemoryProviderLedger>(), {});
  auto out = after->Tick({Job("j", 2)}, {}, kT0 + 59s);
  EXPECT_TRUE(b->cancelled.empty()) << Kinds(out);
  out = after->Tick({Job("j", 2)}, {}, kT0 + 61s);
  EXPECT_EQ(b->cancelled, (std::vector<uint64_t>{id})) << Kinds(out);
  EXPECT_NE(Kinds(out).find("provider_retry"), std::string::npos) << Kinds(out);
}

// A request is in the persisted state before its provider is asked; a persist that fails
// (the coordinator's store) means no request is made.
TEST(ProviderStateTest, ARequestIsPersistedBeforeTheProviderIsAsked) {
  FakeProvider* a = nullptr;
  auto m = Manager(&a);
  std::string persisted;
  bool store_ok = false;
  a->persisted = &persisted;
  m->SetPersist([&](const std::string& s) {
    if (store_ok) persisted = s;
    return store_ok;
  });
  auto out = m->Tick({Job("j", 2)}, {}, kT0);
  EXPECT_TRUE(a->requests.empty()) << "not recorded, not asked: " << Kinds(out);
  EXPECT_EQ(Kinds(out).find("provider_request"), std::string::npos) << Kinds(out);
  store_ok = true;
  out = m->Tick({Job("j", 2)}, {}, kT0 + 1s);
  ASSERT_EQ(a->requests.size(), 1u) << Kinds(out);
  const std::string& then = a->persisted_when_asked[0];
  EXPECT_NE(then.find(fmt::format("\"id\":{}", a->requests[0].id)), std::string::npos) << then;
  for (const auto& name : a->requests[0].names) {
    EXPECT_NE(then.find("\"" + name + "\""), std::string::npos) << name << " in " << then;
  }
  // A fresh manager restored from what was persisted when the provider was asked knows it.
  FakeProvider* b = nullptr;
  auto after = Manager(&b);
  ASSERT_TRUE(after->RestoreState(then).ok());
  out = after->Tick({Job("j", 2)}, {}, kT0 + 2s);
  EXPECT_NE(Kinds(out).find("provider_retry"), std::string::npos) << Kinds(out);
}

// Idle clocks keep running across a restart, and a released node stays released.
TEST(ProviderStateTest, IdleClocksAndReleasedNamesSurvive) {
  FakeProvider* a = nullptr;
  auto before = Manager(&a);
  before->Tick({}, {Node("aws-1"), Node("aws-2", "busy")}, kT0);
  before->Tick({}, {Node("aws-1"), Node("aws-2", "busy"), Node("aws-3")}, kT0 + 20s);
  FakeProvider* b = nullptr;
  auto after = Manager(&b);
  ASSERT_TRUE(after->RestoreState(before->SaveState()).ok());
  auto out = after->Tick({}, {Node("aws-1"), Node("aws-2", "busy"), Node("aws-3")}, kT0 + 31s);
  EXPECT_EQ(b->released, (std::vector<std::string>{"aws-1"}))
      << "idle 31 s of 30 counted from before the restart: " << Kinds(out);
  FakeProvider* c = nullptr;
  auto third = Manager(&c);
  ASSERT_TRUE(third->RestoreState(after->SaveState()).ok());
  EXPECT_TRUE(third->Released("aws-1"));
  EXPECT_FALSE(third->Released("aws-3"));
}

// A state that does not parse is DataLoss and changes nothing; a request to a provider no
// longer configured is dropped with an event.
TEST(ProviderStateTest, BadStateIsAnErrorAndAnUnknownProvidersRequestIsDropped) {
  FakeProvider* a = nullptr;
  auto m = Manager(&a);
  for (const std::string bad : {"", "{", "[]", R"({"version": 2})", R"({"version": 1})"}) {
    auto r = m->RestoreState(bad);
    EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << bad;
  }
  m->Tick({Job("j", 1)}, {}, kT0);
  ASSERT_EQ(a->requests.size(), 1u);
  EXPECT_EQ(a->requests[0].names[0], "aws-1") << "nothing was restored from the bad states";
  std::string state = m->SaveState();
  for (size_t at; (at = state.find("\"aws\"")) != std::string::npos;)
    state.replace(at, 5, "\"gcp\"");
  FakeProvider* b = nullptr;
  auto other = Manager(&b);
  auto r = other->RestoreState(state);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 1u);
  EXPECT_NE((*r)[0].message.find("provider gcp dropped"), std::string::npos) << (*r)[0].message;
}

}  // namespace
}  // namespace muster::coordinator::providers
