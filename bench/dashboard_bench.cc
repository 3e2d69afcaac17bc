// muster-bench dashboard: does serving the dashboard slow the coordinator's reactor down?
//
// A Coordinator (real SQLite database, real clock) on its own reactor with the dashboard
// (coordinator/http) on loopback; `--nodes` registered nodes and `--jobs` submitted jobs of 2
// nodes each, so that part is placed and the rest stays pending and every pass has work. Then
// `--ticks` reactor ticks (Coordinator::Tick, which runs a scheduling pass, and the dashboard's
// publication) every 20 ms, twice: with nobody polling, and with `--pollers` threads fetching
// /api/jobs and /metrics back to back as fast as they are answered. Per phase: the reactor's time
// per tick (p50, p99; the scheduling pass is most of it) and the requests answered.

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <random>
#include <thread>

#include "bench/bench.h"
#include "common/logging.h"
#include "common/reactor.h"
#include "coordinator/coordinator.h"
#include "coordinator/http/dashboard_server.h"

namespace muster::bench {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// One GET over a fresh connection; true on a 200 with a body.
bool Fetch(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    std::string req = "GET " + path + " HTTP/1.0\r\nHost: x\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      std::string all;
      char buf[65536];
      for (ssize_t n; (n = ::recv(fd, buf, sizeof(buf), 0)) > 0;) all.append(buf, n);
      ok = all.rfind("HTTP/1.1 200", 0) == 0 && all.size() > 100;
    }
  }
  ::close(fd);
  return ok;
}

struct Phase {
  std::vector<double> tick_ms;     // Coordinator::Tick: the scheduling pass and timers
  std::vector<double> publish_ms;  // the dashboard's snapshot, when it took one
  uint64_t requests = 0;
  double seconds = 0;
};

}  // namespace

void AddDashboardBench(CLI::App& app, Runner* runner) {
  auto* cmd =
      app.add_subcommand("dashboard",
                         "Reactor time per tick and scheduler pass time, with the dashboard polled "
                         "hard and not at all");
  struct Opts {
    int nodes = 1000, jobs = 1000, ticks = 150, pollers = 8;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--nodes", o->nodes)->capture_default_str();
  cmd->add_option("--jobs", o->jobs)->capture_default_str();
  cmd->add_option("--ticks", o->ticks)->capture_default_str();
  cmd->add_option("--pollers", o->pollers)->capture_default_str();
  cmd->callback([=] {
    *runner = [=]() -> int {
      log::InitLogging("error").IgnoreError();
      fs::path dir = fs::temp_directory_path() /
                     ("muster-bench-dashboard-" + std::to_string(std::random_device{}()));
      coordinator::CoordinatorOptions co;
      co.heartbeat_timeout = std::chrono::hours(1);  // nodes stay up without agents
      co.lease = std::chrono::hours(2);
      auto store = coordinator::CoordinatorDb::Open(dir);
      if (!store.ok()) return 1;
      auto coord = coordinator::Coordinator::Create(std::move(*store), co);
      if (!coord.ok()) return 1;
      Reactor reactor("bench-coord");
      reactor.Start();
      auto call = [&](proto::Envelope e) {
        (*coord)->Handle("bench", std::move(e), [](proto::Envelope) {});
      };
      reactor.Call("setup", [&] {
        for (int i = 0; i < o->nodes; ++i) {
          proto::Envelope e;
          auto* l = e.mutable_agent_register()->mutable_labels();
          l->set_name("node-" + std::to_string(i));
          l->set_provider(i % 2 ? "aws" : "gcp");
          l->set_island("island-" + std::to_string(i / 32));
          l->set_gpus(8);
          l->set_slots(8);
          call(e);
        }
        for (int j = 0; j < o->jobs; ++j) {
          proto::Envelope e;
          e.mutable_submit_request()->set_yaml("name: job\ncommand: x\nnodes: 2\n");
          call(e);
        }
        return 0;
      });
      coordinator::http::HttpOptions ho;
      ho.listen = "127.0.0.1:0";
      auto server = reactor.Call("dashboard", [&] {
        return coordinator::http::DashboardServer::Start(reactor, **coord, ho);
      });
      if (!server.ok()) {
        fprintf(stderr, "dashboard: %s\n", server.status().ToString().c_str());
        return 1;
      }
      int port = (*server)->port();
      auto run_phase = [&](int pollers) {
        Phase p;
        std::atomic<bool> stop{false};
        std::atomic<uint64_t> served{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < pollers; ++t) {
          threads.emplace_back([&, t] {
            while (!stop) served += Fetch(port, t % 2 ? "/metrics" : "/api/jobs");
          });
        }
        auto t0 = Clock::now();
        for (int i = 0; i < o->ticks; ++i) {
          auto [tick, publish] = reactor.Call("tick", [&] {
            auto a = Clock::now();
            (*coord)->Tick();
            auto b = Clock::now();
            uint64_t v = (*server)->snapshot_version();
            (*server)->OnTick();
            auto c = Clock::now();
            if ((*server)->snapshot_version() == v) b = c;  // checked for changes, took none
            return std::pair<double, double>(
                std::chrono::duration<double, std::milli>(b - a).count(),
                std::chrono::duration<double, std::milli>(c - b).count());
          });
          p.tick_ms.push_back(tick);
          if (publish > 0) p.publish_ms.push_back(publish);
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        p.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
        stop = true;
        for (auto& t : threads) t.join();
        p.requests = served;
        std::sort(p.tick_ms.begin(), p.tick_ms.end());
        std::sort(p.publish_ms.begin(), p.publish_ms.end());
        return p;
      };
      Phase quiet = run_phase(0);
      Phase busy = run_phase(o->pollers);
      Table t({"phase", "ticks", "tick p50 ms", "tick p99 ms", "snapshots", "snapshot p50 ms",
               "snapshot max ms", "requests/s"});
      auto pct = [](const std::vector<double>& v, double q) {
        return v.empty() ? std::string("-")
                         : Fmt(v[std::min(v.size() - 1, size_t(v.size() * q))], 3);
      };
      auto row = [&](const std::string& name, const Phase& p) {
        t.Row({name, std::to_string(p.tick_ms.size()), pct(p.tick_ms, 0.5), pct(p.tick_ms, 0.99),
               std::to_string(p.publish_ms.size()), pct(p.publish_ms, 0.5),
               p.publish_ms.empty() ? "-" : Fmt(p.publish_ms.back(), 3),
               Fmt(p.requests / p.seconds, 0)});
      };
      row("not polled", quiet);
      row(fmt::format("{} pollers", o->pollers), busy);
      printf(
          "coordinator with %d nodes, %d jobs of 2 nodes each; tick = Coordinator::Tick (its "
          "scheduling pass and timers); snapshot = the dashboard's publication on the reactor "
          "(at most every 250 ms); pollers fetch /api/jobs and /metrics back to back\n",
          o->nodes, o->jobs);
      t.Print();
      reactor.Stop();
      server->reset();
      coord->reset();
      fs::remove_all(dir);
      return 0;
    };
  });
}

}  // namespace muster::bench
