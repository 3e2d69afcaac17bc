#pragma once

// ReactorZapTest: a GoogleTest fixture holding a Reactor and, for CURVE, a ZapAuthenticator on
// it: the set-up every test of a ZeroMQ server (RpcServer, RendezvousServer) repeats.
//
//   void SetUp() override {
//     CreateReactor("store-test");                  // the reactor and its authenticator
//     server_ = *RendezvousServer::Create(*reactor_, zap_.get(), {});
//     reactor_->Start();
//   }
//   void ReleaseOnReactor() override { server_.reset(); }
//
// TearDown destroys, on the reactor thread (their sockets belong to it), whatever
// ReleaseOnReactor() releases and then the authenticator, and stops the reactor.
//
// Thread-safety: as any fixture, used by the test's thread; reactor_ and zap_ follow the
// Reactor's rules (sockets only on its thread).

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "common/curve.h"
#include "common/reactor.h"

namespace muster::testing {

class ReactorZapTest : public ::testing::Test {
 protected:
  // Creates reactor_ (not started) and, with `with_zap`, zap_ on it (a failure fails the test).
  void CreateReactor(const std::string& name, bool with_zap = true) {
    reactor_ = std::make_unique<Reactor>(name);
    if (!with_zap) return;
    auto zap = ZapAuthenticator::Create(*reactor_);
    ASSERT_TRUE(zap.ok()) << zap.status();
    zap_ = std::move(*zap);
  }

  // Releases the test's servers and clients of the reactor; runs on the reactor thread.
  virtual void ReleaseOnReactor() {}

  void TearDown() override {
    if (!reactor_) return;
    reactor_->Call("teardown", [&] {
      ReleaseOnReactor();
      zap_.reset();
    });
    reactor_->Stop();
  }

  std::unique_ptr<Reactor> reactor_;
  std::unique_ptr<ZapAuthenticator> zap_;
};

}  // namespace muster::testing
