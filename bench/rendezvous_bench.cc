// muster-bench rendezvous: N simulated ranks, each with its own DEALER socket (CURVE), go
// through a job's rendezvous on one RendezvousServer: connect (first request), barrier, broadcast
// of 128 bytes from rank 0, allgather of 64-byte addresses (one RendezvousStore::AllGather request
// each). The anchors, in the same run, with the same N sockets against a raw ZeroMQ ROUTER (CURVE
// too): one round trip each (the floor that connecting N sockets costs), then a reply of N x 64
// bytes to each (the floor of an allgather answered by one server: N^2 x 64 bytes leave it).
// The relayed path runs the same phases with the ranks grouped into nodes of --ranks-per-node:
// each node's ranks talk to their node's RendezvousRelay over a Unix socket (no CURVE, no
// ZeroMQ: common/local_rpc.h), and only the
// relays talk to the store, one CURVE connection each (collectives/rendezvous_relay.h). A large
// allgather result reaches a node's ranks as one sealed memory file from its relay, its
// descriptor passed with each reply (relayed), or down each rank's socket (relayed-socket).

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <spdlog/sinks/base_sink.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <thread>

#include "bench/bench.h"
#include "collectives/rendezvous_client.h"
#include "collectives/rendezvous_relay.h"
#include "collectives/rendezvous_server.h"
#include "common/local_rpc.h"
#include "common/logging.h"
#include "common/sodium_pool.h"
#include "common/wire.h"

namespace muster::bench {
namespace {

using Clock = std::chrono::steady_clock;
using collectives::RdzvCredentials;

// CPU seconds (user + system, every thread) this process has used so far.
double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// The threads of this process now (their ids).
std::set<pid_t> Threads() {
  std::set<pid_t> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    out.insert(static_cast<pid_t>(std::atoi(e.path().filename().c_str())));
  }
  return out;
}

// CPU seconds (user + system) the threads `tids` of this process have used so far.
double ThreadsCpuSeconds(const std::set<pid_t>& tids) {
  static const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  double sum = 0;
  for (pid_t t : tids) {
    FILE* f = std::fopen(("/proc/self/task/" + std::to_string(t) + "/stat").c_str(), "r");
    if (f == nullptr) continue;
    char buf[1024];
    size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    // After the command name's ")": state, then 10 fields, then utime and stime (in ticks).
    const char* p = std::strrchr(buf, ')');
    unsigned long long utime = 0, stime = 0;
    if (p != nullptr && std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                                    &utime, &stime) == 2) {
      sum += static_cast<double>(utime + stime) / tick;
    }
  }
  return sum;
}

// The threads that appear between its construction and Since(): those of what was made in
// between (the store's reactor, its ZeroMQ I/O thread and reaper).
class NewThreads {
 public:
  NewThreads() : before_(Threads()) {}
  std::set<pid_t> Since() const {
    std::set<pid_t> out;
    for (pid_t t : Threads()) {
      if (!before_.count(t)) out.insert(t);
    }
    return out;
  }

 private:
  std::set<pid_t> before_;
};

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void RaiseFdLimit() {
  rlimit r;
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

// N rank connections driven from one thread through epoll: DEALER sockets (watched by their
// ZMQ_FDs) to the store, or plain Unix sockets to a relay (a unix:// endpoint, as
// RendezvousClient talks to one: LocalRpcClient's frames).
class Ranks {
 public:
  Ranks(int n, const std::string& endpoint, const RdzvCredentials& creds, int io_threads = 1)
      : Ranks(
            n, [&](int) { return endpoint; }, creds, io_threads) {}
  // Rank i connects to endpoint_of(i); a unix:// endpoint (a relay's) with a plain socket. The
  // ZeroMQ sockets share one context with `io_threads` I/O threads.
  Ranks(int n, const std::function<std::string(int)>& endpoint_of, const RdzvCredentials& creds,
        int io_threads = 1)
      : ctx_(io_threads), epfd_(epoll_create1(EPOLL_CLOEXEC)) {
    ctx_.set(zmq::ctxopt::max_sockets, n + 64);
    socks_.reserve(n);
    try {
      Open(n, endpoint_of, creds);
    } catch (const zmq::error_t& e) {
      rlimit r{};
      getrlimit(RLIMIT_NOFILE, &r);
      status_ = UnavailableError("cannot open " + std::to_string(n) + " rank sockets (" +
                                 std::to_string(socks_.size()) + " opened): " + e.what() +
                                 "; open files are limited to " + std::to_string(r.rlim_cur));
    }
  }
  ~Ranks() {
    for (int fd : fds_) {
      if (fd >= 0) ::close(fd);
    }
    close(epfd_);
  }
  // Not OK when the sockets could not all be opened.
  const Status& status() const { return status_; }
  int size() const { return static_cast<int>(socks_.size()); }

 private:
  void Open(int n, const std::function<std::string(int)>& endpoint_of,
            const RdzvCredentials& creds) {
    for (int i = 0; i < n; ++i) {
      const std::string endpoint = endpoint_of(i);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u32 = static_cast<uint32_t>(i);
      if (IsUnixEndpoint(endpoint)) {
        socks_.emplace_back();  // none: the rank's connection is fds_[i]
        readers_.emplace_back(kDefaultMaxMessageBytes);
        received_.emplace_back();
        fds_.push_back(ConnectUnix(endpoint));
        epoll_ctl(epfd_, EPOLL_CTL_ADD, fds_.back(), &ev);
        continue;
      }
      fds_.push_back(-1);
      readers_.emplace_back(0);
      received_.emplace_back();
      socks_.emplace_back(ctx_, zmq::socket_type::dealer);
      zmq::socket_t& s = socks_.back();
      s.set(zmq::sockopt::linger, 0);
      if (!creds.insecure) {
        s.set(zmq::sockopt::curve_serverkey, creds.server_public_key);
        s.set(zmq::sockopt::curve_publickey, creds.client_key.public_key);
        s.set(zmq::sockopt::curve_secretkey, creds.client_key.secret_key);
      }
      s.connect(endpoint);
      // zmq_poll costs O(sockets) per call; with thousands of sockets the harness, not the
      // store, would dominate. Watch each socket's ZMQ_FD in one epoll set instead.
      epoll_ctl(epfd_, EPOLL_CTL_ADD, s.get(zmq::sockopt::fd), &ev);
    }
  }
  // A non-blocking connection to a relay's socket (as LocalRpcClient makes it); throws
  // zmq::error_t (as a socket would, and Open reports it) when it cannot be made within 10 s.
  static int ConnectUnix(const std::string& endpoint) {
    auto fd = ConnectUnixSocket(endpoint, Clock::now() + std::chrono::seconds(10));
    if (!fd.ok()) throw zmq::error_t();
    return fd->release();
  }

 public:
  // The next descriptor that came with rank i's replies (none: -1).
  ScopedFd TakeDescriptor(int i) {
    if (received_[i].empty()) return ScopedFd();
    ScopedFd fd = std::move(received_[i].front());
    received_[i].pop_front();
    return fd;
  }
  void Send(int i, const std::string& bytes) {
    if (fds_[i] < 0) {
      socks_[i].send(zmq::buffer(bytes), zmq::send_flags::none);
      return;
    }
    const std::string frame = LocalFrame(bytes);
    size_t sent = 0;
    while (sent < frame.size()) {
      ssize_t w = ::send(fds_[i], frame.data() + sent, frame.size() - sent, MSG_NOSIGNAL);
      if (w > 0) {
        sent += static_cast<size_t>(w);
      } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
        pollfd p{fds_[i], POLLOUT, 0};
        ::poll(&p, 1, 100);
      } else {
        return;  // the relay closed it: Collect reports the missing reply
      }
    }
  }
  void SendRequest(int i, proto::StoreRequest req) {
    req.mutable_scope()->set_job("bench");
    proto::Envelope env;
    env.set_request_id(++next_id_);
    *env.mutable_store_request() = std::move(req);
    Send(i, SerializeEnvelope(env));
  }

  // Receives `expected` replies; the first error reply or a timeout fails. `check` sees each.
  Status Collect(size_t expected, std::function<Status(int, const proto::Envelope&)> check = {}) {
    auto deadline = Clock::now() + std::chrono::seconds(60);
    size_t got = 0;
    // Every socket is drained once (a send may have left replies behind without a new fd
    // event); afterwards only those whose ZMQ_FD fired.
    std::vector<uint32_t> ready(socks_.size());
    for (size_t i = 0; i < ready.size(); ++i) ready[i] = static_cast<uint32_t>(i);
    std::vector<epoll_event> events(1024);
    while (got < expected) {
      for (uint32_t i : ready) {
        auto handle = [&](const void* data, size_t size) -> Status {
          ++got;
          if (!check) return Status::Ok();
          auto env = ParseEnvelope(data, size);
          if (!env.ok()) return env.status();
          if (env->has_error()) return ErrorToStatus(env->error());
          return check(static_cast<int>(i), *env);
        };
        if (fds_[i] >= 0) {
          LocalFrameReader& in = readers_[i];
          for (;;) {
            std::string_view frame;
            while (in.Next(&frame) == LocalFrameReader::Result::kFrame) {
              MUSTER_RETURN_IF_ERROR(handle(frame.data(), frame.size()));
            }
            const size_t want = std::max<size_t>(in.missing(), 4096);
            // As LocalRpcClient reads: the descriptors a reply brings (a sealed result file).
            std::vector<ScopedFd> fds;
            bool truncated = false;
            ssize_t r = RecvWithDescriptors(fds_[i], in.Prepare(want), want, &fds, &truncated);
            for (auto& fd : fds) received_[i].push_back(std::move(fd));
            if (truncated) {
              return DataLossError("rank " + std::to_string(i) +
                                   ": descriptors from its relay were dropped by the kernel");
            }
            if (r <= 0) {
              if (r < 0 && errno == EINTR) continue;
              if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
              return UnavailableError("rank " + std::to_string(i) +
                                      ": its relay closed the connection");
            }
            in.Commit(static_cast<size_t>(r));
          }
          continue;
        }
        zmq::message_t msg;
        while (socks_[i].recv(msg, zmq::recv_flags::dontwait)) {
          MUSTER_RETURN_IF_ERROR(handle(msg.data(), msg.size()));
        }
      }
      ready.clear();
      if (got >= expected) break;
      if (Clock::now() > deadline) {
        return DeadlineExceededError(std::to_string(got) + " of " + std::to_string(expected) +
                                     " replies");
      }
      int n = epoll_wait(epfd_, events.data(), static_cast<int>(events.size()), 100);
      for (int e = 0; e < n; ++e) ready.push_back(events[e].data.u32);
      if (n == 0) {  // belt and braces: a missed edge costs one full sweep, not a hang
        for (size_t i = 0; i < socks_.size(); ++i) ready.push_back(static_cast<uint32_t>(i));
      }
    }
    return Status::Ok();
  }

 private:
  zmq::context_t ctx_;
  std::vector<zmq::socket_t> socks_;  // rank i's DEALER socket, or none (fds_[i] >= 0)
  std::vector<int> fds_;              // rank i's Unix socket to its relay, or -1
  std::vector<LocalFrameReader> readers_;
  std::vector<std::deque<ScopedFd>> received_;  // descriptors rank i's replies brought
  int epfd_;
  Status status_;
  uint64_t next_id_ = 0;
};

struct Result {
  int ranks;
  bool curve;
  double connect_s, barrier_s, broadcast_s, allgather_s, total_s, anchor_s, anchor_allgather_s;
  int ranks_per_node = 0;           // 0: the direct path; else relayed, this many ranks per relay
  int processes = 1;                // relayed: the simulated nodes were spread over this many
  uint64_t upstream_requests = 0;   // relayed: requests the relays sent the store
  uint64_t compressed_gathers = 0;  // relayed: gather results the store sent compressed
  uint64_t shared_replies = 0;      // relayed: allgather replies handed over in a file
  bool gather_files = false;        // relayed: large gather results may go through files
  double relays_s = 0;              // relayed, one process: creating the relays (part of connect)
  // Relayed: the relays created and connected to the store (every upstream handshake done), as
  // an agent does before it spawns the ranks (part of connect, and of total); then the ranks'
  // own rendezvous: opening their sockets, connect (through the relays), barrier, broadcast and
  // allgather. total = setup + ranks. Direct: setup 0, ranks = total.
  double setup_s = 0, ranks_s = 0;
  double setup_cpu_s = -1;      // relayed: CPU seconds of the setup (every process); else -1
  double cpu_s = -1;            // CPU seconds of every phase, every thread of every process
  double store_cpu_s = 0;       // CPU seconds of the store's threads (reactor, ZeroMQ I/O)
  int io_threads = 1;           // ZeroMQ I/O threads of the relays and of the ranks
  int store_io_threads = 1;     // ZeroMQ I/O threads of the store's context
  bool zstd = false;            // relayed: the relays took gather results compressed
  bool random_entries = false;  // the allgather entries were random bytes
};

// The reactor's "closure '...' blocked the loop for N ms" warnings, rate-limited in this bench:
// its simulated relays' reactors share 2 cores with thousands of simulated ranks, and at 16384
// ranks their closures often wait 100-250 ms for a core, one warning line each, which buried
// the table. The first such warning of each phase is logged as it comes; the rest are counted
// and summed up in one line when the phase ends (Summary). Other messages pass untouched.
// Only this bench installs it (InstallSlowClosureLimiter); the reactor logs as before elsewhere.
class SlowClosureLimiter : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit SlowClosureLimiter(std::vector<spdlog::sink_ptr> next) : next_(std::move(next)) {}

  // Logs, on the bench's logger, how many warnings were held back since the last call and the
  // longest block among all of them; nothing when none were held back.
  void Summary(const std::string& phase) {
    int held = 0;
    long longest = 0;
    {
      std::lock_guard<std::mutex> l(mutex_);
      held = seen_ - 1;
      longest = longest_;
      seen_ = 0;
      longest_ = 0;
    }
    if (held <= 0) return;
    log::Get("bench")->warn(
        "{} more reactor closures blocked their loops for 100 ms or more during {} (longest {} "
        "ms; only the first was logged): the simulated relays' reactors wait for a core among "
        "the simulated ranks",
        held, phase, longest);
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::string_view text(msg.payload.data(), msg.payload.size());
    constexpr std::string_view kBlocked = "blocked the loop for ";
    if (size_t at = text.find(kBlocked); at != std::string_view::npos) {
      long ms =
          std::strtol(std::string(text.substr(at + kBlocked.size(), 12)).c_str(), nullptr, 10);
      longest_ = std::max(longest_, ms);
      if (seen_++ > 0) return;
    }
    for (auto& sink : next_) {
      if (sink->should_log(msg.level)) sink->log(msg);
    }
  }
  void flush_() override {
    for (auto& sink : next_) sink->flush();
  }

 private:
  std::vector<spdlog::sink_ptr> next_;
  int seen_ = 0;  // GUARDED_BY(mutex_): such warnings in this phase
  long longest_ = 0;
};

// Puts a SlowClosureLimiter in front of the reactor logger's sinks, once per process, before
// any reactor runs. Returns it.
SlowClosureLimiter& InstallSlowClosureLimiter() {
  static SlowClosureLimiter* limiter = [] {
    auto logger = log::Get("reactor");
    auto sink = std::make_shared<SlowClosureLimiter>(logger->sinks());
    logger->sinks() = {sink};
    return sink.get();  // kept alive by the logger, which the registry holds
  }();
  return *limiter;
}

// Where the relays' directories go (--relay-dir); empty: where an agent would put them
// (collectives::PickRelaySocketParent).
std::filesystem::path g_relay_parent;

// ZeroMQ I/O threads of the simulated agents' relays, and of the simulated ranks, in each
// process (--io-threads). On a cluster every agent and every rank is its own process with its
// own I/O thread; one I/O thread for all of them in this process would serialise every
// simulated node's socket work (the handshakes, encryption and copies) through one thread,
// which no real node shares. The default, the host's cores, lets that work use the cores the
// simulation has; 1 is the mode of the earlier runs, kept for comparison.
int g_io_threads = 1;

// ZeroMQ I/O threads of the store's context (--store-io-threads): the server side of every
// CURVE handshake and of every encrypted message runs on them. 2 is what the store gets on the
// agent's reactor (node_agent/agent.cc); the launcher's (`muster run`, one host) has 1.
int g_store_io_threads = 2;

// Whether the relays ask the store for gather results compressed (--gather-zstd;
// RendezvousRelay::Options::accept_zstd).
bool g_gather_zstd = true;
// Whether each rank's 64-byte allgather entry is pseudo-random bytes, which do not compress
// (--random-entries), instead of a text address padded with spaces, which does.
bool g_random_entries = false;

// Rank i's 64-byte allgather entry.
std::string Entry(int i) {
  if (g_random_entries) {
    std::string e(64, '\0');
    // Each entry its own eight steps of the sequence: no two entries share a word.
    uint64_t x = 0x9e3779b97f4a7c15ull * (8 * static_cast<uint64_t>(i) + 8);
    for (size_t b = 0; b < e.size(); b += 8) {  // splitmix64
      x += 0x9e3779b97f4a7c15ull;
      uint64_t z = x;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      std::memcpy(&e[b], &z, 8);
    }
    return e;
  }
  std::string addr = "tcp://198.18.0.1:" + std::to_string(20000 + i);
  addr.resize(64, ' ');
  return addr;
}

int HostCores() {
  unsigned c = std::thread::hardware_concurrency();
  return c == 0 ? 1 : static_cast<int>(c);
}

// The relays of the relayed path: one per node of `per_node` ranks. As on a cluster, where
// each node's agent runs its relay on its own reactor, the relays are spread over reactors of
// their own (kNodesPerReactor each; one reactor polling the sockets of hundreds of relays would
// cost the simulation, not the relays, O(relays) per event).
class Relays {
 public:
  static constexpr int kNodesPerReactor = 16;

  // The relays of nodes [first_node, first_node + nodes) (nodes -1: all of them) of n ranks.
  Relays(int n, int per_node, bool gather_files, int first_node = 0, int nodes = -1)
      : n_(n),
        per_node_(per_node),
        first_node_(first_node),
        nodes_(nodes >= 0 ? nodes : (n + per_node - 1) / per_node),
        gather_files_(gather_files),
        ctx_(MakeContext(nodes_)) {
    // Where an agent puts its relay's directory (a memory file system where the host has one),
    // or --relay-dir, in a directory of this run's own.
    dir_ = (g_relay_parent.empty()
                ? collectives::PickRelaySocketParent(collectives::RelaySocketParentCandidates(),
                                                     std::filesystem::temp_directory_path())
                : g_relay_parent) /
           ("muster-relay-bench-" + std::to_string(getpid()));
  }
  ~Relays() {
    for (auto& g : groups_) {
      if (g.reactor->running()) {
        g.reactor->Call("stop", [&] { g.relays.clear(); });
        g.reactor->Stop();
      }
      g.relays.clear();
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  Status Start(const std::string& store, const RdzvCredentials& creds) {
    const int nodes = first_node_ + nodes_;
    for (int first = first_node_; first < nodes; first += kNodesPerReactor) {
      groups_.push_back(
          {std::make_unique<Reactor>("rdzv-bench-relays-" + std::to_string(groups_.size()), &ctx_),
           {}});
      Group& g = groups_.back();
      g.reactor->Start();
      MUSTER_RETURN_IF_ERROR(g.reactor->Call("create", [&]() -> Status {
        for (int node = first; node < std::min(nodes, first + kNodesPerReactor); ++node) {
          collectives::RendezvousRelay::Options o;
          o.socket_parent = dir_;
          o.upstream_endpoint = store;
          o.credentials = creds;
          o.job = "bench";
          o.attempt = 0;
          for (int r = node * per_node_; r < std::min(n_, (node + 1) * per_node_); ++r) {
            o.local_ranks.push_back(r);
          }
          o.rpc_slack = std::chrono::seconds(60);
          if (!gather_files_) o.shared_gather_min_bytes = 0;
          o.accept_zstd = g_gather_zstd;
          // Counts each relay's first handshake with the store (its reactor thread only).
          o.on_upstream_ready = [this, counted = std::make_shared<bool>(false)] {
            if (*counted) return;
            *counted = true;
            std::lock_guard<std::mutex> l(ready_mu_);
            ++ready_;
            ready_cv_.notify_all();
          };
          MUSTER_ASSIGN_OR_RETURN(auto relay, collectives::RendezvousRelay::Create(*g.reactor, o));
          g.relays.push_back(std::move(relay));
        }
        return Status::Ok();
      }));
    }
    return Status::Ok();
  }
  // Waits until every relay has completed its handshake with the store (an agent's relay
  // makes it eagerly, while the ranks start).
  Status WaitUpstream(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> l(ready_mu_);
    if (ready_cv_.wait_for(l, timeout, [&] { return ready_ >= nodes_; })) return Status::Ok();
    return DeadlineExceededError(std::to_string(ready_) + " of " + std::to_string(nodes_) +
                                 " relays connected to the store within " +
                                 std::to_string(timeout.count()) + " s");
  }
  std::string EndpointOf(int rank) const {
    int node = rank / per_node_ - first_node_;
    return groups_[node / kNodesPerReactor].relays[node % kNodesPerReactor]->endpoint();
  }
  uint64_t UpstreamRequests() {
    return Sum([](const collectives::RendezvousRelay::Stats& s) { return s.upstream_requests; });
  }
  // Gather results that came from the store compressed.
  uint64_t CompressedGathers() {
    return Sum([](const collectives::RendezvousRelay::Stats& s) { return s.compressed_gathers; });
  }

 private:
  uint64_t Sum(const std::function<uint64_t(const collectives::RendezvousRelay::Stats&)>& of) {
    uint64_t sum = 0;
    for (auto& g : groups_) {
      sum += g.reactor->Call("stats", [&] {
        uint64_t s = 0;
        for (auto& r : g.relays) s += of(r->stats());
        return s;
      });
    }
    return sum;
  }
  struct Group {
    std::unique_ptr<Reactor> reactor;
    std::vector<std::unique_ptr<collectives::RendezvousRelay>> relays;
  };
  static zmq::context_t MakeContext(int nodes) {
    zmq::context_t ctx(g_io_threads);
    // Four sockets per relay: its local socket, its upstream one, and the pair that watches
    // the upstream handshakes.
    ctx.set(zmq::ctxopt::max_sockets, 4 * nodes + 1024);
    return ctx;
  }
  int n_, per_node_, first_node_, nodes_;
  bool gather_files_;
  zmq::context_t ctx_;
  std::filesystem::path dir_;
  std::vector<Group> groups_;
  std::mutex ready_mu_;
  std::condition_variable ready_cv_;
  int ready_ = 0;  // relays whose upstream handshake completed
};

// The phases of a rendezvous for ranks [first, first + ranks.size()) of n: rank first + i is
// socket i of `ranks`, going through `relays` (null: the direct path).
class Phases {
 public:
  Phases(Ranks& ranks, int first, int n, Relays* relays)
      : ranks_(ranks), first_(first), n_(n), relays_(relays) {}

  // connect: the first request of every rank completes its handshake.
  Status Connect() {
    for (int i = 0; i < ranks_.size(); ++i) {
      proto::StoreRequest r;
      r.mutable_add()->set_key("joined");
      r.mutable_add()->set_delta(1);
      ranks_.SendRequest(i, std::move(r));
    }
    return ranks_.Collect(ranks_.size(), [](int, const proto::Envelope&) { return Status::Ok(); });
  }
  Status Barrier() {
    for (int i = 0; i < ranks_.size(); ++i) {
      proto::StoreRequest r;
      r.mutable_barrier()->set_name("start");
      r.mutable_barrier()->set_n(n_);
      r.mutable_barrier()->set_timeout_ms(60000);
      ranks_.SendRequest(i, std::move(r));
    }
    return ranks_.Collect(ranks_.size(), [](int, const proto::Envelope&) { return Status::Ok(); });
  }
  // broadcast: ranks 1.. park a get; rank 0 sets.
  Status Broadcast() {
    const std::string blob(128, 'b');
    for (int i = 0; i < ranks_.size(); ++i) {
      if (first_ + i == 0) continue;
      proto::StoreRequest r;
      r.mutable_get()->add_keys("bcast");
      r.mutable_get()->set_timeout_ms(60000);
      ranks_.SendRequest(i, std::move(r));
    }
    if (first_ == 0 && ranks_.size() > 0) {
      proto::StoreRequest r;
      r.mutable_set()->set_key("bcast");
      r.mutable_set()->set_value(blob);
      ranks_.SendRequest(0, std::move(r));
    }
    return ranks_.Collect(ranks_.size(), [&](int i, const proto::Envelope& e) -> Status {
      if (first_ + i != 0 &&
          (e.store_reply().values_size() != 1 || e.store_reply().values(0) != blob))
        return DataLossError("broadcast: wrong value");
      return Status::Ok();
    });
  }
  // allgather: each rank contributes its 64-byte address to one gather and receives all N in
  // rank order (one request, one reply per rank; the server assembles the reply once).
  Status AllGather() {
    auto address = [](int i) { return Entry(i); };
    for (int i = 0; i < ranks_.size(); ++i) {
      proto::StoreRequest r;
      auto& g = *r.mutable_gather();
      g.set_name("addrs");
      g.set_rank(first_ + i);
      g.set_n(n_);
      g.set_value(address(first_ + i));
      g.set_timeout_ms(60000);
      ranks_.SendRequest(i, std::move(r));
    }
    // Every rank must receive the same entries; the first reply is decoded and checked entry
    // by entry, every other one compared with it byte for byte.
    std::string first;
    return ranks_.Collect(ranks_.size(), [&](int i, const proto::Envelope& e) -> Status {
      // Through a relay, a large result comes as a sealed memory file passed with the reply:
      // each rank maps and checks it, as RendezvousClient::AllGather does.
      std::optional<collectives::MappedGather> mapped;
      if (e.store_reply().gathered_fd()) {
        if (relays_ == nullptr) return DataLossError("allgather: a file from the store itself");
        ScopedFd fd = ranks_.TakeDescriptor(i);
        if (fd.get() < 0) return DataLossError("allgather: no descriptor came with the reply");
        auto m = collectives::MappedGather::FromDescriptor(std::move(fd),
                                                           e.store_reply().gathered_size());
        if (!m.ok()) return m.status();
        mapped.emplace(std::move(*m));
        ++shared_replies;
      }
      std::string_view got =
          mapped ? mapped->bytes() : std::string_view(e.store_reply().gathered());
      if (!first.empty()) {
        return got == first ? Status::Ok() : DataLossError("allgather: replies differ");
      }
      proto::StoreGathered all;
      if (!all.ParseFromArray(got.data(), static_cast<int>(got.size())) || all.values_size() != n_)
        return DataLossError("allgather: wrong number of addresses");
      for (int r = 0; r < n_; ++r)
        if (all.values(r) != address(r)) return DataLossError("allgather: wrong address");
      first = std::string(got);
      return Status::Ok();
    });
  }

  uint64_t shared_replies = 0;  // allgather replies that came as a file

 private:
  Ranks& ranks_;
  int first_, n_;
  Relays* relays_;
};

// `per_node` 0: every rank connects to the store itself (the direct path); else the ranks go
// through relays of `per_node` ranks each, which hand a large allgather result to their ranks
// in a file when `gather_files` (else down each rank's socket).
StatusOr<Result> Run(int n, bool curve, int per_node, bool gather_files) {
  Result res{n, curve, 0, 0, 0, 0, 0, 0, 0};
  res.ranks_per_node = per_node;
  res.gather_files = per_node > 0 && gather_files;
  res.io_threads = g_io_threads;
  res.store_io_threads = g_store_io_threads;
  res.zstd = per_node > 0 && g_gather_zstd;
  res.random_entries = g_random_entries;
  // Every simulated rank costs about three descriptors in this one process (its socket's
  // mailbox and both ends of its connection), a relay about seven more (its sockets' mailboxes,
  // its listener, its connection to the store and the store's end of it). libzmq aborts when it
  // runs out of them while accepting, so refuse a run that cannot fit instead.
  rlimit lim{};
  getrlimit(RLIMIT_NOFILE, &lim);
  uint64_t needed = 3 * static_cast<uint64_t>(n) + 256 +
                    (per_node > 0 ? 7 * static_cast<uint64_t>((n + per_node - 1) / per_node) : 0);
  if (lim.rlim_cur != RLIM_INFINITY && needed > lim.rlim_cur) {
    return FailedPreconditionError(
        std::to_string(n) + " simulated ranks need about " + std::to_string(needed) +
        " open files in this one process; the limit is " + std::to_string(lim.rlim_cur) +
        " (hard limit " + std::to_string(lim.rlim_max) + ")");
  }
  zmq::context_t store_ctx(g_store_io_threads);
  NewThreads store_threads;
  Reactor reactor("rdzv-bench", &store_ctx);
  std::unique_ptr<ZapAuthenticator> zap;
  if (curve) {
    MUSTER_ASSIGN_OR_RETURN(zap, ZapAuthenticator::Create(reactor));
  }
  collectives::RendezvousServer::Options so;
  so.insecure = !curve;
  MUSTER_ASSIGN_OR_RETURN(auto server,
                          collectives::RendezvousServer::Create(reactor, zap.get(), so));
  MUSTER_ASSIGN_OR_RETURN(std::string key, server->AddScope("bench", 0));
  MUSTER_ASSIGN_OR_RETURN(auto creds, RdzvCredentials::Parse(key));
  reactor.Start();
  const std::set<pid_t> store_tids = store_threads.Since();
  auto cleanup = [&] {
    reactor.Call("stop", [&] {
      server.reset();
      zap.reset();
    });
    reactor.Stop();
  };

  auto t0 = Clock::now();
  const double cpu0 = CpuSeconds();
  const double store_cpu0 = ThreadsCpuSeconds(store_tids);
  Status st;
  {
    // Relays are created inside the timed section: their CURVE connections are part of
    // connecting.
    std::unique_ptr<Relays> relays;
    if (per_node > 0) {
      relays = std::make_unique<Relays>(n, per_node, gather_files);
      if (Status rs = relays->Start(server->endpoint(), creds); !rs.ok()) {
        relays.reset();
        cleanup();
        return rs;
      }
      res.relays_s = Since(t0);
      if (Status ws = relays->WaitUpstream(std::chrono::seconds(60)); !ws.ok()) {
        relays.reset();
        cleanup();
        return ws;
      }
      res.setup_s = Since(t0);
      res.setup_cpu_s = CpuSeconds() - cpu0;
    }
    auto tr = Clock::now();
    Ranks ranks(
        n, [&](int i) { return relays ? relays->EndpointOf(i) : server->endpoint(); }, creds,
        g_io_threads);
    Phases phases(ranks, 0, n, relays.get());
    st = ranks.status();
    if (st.ok()) st = phases.Connect();
    res.connect_s = Since(t0);
    auto t1 = Clock::now();
    if (st.ok()) st = phases.Barrier();
    res.barrier_s = Since(t1);
    auto t2 = Clock::now();
    if (st.ok()) st = phases.Broadcast();
    res.broadcast_s = Since(t2);
    auto t3 = Clock::now();
    if (st.ok()) st = phases.AllGather();
    res.allgather_s = Since(t3);
    res.shared_replies = phases.shared_replies;
    res.ranks_s = Since(tr);
    res.total_s = Since(t0);
    res.cpu_s = CpuSeconds() - cpu0;
    res.store_cpu_s = ThreadsCpuSeconds(store_tids) - store_cpu0;
    if (relays) res.upstream_requests = relays->UpstreamRequests();
    if (relays) res.compressed_gathers = relays->CompressedGathers();
  }
  cleanup();
  if (!st.ok()) return st;
  if (per_node > 0) return res;  // the anchors are the direct path's

  // The anchor: one round trip per socket against a raw ROUTER echo, same security.
  {
    zmq::context_t sctx(1);
    zmq::socket_t router(sctx, zmq::socket_type::router);
    router.set(zmq::sockopt::linger, 0);
    router.set(zmq::sockopt::backlog, 4096);  // as RpcServer: no SYN drops at N connects
    KeyPair skey = *GenerateKeyPair();
    if (curve) {
      router.set(zmq::sockopt::curve_server, 1);
      router.set(zmq::sockopt::curve_secretkey, skey.secret_key);
    }
    router.bind("tcp://127.0.0.1:*");
    std::string ep = router.get(zmq::sockopt::last_endpoint);
    const std::string all_blob(static_cast<size_t>(n) * 64, 'a');
    std::atomic<bool> stop{false};
    std::thread echo([&] {
      while (!stop) {
        zmq::pollitem_t it{router.handle(), 0, ZMQ_POLLIN, 0};
        zmq::poll(&it, 1, std::chrono::milliseconds(50));
        std::vector<zmq::message_t> frames;
        while (zmq::recv_multipart(router, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
          // "all": answer with N x 64 bytes, as a rendezvous allgather must send every rank.
          if (frames.size() == 2 && frames[1].to_string_view() == "all") {
            router.send(frames[0], zmq::send_flags::sndmore);
            router.send(zmq::buffer(all_blob), zmq::send_flags::none);
          } else {
            zmq::send_multipart(router, frames);
          }
          frames.clear();
        }
      }
    });
    RdzvCredentials ac;
    ac.insecure = !curve;
    ac.server_public_key = skey.public_key;
    ac.client_key = *GenerateKeyPair();
    auto ta = Clock::now();
    {
      Ranks ranks(n, ep, ac, g_io_threads);
      st = ranks.status();
      for (int i = 0; st.ok() && i < n; ++i) ranks.Send(i, "ping");
      if (st.ok()) st = ranks.Collect(n);
      res.anchor_s = Since(ta);
      // The floor of an allgather through one server: every socket receives N x 64 bytes.
      auto tb = Clock::now();
      for (int i = 0; st.ok() && i < n; ++i) ranks.Send(i, "all");
      if (st.ok()) st = ranks.Collect(n);
      res.anchor_allgather_s = Since(tb);
    }
    stop = true;
    echo.join();
  }
  if (!st.ok()) return st;
  return res;
}

// One of the processes of a spread simulation (`rendezvous-nodes`, started by RunSpread): the
// relays and ranks of nodes [first_node, first_node + nodes) of n ranks, against the store at
// `store` with the key in MUSTER_RDZV_KEY. It reads one phase a line on stdin (setup: make the
// relays and wait for their handshakes with the store; connect: open the ranks' sockets and make
// their first requests; barrier, bcast, allgather; cpu: nothing; quit) and answers each with "ok
// <store requests by its relays> <allgather replies by file> <CPU seconds it has used so far>
// <gather results its relays got compressed>" or "error <why>".
int RunNodes(const std::string& store, int n, int per_node, int first_node, int nodes,
             bool gather_files) {
  RaiseFdLimit();
  SlowClosureLimiter& slow = InstallSlowClosureLimiter();
  const char* key = std::getenv("MUSTER_RDZV_KEY");
  auto creds = RdzvCredentials::Parse(key ? key : "");
  const int first_rank = first_node * per_node;
  const int count = std::min(n, (first_node + nodes) * per_node) - first_rank;
  std::unique_ptr<Relays> relays;
  std::unique_ptr<Ranks> ranks;
  std::unique_ptr<Phases> phases;
  for (std::string line; std::getline(std::cin, line);) {
    if (line == "quit") break;
    Status st;
    if (!creds.ok()) {
      st = creds.status();
    } else if (line == "cpu") {
      // Only the answer's CPU seconds: a baseline before the first phase.
    } else if (line == "setup") {
      relays = std::make_unique<Relays>(n, per_node, gather_files, first_node, nodes);
      st = relays->Start(store, *creds);
      if (st.ok()) st = relays->WaitUpstream(std::chrono::seconds(60));
    } else if (line == "connect") {
      if (!relays) st = FailedPreconditionError("'connect' before 'setup'");
      if (st.ok()) {
        ranks = std::make_unique<Ranks>(
            count, [&](int i) { return relays->EndpointOf(first_rank + i); }, *creds, g_io_threads);
        st = ranks->status();
      }
      if (st.ok()) {
        phases = std::make_unique<Phases>(*ranks, first_rank, n, relays.get());
        st = phases->Connect();
      }
    } else if (!phases) {
      st = FailedPreconditionError("'" + line + "' before connect");
    } else if (line == "barrier") {
      st = phases->Barrier();
    } else if (line == "bcast") {
      st = phases->Broadcast();
    } else if (line == "allgather") {
      st = phases->AllGather();
    } else {
      st = InvalidArgumentError("unknown phase '" + line + "'");
    }
    slow.Summary(line + " (nodes " + std::to_string(first_node) + ".." +
                 std::to_string(first_node + nodes - 1) + ")");
    if (st.ok()) {
      std::cout << "ok " << (relays ? relays->UpstreamRequests() : 0) << " "
                << (phases ? phases->shared_replies : 0) << " " << CpuSeconds() << " "
                << (relays ? relays->CompressedGathers() : 0) << std::endl;
    } else {
      std::cout << "error " << st.ToString() << std::endl;
    }
  }
  phases.reset();
  ranks.reset();
  relays.reset();
  return 0;
}

// The relayed path with the simulated nodes spread over `processes` processes (this binary's
// `rendezvous-nodes`), as on a cluster where each node's relay and ranks are their own
// processes: the store here, each phase started in every process at once and timed until the
// last one has finished it.
StatusOr<Result> RunSpread(int n, bool curve, int per_node, bool gather_files, int processes) {
  zmq::context_t store_ctx(g_store_io_threads);
  Result res{n, curve, 0, 0, 0, 0, 0, 0, 0};
  res.ranks_per_node = per_node;
  res.gather_files = gather_files;
  res.processes = processes;
  res.io_threads = g_io_threads;
  res.store_io_threads = g_store_io_threads;
  res.zstd = g_gather_zstd;
  res.random_entries = g_random_entries;
  NewThreads store_threads;
  Reactor reactor("rdzv-bench", &store_ctx);
  std::unique_ptr<ZapAuthenticator> zap;
  if (curve) {
    MUSTER_ASSIGN_OR_RETURN(zap, ZapAuthenticator::Create(reactor));
  }
  collectives::RendezvousServer::Options so;
  so.insecure = !curve;
  MUSTER_ASSIGN_OR_RETURN(auto server,
                          collectives::RendezvousServer::Create(reactor, zap.get(), so));
  MUSTER_ASSIGN_OR_RETURN(std::string key, server->AddScope("bench", 0));
  reactor.Start();
  const std::set<pid_t> store_tids = store_threads.Since();

  struct Child {
    pid_t pid = -1;
    FILE* in = nullptr;   // its stdin
    FILE* out = nullptr;  // its stdout
  };
  std::vector<Child> children;
  const int nodes = (n + per_node - 1) / per_node;
  const int chunk = (nodes + processes - 1) / processes;
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string_view(*e).rfind("MUSTER_RDZV_KEY=", 0) != 0) env.emplace_back(*e);
  }
  env.push_back("MUSTER_RDZV_KEY=" + key);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  Status st;
  for (int first = 0; first < nodes && st.ok(); first += chunk) {
    int to[2], from[2];
    if (::pipe2(to, O_CLOEXEC) != 0 || ::pipe2(from, O_CLOEXEC) != 0) {
      st = ErrnoStatus(errno, "pipe");
      break;
    }
    std::vector<std::string> args = {
        "muster-bench",     "rendezvous-nodes",
        "--store",          server->endpoint(),
        "--ranks",          std::to_string(n),
        "--ranks-per-node", std::to_string(per_node),
        "--first-node",     std::to_string(first),
        "--nodes",          std::to_string(std::min(chunk, nodes - first)),
        "--gather-files",   gather_files ? "1" : "0",
        "--relay-dir",      g_relay_parent.string(),
        "--io-threads",     std::to_string(g_io_threads),
        "--gather-zstd",    g_gather_zstd ? "1" : "0",
        "--random-entries", g_random_entries ? "1" : "0"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to[0], 0);
    posix_spawn_file_actions_adddup2(&fa, from[1], 1);
    pid_t pid = -1;
    int rc = posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    ::close(to[0]);
    ::close(from[1]);
    if (rc != 0) {
      ::close(to[1]);
      ::close(from[0]);
      st = ErrnoStatus(rc, "posix_spawn muster-bench rendezvous-nodes");
      break;
    }
    children.push_back({pid, fdopen(to[1], "w"), fdopen(from[0], "r")});
  }
  // Runs one phase in every child at once; adds up what they report.
  uint64_t upstream = 0, shared = 0, compressed = 0;
  double children_cpu = 0;  // CPU seconds the children have used so far, as they reported
  auto run_phase = [&](const std::string& name) -> Status {
    for (auto& c : children) {
      std::fputs((name + "\n").c_str(), c.in);
      std::fflush(c.in);
    }
    upstream = shared = compressed = 0;
    children_cpu = 0;
    Status result;
    for (auto& c : children) {
      char buf[4096];
      if (std::fgets(buf, sizeof(buf), c.out) == nullptr) {
        if (result.ok()) result = InternalError("a rendezvous-nodes process ended during " + name);
        continue;
      }
      std::string line(buf);
      if (line.rfind("ok ", 0) == 0) {
        unsigned long long u = 0, f = 0, z = 0;
        double cpu = 0;
        std::sscanf(line.c_str() + 3, "%llu %llu %lf %llu", &u, &f, &cpu, &z);
        upstream += u;
        shared += f;
        compressed += z;
        children_cpu += cpu;
      } else {
        if (result.ok()) result = InternalError(name + ": " + line);
      }
    }
    return result;
  };
  // MUSTER_BENCH_PHASE_CLOCK set: each phase's start and end on stderr, in CLOCK_MONOTONIC
  // seconds (perf record -k CLOCK_MONOTONIC stamps its samples on the same clock), so that a
  // profile can be cut by phase.
  const bool print_clock = std::getenv("MUSTER_BENCH_PHASE_CLOCK") != nullptr;
  auto mono = [] {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  };
  auto phase = [&](const std::string& name) -> Status {
    if (print_clock) std::fprintf(stderr, "phase %s start %.6f\n", name.c_str(), mono());
    Status done = run_phase(name);
    if (print_clock) std::fprintf(stderr, "phase %s end %.6f\n", name.c_str(), mono());
    InstallSlowClosureLimiter().Summary(name + " (the store's process)");
    return done;
  };
  if (st.ok()) st = phase("cpu");
  const double children_cpu0 = children_cpu;
  auto t0 = Clock::now();
  const double cpu0 = CpuSeconds();
  const double store_cpu0 = ThreadsCpuSeconds(store_tids);
  if (st.ok()) st = phase("setup");
  res.setup_s = Since(t0);
  // Every process's: the children's and this one's (the store's threads and the driver).
  res.setup_cpu_s = children_cpu - children_cpu0 + CpuSeconds() - cpu0;
  auto tr = Clock::now();
  if (st.ok()) st = phase("connect");
  res.connect_s = Since(t0);
  auto t1 = Clock::now();
  if (st.ok()) st = phase("barrier");
  res.barrier_s = Since(t1);
  auto t2 = Clock::now();
  if (st.ok()) st = phase("bcast");
  res.broadcast_s = Since(t2);
  auto t3 = Clock::now();
  if (st.ok()) st = phase("allgather");
  res.allgather_s = Since(t3);
  res.ranks_s = Since(tr);
  res.total_s = Since(t0);
  res.cpu_s = children_cpu - children_cpu0 + CpuSeconds() - cpu0;
  res.store_cpu_s = ThreadsCpuSeconds(store_tids) - store_cpu0;
  res.upstream_requests = upstream;
  res.compressed_gathers = compressed;
  res.shared_replies = shared;
  for (auto& c : children) {
    std::fputs("quit\n", c.in);
    std::fclose(c.in);
    std::fclose(c.out);
    int status = 0;
    ::waitpid(c.pid, &status, 0);
  }
  reactor.Call("stop", [&] {
    server.reset();
    zap.reset();
  });
  reactor.Stop();
  if (!st.ok()) return st;
  return res;
}

}  // namespace

void AddRendezvousBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand(
      "rendezvous", "Rendezvous of N simulated ranks through the store vs raw ZeroMQ connects");
  auto ranks = std::make_shared<std::vector<int>>(std::vector<int>{64, 256, 1024, 4096});
  auto json = std::make_shared<bool>(false);
  auto insecure = std::make_shared<bool>(false);
  auto paths =
      std::make_shared<std::vector<std::string>>(std::vector<std::string>{"direct", "relayed"});
  auto per_node = std::make_shared<int>(8);
  cmd->add_option("--ranks", *ranks, "Simulated ranks (repeatable; 64..4096 by default)")
      ->check(CLI::Range(1, 16384));
  cmd->add_option("--path", *paths,
                  "direct (every rank connects to the store), relayed (through node agents' "
                  "relays, which hand a large allgather result over in a file) and/or "
                  "relayed-socket (the same, with every reply down the rank's socket); "
                  "repeatable; direct and relayed by default")
      ->check(CLI::IsMember({"direct", "relayed", "relayed-socket"}));
  cmd->add_option("--ranks-per-node", *per_node, "Ranks per relay on the relayed path")
      ->check(CLI::Range(1, 1024));
  auto processes = std::make_shared<int>(0);
  cmd->add_option("--processes", *processes,
                  "Spread the relayed paths' simulated nodes (relays and ranks) over this many "
                  "processes, the store staying in this one (default: the host's cores, as on a "
                  "cluster no agent shares an address space with another, and at least one per "
                  "4096 ranks, which fit one process's open files; 1: everything in this "
                  "process, the earlier mode). The direct path always runs in this one")
      ->check(CLI::Range(1, 64));
  auto io_threads = std::make_shared<int>(HostCores());
  cmd->add_option("--io-threads", *io_threads,
                  "ZeroMQ I/O threads of the simulated agents' relays and of the simulated ranks, "
                  "in each process (default: the host's cores, as real agents and ranks each "
                  "have their own; 1: all of them through one I/O thread, the earlier mode)")
      ->check(CLI::Range(1, 64));
  auto store_io = std::make_shared<std::vector<int>>(std::vector<int>{2});
  cmd->add_option("--store-io-threads", *store_io,
                  "ZeroMQ I/O threads of the store's context, which run the server side of every "
                  "CURVE handshake and encryption (repeatable, for rows of each in one run; "
                  "default 2, what the store gets on an agent's reactor; 1 as in `muster run`)")
      ->check(CLI::Range(1, 64));
  auto zstd = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"on"});
  cmd->add_option("--gather-zstd", *zstd,
                  "on: the relays take gather results from the store compressed, as an agent's "
                  "do; off: plain (repeatable, for rows of both in one run; on by default)")
      ->check(CLI::IsMember({"on", "off"}));
  auto random_entries = std::make_shared<bool>(false);
  cmd->add_flag("--random-entries", *random_entries,
                "Allgather entries of 64 random bytes, which do not compress, instead of text "
                "addresses padded with spaces");
  auto relay_dir = std::make_shared<std::string>();
  cmd->add_option("--relay-dir", *relay_dir,
                  "Make the relays' directories here (default: where an agent makes them, a "
                  "memory file system where the host has one)");
  cmd->add_flag("--insecure", *insecure, "Also run without CURVE");
  cmd->add_flag("--json", *json, "Print JSON instead of a table");
  cmd->callback([=] {
    *runner = [=] {
      RaiseFdLimit();
      SlowClosureLimiter& slow = InstallSlowClosureLimiter();
      g_relay_parent = *relay_dir;
      g_io_threads = *io_threads;
      g_random_entries = *random_entries;
      std::vector<Result> rows;
      for (int n : *ranks) {
        for (const std::string& path : *paths) {
          for (bool curve : {true, false}) {
            if (!curve && !*insecure) continue;
            for (const std::string& z : *zstd) {
              for (int store_io_threads : *store_io) {
                // The direct path has no relays to compress for: one row.
                if (path == "direct" && z != zstd->front()) continue;
                g_gather_zstd = z == "on";
                g_store_io_threads = store_io_threads;
                const int procs =
                    *processes > 0 ? *processes : std::max(HostCores(), (n + 4095) / 4096);
                auto r = path != "direct" && procs > 1
                             ? RunSpread(n, curve, *per_node, path == "relayed", procs)
                             : Run(n, curve, path == "direct" ? 0 : *per_node, path == "relayed");
                if (!r.ok()) {
                  std::cerr << "rendezvous bench with " << n << " ranks (" << path
                            << ") failed: " << r.status() << "\n";
                  return 1;
                }
                slow.Summary(std::to_string(n) + " ranks, " + path);
                rows.push_back(*r);
              }
            }
          }
        }
      }
      // Every process of the run (the children inherit the environment) has the pool or not.
      const bool pool = GetSodiumPoolStats().enabled;
      if (*json) {
        nlohmann::json out = nlohmann::json::array();
        for (auto& r : rows)
          out.push_back({{"ranks", r.ranks},
                         {"seconds", r.total_s},
                         {"curve", r.curve},
                         {"connect_s", r.connect_s},
                         {"barrier_s", r.barrier_s},
                         {"broadcast_s", r.broadcast_s},
                         {"allgather_s", r.allgather_s},
                         {"raw_zmq_connect_s", r.anchor_s},
                         {"raw_zmq_allgather_s", r.anchor_allgather_s},
                         {"path", r.ranks_per_node == 0 ? "direct"
                                  : r.gather_files      ? "relayed"
                                                        : "relayed-socket"},
                         {"gather_file_replies", r.shared_replies},
                         {"processes", r.processes},
                         {"ranks_per_node", r.ranks_per_node},
                         {"relays_s", r.relays_s},
                         {"cpu_s", r.cpu_s},
                         {"store_cpu_s", r.store_cpu_s},
                         {"io_threads", r.io_threads},
                         {"store_io_threads", r.store_io_threads},
                         {"gather_zstd", r.zstd},
                         {"random_entries", r.random_entries},
                         {"setup_s", r.setup_s},
                         {"ranks_s", r.ranks_s},
                         {"setup_cpu_s", r.setup_cpu_s},
                         {"upstream_requests", r.upstream_requests},
                         {"compressed_gathers", r.compressed_gathers},
                         {"sodium_pool", pool}});
        std::cout << (out.size() == 1 ? out[0] : out).dump(2) << "\n";
        return 0;
      }
      std::cout
          << "rendezvous of N ranks (own DEALER each) on one RendezvousServer, direct or through "
             "relays of R ranks (a Unix socket to the relay, one CURVE connection per relay to the "
             "store), "
             "simulated in this process"
          << (*processes != 1 ? ", the relayed rows' relays and ranks spread over P processes "
                                "of their own (as no agent shares an address space with "
                                "another on a cluster)"
                              : std::string())
          << "; io thr: the ZeroMQ I/O threads that the simulated agents' relays share, and "
             "those the simulated ranks share, per process (on a cluster each agent and each "
             "rank has its own; 1 serialises all of them through one thread). setup s: the "
             "relays created and every one's CURVE handshake with the store done, what an agent "
             "does before it spawns the ranks, so while the programs start; ranks s: the ranks' "
             "own rendezvous after that (open their sockets, connect through the relays, "
             "barrier, broadcast, allgather); total s = setup s + ranks s, the whole rendezvous "
             "from nothing, as in earlier runs; connect s includes setup s; relays s: creating "
             "the relays, part of setup (one-process rows); cpu s: CPU seconds used over all "
             "phases (every thread of every process), setup cpu s those of the setup; store cpu "
             "s: those of the store's own threads (its reactor, ZeroMQ I/O thread and reaper), "
             "the part that stays serial on a cluster; zstd: the relays asked for gather results "
             "compressed, and zstd from store: how many came so (the store compresses once, "
             "and only when that saves an eighth; the allgather entries are "
          << (*random_entries ? "64 random bytes, which do not compress"
                              : "text addresses padded to 64 bytes, which compress well")
          << "); anchors (direct rows): the same N sockets "
             "against a raw ZeroMQ ROUTER, one round trip each (connect) and then N x 64 bytes "
             "to each (allgather); store io thr: the ZeroMQ I/O threads of the store's context "
             "(1 on an agent today); sodium pool: libzmq's CURVE handshake buffers from the "
             "locked pool of common/sodium_pool.h (on, as in the muster binary) or from "
             "libsodium's guarded mappings (off: MUSTER_SODIUM_POOL=off)\n";
      Table t({"ranks",
               "path",
               "security",
               "io thr",
               "zstd",
               "setup s",
               "ranks s",
               "connect s",
               "barrier s",
               "bcast128 s",
               "allgather64 s",
               "total s",
               "relays s",
               "cpu s",
               "setup cpu s",
               "store cpu s",
               "store reqs by relays",
               "gather via file",
               "zstd from store",
               "raw zmq connect s",
               "raw zmq N*64B s",
               "store io thr",
               "sodium pool"});
      for (auto& r : rows) {
        bool relayed = r.ranks_per_node > 0;
        t.Row({std::to_string(r.ranks),
               relayed ? std::string(r.gather_files ? "relayed" : "relay-sock") +
                             " R=" + std::to_string(r.ranks_per_node) +
                             (r.processes > 1 ? " P=" + std::to_string(r.processes) : "")
                       : "direct",
               r.curve ? "CURVE" : "none",
               std::to_string(r.io_threads),
               relayed ? (r.zstd ? "on" : "off") : "-",
               relayed ? Fmt(r.setup_s, 3) : "-",
               relayed ? Fmt(r.ranks_s, 3) : "-",
               Fmt(r.connect_s, 3),
               Fmt(r.barrier_s, 3),
               Fmt(r.broadcast_s, 3),
               Fmt(r.allgather_s, 3),
               Fmt(r.total_s, 3),
               relayed && r.processes == 1 ? Fmt(r.relays_s, 3) : "-",
               r.cpu_s >= 0 ? Fmt(r.cpu_s, 2) : "-",
               r.setup_cpu_s >= 0 ? Fmt(r.setup_cpu_s, 2) : "-",
               Fmt(r.store_cpu_s, 2),
               relayed ? std::to_string(r.upstream_requests) : "-",
               relayed ? std::to_string(r.shared_replies) : "-",
               relayed ? std::to_string(r.compressed_gathers) : "-",
               relayed ? "-" : Fmt(r.anchor_s, 3),
               relayed ? "-" : Fmt(r.anchor_allgather_s, 3),
               std::to_string(r.store_io_threads),
               pool ? "on" : "off"});
      }
      t.Print();
      return 0;
    };
  });

  // One process of a spread simulation (RunSpread); not for users.
  auto nodes_cmd = app.add_subcommand("rendezvous-nodes", "");
  nodes_cmd->group("");
  auto store = std::make_shared<std::string>();
  auto n_all = std::make_shared<int>(0);
  auto first_node = std::make_shared<int>(0);
  auto node_count = std::make_shared<int>(0);
  auto files = std::make_shared<int>(1);
  auto rpn = std::make_shared<int>(8);
  nodes_cmd->add_option("--store", *store)->required();
  nodes_cmd->add_option("--ranks", *n_all)->required();
  nodes_cmd->add_option("--ranks-per-node", *rpn)->required();
  nodes_cmd->add_option("--first-node", *first_node)->required();
  nodes_cmd->add_option("--nodes", *node_count)->required();
  nodes_cmd->add_option("--gather-files", *files);
  auto nodes_relay_dir = std::make_shared<std::string>();
  nodes_cmd->add_option("--relay-dir", *nodes_relay_dir);
  auto nodes_io_threads = std::make_shared<int>(1);
  nodes_cmd->add_option("--io-threads", *nodes_io_threads);
  auto nodes_zstd = std::make_shared<int>(1);
  nodes_cmd->add_option("--gather-zstd", *nodes_zstd);
  auto nodes_random = std::make_shared<int>(0);
  nodes_cmd->add_option("--random-entries", *nodes_random);
  nodes_cmd->callback([=] {
    *runner = [=] {
      g_relay_parent = *nodes_relay_dir;
      g_io_threads = std::max(1, *nodes_io_threads);
      g_gather_zstd = *nodes_zstd != 0;
      g_random_entries = *nodes_random != 0;
      return RunNodes(*store, *n_all, *rpn, *first_node, *node_count, *files != 0);
    };
  });
}

}  // namespace muster::bench
