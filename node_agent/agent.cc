#include "node_agent/agent.h"

#include <unistd.h>

#include <algorithm>
#include <thread>

#include "common/curve.h"
#include "common/logging.h"
#include "common/reactor.h"
#include "coordinator/client.h"
#include "node_agent/assignment_runner.h"
#include "node_agent/coordinator_session.h"
#include "node_agent/lease_watchdog.h"
#include "node_agent/metrics/metrics_server.h"
#include "node_agent/prune_worker.h"
#include "node_agent/rank_reaper.h"
#include "node_agent/replication_worker.h"

#ifdef MUSTER_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

// The agent is the composition of its parts, each in a file of its own:
//   - AssignmentRunner (assignment_runner.h): the ranks, their stores and reports; reactor only.
//   - CoordinatorSession (coordinator_session.h): register, heartbeat, outbox, long poll.
//   - LeaseWatchdog (lease_watchdog.h): stops the ranks when the lease runs out.
//   - ReplicationWorker (replication_worker.h) and PruneWorker (prune_worker.h): checkpoint
//     copies and retention, on threads of their own.
// This file wires them: actions from the session run on the reactor, reports from the runner
// and the workers go to the session's outbox, and Shutdown stops them in order.

namespace muster::node_agent {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int CountGpus() {
#ifdef MUSTER_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------------------------

struct Agent::Impl {
  AgentOptions options;
  proto::NodeLabels labels;  // as completed at Start; immutable after
  std::shared_ptr<spdlog::logger> logger = log::Get("agent");

  // The reactor's ZeroMQ context (declared first: it outlives the reactor). Two I/O threads:
  // on node rank 0 the attempt's rendezvous store does every relay's CURVE handshake on them
  // (512 at 4096 ranks), in parallel instead of on one core (docs/benchmarks.md, relay rounds).
  std::unique_ptr<zmq::context_t> context;
  std::unique_ptr<Reactor> reactor;
  std::unique_ptr<ZapAuthenticator> zap;
  std::unique_ptr<AssignmentRunner> runner;  // reactor thread only
  // Stops the ranks when the lease runs out, whatever the reactor does (lease_watchdog.h).
  std::unique_ptr<LeaseWatchdog> watchdog;
  std::unique_ptr<PruneWorker> pruner;
  std::unique_ptr<ReplicationWorker> replication;
  std::unique_ptr<CoordinatorSession> session;
  std::unique_ptr<NoticeWatcher> watcher;
  NoticeCounter notices;
  std::unique_ptr<AgentMetricsServer> metrics;  // reactor thread; null without --http

  // Every notice, whatever its source, goes through here to the runner.
  void OnNotice(const PreemptionNotice& n) {
    notices.Count(n.source);
    reactor->Post("agent.notice", [this, n] { runner->OnNotice(n); });
  }
  // What /metrics shows now. On the reactor thread.
  AgentMetricsSnapshot CollectMetrics() const {
    AgentMetricsSnapshot s;
    s.time_ms = std::chrono::duration_cast<milliseconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count();
    s.node = labels.name();
    s.provider = labels.provider();
    s.ranks = runner->RankMetricsNow();
    s.copies = replication->CopiesInFlight();
    s.notices = notices.Get();
    if (SnapshotStore* ss = runner->snapshots()) {
      s.snapshots = true;
      s.snapshot_used = ss->used_bytes();
      s.snapshot_reserved = ss->reserved_bytes();
      s.snapshot_limit = ss->memory_limit();
      if (SnapshotForwarder* fwd = runner->snapshot_forwarder()) {
        s.snapshot_offered = fwd->offered_bytes();
        s.snapshot_offered_sent = fwd->offered_bytes_sent();
      }
    }
    return s;
  }
};

Agent::Agent(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusOr<std::unique_ptr<Agent>> Agent::Start(AgentOptions options) {
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  Impl* p = impl.get();
  m.options = options;
  proto::NodeLabels labels = options.labels;
  if (labels.name().empty()) {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    labels.set_name(host);
  }
  if (labels.provider().empty()) return InvalidArgumentError("--provider is required");
  if (options.work_dir.empty()) return InvalidArgumentError("no work directory");
  if (!options.http.empty()) {  // checked before anything starts; bound once the reactor runs
    MUSTER_ASSIGN_OR_RETURN(auto hp, http::ParseListen(options.http));
    if (!http::IsLoopbackHost(hp.first) && options.http_token.empty()) {
      return FailedPreconditionError(
          "--http " + options.http +
          " is not a loopback address: the agent's /metrics then needs the bearer token that "
          "`muster keys init` writes to <keys>/http_token");
    }
  }
  std::error_code ec;
  fs::create_directories(options.work_dir / "logs", ec);
  if (ec) return ErrnoStatus(ec.value(), "work directory " + options.work_dir.string());
  KillLeftoverRanks(options.work_dir / "ranks.pids", m.logger);
  if (!options.rank_reaper_bin.empty()) {
    MUSTER_RETURN_IF_ERROR(
        StartRankReaper(options.rank_reaper_bin, options.work_dir / "ranks.pids"));
  }
  for (const auto& v : labels.volumes()) {
    if (!fs::is_directory(v.path(), ec)) {
      return InvalidArgumentError("volume " + v.name() + ": " + v.path() + " is not a directory");
    }
  }
  coordinator::ClientOptions co;
  co.endpoint = options.coordinator;
  co.keys_dir = options.keys_dir;
  co.key_file = !options.key_file.empty()
                    ? options.key_file
                    : KeysDir::Resolve(options.keys_dir).agent_key_or_client_key().string();
  co.insecure = options.insecure;
  co.timeout = options.call_timeout;
  MUSTER_ASSIGN_OR_RETURN(auto ctl, coordinator::CoordinatorClient::Connect(co));
  MUSTER_ASSIGN_OR_RETURN(auto poll, coordinator::CoordinatorClient::Connect(co));
  if (labels.address().empty()) labels.set_address(LocalAddressFor(ctl->endpoint()));

  m.context = std::make_unique<zmq::context_t>(/*io_threads=*/2);
  m.reactor = std::make_unique<Reactor>("agent", m.context.get());
  if (!options.insecure) {
    MUSTER_ASSIGN_OR_RETURN(m.zap, ZapAuthenticator::Create(*m.reactor));
  }
  // What the runner and the workers produce goes to the session's outbox, copies to the
  // replication worker, retention to the pruner, rank groups to the watchdog. All of these
  // exist before the first rank or report can.
  AssignmentRunner::Options ro;
  ro.work_dir = options.work_dir;
  ro.insecure = options.insecure;
  ro.stop_grace = options.stop_grace;
  ro.rank_log_max_bytes = options.rank_log_max_bytes;
  ro.rank_log_keep = options.rank_log_keep;
  ro.preflight_timeout = options.preflight_timeout;
  ro.preflight_probe_timeout = options.preflight_probe_timeout;
  ro.snapshot_memory = options.snapshot_memory;
  ro.snapshot_cpu = options.snapshot_cpu;
  AssignmentRunner::Outputs out;
  out.report = [p](proto::AgentReport r) { p->session->QueueReport(std::move(r)); };
  out.send = [p](proto::Envelope e) { p->session->Queue(std::move(e)); };
  out.prune = [p](const std::string& dir, int keep) { p->pruner->Queue(dir, keep); };
  out.replicate = [p](const proto::ReplicateCheckpoint& r) { p->replication->Offer(r); };
  out.guard = [p](pid_t pgid, const std::string& label) { p->watchdog->AddGroup(pgid, label); };
  out.unguard = [p](pid_t pgid) { p->watchdog->RemoveGroup(pgid); };
  MUSTER_ASSIGN_OR_RETURN(m.runner, AssignmentRunner::Create(*m.reactor, m.zap.get(), labels,
                                                             std::move(ro), std::move(out)));
  m.labels = m.runner->labels();  // with the volume server's transfer endpoint and key
  m.watchdog = std::make_unique<LeaseWatchdog>(options.stop_grace, [p](milliseconds silent) {
    // The runner is gone once the agent is torn down (Shutdown resets it before the watchdog).
    p->reactor->Post("agent.lease_expired", [p, silent] {
      if (p->runner) p->runner->OnLeaseExpired(silent);
    });
  });
  m.pruner = std::make_unique<PruneWorker>();
  ReplicationWorker::Outputs rout;
  rout.report = [p](proto::AgentReport r) { p->session->QueueReport(std::move(r)); };
  rout.prune = [p](const std::string& dir, int keep) { p->pruner->Queue(dir, keep); };
  m.replication = std::make_unique<ReplicationWorker>(m.labels, options.insecure, std::move(rout));
  CoordinatorSession::Delegate d;
  d.running = [p] {
    return p->reactor->Call("agent.running", [p] { return p->runner->Running(); });
  };
  d.snapshot = [p] {
    return p->reactor->Call("agent.snapshot", [p] {
      auto progress = p->runner->TakeProgress();
      return std::make_pair(p->runner->Running(), std::move(progress));
    });
  };
  d.return_progress = [p](CoordinatorSession::ProgressMap progress) {
    p->reactor->Post("agent.progress_back", [p, progress = std::move(progress)]() mutable {
      p->runner->ReturnProgress(std::move(progress));
    });
  };
  d.snapshots_held = [p] { return p->runner->SnapshotsHeld(); };
  d.on_fatal = options.on_fatal;
  d.on_action = [p](const proto::AgentAction& a) {
    p->reactor->Post("agent.action", [p, a] { p->runner->OnAction(a); });
  };
  m.session =
      std::make_unique<CoordinatorSession>(std::move(ctl), std::move(poll), m.labels,
                                           options.call_timeout, m.watchdog.get(), std::move(d));
  m.reactor->Start();
  if (!options.http.empty()) {
    AgentMetricsOptions mo;
    mo.listen = options.http;
    mo.token = options.http_token;
    auto metrics = m.reactor->Call("agent.metrics_start", [&] {
      return AgentMetricsServer::Start(*m.reactor, mo, [p] { return p->CollectMetrics(); });
    });
    if (!metrics.ok()) {
      m.reactor->Call("agent.teardown", [&] { m.runner.reset(); });
      m.reactor->Stop();
      return metrics.status();
    }
    m.metrics = std::move(*metrics);
  }

  std::vector<std::unique_ptr<NoticeSource>> sources;
  if (!options.preempt_file.empty()) {
    sources.push_back(NewNoticeFileSource(options.preempt_file, options.default_notice));
  }
  if (!options.aws_metadata.empty()) {
    sources.push_back(NewAwsSpotSource(options.aws_metadata, milliseconds(1000)));
  }
  if (!options.gcp_metadata.empty()) {
    sources.push_back(NewGcpPreemptedSource(options.gcp_metadata, milliseconds(1000)));
  }
  if (!sources.empty()) {
    m.watcher = std::make_unique<NoticeWatcher>(std::move(sources), options.notice_interval,
                                                [p](const PreemptionNotice& n) { p->OnNotice(n); });
    m.watcher->Start();
  }
  m.session->Start();
  m.logger->info("agent {} (provider {}, address {}) connecting to {}", m.labels.name(),
                 m.labels.provider(), m.labels.address(), m.session->endpoint());
  return std::unique_ptr<Agent>(new Agent(std::move(impl)));
}

void Agent::Notice(const PreemptionNotice& notice) { impl_->OnNotice(notice); }

bool Agent::WaitIdle(std::chrono::milliseconds timeout) {
  auto until = Clock::now() + timeout;
  for (;;) {
    bool idle = impl_->reactor->Call("agent.idle", [this] { return impl_->runner->Idle(); });
    if (idle) {
      // Let the control thread send the exits.
      impl_->session->WaitSent(std::min(until, Clock::now() + milliseconds(2000)));
      return true;
    }
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(milliseconds(50));
  }
}

void Agent::Shutdown(std::chrono::milliseconds grace) {
  Impl& m = *impl_;
  if (m.session->stopping()) return;
  if (m.watcher) m.watcher->Stop();
  m.reactor->Call("agent.shutdown", [&] { m.runner->StopAll(grace); });
  WaitIdle(grace + milliseconds(3000));
  m.replication->RequestStop();
  m.session->RequestStop();  // ends the long poll now; the control thread sends what it can
  m.replication->Stop();
  m.pruner->Stop();
  m.session->Join();
  m.reactor->Call("agent.teardown", [&] {
    if (m.metrics) m.metrics->Stop();
    m.runner.reset();
  });
  m.metrics.reset();
  m.watchdog.reset();
  m.reactor->Stop();
  m.zap.reset();
  m.logger->info("agent {} stopped", m.labels.name());
}

Agent::~Agent() { Shutdown(impl_->options.stop_grace); }

const proto::NodeLabels& Agent::labels() const { return impl_->labels; }

void Agent::RunOnReactorForTesting(std::function<void()> f) {
  impl_->reactor->Post("agent.test", std::move(f));
}

std::string Agent::metrics_url() const { return impl_->metrics ? impl_->metrics->url() : ""; }

bool Agent::registered() const { return !impl_->session->session().empty(); }

}  // namespace muster::node_agent
