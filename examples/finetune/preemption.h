#pragma once

// PreemptionNotice: the seam through which the trainer learns that it should checkpoint now and
// stop (a spot node is being reclaimed, a higher-priority job needs the gang). The trainer
// polls Requested() once per step; all ranks agree on the step through the same collective that
// averages the loss, so every rank checkpoints the same step.
//
// LocalNotice covers what a single process can see: SIGTERM (what an agent or `kill` sends)
// and a notice file (what a cloud metadata watcher can touch). The agent's store-based notice
// plugs in behind the same interface.
//
// Thread-safety: Requested() may be called from any thread; Install() once, from main.

#include <filesystem>
#include <memory>
#include <string>

#include "collectives/store.h"

namespace muster::finetune {

class PreemptionNotice {
 public:
  virtual ~PreemptionNotice() = default;
  // True once a notice has arrived; stays true.
  virtual bool Requested() = 0;
  // Why, for the log ("SIGTERM", "notice file /run/x").
  virtual std::string Reason() = 0;
};

class LocalNotice final : public PreemptionNotice {
 public:
  // `notice_file` may be empty (no file is watched).
  explicit LocalNotice(std::filesystem::path notice_file) : file_(std::move(notice_file)) {}
  // Routes SIGTERM to this process's notice flag (async-signal-safe: sets a flag only).
  static void InstallSigtermHandler();

  bool Requested() override;
  std::string Reason() override { return reason_; }

 private:
  std::filesystem::path file_;
  std::string reason_;
};

// StoreNotice: LocalNotice plus the job's rendezvous store, where the node agent sets the key
// `muster/preempt` (the deadline, unix ms) when the gang must checkpoint and stop. Rank 0 asks
// the store once per step, without waiting (one round trip on its own connection, so it never
// queues behind a checkpoint commit); the step's loss allreduce carries the answer to every
// rank.
class StoreNotice final : public PreemptionNotice {
 public:
  // `store` may be null (then only `local` is consulted); not owned.
  StoreNotice(LocalNotice* local, collectives::Store* store) : local_(local), store_(store) {}
  bool Requested() override;
  std::string Reason() override { return reason_.empty() ? local_->Reason() : reason_; }

  static constexpr char kKey[] = "muster/preempt";

 private:
  LocalNotice* local_;
  collectives::Store* store_;
  std::string reason_;
};

}  // namespace muster::finetune
