#include "common/key_scope.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace muster {

namespace {

Status CheckValue(std::string_view what, const std::string& value) {
  if (value.empty() || value.size() > 253 ||
      value.find_first_of(" \t\r\n,#") != std::string::npos) {
    return InvalidArgumentError(fmt::format(
        "key scope: {} '{}' must be 1-253 characters without whitespace, ',' or '#'", what, value));
  }
  return Status::Ok();
}

std::vector<std::string> SplitCommas(std::string_view s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t comma = s.find(',', start);
    out.emplace_back(s.substr(start, comma == std::string_view::npos ? s.npos : comma - start));
    if (comma == std::string_view::npos) return out;
    start = comma + 1;
  }
}

}  // namespace

std::string KeyScope::LineWords() const {
  std::vector<std::string> words;
  if (!nodes.empty()) words.push_back(fmt::format("nodes={}", fmt::join(nodes, ",")));
  if (!provider.empty()) words.push_back("provider=" + provider);
  if (!island.empty()) words.push_back("island=" + island);
  return fmt::format("{}", fmt::join(words, " "));
}

std::string KeyScope::ToString() const { return empty() ? "unscoped" : LineWords(); }

Status ValidateKeyScope(const KeyScope& scope) {
  for (const auto& n : scope.nodes) MUSTER_RETURN_IF_ERROR(CheckValue("node name", n));
  for (size_t i = 0; i < scope.nodes.size(); ++i) {
    if (std::find(scope.nodes.begin(), scope.nodes.begin() + i, scope.nodes[i]) !=
        scope.nodes.begin() + i) {
      return InvalidArgumentError("key scope: node '" + scope.nodes[i] + "' listed twice");
    }
  }
  if (!scope.provider.empty()) MUSTER_RETURN_IF_ERROR(CheckValue("provider", scope.provider));
  if (!scope.island.empty()) MUSTER_RETURN_IF_ERROR(CheckValue("island", scope.island));
  return Status::Ok();
}

StatusOr<bool> ParseKeyScopeWord(std::string_view word, KeyScope* scope) {
  auto value_of = [&](std::string_view prefix) -> std::optional<std::string> {
    if (word.substr(0, prefix.size()) != prefix) return std::nullopt;
    return std::string(word.substr(prefix.size()));
  };
  if (auto v = value_of("nodes=")) {
    if (!scope->nodes.empty()) return InvalidArgumentError("key scope: nodes= given twice");
    KeyScope one;
    one.nodes = SplitCommas(*v);
    MUSTER_RETURN_IF_ERROR(ValidateKeyScope(one));
    scope->nodes = std::move(one.nodes);
    return true;
  }
  if (auto v = value_of("provider=")) {
    if (!scope->provider.empty()) return InvalidArgumentError("key scope: provider= given twice");
    MUSTER_RETURN_IF_ERROR(CheckValue("provider", *v));
    scope->provider = *v;
    return true;
  }
  if (auto v = value_of("island=")) {
    if (!scope->island.empty()) return InvalidArgumentError("key scope: island= given twice");
    MUSTER_RETURN_IF_ERROR(CheckValue("island", *v));
    scope->island = *v;
    return true;
  }
  return false;
}

std::optional<std::string> OutsideKeyScope(const KeyScope& scope, const proto::NodeLabels& labels) {
  if (!scope.nodes.empty() &&
      std::find(scope.nodes.begin(), scope.nodes.end(), labels.name()) == scope.nodes.end()) {
    return fmt::format("node name '{}' is outside the key's scope ({})", labels.name(),
                       scope.ToString());
  }
  if (!scope.provider.empty() && labels.provider() != scope.provider) {
    return fmt::format("provider '{}' is outside the key's scope ({})", labels.provider(),
                       scope.ToString());
  }
  if (!scope.island.empty() && labels.island() != scope.island) {
    return fmt::format("island '{}' is outside the key's scope ({})", labels.island(),
                       scope.ToString());
  }
  return std::nullopt;
}

std::optional<std::string> MovesNode(const proto::NodeLabels& known,
                                     const proto::NodeLabels& claim) {
  if (known.provider() == claim.provider() && known.island() == claim.island()) {
    return std::nullopt;
  }
  return fmt::format(
      "node {} is registered with provider '{}' island '{}' and claims provider '{}' island "
      "'{}': a node does not move to another provider or island (give the node another name)",
      known.name(), known.provider(), known.island(), claim.provider(), claim.island());
}

}  // namespace muster
