#pragma once

// KeyScope: what an agent key may register as. An authorized-keys line of role agent may carry
// `nodes=a,b` (the node names it may register), `provider=P` and `island=I` (the labels every
// node it registers must have); a field left out does not restrict. A line without any of them
// is unscoped: the key may register any name with any labels (the shared agent.key, and every
// line written before scopes existed). `muster keys add --role agent --node N --provider P
// --island I` writes them; the coordinator checks each registration against the scope of the
// key as authorized at that moment (a changed authorized_keys applies from the next request).
//
// Plain values; thread-compatible.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/proto/coordinator.pb.h"
#include "common/status.h"

namespace muster {

struct KeyScope {
  std::vector<std::string> nodes;  // node names the key may register; empty: any name
  std::string provider;            // the provider its nodes must have; empty: any
  std::string island;              // the island its nodes must have; empty: any

  bool empty() const { return nodes.empty() && provider.empty() && island.empty(); }
  // The words of an authorized-keys line ("nodes=a,b provider=p island=i"); "" when empty.
  std::string LineWords() const;
  // For people: LineWords(), or "unscoped".
  std::string ToString() const;
};

// Checks a scope's values: node names, provider and island 1-253 characters without whitespace,
// ',' or '#'. InvalidArgument naming the bad value otherwise.
Status ValidateKeyScope(const KeyScope& scope);

// If `word` (one whitespace-separated word of an authorized-keys line) is a scope word
// (`nodes=`, `provider=`, `island=`), records it in `scope` and returns true; false for any
// other word. InvalidArgument for a scope word given twice or with a bad value.
StatusOr<bool> ParseKeyScopeWord(std::string_view word, KeyScope* scope);

// Why a registration of `labels` is outside `scope` ("node name 'x' is not one of its nodes
// [a, b]", ...); nullopt when it is inside (an empty scope holds every registration).
std::optional<std::string> OutsideKeyScope(const KeyScope& scope, const proto::NodeLabels& labels);

// Why a registration of `claim` for a node already known as `known` (the same name) would move
// the node to another provider or island; nullopt when it does not. A node never moves: the
// name is taken for good by its first provider and island.
std::optional<std::string> MovesNode(const proto::NodeLabels& known,
                                     const proto::NodeLabels& claim);

}  // namespace muster
