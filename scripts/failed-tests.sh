#!/usr/bin/env bash
# Prints, for every test a `cargo test` log (LOG, default target/test.log) reports FAILED, from
# what it printed (its "---- NAME stdout ----" section) the lines saying FAIL, panicked or
# assertion (at most 20), then its last 40 lines. scripts/test.sh runs it at the end of a
# failed run, so a log cut to its tail still says why each test failed.
set -euo pipefail
log=${1:-target/test.log}
failed=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log" | sort -u)
echo "=== failed tests: $(grep -c . <<<"$failed" || true) (the whole log is $log)"
while read -r t; do
  [ -n "$t" ] || continue
  echo "--- $t"
  out=$(awk -v h="---- $t stdout ----" '$0 == h { f = 1; next } f && (/^---- .* stdout ----$/ || /^failures:$/) { exit } f' "$log")
  echo "[failure lines]"; grep -E 'FAIL|panicked|assertion' <<<"$out" | head -20 || true
  echo "[last 40 lines]"; tail -40 <<<"$out"
done <<<"$failed"
