#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "collectives/rendezvous_store.h"
#include "common/strings.h"

namespace muster::collectives {

namespace {

class InMemoryRendezvousStore final : public RendezvousStore {
 public:
  Status Set(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> l(mu_);
    kv_[key] = value;
    cv_.notify_all();
    return Status::Ok();
  }

  StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, timeout, [&] { return kv_.count(key) > 0; })) {
      return DeadlineExceededError("store: key '" + key + "' not set within " +
                                   std::to_string(timeout.count()) + " ms");
    }
    return kv_[key];
  }

  StatusOr<int64_t> Add(const std::string& key, int64_t delta) override {
    std::lock_guard<std::mutex> l(mu_);
    int64_t v = 0;
    if (auto it = kv_.find(key); it != kv_.end()) {
      std::optional<int64_t> held = ParseInt64(it->second);
      if (!held) return InvalidArgumentError("store: key '" + key + "' does not hold an integer");
      v = *held;
    }
    // As the rendezvous server: an add that would overflow is refused, not wrapped.
    if (__builtin_add_overflow(v, delta, &v)) {
      return InvalidArgumentError("store: key '" + key + "' holds " + kv_[key] + "; adding " +
                                  std::to_string(delta) + " overflows a 64-bit integer");
    }
    kv_[key] = std::to_string(v);
    cv_.notify_all();
    return v;
  }

  StatusOr<std::string> CompareSet(const std::string& key, const std::string& expected,
                                   const std::string& desired) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = kv_.find(key);
    std::string current = it == kv_.end() ? "" : it->second;
    if (current == expected) {
      kv_[key] = desired;
      cv_.notify_all();
      return desired;
    }
    return current;
  }

  Status Wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> l(mu_);
    bool ok = cv_.wait_for(l, timeout, [&] {
      for (const auto& k : keys)
        if (!kv_.count(k)) return false;
      return true;
    });
    if (!ok)
      return DeadlineExceededError("store: wait timed out after " +
                                   std::to_string(timeout.count()) + " ms");
    return Status::Ok();
  }

  StatusOr<std::vector<std::string>> AllGather(const std::string& name, int rank, int n,
                                               const std::string& value,
                                               std::chrono::milliseconds timeout) override {
    if (n <= 0 || n > kMaxGatherRanks) {
      return InvalidArgumentError("store gather '" + name + "': n=" + std::to_string(n) +
                                  " is not in 1.." + std::to_string(kMaxGatherRanks));
    }
    if (rank < 0 || rank >= n) {
      return InvalidArgumentError("store gather '" + name + "': rank " + std::to_string(rank) +
                                  " is not in 0.." + std::to_string(n - 1));
    }
    std::unique_lock<std::mutex> l(mu_);
    Gather& g = gathers_[name];
    if (g.n == 0) {
      g.n = n;
      g.values.resize(n);
      g.present.assign(n, false);
    }
    if (g.n != n) {
      return InvalidArgumentError("store gather '" + name + "': entered with n=" +
                                  std::to_string(n) + " but others use n=" + std::to_string(g.n));
    }
    if (g.result) {
      return InvalidArgumentError("store gather '" + name + "' already completed with " +
                                  std::to_string(g.n) + " ranks; names are single use");
    }
    if (g.present[rank]) {
      return InvalidArgumentError("store gather '" + name + "': rank " + std::to_string(rank) +
                                  " has already contributed");
    }
    g.values[rank] = value;
    g.present[rank] = true;
    if (++g.arrived == n) {
      g.result = std::make_shared<const std::vector<std::string>>(std::move(g.values));
      g.values.clear();
      cv_.notify_all();
      return *g.result;
    }
    if (timeout.count() <= 0 || !cv_.wait_for(l, timeout, [&] { return g.result != nullptr; })) {
      // This rank leaves the gather; it may call again. A gather nobody is in is forgotten.
      g.present[rank] = false;
      g.values[rank].clear();
      int others = --g.arrived;
      if (others == 0) gathers_.erase(name);
      return DeadlineExceededError(
          "store gather '" + name + "': " + std::to_string(others) + " other rank(s) of " +
          std::to_string(n) + " contributed within " + std::to_string(timeout.count()) + " ms");
    }
    return *g.result;
  }

  Status Barrier(const std::string& name, int n, std::chrono::milliseconds timeout) override {
    MUSTER_ASSIGN_OR_RETURN(int64_t arrived, Add("barrier/" + name, 1));
    if (arrived == n) MUSTER_RETURN_IF_ERROR(Set("barrier/" + name + "/done", "1"));
    Status st = Wait({"barrier/" + name + "/done"}, timeout);
    if (!st.ok()) {
      return DeadlineExceededError("store: barrier '" + name + "' timed out");
    }
    return st;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> kv_;  // GUARDED_BY(mu_)
  struct Gather {
    int n = 0;
    int arrived = 0;
    std::vector<std::string> values;  // by rank, until complete
    std::vector<bool> present;
    std::shared_ptr<const std::vector<std::string>> result;  // set when complete
  };
  std::map<std::string, Gather> gathers_;  // GUARDED_BY(mu_)
};

}  // namespace

std::unique_ptr<RendezvousStore> NewInMemoryRendezvousStore() {
  return std::make_unique<InMemoryRendezvousStore>();
}

}  // namespace muster::collectives
