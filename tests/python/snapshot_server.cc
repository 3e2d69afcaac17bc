// muster-py-snapshot-server: the agent's end of the local snapshot channel on its own, for the
// Python package's snapshot tests (tests/python/test_snapshot.py): a real SnapshotStore and
// SnapshotServer (node_agent/snapshots/), as an agent runs them, at SOCKET with a memory limit
// of MEMORY_BYTES, with no peer check (the socket directory's 0700 mode is the fence).
//
//   muster-py-snapshot-server SOCKET MEMORY_BYTES
//
// Prints "ready" once the socket accepts, then serves until its stdin closes (the test's end).
// Exit codes: 0 done, 2 bad arguments, 1 the server did not start.

#include "node_agent/snapshots/snapshot_server.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/logging.h"
#include "node_agent/snapshots/snapshot_store.h"

int main(int argc, char** argv) {
  using namespace muster;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SOCKET MEMORY_BYTES\n", argv[0]);
    return 2;
  }
  char* end = nullptr;
  unsigned long long limit = std::strtoull(argv[2], &end, 10);
  if (!end || *end != '\0') {
    std::fprintf(stderr, "MEMORY_BYTES '%s' is not a number\n", argv[2]);
    return 2;
  }
  if (!log::InitLogging("warn").ok()) return 2;
  node_agent::SnapshotStore store({.memory_limit = limit, .keep_steps = 2});
  auto server = node_agent::SnapshotServer::Start(argv[1], &store);
  if (!server.ok()) {
    std::fprintf(stderr, "snapshot server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char buf[256];
  while (::read(0, buf, sizeof(buf)) > 0) {
  }
  return 0;
}
