#!/usr/bin/env bash
# `muster demo`, shortened: it must succeed, and its timeline must show the nodes coming and
# going on demand (events the coordinator recorded): the requests to the providers, the nodes
# coming up, the idle nodes released, and the resume on gcp from the step of the notice.
# Usage: muster_demo_test.sh MUSTER WORK_DIR
set -uo pipefail
MUSTER="$1"
WORK="$2"
out="$(mktemp "${TMPDIR:-/tmp}/muster-demo-test.XXXXXX")"
trap 'rm -f "$out"' EXIT
"$MUSTER" demo --work-dir "$WORK" --steps 60 --ckpt-every 20 --preempt-at 25 --notice 15 \
  --timeout 150 --no-wait >"$out" 2>&1
rc=$?
cat "$out"
if [ "$rc" -ne 0 ]; then
  echo "FAIL: muster demo exited $rc" >&2
  exit 1
fi
missing=0
for want in \
  'provider_request +requested 2 nodes from aws: aws-1,aws-2' \
  'node_up +\[aws-1\] node aws-1 up \(provider aws' \
  'node_up +\[aws-2\] node aws-2 up \(provider aws' \
  'provider_request +\(eval\) requested 1 node from gcp: gcp-1' \
  'provider_request +requested 2 nodes from gcp: gcp-2,gcp-3' \
  'node_up +\[gcp-3\] node gcp-3 up \(provider gcp' \
  'resumed +attempt 2 resumes from step [0-9]+ on volume ckpt \(provider gcp\)' \
  'node_released +\[aws-1\] released idle node aws-1 to provider aws' \
  'node_released +\[aws-2\] released idle node aws-2 to provider aws' \
  'node_released +\[gcp-3\] released idle node gcp-3 to provider gcp' \
  '0 steps lost' \
  'nodes on demand: 3 requests to the providers, 5 nodes up, 5 released idle'; do
  if ! grep -Eq -- "$want" "$out"; then
    echo "FAIL: the demo's output lacks /$want/" >&2
    missing=1
  fi
done
exit "$missing"
