#include "launcher/remote_run.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <optional>
#include <string_view>
#include <thread>

#include "common/logging.h"
#include "common/rank_env.h"
#include "coordinator/client.h"
#include "launcher/run_options.h"

namespace muster::launcher {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

void WriteAll(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::write(fd, s.data(), s.size());
    if (n <= 0) return;
    s.remove_prefix(static_cast<size_t>(n));
  }
}

bool Terminal(proto::JobState s) {
  return s == proto::JOB_SUCCEEDED || s == proto::JOB_FAILED || s == proto::JOB_CANCELLED;
}

// The integer right after the first `word` in `detail` ("-?[0-9]+"), if one is there and fits.
// No std::regex: the detail comes off the wire, and libstdc++'s regex recurses per character.
std::optional<int> IntAfter(std::string_view detail, std::string_view word) {
  size_t at = detail.find(word);
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view rest = detail.substr(at + word.size());
  int v = 0;
  auto [end, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), v, 10);
  if (ec != std::errc() || end == rest.data()) return std::nullopt;
  return v;
}

// "rank 3 on aws-1 exited 7" -> 7; "... killed by signal 9" -> 137; else 1. A code outside
// 0..255 (or a signal outside 1..127), which no process exits with, counts as 1.
int ExitCodeOf(const std::string& detail) {
  if (auto code = IntAfter(detail, "exited ")) return *code >= 0 && *code <= 255 ? *code : 1;
  if (auto sig = IntAfter(detail, "killed by signal ")) {
    return *sig > 0 && *sig < 128 ? 128 + *sig : 1;
  }
  if (detail.find("could not start") != std::string::npos &&
      detail.find("not found") != std::string::npos)
    return kExitNotFound;
  return 1;
}

}  // namespace

int RunThroughCoordinator(const RunOptions& options, const RunIo& io) {
  auto fail = [&](const std::string& what, int code) {
    WriteAll(io.stderr_fd, "muster run: " + what + "\n");
    return code;
  };
  // The gang: the same number of ranks on every host, filled in order as mpirun does.
  std::vector<std::string> hosts;
  int rpn = 0;
  if (options.hosts.empty()) {
    rpn = options.np > 0 ? options.np : 1;
  } else {
    int total = 0;
    for (const auto& h : options.hosts) total += h.slots;
    int np = options.np > 0 ? options.np : total;
    if (np > total) {
      return fail("-np " + std::to_string(np) + " is more than the " + std::to_string(total) +
                      " slots of the hosts given",
                  kExitUsage);
    }
    std::vector<int> per;
    for (const auto& h : options.hosts) {
      if (np == 0) break;
      int n = std::min(np, h.slots);
      hosts.push_back(h.host);
      per.push_back(n);
      np -= n;
    }
    for (int n : per) {
      if (n != per[0]) {
        std::string layout;
        for (size_t i = 0; i < per.size(); ++i)
          layout += (i ? "," : "") + hosts[i] + ":" + std::to_string(per[i]);
        return fail(
            "a job through the coordinator is a gang with the same number of ranks on "
            "every node, not " +
                layout + " (adjust -np or the slots)",
            kExitUsage);
      }
    }
    rpn = per[0];
  }
  coordinator::ClientOptions co;
  co.endpoint = options.coordinator;
  co.keys_dir = options.keys_dir;
  co.insecure = options.insecure;
  auto client = coordinator::CoordinatorClient::Connect(co);
  if (!client.ok()) return fail(client.status().message(), kExitUsage);
  auto& c = **client;

  proto::Envelope req;
  auto* spec = req.mutable_submit_request()->mutable_spec();
  spec->set_name(options.job_id.empty() ? "run" : options.job_id);
  for (const auto& a : options.program) spec->add_command(a);
  auto exported = ResolveExports(options.exports, ProcessEnviron());
  if (!exported.ok()) return fail(exported.status().message(), kExitUsage);
  for (const auto& [name, value] : *exported) (*spec->mutable_env())[name] = value;
  spec->set_nodes(hosts.empty() ? 1 : static_cast<int>(hosts.size()));
  spec->set_ranks_per_node(rpn);
  for (const auto& h : hosts) spec->add_hosts(h);
  spec->set_interactive(true);
  spec->set_max_restarts(0);
  spec->set_checkpoint_keep(3);
  if (options.timeout)
    spec->set_time_limit_s(std::max<int64_t>(1, options.timeout->count() / 1000));
  auto submitted = c.Call(std::move(req));
  if (!submitted.ok()) return fail(submitted.status().message(), kExitUsage);
  const std::string job = submitted->submit_reply().job_id();
  const int world = spec->nodes() * rpn;
  log::Get("launcher")
      ->debug("job {} submitted to {}: {} rank(s) on {}", job, c.endpoint(), world,
              hosts.empty() ? std::string("any node")
                            : options.hosts[0].host + (hosts.size() > 1 ? ",..." : ""));

  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGHUP);
  sigset_t old;
  pthread_sigmask(SIG_BLOCK, &sigs, &old);

  // Each rank's stdout and stderr, read from the agents' logs of each stream alone and written
  // to ours, as a local `muster run` does with its ranks' pipes.
  constexpr proto::LogStream kStreams[2] = {proto::LOG_STDOUT, proto::LOG_STDERR};
  const int fds[2] = {io.stdout_fd, io.stderr_fd};
  std::vector<int64_t> offset(2 * world, 0);
  std::vector<uint64_t> generation(2 * world, 0);
  std::vector<std::string> partial(2 * world);
  std::vector<bool> eof(2 * world, false);
  int seen_attempt = 0;
  auto emit = [&](int rank, int stream, std::string_view line) {
    std::string out = options.tag_output ? "[" + std::to_string(rank) + "]" : "";
    out += line;
    out += '\n';
    WriteAll(fds[stream], out);
  };
  auto pump = [&](int attempt) {
    for (int r = 0; r < world; ++r) {
      for (int s = 0; s < 2; ++s) {
        const int i = 2 * r + s;
        if (eof[i]) continue;
        auto reply = c.Logs(job, r, offset[i], 1 << 20, attempt, kStreams[s], generation[i]);
        if (!reply.ok()) continue;  // not started yet, or its node is away: try again later
        if (reply->skipped()) {
          emit(r, 1, "muster run: some output of this rank was rotated away on its node before "
                     "it was read");
        }
        offset[i] = reply->next_offset();
        generation[i] = reply->generation();
        partial[i] += reply->data();
        size_t start = 0;
        for (size_t nl; (nl = partial[i].find('\n', start)) != std::string::npos; start = nl + 1) {
          emit(r, s, std::string_view(partial[i]).substr(start, nl - start));
        }
        partial[i].erase(0, start);
        if (reply->eof()) {
          if (!partial[i].empty()) emit(r, s, partial[i]);
          partial[i].clear();
          eof[i] = true;
        }
      }
    }
  };

  int signal_code = 0;
  bool timed_out = false;
  auto started = Clock::now();
  proto::JobStatus last;
  for (;;) {
    auto st = c.Status(job);
    if (st.ok() && st->jobs_size() == 1) {
      last = st->jobs(0);
      if (last.attempt() > 0 && last.attempt() != seen_attempt) {
        if (seen_attempt > 0) {
          WriteAll(io.stderr_fd, "muster run: job " + job + " attempt " +
                                     std::to_string(seen_attempt) + " ended; attempt " +
                                     std::to_string(last.attempt()) + " starts over\n");
        }
        seen_attempt = last.attempt();  // a fresh attempt: its logs start over
        std::fill(offset.begin(), offset.end(), 0);
        std::fill(generation.begin(), generation.end(), 0);
        std::fill(eof.begin(), eof.end(), false);
        for (auto& p : partial) p.clear();
      }
      if (seen_attempt > 0) pump(seen_attempt);
      if (Terminal(last.state())) break;
    }
    if (options.timeout && !timed_out && Clock::now() - started > *options.timeout) {
      timed_out = true;
      WriteAll(io.stderr_fd, "muster run: --timeout reached: cancelling job " + job + "\n");
      (void)c.Cancel(job);
    }
    timespec wait{0, 200 * 1000 * 1000};
    int sig = sigtimedwait(&sigs, nullptr, &wait);
    if (sig > 0 && signal_code == 0) {
      signal_code = 128 + sig;
      WriteAll(io.stderr_fd,
               "muster run: " + std::string(strsignal(sig)) + ": cancelling job " + job + "\n");
      (void)c.Cancel(job);
    }
  }
  // The rest of every rank's output.
  for (int i = 0; i < 20 && seen_attempt > 0; ++i) {
    pump(seen_attempt);
    if (std::all_of(eof.begin(), eof.end(), [](bool b) { return b; })) break;
    std::this_thread::sleep_for(milliseconds(100));
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (signal_code != 0) return signal_code;
  if (timed_out || last.detail() == "time limit") {
    WriteAll(io.stderr_fd,
             "muster run: job " + job + " ran past --timeout " +
                 std::to_string(options.timeout ? options.timeout->count() / 1000 : 0) +
                 " s; its " + std::to_string(world) + " ranks were stopped\n");
    return kExitTimeout;
  }
  if (last.state() == proto::JOB_SUCCEEDED) return 0;
  WriteAll(io.stderr_fd, "muster run: job " + job + " " + coordinator::JobStateName(last.state()) +
                             ": " + last.detail() + "\n");
  return last.state() == proto::JOB_CANCELLED ? 1 : ExitCodeOf(last.detail());
}

}  // namespace muster::launcher
