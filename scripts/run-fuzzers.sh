#!/usr/bin/env bash
# Runs each libFuzzer target of a `make fuzz` build dir for SECONDS, one after another, and
# prints one line per target. Usage: run-fuzzers.sh BUILD_DIR SECONDS [TARGET...]
# (default: every tests/fuzz/*_fuzz binary). Exits non-zero on the first crash; the crashing
# input is kept in BUILD_DIR/artifacts/TARGET/ and its corpus in BUILD_DIR/corpus/TARGET/.
set -euo pipefail
dir=$1
seconds=$2
shift 2
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$dir"/tests/fuzz/*_fuzz; do
    [ -x "$f" ] && targets+=("$(basename "$f")")
  done
fi
for t in "${targets[@]}"; do
  mkdir -p "$dir/corpus/$t" "$dir/artifacts/$t"
  seeds=()
  [ -d "tests/fuzz/seeds/$t" ] && seeds+=("tests/fuzz/seeds/$t")
  log="$dir/artifacts/$t/last-run.log"
  echo "fuzz: $t for ${seconds}s"
  if ! "$dir/tests/fuzz/$t" -max_total_time="$seconds" -max_len=16384 -timeout=10 \
      -rss_limit_mb=4096 -artifact_prefix="$dir/artifacts/$t/" "$dir/corpus/$t" "${seeds[@]}" \
      >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED (input in $dir/artifacts/$t/)"
    exit 1
  fi
  stats=$(grep -E '^(#[0-9]+\s+DONE|Done [0-9]+ runs)' "$log" | tail -n 2 | tr '\n' ' ')
  echo "fuzz: $t clean: $stats"
done
