#include "runtime/job_context.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <system_error>

#include "checkpoint/snapshot_state.h"
#include "collectives/rendezvous_client.h"
#include "common/control_channel.h"
#include "common/logging.h"

namespace muster::runtime {
namespace {

volatile sig_atomic_t g_sigterm = 0;
void OnSigterm(int) { g_sigterm = 1; }

// One write(2) per line, so lines of different threads never mix.
Status PrintLine(const std::string& line) {
  std::string l = line + "\n";
  std::string_view rest(l);
  while (!rest.empty()) {
    ssize_t n = ::write(STDOUT_FILENO, rest.data(), rest.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "stdout");
    }
    rest.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<JobContext>> JobContext::FromEnv() {
  MUSTER_ASSIGN_OR_RETURN(RankEnv env, RankEnv::FromProcessEnviron());
  return FromEnv(env);
}

StatusOr<std::unique_ptr<JobContext>> JobContext::FromEnv(const RankEnv& env) {
  std::shared_ptr<collectives::RendezvousStore> store;
  if (env.has_rendezvous()) {
    MUSTER_RETURN_IF_ERROR(env.Validate());
    MUSTER_ASSIGN_OR_RETURN(auto client, collectives::ConnectRendezvous(env));
    store = std::move(client);
  }
  return FromEnv(env, std::move(store));
}

StatusOr<std::unique_ptr<JobContext>> JobContext::FromEnv(
    const RankEnv& env, std::shared_ptr<collectives::RendezvousStore> store) {
  MUSTER_RETURN_IF_ERROR(env.Validate());
  std::unique_ptr<JobContext> ctx(new JobContext(env));
  ctx->store_ = std::move(store);
  log::SetContext(env.job_id, env.node, std::to_string(env.rank));
  return ctx;
}

void JobContext::InstallSigtermHandler() {
  struct sigaction sa = {};
  sa.sa_handler = OnSigterm;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
}

StatusOr<std::unique_ptr<collectives::Communicator>> JobContext::NewCommunicator(
    collectives::CommConfig config, bool want_gpu) const {
  return collectives::Communicator::FromEnv(env_, store_, std::move(config), want_gpu);
}

StatusOr<std::unique_ptr<checkpoint::Checkpointer>> JobContext::NewCheckpointer(
    checkpoint::CheckpointerOptions base) const {
  RankEnv env = env_;
  if (!base.dir.empty()) env.checkpoint_dir = base.dir;
  if (!base.on_commit) {
    // By value: the checkpointer may outlive this context.
    const int fd = env.control_fd;
    base.on_commit = [fd](int64_t step, double seconds) {
      const std::string line = CheckpointLine(step, seconds);
      if (Status s = fd >= 0 ? SendControlLine(fd, line) : PrintLine(line); !s.ok()) {
        log::Get("ckpt.write")->warn("announcing step {}: {}", step, s.ToString());
      }
    };
  }
  return checkpoint::Checkpointer::FromEnv(env, store_.get(), std::move(base));
}

bool JobContext::NoticeSeen() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!notice_reason_.empty()) return true;
  if (g_sigterm) {
    notice_reason_ = "SIGTERM";
  } else if (std::error_code ec;
             !env_.preempt_file.empty() && std::filesystem::exists(env_.preempt_file, ec)) {
    notice_reason_ = "notice file " + env_.preempt_file;
  } else if (store_ && env_.rank == 0) {
    auto v = store_->Get(kPreemptKey, std::chrono::milliseconds(0));
    if (v.ok()) {
      notice_reason_ = "store key " + std::string(kPreemptKey) + " (deadline " + *v + " unix ms)";
    }
  }
  return !notice_reason_.empty();
}

std::string JobContext::NoticeReason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return notice_reason_;
}

StatusOr<bool> JobContext::AgreeToStop(collectives::Communicator& comm) {
  int32_t seen = NoticeSeen() ? 1 : 0;
  auto work = comm.AllReduce(&seen, 1, DType::kI32, collectives::ReduceOp::kMax);
  MUSTER_RETURN_IF_ERROR(work->Wait());
  return seen != 0;
}

Status JobContext::Progress(int64_t step, int64_t total, double loss,
                            const std::vector<std::pair<std::string, double>>& metrics) {
  MUSTER_ASSIGN_OR_RETURN(std::string line, ProgressLine(step, total, loss, metrics));
  if (env_.rank != 0) return Status::Ok();
  return Announce(line);
}

Status JobContext::Announce(const std::string& line) const {
  if (env_.control_fd >= 0) return SendControlLine(env_.control_fd, line);
  return PrintLine(line);
}

std::unique_ptr<checkpoint::SnapshotSender> JobContext::NewSnapshotSender() const {
  if (env_.snapshot_socket.empty() || !env_.snapshot_every) return nullptr;
  return checkpoint::SnapshotSender::Create({.socket_path = env_.snapshot_socket,
                                             .key = {.job = env_.job_id,
                                                     .attempt = env_.attempt,
                                                     .rank = env_.rank,
                                                     .world_size = env_.world_size}});
}

StatusOr<checkpoint::SnapshotFrame> JobContext::FetchSnapshot(int64_t step, int attempt) const {
  if (env_.snapshot_socket.empty()) {
    return FailedPreconditionError(
        "no snapshot socket (MUSTER_SNAPSHOT_SOCKET): the job or the "
        "agent has no in-memory snapshots");
  }
  MUSTER_ASSIGN_OR_RETURN(auto client, checkpoint::SnapshotClient::Connect(env_.snapshot_socket));
  return client->Get({.job = env_.job_id,
                      .attempt = attempt,
                      .rank = env_.rank,
                      .world_size = env_.world_size,
                      .step = step},
                     kMaxSnapshotFetchBytes);
}

StatusOr<int64_t> JobContext::RestoreSnapshot(
    const std::vector<checkpoint::RestoreRequest>& requests, std::string* metadata) const {
  if (!env_.resume_snapshot_step || !env_.resume_snapshot_attempt) {
    return FailedPreconditionError(
        "this attempt does not resume from an in-memory snapshot "
        "(MUSTER_RESUME_SNAPSHOT_STEP unset)");
  }
  const int64_t step = *env_.resume_snapshot_step;
  auto frame = FetchSnapshot(step, static_cast<int>(*env_.resume_snapshot_attempt));
  if (!frame.ok()) {
    return frame.status().WithContext("snapshot of step " + std::to_string(step));
  }
  MUSTER_RETURN_IF_ERROR(
      checkpoint::RestoreSnapshotState(frame->payload, requests, metadata)
          .WithContext("restoring the snapshot of step " + std::to_string(step)));
  return step;
}

}  // namespace muster::runtime
