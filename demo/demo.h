#pragma once

// `muster demo`: the whole promise on one machine. It starts an embedded coordinator (CURVE,
// SQLite) with two on-demand providers of kind `local` ("aws" and "gcp", each with its own
// checkpoint volume): their nodes are `muster agent` processes on loopback that the coordinator
// starts when a gang needs them and stops once they are idle. It submits the C++ fine-tune
// (2 nodes x 2 ranks, Gloo through the job's rendezvous store), which gets its nodes from aws,
// and an evaluation service on one gcp node (so the fine-tune's checkpoints are copied to gcp's
// volume), gives one fine-tune node a preemption notice midway, and shows what follows as a
// timeline with live progress: the checkpoint on notice, the copy of that checkpoint to gcp's
// volume, the requeue, the request of two nodes from gcp, the resume from the very step, the
// completion and the release of every idle node. Then it writes the loss curve, with the
// preemption and the resume marked, as <work-dir>/loss.svg.

#include <filesystem>
#include <ostream>
#include <string>

namespace muster::demo {

struct DemoOptions {
  std::filesystem::path work_dir = "muster-demo";  // created (emptied first); kept afterwards
  std::string finetune;  // the muster-finetune binary; "" : found next to `muster`
  int steps = 150;
  int ckpt_every = 50;
  int preempt_at = 60;   // give the notice once the job reports this step
  double notice_s = 20;  // seconds of notice
  int threads = 1;       // torch threads per rank
  int timeout_s = 300;   // give up (and fail) after this long
  // The coordinator's dashboard (HOST:PORT; port 0: any free one; "": none). Its URL is printed
  // at the start; at the end the demo keeps serving it until Enter (or EOF) on stdin, unless
  // `wait` is false.
  std::string http = "127.0.0.1:0";
  bool wait = true;
};

// Returns the process exit code: 0 when the job completed after the preemption and resumed
// from the step it checkpointed on the notice, and every node the providers started was
// released once idle.
int RunDemo(const DemoOptions& options, std::ostream& out);

}  // namespace muster::demo
