// The Gloo backend: CPU collectives over Gloo's TCP transport, its pairs connected through one
// RendezvousStore::AllGather (MeshContext below). Every Gloo exception is caught here.

#include "collectives/backends.h"

#ifdef MUSTER_HAVE_GLOO

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/context.h>
#include <gloo/math.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>

#include <cstring>
#include <vector>

#include "collectives/queued_communicator.h"
#include "collectives/reduce.h"
#include "common/logging.h"

namespace muster::collectives::internal {
namespace {

// A gloo::Context whose pairs are connected through one RendezvousStore::AllGather.
//
// Rank i's pair with rank j connects to the address that j's pair with i listens on, so each
// rank needs one address from every other. Gloo's own rendezvous::Context::connectFullMesh has
// every rank store its N-1 pair addresses (136 bytes each) under one key and read every other
// rank's key with one Get each: N requests per rank, and N^3 x 136 bytes through the store.
// Here each rank sends one entry through one AllGather, compact where the addresses allow:
// Gloo's tcp pairs share one IP address and differ in their port (one listening socket per
// pair, Debian's Gloo) or in a sequence number handed out in creation order (one listening
// socket per device, newer Gloo), so the entry is the shared address, the first sequence
// number and its step, and one 2-byte port per peer; any other layout sends every pair's
// whole address.
class MeshContext final : public gloo::Context {
 public:
  MeshContext(int rank, int size) : gloo::Context(rank, size) {}

  // Throws what Gloo throws; returns the store's error.
  Status ConnectFullMesh(RendezvousStore& store, const std::string& name,
                         std::shared_ptr<gloo::transport::Device> device,
                         std::chrono::milliseconds timeout) {
    auto transport = device->createContext(rank, size);
    transport->setTimeout(timeout);
    std::vector<gloo::transport::tcp::Address> mine(size);
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      const auto* a = dynamic_cast<const gloo::transport::tcp::Address*>(
          &transport->createPair(peer)->address());
      if (a == nullptr) return InternalError("gloo: a tcp pair without a tcp address");
      mine[peer] = *a;
    }
    std::string entry = size > 1 ? CompactEntry(mine) : "";
    if (entry.empty()) {
      Append(entry, kPerPair);
      for (int peer = 0; peer < size; ++peer) {
        std::vector<char> bytes = peer == rank ? std::vector<char>{} : mine[peer].bytes();
        Append(entry, static_cast<uint32_t>(bytes.size()));
        entry.append(bytes.begin(), bytes.end());
      }
    }
    log::Get("coll.gloo")->debug("rank {}: address entry of {} bytes", rank, entry.size());
    MUSTER_ASSIGN_OR_RETURN(auto all, store.AllGather(name, rank, size, entry, timeout));
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      MUSTER_ASSIGN_OR_RETURN(std::vector<char> addr, AddressFor(all[peer], peer));
      transport->getPair(peer)->connect(addr);
    }
    device_ = std::move(device);
    transportContext_ = std::move(transport);
    return Status::Ok();
  }

 private:
  static constexpr uint32_t kCompact = 1, kPerPair = 2;

  template <typename T>
  static void Append(std::string& out, const T& v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  template <typename T>
  static bool Read(const std::string& in, size_t& at, T& v) {
    if (in.size() - at < sizeof(v)) return false;
    std::memcpy(&v, in.data() + at, sizeof(v));
    at += sizeof(v);
    return true;
  }

  // Copies the IPv4 or IPv6 address `in` to `out` with port 0 and every other byte zeroed
  // (getsockname leaves the tail of a sockaddr_storage undefined) and returns its port in
  // network order; false for another family.
  static bool Normalize(const sockaddr_storage& in, sockaddr_storage& out, uint16_t& port) {
    std::memset(&out, 0, sizeof(out));
    if (in.ss_family == AF_INET) {
      const auto& i = reinterpret_cast<const sockaddr_in&>(in);
      auto& o = reinterpret_cast<sockaddr_in&>(out);
      o.sin_family = AF_INET;
      o.sin_addr = i.sin_addr;
      port = i.sin_port;
      return true;
    }
    if (in.ss_family == AF_INET6) {
      const auto& i = reinterpret_cast<const sockaddr_in6&>(in);
      auto& o = reinterpret_cast<sockaddr_in6&>(out);
      o.sin6_family = AF_INET6;
      o.sin6_addr = i.sin6_addr;
      o.sin6_flowinfo = i.sin6_flowinfo;
      o.sin6_scope_id = i.sin6_scope_id;
      port = i.sin6_port;
      return true;
    }
    return false;
  }

  static void SetPort(sockaddr_storage& ss, uint16_t port) {
    if (ss.ss_family == AF_INET) reinterpret_cast<sockaddr_in&>(ss).sin_port = port;
    if (ss.ss_family == AF_INET6) reinterpret_cast<sockaddr_in6&>(ss).sin6_port = port;
  }

  // The index of `peer`'s pair among this rank's pairs (created in rank order, skipping self).
  static int64_t PairIndex(int self, int peer) { return peer < self ? peer : peer - 1; }

  // [kCompact][address with port 0][first seq][seq step][port per rank], or "" when the pairs'
  // addresses differ in more than the port, or their sequence numbers are not first + step x
  // index with a step of 0 or 1.
  std::string CompactEntry(const std::vector<gloo::transport::tcp::Address>& mine) const {
    int first = rank == 0 ? 1 : 0;
    int second = first + 1 == rank ? first + 2 : first + 1;
    sockaddr_storage shared;
    uint16_t unused;
    if (!Normalize(mine[first].getSockaddr(), shared, unused)) return "";
    int64_t seq0 = mine[first].getSeq();
    int64_t step = second < size ? mine[second].getSeq() - seq0 : 0;
    if (step != 0 && step != 1) return "";
    std::vector<uint16_t> ports(size, 0);
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      sockaddr_storage ss;
      if (!Normalize(mine[peer].getSockaddr(), ss, ports[peer])) return "";
      if (std::memcmp(&ss, &shared, sizeof(ss)) != 0) return "";
      if (mine[peer].getSeq() != seq0 + step * PairIndex(rank, peer)) return "";
    }
    std::string entry;
    Append(entry, kCompact);
    Append(entry, shared);
    Append(entry, seq0);
    Append(entry, step);
    entry.append(reinterpret_cast<const char*>(ports.data()), ports.size() * sizeof(uint16_t));
    return entry;
  }

  // The address `peer` made for its pair with this rank, from `peer`'s entry.
  StatusOr<std::vector<char>> AddressFor(const std::string& entry, int peer) const {
    auto bad = [&] {
      return DataLossError("gloo rendezvous: rank " + std::to_string(peer) +
                           "'s address entry is malformed (" + std::to_string(entry.size()) +
                           " bytes)");
    };
    size_t at = 0;
    uint32_t format = 0;
    if (!Read(entry, at, format)) return bad();
    if (format == kCompact) {
      sockaddr_storage ss;
      int64_t seq0 = 0, step = 0;
      if (!Read(entry, at, ss) || !Read(entry, at, seq0) || !Read(entry, at, step) ||
          entry.size() - at != static_cast<size_t>(size) * sizeof(uint16_t)) {
        return bad();
      }
      if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) return bad();
      uint16_t port;
      std::memcpy(&port, entry.data() + at + rank * sizeof(uint16_t), sizeof(port));
      SetPort(ss, port);
      return gloo::transport::tcp::Address(ss, seq0 + step * PairIndex(peer, rank)).bytes();
    }
    if (format != kPerPair) return bad();
    for (int r = 0; r < size; ++r) {
      uint32_t len = 0;
      if (!Read(entry, at, len) || entry.size() - at < len) return bad();
      if (r == rank) return std::vector<char>(entry.data() + at, entry.data() + at + len);
      at += len;
    }
    return bad();
  }
};

// Gloo writes to its sockets with writev, which raises SIGPIPE in the writing thread when the
// peer has died: that would kill the rank instead of failing its collective (and the rank's
// exit code would be 141, not kPeerFailureExitCode). The threads that write to Gloo's sockets
// (Gloo's device loop, the communicator's worker, and the caller while it connects) are started
// or run inside this guard, with SIGPIPE blocked; new threads inherit the mask, so the writes
// fail with EPIPE and the process's own SIGPIPE disposition stays the program's.
class BlockSigpipe {
 public:
  BlockSigpipe() {
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &old_);
  }
  ~BlockSigpipe() {
    if (sigismember(&old_, SIGPIPE)) return;
    // Discard a SIGPIPE raised in this thread while connecting, before unblocking it.
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    timespec zero{0, 0};
    while (sigtimedwait(&pipe, nullptr, &zero) == SIGPIPE) {
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

 private:
  sigset_t old_;
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

  std::unique_ptr<Work> AllReduce(void* data, size_t count, DType type, ReduceOp op) override {
    if (Status s = CheckReducible("allreduce", type); !s.ok()) return FinishedWork(s);
    return Enqueue([=, this] { return DoAllReduce(data, count, type, op); });
  }

  std::unique_ptr<Work> Broadcast(void* data, size_t count, DType type, int root) override {
    return Enqueue([=, this]() -> Status {
      if (root < 0 || root >= config_.size) {
        return InvalidArgumentError("broadcast root " + std::to_string(root) + " out of range");
      }
      if (config_.size == 1 || count == 0) return Status::Ok();
      return Guard("broadcast", [&] {
        gloo::BroadcastOptions o(context_);
        o.setOutput(static_cast<char*>(data), count * DTypeSize(type));
        o.setRoot(root);
        o.setTag(NextTag());
        o.setTimeout(config_.timeout);
        gloo::broadcast(o);
      });
    });
  }

  std::unique_ptr<Work> AllGather(const void* send, void* recv, size_t count, DType type) override {
    return Enqueue([=, this]() -> Status {
      size_t bytes = count * DTypeSize(type);
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

  std::unique_ptr<Work> ReduceScatter(const void* send, void* recv, size_t count, DType type,
                                      ReduceOp op) override {
    if (Status s = CheckReducible("reduce_scatter", type); !s.ok()) return FinishedWork(s);
    // Gloo's new-style API has no reduce_scatter: allreduce a copy and keep this rank's block.
    return Enqueue([=, this]() -> Status {
      size_t block = count * DTypeSize(type);
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

 protected:
  // A waiting caller that runs a collective itself writes to Gloo's sockets: with SIGPIPE
  // blocked, as the worker (see BlockSigpipe).
  Status RunOnCaller(const std::function<Status()>& fn) override {
    BlockSigpipe sigpipe_blocked;
    return fn();
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

  Status DoAllReduce(void* data, size_t count, DType type, ReduceOp op) {
    if (count == 0) return Status::Ok();
    if (config_.size > 1) {
      MUSTER_RETURN_IF_ERROR(Guard("allreduce", [&] {
        switch (type) {
          case DType::kF32:
            return RunAllReduce<float>(data, count, Native<float>(op));
          case DType::kF64:
            return RunAllReduce<double>(data, count, Native<double>(op));
          case DType::kI32:
            return RunAllReduce<int32_t>(data, count, Native<int32_t>(op));
          case DType::kI64:
            return RunAllReduce<int64_t>(data, count, Native<int64_t>(op));
          case DType::kU8:
            return RunAllReduce<uint8_t>(data, count, Native<uint8_t>(op));
          case DType::kI8:
            return RunAllReduce<int8_t>(data, count, Native<int8_t>(op));
          case DType::kF16:
          case DType::kBF16:
            return RunAllReduce<uint16_t>(
                data, count, [type, op](void* c, const void* a, const void* b, size_t n) {
                  ReduceInto(type, op, c, a, b, n);
                });
          case DType::kBool:  // refused by CheckReducible before it was queued
            break;
        }
        MUSTER_CHECK(false) << "allreduce of " << DTypeName(type);
      }));
    }
    if (op == ReduceOp::kAvg) DivideBy(type, data, count, config_.size);
    return Status::Ok();
  }

  CommConfig config_;
  std::shared_ptr<gloo::Context> context_;
  uint32_t next_tag_ = 1;  // by the collective running (one at a time)
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> NewGlooCommunicator(std::shared_ptr<RendezvousStore> store,
                                                            CommConfig config) {
  BlockSigpipe sigpipe_blocked;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = config.host;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<MeshContext>(config.rank, config.size);
    context->setTimeout(config.timeout);
    Status st = context->ConnectFullMesh(*store, "coll/" + config.name + "/gloo/mesh", device,
                                         config.timeout);
    if (!st.ok()) {
      return Status(st.code(), "gloo rendezvous of rank " + std::to_string(config.rank) + " of " +
                                   std::to_string(config.size) + ": " + st.message());
    }
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
StatusOr<std::unique_ptr<Communicator>> NewGlooCommunicator(std::shared_ptr<RendezvousStore>,
                                                            CommConfig) {
  return FailedPreconditionError(
      "the Gloo backend was not built: install libgloo-dev and reconfigure (MUSTER_HAVE_GLOO)");
}
}  // namespace muster::collectives::internal

#endif
