#include "tests/testing/port_range.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

namespace muster::testing {

namespace {
constexpr int kFirst = 10000;
constexpr int kRanges = 19;  // [10000, 29000)
constexpr char kDir[] = "/tmp/muster-test-ports";
}  // namespace

PortRange::PortRange() {
  std::error_code ec;
  std::filesystem::create_directories(kDir, ec);
  int start = static_cast<int>(getpid()) % kRanges;
  for (int round = 0;; ++round) {
    for (int i = 0; i < kRanges; ++i) {
      int base = kFirst + ((start + i) % kRanges) * 1000;
      std::string path = std::string(kDir) + "/" + std::to_string(base) + ".lock";
      int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
      if (fd < 0) continue;
      if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
        fd_ = fd;
        base_ = base;
        return;
      }
      ::close(fd);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

PortRange::~PortRange() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock
}

HeldPort::HeldPort(int port) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return;
  int one = 1;
  ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd_, 4) != 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

HeldPort::~HeldPort() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace muster::testing
