#include "node_agent/torch_env.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>

#include <cstring>

#include "common/net_address.h"

namespace muster::node_agent {

namespace {
constexpr char kGlooIfname[] = "GLOO_SOCKET_IFNAME";
}  // namespace

std::string InterfaceWithAddress(const std::string& address) {
  in_addr v4{};
  in6_addr v6{};
  const bool is4 = ::inet_pton(AF_INET, address.c_str(), &v4) == 1;
  const bool is6 = !is4 && ::inet_pton(AF_INET6, address.c_str(), &v6) == 1;
  if (!is4 && !is6) return "";
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return "";
  std::string found;
  for (ifaddrs* i = list; i != nullptr && found.empty(); i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_name == nullptr) continue;
    if (is4 && i->ifa_addr->sa_family == AF_INET &&
        reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr == v4.s_addr) {
      found = i->ifa_name;
    } else if (is6 && i->ifa_addr->sa_family == AF_INET6 &&
               std::memcmp(&reinterpret_cast<sockaddr_in6*>(i->ifa_addr)->sin6_addr, &v6,
                           sizeof(v6)) == 0) {
      found = i->ifa_name;
    }
  }
  ::freeifaddrs(list);
  return found;
}

void AddGlooSocketIfname(const std::vector<std::string>& inherited, const std::string& master_addr,
                         int nnodes, std::map<std::string, std::string>& job_env) {
  if (nnodes <= 1 || job_env.count(kGlooIfname) > 0) return;
  const std::string prefix = std::string(kGlooIfname) + "=";
  for (const auto& e : inherited) {
    if (e.compare(0, prefix.size(), prefix) == 0) return;
  }
  std::string ifname = InterfaceWithAddress(LocalAddressToward(master_addr));
  if (!ifname.empty()) job_env[kGlooIfname] = ifname;
}

}  // namespace muster::node_agent
