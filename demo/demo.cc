#include "demo/demo.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
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

  say("1. a coordinator with two on-demand providers (local agents on loopback, CURVE)");
  KeysDir keys{work / "keys"};
  if (auto s = InitKeysDir(keys, true); !s.ok()) return fail(s.ToString());
  // Both providers are `local`: the coordinator starts a `muster agent` process per node when a
  // gang needs one and stops it once it has been idle for idle_timeout_s. Each provider has its
  // own checkpoint volume. The idle timeouts must outlast one thing: the demo reads each
  // attempt's rank-0 log through the coordinator from that attempt's node (the agent keeps it),
  // and it does so as soon as it sees the attempt end (the requeue, or the job's end), one poll
  // (200 ms) later; an idle node is released no earlier than idle_timeout_s after its ranks
  // exited. aws's 10 s and gcp's 5 s leave that read a wide margin and still show the releases.
  for (const char* p : {"aws", "gcp"}) fs::create_directories(work / "volumes" / p, ec);
  fs::path providers_file = work / "providers.yaml";
  std::string providers_yaml = fmt::format(
      "providers:\n"
      "  - name: aws\n"
      "    kind: local\n"
      "    max_nodes: 2\n"
      "    idle_timeout_s: 10\n"
      "    work_dir: {0}/agents\n"
      "    node: {{region: us-east-1, island: us-east-1a, slots: 2, gpus: 0,\n"
      "           volumes: {{ckpt: {0}/volumes/aws}}}}\n"
      "  - name: gcp\n"
      "    kind: local\n"
      "    max_nodes: 3\n"
      "    idle_timeout_s: 5\n"
      "    work_dir: {0}/agents\n"
      "    node: {{region: us-central1, island: us-central1a, slots: 2, gpus: 0,\n"
      "           volumes: {{ckpt: {0}/volumes/gcp}}}}\n",
      work.string());
  std::ofstream(providers_file) << providers_yaml;
  out << st.dim(providers_yaml);
  coordinator::ServerOptions so;
  so.data_dir = work / "coordinator";
  so.listen = "tcp://127.0.0.1:*";
  so.keys_dir = keys.dir.string();
  so.providers_file = providers_file;
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
      << "/coordinator.db); no nodes yet\n";
  if (!dashboard.empty()) out << "  dashboard    " << st.bold(dashboard) << std::endl;
  coordinator::ClientOptions co;
  co.endpoint = (*server)->endpoint();
  co.keys_dir = keys.dir.string();
  auto client = coordinator::CoordinatorClient::Connect(co);
  if (!client.ok()) return fail(client.status().ToString());
  auto& c = **client;

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
  // A checkpoint is copied to another provider's volume only through a node of that provider
  // that is up when the step commits. An evaluation service on gcp keeps one gcp node up
  // beside the fine-tune, so the step checkpointed on the notice reaches gcp's volume.
  std::string eval_yaml =
      "name: eval\n"
      "command: [\"sleep\", \"3600\"]\n"
      "nodes: 1\n"
      "placement:\n"
      "  providers: [gcp]\n";
  auto eval = c.Submit(eval_yaml, (work / "eval.yaml").string());
  if (!eval.ok()) return fail("submit eval: " + eval.status().ToString());
  out << "  job " << st.bold(*eval) << " submitted: an evaluation service on gcp (1 node), "
      << "whose node receives the copies of the fine-tune's checkpoints\n";

  say("3. timeline (events from the coordinator, progress from rank 0)");
  int64_t after = 0;
  int64_t last_step = -1;
  bool preempted = false;
  std::string preempted_node;
  proto::JobStatus last;
  std::vector<std::string> shown_lines;  // what the timeline showed (checked at the end)
  // The events of both jobs and of the providers' nodes (requests, nodes up, releases).
  auto show_events = [&] {
    auto events = c.Events("", after);
    if (!events.ok()) return;
    for (const auto& e : events->events()) {
      after = e.id();
      std::string kind = e.kind();
      bool ours = e.job_id() == *job || e.job_id() == *eval;
      if (!ours && kind != "node_released" && kind != "notice" && kind != "node_lost") continue;
      std::string shown = fmt::format("{:<20}", kind);
      if (kind == "preempted" || kind == "notice" || kind == "requeued") {
        shown = st.yellow(shown);
      } else if (kind == "resumed" || kind == "succeeded") {
        shown = st.green(shown);
      } else if (kind == "failed" || kind == "rank_failed" || kind == "node_lost") {
        shown = st.red(shown);
      }
      std::string job_tag = e.job_id() == *eval ? "(eval) " : "";
      out << "  " << elapsed() << "  " << shown << " " << job_tag
          << (e.node().empty() ? "" : "[" + e.node() + "] ") << e.message() << "\n";
      shown_lines.push_back(kind + " " + e.message());
    }
  };
  // Each attempt's rank-0 log, fetched through the coordinator from the agent of the node
  // that ran rank 0, as soon as the attempt has ended: the node may be released once it has
  // been idle for its provider's idle_timeout_s (see the providers file above).
  std::map<int, std::string> rank0_logs;
  std::map<int, std::string> log_errors;
  auto fetch_log = [&](int a) {
    if (rank0_logs.count(a) || log_errors.count(a)) return;
    std::string text;
    // Read to the end (eof: the rank exited and its output was drained). An attempt ends when
    // its ranks have exited, which can be a moment before the agent has read the last lines
    // they wrote: an empty chunk short of eof is asked again (a while, then what came is kept).
    auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
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
        log_errors[a] = std::string(r.status().message());
        return;
      }
      text += r->logs_reply().data();
      off = r->logs_reply().next_offset();
      if (r->logs_reply().eof()) break;
      if (r->logs_reply().data().empty()) {
        if (std::chrono::steady_clock::now() > give_up) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
    rank0_logs[a] = std::move(text);
  };
  for (auto until = t0 + std::chrono::seconds(o.timeout_s);;) {
    show_events();
    auto status = c.Status(*job);
    if (status.ok() && status->jobs_size() == 1) {
      last = status->jobs(0);
      for (int a = 1; a < last.attempt(); ++a) fetch_log(a);
      if (last.attempt() >= 1 &&
          (last.state() == proto::JOB_REQUEUED || last.state() == proto::JOB_PENDING ||
           last.state() == proto::JOB_SUCCEEDED || last.state() == proto::JOB_FAILED ||
           last.state() == proto::JOB_CANCELLED)) {
        fetch_log(last.attempt());
      }
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
  // The evaluation service is no longer needed: cancel it. Then every node the providers
  // started is idle and goes back once its provider's idle_timeout_s has passed; follow the
  // events (the final checkpoint's replication, the releases) until each node that came up
  // was released.
  if (auto r = c.Cancel(*eval); !r.ok()) return fail("cancel eval: " + r.status().ToString());
  auto count = [&](const std::string& prefix) {
    return std::count_if(shown_lines.begin(), shown_lines.end(),
                         [&](const std::string& l) { return l.rfind(prefix, 0) == 0; });
  };
  for (auto until = Clock::now() + std::chrono::seconds(60);;) {
    show_events();
    if (count("node_up ") > 0 && count("node_released ") >= count("node_up ")) break;
    if (Clock::now() > until) {
      return fail(fmt::format("{} of the {} nodes that came up were released within 60 s",
                              count("node_released "), count("node_up ")));
    }
    std::this_thread::sleep_for(milliseconds(200));
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
    std::string text = rank0_logs.count(a) ? rank0_logs[a] : "";
    if (!rank0_logs.count(a)) {
      out << "  attempt " << a << ": no log (" << (log_errors.count(a) ? log_errors[a] : "not read")
          << ")\n";
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
  auto requests = count("provider_request "), ups = count("node_up "),
       releases = count("node_released ");
  out << fmt::format(
      "  nodes on demand: {} request{} to the providers, {} node{} up, {} released "
      "idle\n",
      requests, requests == 1 ? "" : "s", ups, ups == 1 ? "" : "s", releases);
  ok = ok && requests > 0 && ups > 0 && releases >= ups;
  out << "  files: " << work.string()
      << " (coordinator db, providers.yaml, agent logs, both volumes)\n";
  out << "  took " << elapsed() << "\n";
  if (!dashboard.empty() && o.wait) {
    out << "\n  the dashboard keeps serving at " << st.bold(dashboard) << "; press Enter to stop"
        << std::endl;
    std::string line;
    std::getline(std::cin, line);  // Enter, or EOF (stdin closed)
  }

  (*server)->Stop();
  return ok ? 0 : 1;
}

}  // namespace muster::demo
