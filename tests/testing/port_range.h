#pragma once

// A range of 1000 TCP ports for one test's coordinator (`--rendezvous-port-base`: MASTER_PORT
// in [base, base + 500), rendezvous stores in [base + 500, base + 1000)), held exclusively
// while the object lives: tests that run side by side (ctest -j) never share ports. The claim
// is an flock on /tmp/muster-test-ports/<base>.lock, so every test process (the Python tests
// too, see tests/examples/pytorch_ddp_test.py) draws from the same pool. The ranges lie in
// [10000, 29000): below the kernel's ephemeral ports (32768+, which "tcp://...:*" endpoints
// get) and clear of muster's default 29500 (`muster demo`).

namespace muster::testing {

class PortRange {
 public:
  PortRange();  // blocks until a range is free
  ~PortRange();
  PortRange(const PortRange&) = delete;
  PortRange& operator=(const PortRange&) = delete;

  int base() const { return base_; }

 private:
  int fd_ = -1;
  int base_ = 0;
};

// A TCP listener on 127.0.0.1:`port` (SO_REUSEADDR, as real servers bind), closed when the
// object goes: "some other program holds this port". fd() < 0 when the bind failed.
class HeldPort {
 public:
  explicit HeldPort(int port);
  ~HeldPort();
  HeldPort(const HeldPort&) = delete;
  HeldPort& operator=(const HeldPort&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

}  // namespace muster::testing
