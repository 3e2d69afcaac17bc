#include "examples/finetune/preemption.h"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <system_error>

namespace muster::finetune {
namespace {
volatile sig_atomic_t g_sigterm = 0;
void OnSigterm(int) { g_sigterm = 1; }
}  // namespace

void LocalNotice::InstallSigtermHandler() {
  struct sigaction sa = {};
  sa.sa_handler = OnSigterm;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
}

bool LocalNotice::Requested() {
  if (!reason_.empty()) return true;
  if (g_sigterm) {
    reason_ = "SIGTERM";
  } else if (!file_.empty()) {
    std::error_code ec;
    if (std::filesystem::exists(file_, ec)) reason_ = "notice file " + file_.string();
  }
  return !reason_.empty();
}

bool StoreNotice::Requested() {
  if (local_->Requested()) return true;
  if (!reason_.empty()) return true;
  if (store_ == nullptr) return false;
  auto v = store_->Get(kKey, std::chrono::milliseconds(0));
  if (v.ok()) reason_ = "store key " + std::string(kKey) + " (deadline " + *v + " unix ms)";
  return !reason_.empty();
}

}  // namespace muster::finetune
