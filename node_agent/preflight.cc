#include "node_agent/preflight.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>

#include "common/logging.h"
#include "common/strings.h"

namespace muster::node_agent {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::string Errno(int e) { return std::strerror(e); }

StatusOr<in_addr> Resolve(const std::string& address) {
  in_addr a{};
  if (inet_pton(AF_INET, address.c_str(), &a) == 1) return a;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(address.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    return InvalidArgumentError("cannot resolve '" + address + "' to an IPv4 address: " +
                                (rc != 0 ? gai_strerror(rc) : "no address"));
  }
  a = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return a;
}

std::string ToString(in_addr a) {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &a, buf, sizeof(buf));
  return buf;
}

// RAII for a socket fd.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) close(fd);
  }
  Fd(Fd&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
  Fd(const Fd&) = delete;
};

struct Target {
  std::string address;
  int port = 0;
};

// Connects to every target at once (non-blocking connects, one poll loop); one Status each.
std::vector<Status> ProbeMany(const std::vector<Target>& targets, milliseconds timeout) {
  std::vector<Status> out(targets.size(), Status::Ok());
  std::vector<Fd> fds;
  std::vector<size_t> pending;  // indexes into targets whose connect is in flight
  fds.reserve(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    fds.emplace_back(-1);
    auto a = Resolve(targets[i].address);
    if (!a.ok()) {
      out[i] = a.status();
      continue;
    }
    if (targets[i].port <= 0 || targets[i].port > 65535) {
      out[i] = InvalidArgumentError(fmt::format("port {} is out of range", targets[i].port));
      continue;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      out[i] = UnavailableError("socket: " + Errno(errno));
      continue;
    }
    fds.back().fd = fd;
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(targets[i].port));
    sa.sin_addr = *a;
    if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0) continue;
    if (errno != EINPROGRESS) {
      out[i] = UnavailableError(Errno(errno));
      continue;
    }
    pending.push_back(i);
  }
  const auto deadline = Clock::now() + timeout;
  while (!pending.empty()) {
    auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) break;
    std::vector<pollfd> p;
    for (size_t i : pending) p.push_back({fds[i].fd, POLLOUT, 0});
    int n = poll(p.data(), p.size(), static_cast<int>(left));
    if (n < 0 && errno != EINTR) break;
    std::vector<size_t> still;
    for (size_t k = 0; k < pending.size(); ++k) {
      size_t i = pending[k];
      if (p[k].revents == 0) {
        still.push_back(i);
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fds[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) out[i] = UnavailableError(Errno(err));
    }
    pending.swap(still);
  }
  for (size_t i : pending) {
    out[i] = UnavailableError(fmt::format("connect timed out after {} ms", timeout.count()));
  }
  return out;
}

std::string OneLine(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '|', '/');
  return s;
}

milliseconds Left(Clock::time_point deadline) {
  return std::max(milliseconds(1),
                  std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
}

}  // namespace

StatusOr<Route> RouteTo(const std::string& address) {
  MUSTER_ASSIGN_OR_RETURN(in_addr dst, Resolve(address));
  Fd s(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (s.fd < 0) return UnavailableError("socket: " + Errno(errno));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(9);  // any port: a UDP connect only picks the route
  sa.sin_addr = dst;
  if (connect(s.fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    return UnavailableError("no route to " + address + ": " + Errno(errno));
  }
  sockaddr_in local{};
  socklen_t len = sizeof(local);
  if (getsockname(s.fd, reinterpret_cast<sockaddr*>(&local), &len) != 0) {
    return UnavailableError("getsockname: " + Errno(errno));
  }
  Route r;
  r.local_address = ToString(local.sin_addr);
  ifaddrs* ifs = nullptr;
  if (getifaddrs(&ifs) != 0) return UnavailableError("getifaddrs: " + Errno(errno));
  for (ifaddrs* i = ifs; i; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
    if (reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr == local.sin_addr.s_addr) {
      r.interface = i->ifa_name;
      break;
    }
  }
  freeifaddrs(ifs);
  if (r.interface.empty()) {
    return UnavailableError("the route to " + address + " leaves from " + r.local_address +
                            ", which no interface holds");
  }
  return r;
}

Status ProbeTcp(const std::string& address, int port, milliseconds timeout) {
  return ProbeMany({{address, port}}, timeout)[0];
}

StatusOr<std::unique_ptr<ProbeListener>> ProbeListener::Open(const std::string& address) {
  MUSTER_ASSIGN_OR_RETURN(in_addr a, Resolve(address));
  Fd s(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (s.fd < 0) return UnavailableError("socket: " + Errno(errno));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr = a;
  if (bind(s.fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    return UnavailableError("bind " + address + ": " + Errno(errno));
  }
  // The backlog holds every peer's probe: nothing is accepted.
  if (listen(s.fd, 4096) != 0) return UnavailableError("listen: " + Errno(errno));
  socklen_t len = sizeof(sa);
  if (getsockname(s.fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0) {
    return UnavailableError("getsockname: " + Errno(errno));
  }
  int fd = std::exchange(s.fd, -1);
  return std::unique_ptr<ProbeListener>(new ProbeListener(fd, ntohs(sa.sin_port)));
}

ProbeListener::~ProbeListener() { close(fd_); }

std::string PreflightPeer::Encode() const {
  return fmt::format("{}|{}|{}|{}", OneLine(node), OneLine(address), OneLine(interface),
                     probe_port);
}

StatusOr<PreflightPeer> PreflightPeer::Decode(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string p; std::getline(in, p, '|');) parts.push_back(p);
  if (parts.size() != 4) {
    return InvalidArgumentError("preflight entry '" + text + "' is not node|address|if|port");
  }
  for (int i = 0; i < 3; ++i) {
    bool control = std::any_of(parts[i].begin(), parts[i].end(),
                               [](char c) { return static_cast<unsigned char>(c) < 0x20; });
    if (parts[i].empty() || control) {
      return InvalidArgumentError("preflight entry '" + OneLine(text) +
                                  "': a node, address or interface is empty or holds a control "
                                  "character");
    }
  }
  std::optional<int64_t> port = ParseInt64(parts[3]);
  if (!port || *port <= 0 || *port > 65535) {
    return InvalidArgumentError("preflight entry '" + text + "': bad port '" + parts[3] + "'");
  }
  return PreflightPeer{parts[0], parts[1], parts[2], static_cast<int>(*port)};
}

std::string EncodeFailures(const std::vector<ProbeFailure>& failures) {
  std::string out;
  for (const auto& f : failures) out += fmt::format("{} {} {}\n", f.from, f.to, OneLine(f.error));
  return out;
}

StatusOr<std::vector<ProbeFailure>> DecodeFailures(const std::string& text, int nnodes) {
  std::vector<ProbeFailure> out;
  std::stringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    std::stringstream l(line);
    ProbeFailure f;
    if (!(l >> f.from >> f.to) || f.from < 0 || f.from >= nnodes || f.to < -1 || f.to >= nnodes) {
      return InvalidArgumentError("preflight failure line '" + line + "' is malformed");
    }
    std::getline(l >> std::ws, f.error);
    out.push_back(std::move(f));
  }
  return out;
}

std::optional<int> Blame(int nnodes, const std::vector<ProbeFailure>& failures) {
  if (failures.empty()) return std::nullopt;
  std::vector<int> score(std::max(nnodes, 1), 0);
  for (const auto& f : failures) {
    if (f.to < 0) {
      score[f.from] += 2;
    } else {
      score[f.from]++;
      score[f.to]++;
    }
  }
  int best = 0;
  for (int r = 1; r < nnodes; ++r) {
    if (score[r] >= score[best]) best = r;
  }
  return best;
}

PreflightResult RunPreflight(const PreflightOptions& o, collectives::RendezvousStore& store,
                             const std::atomic<bool>* cancelled) {
  auto logger = log::Get("agent.preflight");
  const auto deadline = Clock::now() + o.timeout;
  PreflightResult res;
  auto self_fail = [&](const std::string& what) {
    res.ok = false;
    res.blamed_rank = o.node_rank;
    res.blamed_node = o.node;
    res.message = fmt::format("node {} ({} via {}) {}", o.node,
                              res.route.local_address.empty() ? "?" : res.route.local_address,
                              res.route.interface.empty() ? "?" : res.route.interface, what);
    return res;
  };
  auto is_cancelled = [&] { return cancelled && cancelled->load(); };

  // 1. The route toward the master, and a listener there for the peers' probes.
  auto route = RouteTo(o.master_addr);
  if (!route.ok()) return self_fail("has no route to the master: " + route.status().message());
  res.route = *route;
  auto listener = ProbeListener::Open(route->local_address);
  if (!listener.ok()) return self_fail("cannot listen for probes: " + listener.status().message());

  // 2. The master's store port. Refused means "not open yet" until the deadline.
  for (;;) {
    if (is_cancelled()) return self_fail("cancelled");
    Status st = ProbeTcp(o.master_addr, o.store_port, std::min(o.probe_timeout, Left(deadline)));
    if (st.ok()) break;
    bool refused = st.message().find(Errno(ECONNREFUSED)) != std::string::npos;
    if (!refused || Clock::now() + milliseconds(50) >= deadline) {
      return self_fail(fmt::format("cannot reach the master at {}:{} (rendezvous store): {}",
                                   o.master_addr, o.store_port, st.message()));
    }
    std::this_thread::sleep_for(milliseconds(50));  // the master's agent opens its store
  }

  // 3. Round 1: who is where.
  const std::string joined = "muster/preflight/joined/";
  PreflightPeer me{o.node, route->local_address, route->interface, (*listener)->port()};
  if (Status st = store.Set(joined + std::to_string(o.node_rank), "1"); !st.ok()) {
    return self_fail("cannot write to the rendezvous store at " + o.master_addr + ": " +
                     st.message());
  }
  std::vector<PreflightPeer> peers(o.nnodes);
  auto missing_of = [&](const std::string& prefix) {
    std::vector<ProbeFailure> missing;
    for (int r = 0; r < o.nnodes; ++r) {
      if (!store.Wait({prefix + std::to_string(r)}, milliseconds(1)).ok()) {
        missing.push_back(
            {r, -1, fmt::format("did not join the preflight within {} ms", o.timeout.count())});
      }
    }
    return missing;
  };
  auto blame_missing = [&](std::vector<ProbeFailure> missing, const Status& st) {
    if (missing.empty()) return self_fail("preflight collective failed: " + st.message());
    int r = *Blame(o.nnodes, missing);
    res.ok = false;
    res.blamed_rank = r;
    res.blamed_node = peers[r].node;
    res.message = fmt::format(
        "node {} did not take part in the preflight within {} ms{} (waited for by node {})",
        peers[r].node.empty() ? "rank " + std::to_string(r) : peers[r].node, o.timeout.count(),
        peers[r].address.empty() ? "" : " from " + peers[r].address + " via " + peers[r].interface,
        o.node);
    return res;
  };
  auto round1 =
      store.AllGather("muster/preflight/1", o.node_rank, o.nnodes, me.Encode(), Left(deadline));
  if (!round1.ok()) {
    if (round1.status().code() != StatusCode::kDeadlineExceeded) {
      return self_fail("preflight collective failed: " + round1.status().message());
    }
    return blame_missing(missing_of(joined), round1.status());
  }
  for (int r = 0; r < o.nnodes; ++r) {
    auto p = PreflightPeer::Decode((*round1)[r]);
    if (!p.ok()) return self_fail(p.status().message());
    peers[r] = *p;
  }

  // 4. Probe every peer at once.
  if (is_cancelled()) return self_fail("cancelled");
  std::vector<Target> targets;
  std::vector<int> target_rank;
  for (int r = 0; r < o.nnodes; ++r) {
    if (r == o.node_rank) continue;
    targets.push_back({peers[r].address, peers[r].probe_port});
    target_rank.push_back(r);
  }
  std::vector<ProbeFailure> mine;
  auto probes = ProbeMany(targets, std::min(o.probe_timeout, Left(deadline)));
  for (size_t i = 0; i < probes.size(); ++i) {
    if (!probes[i].ok()) {
      // What this node tried, as it tried it: the verdict quotes it on every node.
      mine.push_back(
          {o.node_rank, target_rank[i],
           fmt::format("{}:{}: {}", targets[i].address, targets[i].port, probes[i].message())});
    }
  }

  // 5. Round 2: what failed, everywhere. Its completion means every peer is done probing us.
  const std::string probed = "muster/preflight/probed/";
  store.Set(probed + std::to_string(o.node_rank), "1").IgnoreError();
  auto round2 = store.AllGather("muster/preflight/2", o.node_rank, o.nnodes, EncodeFailures(mine),
                                Left(deadline));
  if (!round2.ok()) {
    if (round2.status().code() != StatusCode::kDeadlineExceeded) {
      return self_fail("preflight collective failed: " + round2.status().message());
    }
    return blame_missing(missing_of(probed), round2.status());
  }
  std::vector<ProbeFailure> all;
  for (int r = 0; r < o.nnodes; ++r) {
    auto f = DecodeFailures((*round2)[r], o.nnodes);
    if (!f.ok()) return self_fail(f.status().message());
    for (auto& x : *f) {
      if (x.from == r) all.push_back(std::move(x));  // a node speaks for its own probes only
    }
  }
  auto blamed = Blame(o.nnodes, all);
  if (!blamed) {
    res.ok = true;
    logger->info("preflight passed: {} nodes reach each other; this node uses {} ({})", o.nnodes,
                 res.route.interface, res.route.local_address);
    return res;
  }
  // 6. The verdict, the same on every node: name the blamed node's own failed probe first.
  const ProbeFailure* f = nullptr;
  int involving = 0;
  for (const auto& x : all) {
    if (x.from != *blamed && x.to != *blamed) continue;
    ++involving;
    if (!f || (f->from != *blamed && x.from == *blamed)) f = &x;
  }
  const PreflightPeer& from = peers[f->from];
  const PreflightPeer& to = peers[f->to];
  res.ok = false;
  res.blamed_rank = *blamed;
  res.blamed_node = peers[*blamed].node;
  res.message = fmt::format("node {} ({} via {}) cannot reach node {} at {}{}", from.node,
                            from.address, from.interface, to.node, f->error,
                            involving > 1 ? fmt::format(" ({} failed probes involve node {})",
                                                        involving, peers[*blamed].node)
                                          : std::string());
  return res;
}

struct Preflight::State {
  std::mutex mu;
  bool cancelled = false;  // GUARDED_BY(mu)
  std::atomic<bool> cancel_flag{false};
};

std::unique_ptr<Preflight> Preflight::Start(PreflightOptions options, StoreFactory connect,
                                            Done done) {
  auto state = std::make_shared<State>();
  std::thread([state, options = std::move(options), connect = std::move(connect),
               done = std::move(done)] {
    PreflightResult res;
    auto store = connect();
    if (!store.ok()) {
      res.blamed_rank = options.node_rank;
      res.blamed_node = options.node;
      res.message =
          fmt::format("node {} cannot connect to the rendezvous store at {}:{}: {}", options.node,
                      options.master_addr, options.store_port, store.status().message());
    } else {
      res = RunPreflight(options, **store, &state->cancel_flag);
    }
    std::lock_guard<std::mutex> l(state->mu);
    if (!state->cancelled) done(std::move(res));
  }).detach();
  return std::unique_ptr<Preflight>(new Preflight(state));
}

Preflight::~Preflight() {
  state_->cancel_flag.store(true);
  std::lock_guard<std::mutex> l(state_->mu);
  state_->cancelled = true;
}

}  // namespace muster::node_agent
