// The Gloo backend: CPU collectives over Gloo's TCP transport, rendezvousing through a
// gloo::rendezvous::Store adapter over muster's Store. Every Gloo exception is caught here.

#include "collectives/backends.h"

#ifdef MUSTER_HAVE_GLOO

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <cstring>
#include <vector>

#include "collectives/queued_communicator.h"
#include "collectives/reduce.h"
#include "common/logging.h"

namespace muster::collectives::internal {
namespace {

// Gloo's store interface reports failure by exception; this adapter turns our Status into
// gloo::IoException, which connectFullMesh lets through to NewGlooCommunicator.
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(std::shared_ptr<collectives::Store> store, std::string prefix,
                   std::chrono::milliseconds timeout)
      : store_(std::move(store)), prefix_(std::move(prefix)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Check(store_->Set(prefix_ + key, std::string(data.begin(), data.end())));
  }
  std::vector<char> get(const std::string& key) override {
    auto v = store_->Get(prefix_ + key, timeout_);
    Check(v.status());
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    std::vector<std::string> full;
    for (const auto& k : keys) full.push_back(prefix_ + k);
    Check(store_->Wait(full, std::min(timeout, timeout_)));
  }

 private:
  static void Check(const Status& s) {
    if (!s.ok()) throw gloo::IoException("rendezvous: " + s.ToString());
  }
  std::shared_ptr<collectives::Store> store_;
  std::string prefix_;
  std::chrono::milliseconds timeout_;
};

Status FromGloo(const char* what, const std::exception& e, std::chrono::milliseconds timeout) {
  std::string msg = std::string("gloo ") + what + ": " + e.what();
  if (msg.find("imed out") != std::string::npos) {
    return DeadlineExceededError(msg + " (no progress within " + std::to_string(timeout.count()) +
                                 " ms: a peer died or stalled)");
  }
  return AbortedError(msg + " (a peer failed)");
}

class GlooCommunicator final : public QueuedCommunicator {
 public:
  GlooCommunicator(CommConfig config, std::shared_ptr<gloo::Context> context)
      : config_(std::move(config)), context_(std::move(context)) {
    StartWorker();
  }
  ~GlooCommunicator() override { StopWorker(); }

  Backend backend() const override { return Backend::kGloo; }
  int rank() const override { return config_.rank; }
  int size() const override { return config_.size; }

  std::unique_ptr<Work> AllReduce(void* data, size_t count, DataType type, ReduceOp op) override {
    return Enqueue([=, this] { return DoAllReduce(data, count, type, op); });
  }

  std::unique_ptr<Work> Broadcast(void* data, size_t count, DataType type, int root) override {
    return Enqueue([=, this]() -> Status {
      if (root < 0 || root >= config_.size) {
        return InvalidArgumentError("broadcast root " + std::to_string(root) + " out of range");
      }
      if (config_.size == 1 || count == 0) return Status::Ok();
      return Guard("broadcast", [&] {
        gloo::BroadcastOptions o(context_);
        o.setOutput(static_cast<char*>(data), count * DataTypeSize(type));
        o.setRoot(root);
        o.setTag(NextTag());
        o.setTimeout(config_.timeout);
        gloo::broadcast(o);
      });
    });
  }

  std::unique_ptr<Work> AllGather(const void* send, void* recv, size_t count,
                                  DataType type) override {
    return Enqueue([=, this]() -> Status {
      size_t bytes = count * DataTypeSize(type);
      if (config_.size == 1 || count == 0) {
        if (bytes) std::memmove(recv, send, bytes);
        return Status::Ok();
      }
      return Guard("allgather", [&] {
        gloo::AllgatherOptions o(context_);
        o.setInput(const_cast<char*>(static_cast<const char*>(send)), bytes);
        o.setOutput(static_cast<char*>(recv), bytes * config_.size);
        o.setTag(NextTag());
        o.setTimeout(config_.timeout);
        gloo::allgather(o);
      });
    });
  }

  std::unique_ptr<Work> ReduceScatter(const void* send, void* recv, size_t count, DataType type,
                                      ReduceOp op) override {
    // Gloo's new-style API has no reduce_scatter: allreduce a copy and keep this rank's block.
    return Enqueue([=, this]() -> Status {
      size_t block = count * DataTypeSize(type);
      std::vector<char> tmp(static_cast<const char*>(send),
                            static_cast<const char*>(send) + block * config_.size);
      MUSTER_RETURN_IF_ERROR(DoAllReduce(tmp.data(), count * config_.size, type, op));
      if (block) std::memcpy(recv, tmp.data() + block * config_.rank, block);
      return Status::Ok();
    });
  }

  std::unique_ptr<Work> Barrier() override {
    return Enqueue([this]() -> Status {
      if (config_.size == 1) return Status::Ok();
      return Guard("barrier", [&] {
        gloo::BarrierOptions o(context_);
        o.setTag(NextTag());
        o.setTimeout(config_.timeout);
        gloo::barrier(o);
      });
    });
  }

 private:
  uint32_t NextTag() { return next_tag_++; }

  template <typename F>
  Status Guard(const char* what, F fn) {
    try {
      fn();
      return Status::Ok();
    } catch (const std::exception& e) {
      Status s = FromGloo(what, e, config_.timeout);
      log::Get("coll.gloo")->error("rank {}: {}", config_.rank, s.ToString());
      return s;
    }
  }

  template <typename T>
  void RunAllReduce(void* data, size_t count, gloo::AllreduceOptions::Func fn) {
    gloo::AllreduceOptions o(context_);
    o.setOutput(static_cast<T*>(data), count);
    o.setReduceFunction(std::move(fn));
    o.setTag(NextTag());
    o.setTimeout(config_.timeout);
    gloo::allreduce(o);
  }

  // Gloo's own kernels for the types it has; ours (through float for f16/bf16) otherwise.
  template <typename T>
  static gloo::AllreduceOptions::Func Native(ReduceOp op) {
    using F = void (*)(void*, const void*, const void*, size_t);
    F f = op == ReduceOp::kMin   ? F(&gloo::min<T>)
          : op == ReduceOp::kMax ? F(&gloo::max<T>)
                                 : F(&gloo::sum<T>);
    return f;
  }

  Status DoAllReduce(void* data, size_t count, DataType type, ReduceOp op) {
    if (count == 0) return Status::Ok();
    if (config_.size > 1) {
      MUSTER_RETURN_IF_ERROR(Guard("allreduce", [&] {
        switch (type) {
          case DataType::kF32:
            return RunAllReduce<float>(data, count, Native<float>(op));
          case DataType::kF64:
            return RunAllReduce<double>(data, count, Native<double>(op));
          case DataType::kI32:
            return RunAllReduce<int32_t>(data, count, Native<int32_t>(op));
          case DataType::kI64:
            return RunAllReduce<int64_t>(data, count, Native<int64_t>(op));
          case DataType::kF16:
          case DataType::kBF16:
            return RunAllReduce<uint16_t>(
                data, count, [type, op](void* c, const void* a, const void* b, size_t n) {
                  ReduceInto(type, op, c, a, b, n);
                });
        }
      }));
    }
    if (op == ReduceOp::kAvg) DivideBy(type, data, count, config_.size);
    return Status::Ok();
  }

  CommConfig config_;
  std::shared_ptr<gloo::Context> context_;
  uint32_t next_tag_ = 1;  // worker thread only
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> NewGlooCommunicator(std::shared_ptr<Store> store,
                                                            CommConfig config) {
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = config.host;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(config.rank, config.size);
    context->setTimeout(config.timeout);
    GlooStoreAdapter adapter(store, "coll/" + config.name + "/gloo/", config.timeout);
    context->connectFullMesh(adapter, device);
    log::Get("coll.gloo")
        ->info("rank {}/{} connected ({} on {})", config.rank, config.size, device->str(),
               config.host);
    return std::unique_ptr<Communicator>(new GlooCommunicator(std::move(config), context));
  } catch (const std::exception& e) {
    std::string msg = std::string("gloo rendezvous of rank ") + std::to_string(config.rank) +
                      " of " + std::to_string(config.size) + ": " + e.what();
    if (msg.find("DeadlineExceeded") != std::string::npos ||
        msg.find("imed out") != std::string::npos) {
      return DeadlineExceededError(msg);
    }
    return UnavailableError(msg);
  }
}

}  // namespace muster::collectives::internal

#else  // !MUSTER_HAVE_GLOO

namespace muster::collectives::internal {
StatusOr<std::unique_ptr<Communicator>> NewGlooCommunicator(std::shared_ptr<Store>, CommConfig) {
  return FailedPreconditionError(
      "the Gloo backend was not built: install libgloo-dev and reconfigure (MUSTER_HAVE_GLOO)");
}
}  // namespace muster::collectives::internal

#endif
