// `muster demo`: argument parsing only; the demo is demo/demo.h.

#include <iostream>

#include "cli/commands.h"
#include "demo/demo.h"

namespace muster::cli {

void AddDemoCommands(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand(
      "demo",
      "Embedded coordinator with two on-demand local providers: a fine-tune gets its nodes "
      "from one, is preempted and resumes on the other; writes the loss curve as SVG");
  auto o = std::make_shared<demo::DemoOptions>();
  auto dir = std::make_shared<std::string>(o->work_dir.string());
  cmd->add_option("--work-dir", *dir, "Where everything goes (emptied first, kept after)")
      ->capture_default_str();
  cmd->add_option("--finetune", o->finetune,
                  "The muster-finetune binary (default: found next to muster)");
  cmd->add_option("--steps", o->steps, "Training steps")
      ->capture_default_str()
      ->check(CLI::Range(20, 100000));
  cmd->add_option("--ckpt-every", o->ckpt_every, "Checkpoint every N steps")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  cmd->add_option("--preempt-at", o->preempt_at, "Give the notice once the job reaches this step")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  cmd->add_option("--notice", o->notice_s, "Seconds of notice")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 600.0));
  cmd->add_option("--threads", o->threads, "Torch threads per rank")->capture_default_str();
  cmd->add_option("--timeout", o->timeout_s, "Give up after this many seconds")
      ->capture_default_str();
  cmd->add_option("--http", o->http,
                  "Serve the dashboard on HOST:PORT (port 0: any free one; \"\": none)")
      ->capture_default_str();
  cmd->add_flag("--no-wait{false}", o->wait,
                "Exit when the demo ends instead of serving the dashboard until Enter");
  cmd->callback([=] {
    *runner = [=] {
      o->work_dir = *dir;
      if (o->preempt_at >= o->steps) {
        std::cerr << "muster demo: --preempt-at must be below --steps\n";
        return 2;
      }
      return demo::RunDemo(*o, std::cout);
    };
  });
}

}  // namespace muster::cli
