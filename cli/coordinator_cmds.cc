// `muster coordinator`, `muster submit|status|cancel|nodes|events`,
// `muster node drain|undrain|preempt|forget`: argument parsing and printing only; the work is in
// coordinator/ (server.h, client.h).

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cli/commands.h"
#include "common/curve.h"
#include "common/logging.h"
#include "coordinator/client.h"
#include "coordinator/http/dashboard_server.h"
#include "coordinator/server.h"

namespace muster::cli {

namespace {

using coordinator::ClientOptions;
using coordinator::CoordinatorClient;
using coordinator::JobStateName;
using coordinator::NodeStateText;

void AddClientFlags(CLI::App* cmd, std::shared_ptr<ClientOptions> o) {
  cmd->add_option("--coordinator", o->endpoint,
                  "Coordinator endpoint, tcp://HOST:PORT (default: $MUSTER_COORDINATOR)");
  cmd->add_option("--keys", o->keys_dir, "Keys directory (default: $MUSTER_KEYS, else ~/.muster)");
  cmd->add_flag("--insecure", o->insecure,
                "Connect without CURVE (only to an --insecure coordinator)");
}

int Fail(const std::string& what, const Status& st) {
  std::cerr << "muster " << what << ": " << st.message() << "\n";
  return st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kFailedPrecondition
             ? 2
             : 1;
}

std::unique_ptr<CoordinatorClient> ConnectOrPrint(const std::string& what, const ClientOptions& o,
                                                  int* rc) {
  auto c = CoordinatorClient::Connect(o);
  if (!c.ok()) {
    *rc = Fail(what, c.status());
    return nullptr;
  }
  return std::move(*c);
}

// A subcommand `name` of `parent` that talks to the coordinator: its client flags, and, when
// chosen, a runner that connects (a failure printed as `muster WHAT: ...`) and returns what
// `body` returns. The caller adds the subcommand's own options to the result; `body` reads them
// through the shared pointers it captured.
CLI::App* AddClientCommand(CLI::App& parent, Runner* runner, const std::string& name,
                           const std::string& help, const std::string& what,
                           std::function<int(CoordinatorClient&)> body) {
  auto* cmd = parent.add_subcommand(name, help);
  auto o = std::make_shared<ClientOptions>();
  AddClientFlags(cmd, o);
  cmd->callback([=] {
    *runner = [=] {
      int rc = 0;
      auto c = ConnectOrPrint(what, *o, &rc);
      return c ? body(*c) : rc;
    };
  });
  return cmd;
}

std::string Ago(int64_t ms) {
  if (ms <= 0) return "-";
  int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count();
  int64_t s = (now - ms) / 1000;
  if (s < 120) return std::to_string(s) + "s ago";
  if (s < 7200) return std::to_string(s / 60) + "m ago";
  return std::to_string(s / 3600) + "h ago";
}

std::string ProgressBar(const proto::Progress& p) {
  if (p.step() <= 0 && p.total_steps() <= 0) return "";
  std::ostringstream os;
  if (p.total_steps() > 0) {
    int width = 24;
    int filled =
        static_cast<int>(width * std::min<double>(1.0, double(p.step()) / p.total_steps()));
    os << "[" << std::string(filled, '#') << std::string(width - filled, '.') << "] " << p.step()
       << "/" << p.total_steps();
  } else {
    os << "step " << p.step();
  }
  if (p.loss() != 0) os << " loss " << p.loss();
  if (p.throughput() > 0) os << " " << p.throughput() << " " << p.throughput_unit();
  return os.str();
}

nlohmann::json JobJson(const proto::JobStatus& j) {
  nlohmann::json out = {{"job_id", j.job_id()},
                        {"name", j.name()},
                        {"state", JobStateName(j.state())},
                        {"attempt", j.attempt()},
                        {"restarts", j.restarts()},
                        {"preemptions", j.preemptions()},
                        {"nodes", std::vector<std::string>(j.nodes().begin(), j.nodes().end())},
                        {"provider", j.provider()},
                        {"pending_reason", j.pending_reason()},
                        {"detail", j.detail()},
                        {"submitted_ms", j.submitted_ms()},
                        {"resume_step", j.resume_step()},
                        {"spares", std::vector<std::string>(j.spares().begin(), j.spares().end())}};
  if (j.has_progress()) {
    out["progress"] = {{"step", j.progress().step()},
                       {"total_steps", j.progress().total_steps()},
                       {"loss", j.progress().loss()},
                       {"throughput", j.progress().throughput()},
                       {"throughput_unit", j.progress().throughput_unit()}};
  }
  return out;
}

void PrintJob(const proto::JobStatus& j) {
  std::cout << j.job_id() << "  " << JobStateName(j.state());
  if (j.attempt() > 0) std::cout << "  attempt " << j.attempt();
  if (j.nodes_size() > 0) {
    std::cout << "  on " << j.provider() << ":";
    for (int i = 0; i < j.nodes_size(); ++i) std::cout << (i ? "," : "") << j.nodes(i);
  }
  std::cout << "\n";
  if (j.spares_size() > 0) {
    std::cout << "  spares held:";
    for (int i = 0; i < j.spares_size(); ++i) std::cout << (i ? "," : " ") << j.spares(i);
    std::cout << "\n";
  }
  if (!j.pending_reason().empty()) std::cout << "  " << j.pending_reason() << "\n";
  if (j.has_progress() && !ProgressBar(j.progress()).empty())
    std::cout << "  " << ProgressBar(j.progress()) << "\n";
  if (!j.detail().empty()) std::cout << "  " << j.detail() << "\n";
  if (j.restarts() || j.preemptions())
    std::cout << "  restarts " << j.restarts() << ", preemptions " << j.preemptions() << "\n";
}

bool Terminal(proto::JobState s) {
  return s == proto::JOB_SUCCEEDED || s == proto::JOB_FAILED || s == proto::JOB_CANCELLED;
}

}  // namespace

void AddCoordinatorCommands(CLI::App& app, Runner* runner) {
  // muster coordinator
  {
    auto* cmd = app.add_subcommand("coordinator",
                                   "Run the coordinator (job queue, scheduler, node registry)");
    auto o = std::make_shared<coordinator::ServerOptions>();
    auto data_dir = std::make_shared<std::string>();
    auto hb = std::make_shared<int>(1000);
    auto hb_timeout = std::make_shared<int>(5000);
    auto lease = std::make_shared<int>(0);
    auto gone_grace = std::make_shared<int>(0);
    auto port_base = std::make_shared<int>(29500);
    cmd->add_option("--data-dir", *data_dir, "State directory (SQLite database)")->required();
    cmd->add_option("--listen", o->listen, "Endpoint to serve on")->capture_default_str();
    cmd->add_option("--keys", o->keys_dir,
                    "Keys directory with coordinator.key and authorized_keys (default: "
                    "$MUSTER_KEYS, else ~/.muster)");
    cmd->add_flag("--insecure", o->insecure, "Serve without CURVE or authorization (tests only)");
    cmd->add_option("--providers", o->providers_file,
                    "On-demand node providers, a YAML file (docs/providers.md); default: every "
                    "node is static (agents started by hand)");
    cmd->add_option("--heartbeat-interval-ms", *hb, "Agent heartbeat interval")
        ->check(CLI::Range(10, 600000));
    cmd->add_option("--heartbeat-timeout-ms", *hb_timeout,
                    "A node whose heartbeats stop this long is lost")
        ->check(CLI::Range(50, 3600000));
    cmd->add_option("--lease-ms", *lease,
                    "An agent that cannot reach the coordinator this long stops its ranks (no "
                    "split brain); a lost node's job waits lease - heartbeat timeout before it "
                    "is placed again. Default 1.5 x the heartbeat timeout")
        ->check(CLI::Range(0, 3600000));
    cmd->add_option("--agent-gone-grace-ms", *gone_grace,
                    "An agent whose connections all closed (its process ended: kill -9, crash) "
                    "and that does not come back within this is lost at once, with no heartbeat "
                    "timeout and no lease fence (its ranks died with it; a silent node keeps "
                    "both). 0: the heartbeat interval + 200 ms; -1: off")
        ->check(CLI::Range(-1, 600000));
    auto db_flush = std::make_shared<int>(100);
    cmd->add_option("--db-flush-ms", *db_flush,
                    "Sync the state database's log this often, on a thread of its own: a "
                    "coordinator that crashes loses nothing; a host that loses power loses at "
                    "most the changes of the last interval. 0: sync at every change, on the "
                    "thread that answers agents (a slow disk then delays their heartbeats)")
        ->check(CLI::Range(0, 10000))
        ->capture_default_str();
    auto http = std::make_shared<std::string>();
    cmd->add_option("--http", *http,
                    "Serve /metrics, the JSON API and the dashboard page on HOST:PORT (e.g. "
                    "127.0.0.1:8780; port 0: any). Beyond loopback every data request needs the "
                    "bearer token in <keys>/http_token");
    cmd->add_option("--rendezvous-port-base", *port_base,
                    "Jobs get MASTER_PORT in [base, base+500) and their rendezvous store "
                    "MASTER_PORT + 500")
        ->check(CLI::Range(1024, 64535))
        ->capture_default_str();
    auto log_job_mb = std::make_shared<int64_t>(64);
    auto log_total_mb = std::make_shared<int64_t>(2048);
    cmd->add_option("--log-keep-job-mb", *log_job_mb,
                    "Keep each finished attempt's rank logs in <data-dir>/logs, at most this "
                    "many MiB per job (each rank keeps the tail of its share; older attempts "
                    "go first); `muster logs` reads them once the nodes are gone. 0: keep none")
        ->check(CLI::Range(int64_t{0}, int64_t{1} << 20))
        ->capture_default_str();
    cmd->add_option("--log-keep-total-mb", *log_total_mb,
                    "At most this many MiB of kept logs in all: the jobs kept longest ago are "
                    "evicted first")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 30))
        ->capture_default_str();
    cmd->callback([=] {
      *runner = [=] {
        o->keep_logs = *log_job_mb > 0;
        o->coordinator.log_keep.job_bytes = std::max<int64_t>(1, *log_job_mb) << 20;
        o->coordinator.log_keep.total_bytes = *log_total_mb << 20;
        if (*lease != 0 && *lease <= *hb_timeout) {
          std::cerr << "muster coordinator: --lease-ms must exceed --heartbeat-timeout-ms\n";
          return 2;
        }
        o->data_dir = *data_dir;
        o->db_flush = std::chrono::milliseconds(*db_flush);
        o->coordinator.rendezvous_port_base = *port_base;
        o->coordinator.heartbeat_interval = std::chrono::milliseconds(*hb);
        o->coordinator.heartbeat_timeout = std::chrono::milliseconds(*hb_timeout);
        o->agent_gone_grace = std::chrono::milliseconds(*gone_grace);
        o->coordinator.lease =
            std::chrono::milliseconds(*lease != 0 ? *lease : *hb_timeout + *hb_timeout / 2);
        if (!http->empty()) {
          coordinator::http::HttpOptions ho;
          ho.listen = *http;
          auto hp = coordinator::http::ParseListen(*http);
          if (!hp.ok()) return Fail("coordinator", hp.status());
          if (!coordinator::http::IsLoopbackHost(hp->first)) {
            auto token = LoadHttpToken(KeysDir::Resolve(o->keys_dir));
            if (!token.ok()) return Fail("coordinator", token.status());
            ho.token = *token;
          }
          o->extensions.push_back(coordinator::http::DashboardServer::Factory(
              ho,
              [](const std::string& url) { std::cout << "dashboard on " << url << std::endl; }));
        }
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGHUP);
        pthread_sigmask(SIG_BLOCK, &set, nullptr);
        auto server = coordinator::CoordinatorServer::Start(*o);
        if (!server.ok()) return Fail("coordinator", server.status());
        std::cout << "coordinator listening on " << (*server)->endpoint() << std::endl;
        int sig = 0;
        // SIGHUP: re-read authorized_keys now (it is also re-read within 2 s of a change).
        while (sigwait(&set, &sig) == 0 && sig == SIGHUP) (*server)->ReloadKeys();
        log::Get("coord")->info("signal {}: stopping", sig);
        (*server)->Stop();
        return 0;
      };
    });
  }
  // muster submit FILE [--follow]
  {
    auto* cmd = app.add_subcommand("submit", "Submit a job spec (YAML); prints the job id");
    auto o = std::make_shared<ClientOptions>();
    auto file = std::make_shared<std::string>();
    auto follow = std::make_shared<bool>(false);
    cmd->add_option("FILE", *file, "Job spec (docs/job-spec.md)")->required();
    cmd->add_flag("--follow,-f", *follow, "Follow the job until it ends, with its progress");
    AddClientFlags(cmd, o);
    cmd->callback([=] {
      *runner = [=] {
        std::ifstream in(*file);
        if (!in) return Fail("submit", ErrnoStatus(errno, "cannot read " + *file));
        std::stringstream ss;
        ss << in.rdbuf();
        int rc = 0;
        auto c = ConnectOrPrint("submit", *o, &rc);
        if (!c) return rc;
        auto id = c->Submit(ss.str(), *file);
        if (!id.ok()) return Fail("submit", id.status());
        std::cout << *id << std::endl;
        if (!*follow) return 0;
        // On a terminal the progress bar is redrawn in place below the events; into a file or
        // a pipe each new progress line is printed once, on a line of its own.
        const bool tty = ::isatty(STDOUT_FILENO) == 1;
        std::string bar;        // the progress last shown
        bool bar_open = false;  // a bar is drawn on the current terminal line
        int64_t after = 0;
        while (true) {
          auto ev = c->Events(*id, after);
          if (ev.ok()) {
            for (const auto& e : ev->events()) {
              if (bar_open) std::cout << "\r\033[K";
              bar_open = false;
              std::cout << "  " << e.kind() << ": " << e.message() << "\n";
              after = e.id();
            }
          }
          auto st = c->Status(*id);
          if (!st.ok()) return Fail("submit", st.status());
          const auto& j = st->jobs(0);
          std::string now = j.has_progress() ? ProgressBar(j.progress()) : "";
          if (!now.empty() && (now != bar || (tty && !bar_open))) {
            if (tty) {
              std::cout << "\r\033[K  " << now;
              bar_open = true;
            } else {
              std::cout << "  " << now << "\n";
            }
            bar = now;
          }
          std::cout << std::flush;
          if (Terminal(j.state())) {
            if (bar_open) std::cout << "\n";
            std::cout << *id << " " << JobStateName(j.state()) << std::endl;
            return j.state() == proto::JOB_SUCCEEDED ? 0 : 1;
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
        }
      };
    });
  }
  // muster status [JOB] [--json]
  {
    auto job = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    auto* cmd = AddClientCommand(
        app, runner, "status", "Jobs: state, attempt, nodes, pending reason, progress", "status",
        [=](CoordinatorClient& c) {
          auto st = c.Status(*job);
          if (!st.ok()) return Fail("status", st.status());
          if (!st->write_error().empty()) {
            // On stderr with --json, so the JSON on stdout stays what scripts parse.
            (*json ? std::cerr : std::cout)
                << "coordinator: READ-ONLY, refusing every change since a durable write failed: "
                << st->write_error() << "\n";
          }
          if (*json) {
            nlohmann::json out = nlohmann::json::array();
            for (const auto& j : st->jobs()) out.push_back(JobJson(j));
            std::cout << (job->empty() ? out : out[0]).dump(2) << "\n";
            return 0;
          }
          if (st->jobs_size() == 0) std::cout << "no jobs\n";
          for (const auto& j : st->jobs()) PrintJob(j);
          return 0;
        });
    cmd->add_option("JOB", *job, "One job (default: all recent)");
    cmd->add_flag("--json", *json, "Print JSON");
  }
  // muster cancel JOB
  {
    auto job = std::make_shared<std::string>();
    auto* cmd = AddClientCommand(app, runner, "cancel", "Cancel a job (its ranks are stopped)",
                                 "cancel", [=](CoordinatorClient& c) {
                                   auto st = c.Cancel(*job);
                                   if (!st.ok()) return Fail("cancel", st.status());
                                   std::cout << *job << " " << JobStateName(*st) << "\n";
                                   return 0;
                                 });
    cmd->add_option("JOB", *job, "Job id")->required();
  }
  // muster nodes [--json]
  {
    auto json = std::make_shared<bool>(false);
    auto* cmd = AddClientCommand(
        app, runner, "nodes", "Registered nodes: labels, state, job", "nodes",
        [=](CoordinatorClient& c) {
          auto st = c.Nodes();
          if (!st.ok()) return Fail("nodes", st.status());
          if (*json) {
            nlohmann::json out = nlohmann::json::array();
            for (const auto& n : st->nodes()) {
              std::vector<std::string> vols;
              for (const auto& v : n.labels().volumes()) vols.push_back(v.name());
              out.push_back({{"name", n.labels().name()},
                             {"provider", n.labels().provider()},
                             {"region", n.labels().region()},
                             {"island", n.labels().island()},
                             {"gpu_type", n.labels().gpu_type()},
                             {"gpus", n.labels().gpus()},
                             {"slots", n.labels().slots()},
                             {"volumes", vols},
                             {"state", NodeStateText(n.state())},
                             {"job_id", n.job_id()},
                             {"spare", n.spare()},
                             {"last_heartbeat_ms", n.last_heartbeat_ms()},
                             {"quarantines", n.quarantines()}});
            }
            std::cout << out.dump(2) << "\n";
            return 0;
          }
          std::printf("%-20s %-10s %-10s %-10s %-8s %5s %5s %-12s %-16s %s\n", "NODE", "PROVIDER",
                      "REGION", "ISLAND", "GPU", "GPUS", "SLOTS", "STATE", "JOB", "HEARTBEAT");
          for (const auto& n : st->nodes()) {
            const auto& l = n.labels();
            std::printf("%-20s %-10s %-10s %-10s %-8s %5d %5d %-12s %-16s %s\n", l.name().c_str(),
                        l.provider().c_str(), l.region().c_str(), l.island().c_str(),
                        l.gpu_type().c_str(), l.gpus(), l.slots(), NodeStateText(n.state()).c_str(),
                        n.job_id().empty() ? "-"
                        : n.spare()        ? (n.job_id() + " (spare)").c_str()
                                           : n.job_id().c_str(),
                        Ago(n.last_heartbeat_ms()).c_str());
          }
          return 0;
        });
    cmd->add_flag("--json", *json, "Print JSON");
  }
  // muster events JOB
  {
    auto job = std::make_shared<std::string>();
    auto* cmd = AddClientCommand(
        app, runner, "events", "A job's timeline", "events", [=](CoordinatorClient& c) {
          auto ev = c.Events(*job, 0);
          if (!ev.ok()) return Fail("events", ev.status());
          for (const auto& e : ev->events()) {
            std::time_t t = e.time_ms() / 1000;
            char buf[32];
            std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", std::gmtime(&t));
            std::cout << buf << "  " << e.kind() << (e.node().empty() ? "" : " [" + e.node() + "]")
                      << "  " << e.message() << "\n";
          }
          return 0;
        });
    cmd->add_option("JOB", *job, "Job id")->required();
  }
  // muster logs JOB [--rank R] [-f]
  {
    auto job = std::make_shared<std::string>();
    auto rank = std::make_shared<int>(0);
    auto follow = std::make_shared<bool>(false);
    auto attempt = std::make_shared<int>(0);
    auto* cmd =
        AddClientCommand(app, runner, "logs", "A rank's output, fetched from its node's agent",
                         "logs", [=](CoordinatorClient& c) {
                           int64_t offset = 0;
                           uint64_t generation = 0;
                           bool kept = false;
                           while (true) {
                             auto r = c.Logs(*job, *rank, offset, 1 << 20, *attempt,
                                             proto::LOG_MERGED, generation, kept);
                             if (!r.ok()) return Fail("logs", r.status());
                             if (!r->kept_note().empty()) {
                               std::cout << std::flush;
                               std::cerr << "muster logs: " << r->kept_note() << "\n";
                             }
                             kept = r->kept();
                             if (r->skipped()) {
                               std::cout << std::flush;
                               std::cerr << "muster logs: some output of rank " << *rank
                                         << " was rotated away before it was read (the agent keeps "
                                            "--rank-log-keep parts of --rank-log-max-mb each)\n";
                             }
                             std::cout << r->data() << std::flush;
                             offset = r->next_offset();
                             generation = r->generation();
                             if (r->eof() || (!*follow && r->data().empty())) return 0;
                             if (r->data().empty())
                               std::this_thread::sleep_for(std::chrono::milliseconds(500));
                           }
                         });
    cmd->add_option("JOB", *job, "Job id")->required();
    cmd->add_option("--rank,-r", *rank, "Global rank (default 0)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--attempt", *attempt, "Attempt (default: the current or last one)")
        ->check(CLI::NonNegativeNumber);
    cmd->add_flag("--follow,-f", *follow, "Keep printing as the rank writes");
  }
  // muster node drain|undrain|preempt|forget NODE
  {
    auto* node = app.add_subcommand("node", "Node administration");
    node->require_subcommand(1);
    for (bool drain : {true, false}) {
      auto name = std::make_shared<std::string>();
      auto* cmd = AddClientCommand(
          *node, runner, drain ? "drain" : "undrain",
          drain ? "No new work on NODE; running jobs continue" : "NODE accepts work again", "node",
          [=](CoordinatorClient& c) {
            auto st = c.Drain(*name, drain);
            if (!st.ok()) return Fail("node", st.status());
            std::cout << *name << " " << NodeStateText(*st) << "\n";
            return 0;
          });
      cmd->add_option("NODE", *name, "Node name")->required();
    }
    // muster node preempt NODE --notice S: as if the node's provider gave notice.
    {
      auto name = std::make_shared<std::string>();
      auto notice = std::make_shared<double>(30);
      auto* cmd = AddClientCommand(
          *node, runner, "preempt",
          "Give NODE a preemption notice: its jobs checkpoint a common step within the notice, "
          "stop and are requeued (not counted against max_restarts); the node is drained",
          "node", [=](CoordinatorClient& c) {
            proto::Envelope req;
            req.mutable_preempt_node_request()->set_node(*name);
            req.mutable_preempt_node_request()->set_notice_ms(static_cast<int64_t>(*notice * 1000));
            auto r = c.Call(std::move(req));
            if (!r.ok()) return Fail("node preempt", r.status());
            const auto& jobs = r->preempt_node_reply().jobs();
            std::cout << *name << ": notice of " << *notice << " s given; draining";
            if (jobs.empty()) std::cout << "; no job running there";
            for (int i = 0; i < jobs.size(); ++i) {
              std::cout << (i == 0 ? "; checkpointing and stopping: " : ", ") << jobs[i];
            }
            std::cout << "\n";
            return 0;
          });
      cmd->add_option("NODE", *name, "Node name")->required();
      cmd->add_option("--notice", *notice, "Seconds of notice")
          ->check(CLI::Range(0.0, 86400.0))
          ->capture_default_str();
    }
    // muster node forget NODE: drop the record of a node taken out of the pool for good.
    {
      auto name = std::make_shared<std::string>();
      auto* cmd = AddClientCommand(
          *node, runner, "forget",
          "Drop a static NODE's record (an admin key): refused while it is connected, in an "
          "attempt or held as a spare, or holds in-memory snapshots or a checkpoint copy a job "
          "still needs",
          "node", [=](CoordinatorClient& c) {
            proto::Envelope req;
            req.mutable_forget_node_request()->set_node(*name);
            auto r = c.Call(std::move(req));
            if (!r.ok()) return Fail("node forget", r.status());
            std::cout << r->forget_node_reply().node() << " forgotten\n";
            return 0;
          });
      cmd->add_option("NODE", *name, "Node name")->required();
    }
  }
}

}  // namespace muster::cli
