#!/usr/bin/env bash
# `make demo`: what muster does, on this machine, in about two minutes after the build.
#
# `muster demo` starts an embedded coordinator with two on-demand providers of kind `local`
# (aws and gcp; each provider with its own checkpoint volume) on loopback with CURVE: the
# coordinator starts node agents when a job needs them and stops them once idle. It submits the
# C++ fine-tune (2 nodes x 2 ranks), which gets two nodes from aws, gives one of its nodes a
# preemption notice midway and shows, as a timeline with live progress: the checkpoint on the
# notice, the copy of that checkpoint to gcp's volume, the requeue, the request of two nodes
# from gcp, the resume from the same step, the completion and the release of the idle nodes.
# It writes the loss curve to muster-demo/loss.svg. Then `muster ckpt` shows what both volumes
# hold.
set -euo pipefail
BUILD="${1:-build}"
MUSTER="$BUILD/bin/muster"
WORK="${MUSTER_DEMO_DIR:-muster-demo}"

"$MUSTER" --version
if [ ! -x "$BUILD/examples/finetune/muster-finetune" ]; then
  echo "muster-finetune was not built (libtorch not found): the demo needs it" >&2
  exit 1
fi
"$MUSTER" demo --work-dir "$WORK" --no-wait

printf '\n\033[1m== 6. the checkpoints on both providers'"'"' volumes: muster ckpt ls / verify\033[0m\n'
for provider in aws gcp; do
  echo "-- volume ckpt of $provider"
  "$MUSTER" ckpt ls "$WORK/volumes/$provider/finetune-1"
  "$MUSTER" ckpt verify "$WORK/volumes/$provider/finetune-1"
done
