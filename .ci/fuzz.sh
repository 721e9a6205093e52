#!/usr/bin/env bash
# A short run of every fuzz target (FUZZ_SECONDS each, default 60) with the
# checks the targets assert (no panic; the completion rule after every
# input). Longer runs: FUZZ_SECONDS=600 bash .ci/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
for t in pdu_decode queue_dispatch; do
  echo "== fuzz $t for ${secs}s"
  log="$(mktemp)"
  rc=0
  cargo fuzz run -s none -O "$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E "^stat::number_of_executed_units|^Done [0-9]+ runs|panicked|SUMMARY|artifact" "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -50 "$log"
    echo "fuzz $t failed (rc=$rc)"
    exit 1
  fi
done
