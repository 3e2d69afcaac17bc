// RankEnv::FromEnviron over arbitrary environments: never crashes, and whatever it accepts
// round-trips through ToEnviron exactly. Input: lines of KEY=VALUE.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/rank_env.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::map<std::string, std::string> env;
  while (!in.empty()) {
    size_t nl = in.find('\n');
    std::string_view line = in.substr(0, nl);
    in = nl == std::string_view::npos ? std::string_view() : in.substr(nl + 1);
    size_t eq = line.find('=');
    if (eq == std::string_view::npos) continue;
    env[std::string(line.substr(0, eq))] = std::string(line.substr(eq + 1));
  }
  std::vector<std::string> unknown;
  auto e = muster::RankEnv::FromEnviron(env, &unknown);
  if (!e.ok()) return 0;
  auto back = muster::RankEnv::FromEnviron(e->ToEnviron());
  if (!back.ok() || !(*back == *e)) std::abort();
  (void)muster::ComposeRankEnviron({}, env, *e);
  (void)muster::CheckJobEnv(env);
  return 0;
}
