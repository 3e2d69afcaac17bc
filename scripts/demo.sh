#!/usr/bin/env bash
# `make demo`: the end-to-end demo of what muster does today, on this machine. Run from the
# project root after `make build`; the first argument is the build directory.
#
# 1. keys; 2. the coordinator refusing a job no node could hold; 3. a 2-rank data-parallel
# fine-tune under `muster run` (Gloo through the CURVE rendezvous store) that receives a
# preemption notice midway, checkpoints the step the ranks agree on and stops, then resumes from
# that checkpoint and finishes; 4. the checkpoint tools on what it wrote.
set -euo pipefail
BUILD="${1:-build}"
MUSTER="$BUILD/bin/muster"
FT="$BUILD/examples/finetune/muster-finetune"
WORK="$(mktemp -d /tmp/muster-demo-XXXXXX)"
COORD_PID=""
cleanup() { [ -n "$COORD_PID" ] && kill "$COORD_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

"$MUSTER" --version
say "1. keys: a coordinator key pair, a client key pair and an authorized list"
"$MUSTER" keys init --dir "$WORK/keys"
export MUSTER_KEYS="$WORK/keys"

say "2. a coordinator (CURVE, SQLite state) refuses a job that no registered node could hold"
"$MUSTER" coordinator --data-dir "$WORK/coord" --listen tcp://127.0.0.1:0 >"$WORK/coord.log" 2>&1 &
COORD_PID=$!
for _ in $(seq 100); do [ -s "$WORK/coord/endpoint" ] && break; sleep 0.1; done
export MUSTER_COORDINATOR="$(cat "$WORK/coord/endpoint")"
cat >"$WORK/job.yaml" <<YAML
name: too-big
command: ["/bin/true"]
nodes: 64
ranks_per_node: 8
gpu_type: h100
gpus_per_node: 8
YAML
"$MUSTER" submit "$WORK/job.yaml" || true
"$MUSTER" nodes || true

if [ ! -x "$FT" ]; then
  echo "muster-finetune was not built (libtorch not found): skipping the fine-tune"
  exit 0
fi
CKPT="$WORK/ckpt"
NOTICE="$WORK/preempt-notice"
ARGS=(--pretrain --steps 160 --ckpt-every 40 --log-every 20 --threads 1 --notice-file "$NOTICE")

say "3a. muster run -np 2: data-parallel fine-tune; a preemption notice (30 s) arrives at step 60"
set +e
"$MUSTER" run -np 2 --tag-output --checkpoint-dir "$CKPT" -- "$FT" "${ARGS[@]}" 2>&1 |
  while IFS= read -r line; do
    case "$line" in
      *MUSTER_*|*"muster run"*|*preemption*) echo "$line" ;;
    esac
    case "$line" in
      *"MUSTER_PROGRESS step=60 "*) echo 30 > "$NOTICE"; echo "   >>> notice file written" ;;
    esac
  done
rc=${PIPESTATUS[0]}
set -e
echo "-> muster run exited $rc (3 = checkpointed on the notice and stopped)"
rm -f "$NOTICE"

say "3b. the job resumes from the checkpoint taken on the notice and finishes"
"$MUSTER" run -np 2 --tag-output --checkpoint-dir "$CKPT" -- "$FT" "${ARGS[@]}" 2>&1 \
  | grep -E "MUSTER_|resumed|muster run"

say "4. the checkpoints it wrote: muster ckpt ls / verify"
"$MUSTER" ckpt ls "$CKPT"
"$MUSTER" ckpt verify "$CKPT"
