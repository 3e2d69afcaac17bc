#!/usr/bin/env bash
# `make demo`: the end-to-end demo of what muster does today. Run from the project root after
# `make build`; the first argument is the build directory.
set -euo pipefail
BUILD="${1:-build}"
MUSTER="$BUILD/bin/muster"
WORK="$(mktemp -d /tmp/muster-demo-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

echo "== muster demo (work dir $WORK) =="
"$MUSTER" --version
echo
echo "-- 1. keys: a coordinator key pair, a client key pair and an authorized list"
"$MUSTER" keys init --dir "$WORK/keys"
echo
echo "-- 2. the secured request/reply path every muster daemon uses (CURVE + ZAP), beside raw ZeroMQ"
"$BUILD/bench/muster-bench" rpc --iterations 500
