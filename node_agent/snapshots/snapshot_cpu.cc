#include "node_agent/snapshots/snapshot_cpu.h"

#include <pthread.h>
#include <sched.h>

#include <cerrno>
#include <cstring>
#include <thread>

namespace muster::node_agent {

StatusOr<SnapshotCpu> ParseSnapshotCpu(std::string_view value) {
  if (value == "normal") return SnapshotCpu::kNormal;
  if (value == "background") return SnapshotCpu::kBackground;
  return InvalidArgumentError("snapshot CPU class '" + std::string(value) +
                              "' is neither 'background' nor 'normal'");
}

std::string_view SnapshotCpuName(SnapshotCpu cpu) {
  return cpu == SnapshotCpu::kBackground ? "background" : "normal";
}

Status EnterSnapshotThread(SnapshotCpu cpu, const char* name) {
  char short_name[16] = {};
  std::strncpy(short_name, name, sizeof(short_name) - 1);
  (void)pthread_setname_np(pthread_self(), short_name);  // a name is for people: best effort
  if (cpu == SnapshotCpu::kNormal) return Status::Ok();
  sched_param p{};
  p.sched_priority = 0;
  // pid 0: the calling thread only (Linux schedules threads, not processes).
  if (sched_setscheduler(0, SCHED_IDLE, &p) != 0) {
    return InternalError(std::string("snapshot thread ") + short_name +
                         ": SCHED_IDLE: " + std::strerror(errno));
  }
  return Status::Ok();
}

Status CheckSnapshotCpuAllowed(SnapshotCpu cpu) {
  if (cpu == SnapshotCpu::kNormal) return Status::Ok();
  int err = 0;
  std::thread probe([&err] {
    sched_param p{};
    p.sched_priority = 0;
    if (sched_setscheduler(0, SCHED_IDLE, &p) != 0) err = errno;
  });
  probe.join();
  if (err != 0) {
    return FailedPreconditionError(
        std::string("--snapshot-cpu background: this host refuses SCHED_IDLE to the agent's "
                    "threads (") +
        std::strerror(err) + "); run with --snapshot-cpu normal");
  }
  return Status::Ok();
}

Status ConfigureSnapshotContext(zmq::context_t& context, SnapshotCpu cpu) {
  if (zmq_ctx_set(context.handle(), ZMQ_THREAD_NAME_PREFIX, kSnapshotZmqThreadPrefix) != 0) {
    return InternalError(std::string("snapshot ZeroMQ context: thread name prefix: ") +
                         zmq_strerror(zmq_errno()));
  }
  if (cpu == SnapshotCpu::kBackground &&
      zmq_ctx_set(context.handle(), ZMQ_THREAD_SCHED_POLICY, SCHED_IDLE) != 0) {
    return InternalError(std::string("snapshot ZeroMQ context: SCHED_IDLE: ") +
                         zmq_strerror(zmq_errno()));
  }
  return Status::Ok();
}

}  // namespace muster::node_agent
