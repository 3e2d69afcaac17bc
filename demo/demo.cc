#include "demo/demo.h"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "common/curve.h"
#include "common/logging.h"
#include "coordinator/client.h"
#include "coordinator/http/dashboard_server.h"
#include "coordinator/server.h"
#include "demo/loss_plot.h"
#include "node_agent/agent.h"

namespace muster::demo {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

struct Style {
  bool on = false;
  std::string bold(const std::string& s) const { return on ? "\033[1m" + s + "\033[0m" : s; }
  std::string dim(const std::string& s) const { return on ? "\033[2m" + s + "\033[0m" : s; }
  std::string red(const std::string& s) const { return on ? "\033[31m" + s + "\033[0m" : s; }
  std::string green(const std::string& s) const { return on ? "\033[32m" + s + "\033[0m" : s; }
  std::string yellow(const std::string& s) const { return on ? "\033[33m" + s + "\033[0m" : s; }
};

std::string FindFinetune(const std::string& given) {
  if (!given.empty()) return given;
  std::error_code ec;
  fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path p : {self.parent_path().parent_path() / "examples/finetune/muster-finetune",
                       self.parent_path() / "muster-finetune"}) {
      if (fs::exists(p, ec)) return p.string();
    }
  }
  return "";
}

struct Series {
  int attempt = 0;
  std::string provider;
  std::vector<std::pair<int64_t, double>> points;
  std::optional<int64_t> preempted_at, resumed_from;
  std::string digest;
};

// Reads the progress, preemption and completion lines of one rank-0 log.
void ParseRankLog(const std::string& text, Series* s) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (auto p = node_agent::ParseProgressLine(line)) {
      s->points.emplace_back(p->step(), p->loss());
    } else if (line.rfind("MUSTER_PREEMPTED step=", 0) == 0) {
      s->preempted_at = std::atoll(line.c_str() + 22);
    } else if (line.rfind("MUSTER_DONE ", 0) == 0) {
      auto at = line.find("param_digest=");
      if (at != std::string::npos) s->digest = line.substr(at + 13);
    }
  }
}

}  // namespace

int RunDemo(const DemoOptions& o, std::ostream& out) {
  Style st;
  st.on = ::isatty(1) == 1;
  auto t0 = Clock::now();
  auto elapsed = [&] {
    return fmt::format("{:6.1f}s", std::chrono::duration<double>(Clock::now() - t0).count());
  };
  auto say = [&](const std::string& s) { out << "\n" << st.bold("== " + s) << std::endl; };
  auto fail = [&](const std::string& why) {
    out << st.red("demo failed: " + why) << std::endl;
    return 1;
  };

  std::string ft = FindFinetune(o.finetune);
  if (ft.empty()) {
    return fail(
        "muster-finetune was not found next to muster (was libtorch found at build "
        "time?); pass --finetune PATH");
  }
  std::error_code ec;
  fs::remove_all(o.work_dir, ec);
  fs::create_directories(o.work_dir, ec);
  if (ec) return fail("work dir " + o.work_dir.string() + ": " + ec.message());
  fs::path work = fs::absolute(o.work_dir);
  // The coordinator, the agents and the ranks all log; keep the terminal for the story.
  if (std::getenv("MUSTER_LOG_LEVEL") == nullptr) log::InitLogging("error").IgnoreError();

  say("1. a coordinator and four node agents on two simulated providers (loopback, CURVE)");
  KeysDir keys{work / "keys"};
  if (auto s = InitKeysDir(keys, true); !s.ok()) return fail(s.ToString());
  coordinator::ServerOptions so;
  so.data_dir = work / "coordinator";
  so.listen = "tcp://127.0.0.1:*";
  so.keys_dir = keys.dir.string();
  so.coordinator.heartbeat_interval = milliseconds(500);
  so.coordinator.heartbeat_timeout = milliseconds(3000);
  so.coordinator.lease = milliseconds(4500);
  so.coordinator.stop_grace = milliseconds(5000);
  std::string dashboard;
  if (!o.http.empty()) {
    coordinator::http::HttpOptions ho;
    ho.listen = o.http;
    so.extensions.push_back(coordinator::http::DashboardServer::Factory(
        ho, [&dashboard](const std::string& url) { dashboard = url; }));
  }
  auto server = coordinator::CoordinatorServer::Start(so);
  if (!server.ok()) return fail("coordinator: " + server.status().ToString());
  out << "  coordinator  " << (*server)->endpoint() << "  (state in " << so.data_dir.string()
      << "/coordinator.db)\n";
  if (!dashboard.empty()) out << "  dashboard    " << st.bold(dashboard) << std::endl;

  struct NodeSpec {
    std::string name, provider, region;
  };
  std::vector<NodeSpec> specs = {{"aws-1", "aws", "us-east-1"},
                                 {"aws-2", "aws", "us-east-1"},
                                 {"gcp-1", "gcp", "us-central1"},
                                 {"gcp-2", "gcp", "us-central1"}};
  std::vector<std::unique_ptr<node_agent::Agent>> agents;
  for (const auto& n : specs) {
    node_agent::AgentOptions ao;
    ao.coordinator = (*server)->endpoint();
    ao.keys_dir = keys.dir.string();
    ao.labels.set_name(n.name);
    ao.labels.set_provider(n.provider);
    ao.labels.set_region(n.region);
    ao.labels.set_island(n.region + "a");
    ao.labels.set_gpus(0);
    ao.labels.set_slots(2);
    ao.labels.set_address("127.0.0.1");
    fs::path vol = work / "volumes" / n.provider;
    fs::create_directories(vol, ec);
    auto* v = ao.labels.add_volumes();
    v->set_name("ckpt");
    v->set_path(vol.string());
    ao.work_dir = work / "agents" / n.name;
    ao.stop_grace = milliseconds(3000);
    auto a = node_agent::Agent::Start(ao);
    if (!a.ok()) return fail("agent " + n.name + ": " + a.status().ToString());
    agents.push_back(std::move(*a));
    out << "  agent        " << n.name << "  provider " << n.provider << ", region " << n.region
        << ", 2 slots, volume ckpt -> " << vol.string() << "\n";
  }
  coordinator::ClientOptions co;
  co.endpoint = (*server)->endpoint();
  co.keys_dir = keys.dir.string();
  auto client = coordinator::CoordinatorClient::Connect(co);
  if (!client.ok()) return fail(client.status().ToString());
  auto& c = **client;
  for (auto until = Clock::now() + std::chrono::seconds(20);;) {
    auto nodes = c.Nodes();
    int up = 0;
    if (nodes.ok()) {
      for (const auto& n : nodes->nodes()) up += n.state() == proto::NODE_UP;
    }
    if (up == static_cast<int>(specs.size())) break;
    if (Clock::now() > until) return fail("the agents did not register within 20 s");
    std::this_thread::sleep_for(milliseconds(100));
  }
  out << "  " << specs.size() << " nodes registered\n";

  say("2. submit the C++ fine-tune: 2 nodes x 2 ranks, checkpoints to volume ckpt");
  std::string yaml = fmt::format(
      "name: finetune\n"
      "command: [\"{}\", \"--pretrain\", \"--steps\", \"{}\", \"--ckpt-every\", \"{}\",\n"
      "          \"--log-every\", \"5\", \"--threads\", \"{}\", \"--deterministic\"]\n"
      "nodes: 2\n"
      "ranks_per_node: 2\n"
      "placement:\n"
      "  providers: [aws, gcp]\n"
      "checkpoint:\n"
      "  volume: ckpt\n"
      "  every: {}\n"
      "restart:\n"
      "  max_restarts: 1\n",
      ft, o.steps, o.ckpt_every, o.threads, o.ckpt_every);
  fs::path spec_path = work / "finetune.yaml";
  std::ofstream(spec_path) << yaml;
  out << st.dim(yaml);
  auto job = c.Submit(yaml, spec_path.string());
  if (!job.ok()) return fail("submit: " + job.status().ToString());
  out << "  job " << st.bold(*job) << " submitted\n";

  say("3. timeline (events from the coordinator, progress from rank 0)");
  int64_t after = 0;
  int64_t last_step = -1;
  bool preempted = false;
  std::string preempted_node;
  proto::JobStatus last;
  for (auto until = t0 + std::chrono::seconds(o.timeout_s);;) {
    auto events = c.Events(*job, after);
    if (events.ok()) {
      for (const auto& e : events->events()) {
        after = e.id();
        std::string kind = e.kind();
        std::string shown = fmt::format("{:<20}", kind);
        if (kind == "preempted" || kind == "notice" || kind == "requeued") {
          shown = st.yellow(shown);
        } else if (kind == "resumed" || kind == "succeeded") {
          shown = st.green(shown);
        } else if (kind == "failed" || kind == "rank_failed" || kind == "node_lost") {
          shown = st.red(shown);
        }
        out << "  " << elapsed() << "  " << shown << " "
            << (e.node().empty() ? "" : "[" + e.node() + "] ") << e.message() << "\n";
      }
    }
    auto status = c.Status(*job);
    if (status.ok() && status->jobs_size() == 1) {
      last = status->jobs(0);
      const auto& p = last.progress();
      if (p.step() > 0 && p.step() != last_step && p.step() % 10 == 0) {
        last_step = p.step();
        out << "  " << elapsed() << "  "
            << st.dim(fmt::format("{:<20} step {:>4}/{}  loss {:.3f}  {:.0f} {}  "
                                  "attempt {} on {}",
                                  "progress", p.step(), p.total_steps(), p.loss(), p.throughput(),
                                  p.throughput_unit(), last.attempt(), last.provider()))
            << "\n";
      }
      if (!preempted && last.state() == proto::JOB_RUNNING && p.step() >= o.preempt_at &&
          last.nodes_size() > 0) {
        preempted = true;
        preempted_node = last.nodes(last.nodes_size() - 1);
        out << "  " << elapsed() << "  "
            << st.yellow(fmt::format("{:<20}", ">>> muster node preempt"))
            << fmt::format(" {} --notice {}  (the provider reclaims it in {} s)", preempted_node,
                           o.notice_s, o.notice_s)
            << "\n";
        proto::Envelope req;
        req.mutable_preempt_node_request()->set_node(preempted_node);
        req.mutable_preempt_node_request()->set_notice_ms(static_cast<int64_t>(o.notice_s * 1000));
        auto r = c.Call(std::move(req));
        if (!r.ok()) return fail("preempt: " + r.status().ToString());
      }
      if (last.state() == proto::JOB_SUCCEEDED || last.state() == proto::JOB_FAILED ||
          last.state() == proto::JOB_CANCELLED) {
        break;
      }
    }
    if (Clock::now() > until)
      return fail(fmt::format("the job did not end within {} s", o.timeout_s));
    std::this_thread::sleep_for(milliseconds(200));
  }
  // The last events (the final checkpoint's replication).
  std::this_thread::sleep_for(milliseconds(300));
  if (auto events = c.Events(*job, after); events.ok()) {
    for (const auto& e : events->events()) {
      out << "  " << elapsed() << "  " << fmt::format("{:<20}", e.kind()) << " "
          << (e.node().empty() ? "" : "[" + e.node() + "] ") << e.message() << "\n";
    }
  }

  say("4. the loss curve, from each attempt's rank-0 log (fetched through the coordinator)");
  std::vector<Series> attempts;
  std::map<int, std::string> provider_of;
  if (auto all = c.Events(*job, 0); all.ok()) {
    for (const auto& e : all->events()) {
      int a = 0;
      char prov[64] = {};
      if (e.kind() == "scheduled" &&
          std::sscanf(e.message().c_str(), "attempt %d on provider %63[^:]", &a, prov) == 2) {
        provider_of[a] = prov;
      }
    }
  }
  for (int a = 1; a <= last.attempt(); ++a) {
    Series s;
    s.attempt = a;
    s.provider = provider_of[a];
    std::string text;
    for (int64_t off = 0;;) {
      proto::Envelope req;
      auto* l = req.mutable_logs_request();
      l->set_job_id(*job);
      l->set_rank(0);
      l->set_attempt(a);
      l->set_offset(off);
      l->set_max_bytes(1 << 20);
      auto r = c.Call(std::move(req));
      if (!r.ok()) {
        out << "  attempt " << a << ": no log (" << r.status().message() << ")\n";
        break;
      }
      text += r->logs_reply().data();
      off = r->logs_reply().next_offset();
      if (r->logs_reply().eof() || r->logs_reply().data().empty()) break;
    }
    ParseRankLog(text, &s);
    if (!s.points.empty() && a > 1) s.resumed_from = s.points.front().first - 5;
    attempts.push_back(std::move(s));
  }
  std::vector<LossSeries> series;
  std::vector<PlotMarker> markers;
  for (const auto& s : attempts) {
    series.push_back({fmt::format("attempt {} on {}", s.attempt, s.provider), s.points});
    if (s.preempted_at) {
      markers.push_back({*s.preempted_at, fmt::format("notice: checkpoint at step {} ({})",
                                                      *s.preempted_at, preempted_node)});
    }
  }
  int64_t resume_step = last.resume_step();
  if (last.attempt() > 1 && resume_step >= 0) {
    markers.push_back(
        {resume_step, fmt::format("resumed on {} from step {}", last.provider(), resume_step)});
  }
  fs::path svg = work / "loss.svg";
  std::ofstream(svg) << RenderLossSvg(
      "muster demo: fine-tune preempted on one provider, "
      "resumed on the other",
      series, markers);
  for (const auto& s : attempts) {
    out << fmt::format(
        "  attempt {} on {:<4} {:>3} points, steps {}..{}{}{}\n", s.attempt, s.provider,
        s.points.size(), s.points.empty() ? 0 : s.points.front().first,
        s.points.empty() ? 0 : s.points.back().first,
        s.preempted_at ? fmt::format(", checkpointed step {} on the notice", *s.preempted_at) : "",
        s.digest.empty() || s.preempted_at ? "" : ", final param digest " + s.digest);
  }
  out << "  loss curve: " << st.bold(svg.string()) << "\n";

  say("5. result");
  bool ok = last.state() == proto::JOB_SUCCEEDED;
  std::optional<int64_t> notice_step;
  for (const auto& s : attempts) {
    if (s.preempted_at) notice_step = s.preempted_at;
  }
  out << "  job " << *job << ": " << coordinator::JobStateName(last.state()) << " ("
      << last.detail() << "), attempt " << last.attempt() << " on " << last.provider()
      << ", preemptions " << last.preemptions() << ", restarts " << last.restarts() << "\n";
  if (preempted && notice_step && last.attempt() > 1) {
    int64_t lost = *notice_step - resume_step;
    out << "  checkpointed step " << *notice_step << " on the notice, resumed from step "
        << resume_step << " on " << last.provider() << ": "
        << (lost == 0 ? st.green("0 steps lost") : st.red(fmt::format("{} steps lost", lost)))
        << "\n";
    ok = ok && lost == 0;
  } else {
    out << st.red("  the preemption did not happen as planned") << "\n";
    ok = false;
  }
  out << "  files: " << work.string() << " (coordinator db, agent logs, both volumes)\n";
  out << "  took " << elapsed() << "\n";
  if (!dashboard.empty() && o.wait) {
    out << "\n  the dashboard keeps serving at " << st.bold(dashboard) << "; press Enter to stop"
        << std::endl;
    std::string line;
    std::getline(std::cin, line);  // Enter, or EOF (stdin closed)
  }

  for (auto& a : agents) a->Shutdown(milliseconds(2000));
  agents.clear();
  (*server)->Stop();
  return ok ? 0 : 1;
}

}  // namespace muster::demo
