// muster-snapshot-trainer: a gang "trainer" for recovery tests and `muster-bench recovery` with
// in-memory snapshots. Each step it waits STEP_MS (the step's compute), agrees with every rank
// (one Gloo allreduce: a rank whose peer died stops too, as in a real gang), updates its state (a
// float tensor of STATE_KB KiB whose values are a function of the rank and the step), hands the
// state to its agent every MUSTER_SNAPSHOT_EVERY steps (runtime::JobContext), and prints
// `MUSTER_PROGRESS step=N total=T t=<unix ms>`. Rank 0 commits a small real checkpoint to the
// volume every CKPT_EVERY steps (prints MUSTER_CHECKPOINT step=N).
//
// On start it prints `T_START=<unix ms> resume=<step> source=<fresh|volume|snapshot>`: from the
// in-memory snapshot when the attempt resumes from one (JobContext::RestoreSnapshot; the
// restored values are checked against the step's), else from MUSTER_RESUME_STEP.
//
// Exit codes: 0 done, 2 env, 3 stopped on a notice, 4 no communicator, kPeerFailureExitCode (75)
// a collective failed (a peer is gone),
// 6 a snapshot refused, 7 the snapshot restore failed, 8 restored values are wrong, 9 the
// volume checkpoint failed.

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpointer.h"
#include "checkpoint/snapshot_state.h"
#include "collectives/communicator.h"
#include "common/exit_codes.h"
#include "common/logging.h"
#include "runtime/job_context.h"

namespace {

using namespace muster;

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t EnvInt(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : dflt;
}

float Value(int rank, int64_t step, size_t i) {
  return static_cast<float>(rank * 100000 + step) + static_cast<float>(i % 1024) * 0.5f;
}

void Fill(std::vector<float>& w, int rank, int64_t step) {
  for (size_t i = 0; i < w.size(); ++i) w[i] = Value(rank, step, i);
}

// A small real step on the volume (rank 0 only): a resume from the volume finds it good.
bool Commit(const std::string& dir, int64_t step) {
  checkpoint::CheckpointerOptions o;
  o.dir = dir;
  o.direct_io = false;
  o.io_threads = 1;
  auto ck = checkpoint::Checkpointer::Create(o);
  if (!ck.ok()) return false;
  std::vector<float> w(1024, static_cast<float>(step));
  checkpoint::SaveState s;
  s.tensors.push_back(
      checkpoint::TensorRef::Replicated("w", checkpoint::DType::kF32, {1024}, w.data()));
  if (!(*ck)->Save(step, s).ok() || !(*ck)->Wait().ok()) return false;
  std::printf("MUSTER_CHECKPOINT step=%lld\n", static_cast<long long>(step));
  std::fflush(stdout);
  return true;
}

}  // namespace

int main() {
  if (!log::InitLogging("warn").ok()) return 2;
  auto ctx = runtime::JobContext::FromEnv();
  if (!ctx.ok()) {
    std::fprintf(stderr, "env: %s\n", ctx.status().ToString().c_str());
    return 2;
  }
  runtime::JobContext& c = **ctx;
  const int rank = c.rank();
  const int64_t total = EnvInt("TOTAL", 100);
  const int64_t step_ms = EnvInt("STEP_MS", 50);
  const int64_t ckpt_every = EnvInt("CKPT_EVERY", 10);
  const size_t floats = static_cast<size_t>(EnvInt("STATE_KB", 1024)) * 256;
  std::vector<float> w(floats);
  int64_t s = 0;
  std::string source = "fresh";
  if (c.resume_snapshot_step()) {
    auto restored = c.RestoreSnapshot({checkpoint::RestoreRequest::Whole(
        "w", checkpoint::DType::kF32, w.data(), w.size() * sizeof(float))});
    if (!restored.ok()) {
      std::fprintf(stderr, "snapshot restore: %s\n", restored.status().ToString().c_str());
      return 7;
    }
    s = *restored;
    for (size_t i = 0; i < w.size(); ++i) {
      if (w[i] != Value(rank, s, i)) {
        std::fprintf(stderr, "restored value %zu of step %lld is wrong\n", i,
                     static_cast<long long>(s));
        return 8;
      }
    }
    source = "snapshot";
  } else if (c.env().resume_step) {
    s = *c.env().resume_step;
    source = "volume";
    Fill(w, rank, s);
  }
  std::printf("T_START=%lld resume=%lld source=%s\n", static_cast<long long>(UnixMs()),
              static_cast<long long>(s), source.c_str());
  std::fflush(stdout);
  std::unique_ptr<collectives::Communicator> comm;
  if (c.world_size() > 1) {
    collectives::CommConfig cc;
    cc.timeout = std::chrono::milliseconds(10000);
    auto made = c.NewCommunicator(cc);
    if (!made.ok()) {
      std::fprintf(stderr, "communicator: %s\n", made.status().ToString().c_str());
      return 4;
    }
    comm = std::move(*made);
  }
  auto sender = c.NewSnapshotSender();
  // SNAPSHOT_COPY=1: copy each snapshot (SnapshotSender::Snapshot); by default the agent reads
  // it in place (SnapshotInPlace, released before `w` changes).
  const char* copy_env = std::getenv("SNAPSHOT_COPY");
  const bool copy_snapshots = copy_env != nullptr && std::string(copy_env) == "1";
  const int64_t every = c.snapshot_every();
  checkpoint::SaveState state;
  state.tensors.push_back(checkpoint::TensorRef::Replicated(
      "w", checkpoint::DType::kF32, {static_cast<int64_t>(w.size())}, w.data()));
  const std::string preempt = c.env().preempt_file;
  while (s < total) {
    ++s;
    std::this_thread::sleep_for(std::chrono::milliseconds(step_ms));
    if (comm) {
      int32_t one = 1;
      Status st = comm->AllReduce(&one, 1, DType::kI32, collectives::ReduceOp::kSum)->Wait();
      if (!st.ok()) {
        std::fprintf(stderr, "step %lld: %s\n", static_cast<long long>(s), st.ToString().c_str());
        return kPeerFailureExitCode;  // a consequence: the cause is the peer's
      }
    }
    // The last snapshot, read in place by the agent, must be taken before `w` changes.
    if (sender) {
      if (Status st = sender->Release(std::chrono::seconds(10)); !st.ok()) {
        std::fprintf(stderr, "snapshot: %s\n", st.ToString().c_str());
      }
    }
    Fill(w, rank, s);
    if (sender && every > 0 && s % every == 0) {
      if (Status st =
              copy_snapshots ? sender->Snapshot(s, state) : sender->SnapshotInPlace(s, state);
          !st.ok()) {
        std::fprintf(stderr, "snapshot: %s\n", st.ToString().c_str());
        return 6;
      }
    }
    std::printf("MUSTER_PROGRESS step=%lld total=%lld t=%lld\n", static_cast<long long>(s),
                static_cast<long long>(total), static_cast<long long>(UnixMs()));
    std::fflush(stdout);
    if (!preempt.empty() && std::filesystem::exists(preempt)) {
      if (rank == 0 && !Commit(c.env().checkpoint_dir, s)) return 9;
      std::printf("MUSTER_PREEMPTED step=%lld\n", static_cast<long long>(s));
      return 3;
    }
    if (rank == 0 && ckpt_every > 0 && s % ckpt_every == 0 && !c.env().checkpoint_dir.empty() &&
        !Commit(c.env().checkpoint_dir, s)) {
      return 9;
    }
  }
  if (sender) sender->Flush(std::chrono::seconds(10)).IgnoreError();
  return 0;
}
