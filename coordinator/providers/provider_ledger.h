#pragma once

// ProviderLedger: where a provider records, durably, what it holds outside this process (the
// Slurm jobs it submitted, and those it is about to submit), so that the next coordinator on the
// same data dir can adopt what is still wanted and give back the rest. The coordinator keeps it
// in its database (CoordinatorDb state "provider_ledger/<provider>", written through its
// durable-write latch: a failed write refuses every change after it).
//
// An entry is one thing held: `key` names it to the provider (a Slurm job id, or "name:<job
// name>" for an sbatch not yet answered), `request` is the NodeGroupRequest it was made for,
// `nodes` the names its nodes register with.
//
// Thread-safety: the coordinator's reactor thread only.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"

namespace muster::coordinator::providers {

struct LedgerEntry {
  std::string key;
  uint64_t request = 0;
  std::vector<std::string> nodes;
  bool operator==(const LedgerEntry&) const = default;
};

class ProviderLedger {
 public:
  virtual ~ProviderLedger() = default;
  // Replaces `provider`'s entries; durable when it returns Ok.
  virtual Status Save(const std::string& provider, const std::vector<LedgerEntry>& entries) = 0;
  // `provider`'s entries (empty: none saved). DataLoss when they do not parse.
  virtual StatusOr<std::vector<LedgerEntry>> Load(const std::string& provider) = 0;
};

// The entries as one JSON document, and back (DataLoss naming what does not parse).
std::string EncodeLedger(const std::vector<LedgerEntry>& entries);
StatusOr<std::vector<LedgerEntry>> DecodeLedger(const std::string& text);

// A ledger in memory (tests; a coordinator restart is a new provider over the same ledger).
class MemoryProviderLedger : public ProviderLedger {
 public:
  Status Save(const std::string& provider, const std::vector<LedgerEntry>& entries) override {
    saved_[provider] = EncodeLedger(entries);
    ++saves_;
    return Status::Ok();
  }
  StatusOr<std::vector<LedgerEntry>> Load(const std::string& provider) override {
    auto it = saved_.find(provider);
    if (it == saved_.end()) return std::vector<LedgerEntry>{};
    return DecodeLedger(it->second);
  }
  int saves() const { return saves_; }

 private:
  std::map<std::string, std::string> saved_;
  int saves_ = 0;
};

}  // namespace muster::coordinator::providers
