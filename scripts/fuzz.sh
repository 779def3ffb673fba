#!/usr/bin/env bash
# Runs udm's cargo-fuzz targets (fuzz/fuzz_targets) one after the other and prints, per target,
# the executions done and the crashes found. Not part of CI (see README).
#
#   scripts/fuzz.sh [TARGET...]          every target when none is named
#   FUZZ_RUNS=2000000 scripts/fuzz.sh    stop each target after that many executions
#   FUZZ_TIME=600 scripts/fuzz.sh        ... or after that many seconds (the first reached wins)
#
# Defaults: FUZZ_TIME=60 when neither is set. A crash stops its target (libFuzzer writes the
# input to fuzz/artifacts/TARGET/); the next target still runs. Seeds: fuzz/seeds/TARGET/. Logs: target/fuzz-logs/TARGET.log.
# Exits non-zero when any target crashed or did not run. Needs cargo-fuzz (installed here with
# `cargo install cargo-fuzz` when missing) and a nightly compiler or RUSTC_BOOTSTRAP=1 (set here).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --help >/dev/null 2>&1; then
  echo "cargo-fuzz not found: cargo install cargo-fuzz"
  cargo install cargo-fuzz
fi
runs=${FUZZ_RUNS:-}
time_s=${FUZZ_TIME:-}
if [ -z "$runs" ] && [ -z "$time_s" ]; then time_s=60; fi
args=(-print_final_stats=1 -timeout="${FUZZ_TIMEOUT:-30}" -rss_limit_mb="${FUZZ_RSS_MB:-2048}")
[ -n "$runs" ] && args+=(-runs="$runs")
[ -n "$time_s" ] && args+=(-max_total_time="$time_s")
cd fuzz
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
logs=$root/target/fuzz-logs
mkdir -p "$logs"
declare -A execs crashes status
failed=0
for t in "${targets[@]}"; do
  log=$logs/$t.log
  echo "== $t: ${runs:+$runs runs }${time_s:+${time_s}s} (log $log)"
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  rc=0
  # Committed seeds (fuzz/seeds/TARGET) start the corpus; new inputs go to fuzz/corpus/TARGET.
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  targs=("${args[@]}")
  # The NBD targets share one server (nbd/mod.rs fuzz_server) whose connection threads end
  # detached: LeakSanitizer's check at process exit reports the handles of the last input's
  # threads that are still exiting (a few hundred bytes, not per input). libFuzzer already turns
  # its per-input leak check off for a target that keeps global state, so nothing else is lost.
  case $t in nbd_*) targs+=(-detect_leaks=0) ;; esac
  cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- "${targs[@]}" >"$log" 2>&1 || rc=$?
  # libFuzzer's last word: "Done N runs in S second(s)", or the final stats after a crash.
  n=$(grep -oE '^Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || true)
  [ -n "$n" ] || n=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
  after=$(find "artifacts/$t" -type f | wc -l)
  c=$((after - before))
  execs[$t]=${n:-0}
  crashes[$t]=$c
  if [ "$rc" -ne 0 ] || [ "$c" -ne 0 ]; then
    failed=1
    status[$t]="FAILED (exit $rc)"
    grep -E 'Test unit written to|^==[0-9]+==ERROR|panicked at|^error' "$log" | head -5 || true
  else
    status[$t]=ok
  fi
  echo "   $t: ${execs[$t]} executions, $c crashes, ${status[$t]}"
done
echo "== summary"
printf '%-20s %15s %8s  %s\n' target executions crashes status
for t in "${targets[@]}"; do
  printf '%-20s %15s %8s  %s\n' "$t" "${execs[$t]}" "${crashes[$t]}" "${status[$t]}"
done
exit "$failed"
