#include "coordinator/providers/provider_ledger.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

namespace muster::coordinator::providers {

std::string EncodeLedger(const std::vector<LedgerEntry>& entries) {
  nlohmann::json all = nlohmann::json::array();
  for (const auto& e : entries) {
    all.push_back({{"key", e.key}, {"request", e.request}, {"nodes", e.nodes}});
  }
  return all.dump();
}

StatusOr<std::vector<LedgerEntry>> DecodeLedger(const std::string& text) {
  std::vector<LedgerEntry> out;
  try {
    for (const auto& j : nlohmann::json::parse(text)) {
      LedgerEntry e;
      e.key = j.at("key").get<std::string>();
      e.request = j.at("request").get<uint64_t>();
      e.nodes = j.at("nodes").get<std::vector<std::string>>();
      if (e.key.empty()) return DataLossError("provider ledger: an entry has an empty key");
      out.push_back(std::move(e));
    }
  } catch (const nlohmann::json::exception& e) {
    return DataLossError(fmt::format("provider ledger does not parse: {}", e.what()));
  }
  return out;
}

}  // namespace muster::coordinator::providers
