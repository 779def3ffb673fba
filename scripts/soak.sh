#!/usr/bin/env bash
# Soak test (a script, not a timed test). Starts a private udmd with 4 disk files, 4 linear
# devices exported over NBD, and runs fio with crc32c verification (nbd engine,
# --verify_fatal=1) on the 4 exports for SOAK_MINUTES (default 30) while, in a loop, it
# attaches and detaches an interposer, takes and drops a snapshot, adds and removes an extra
# export, and a hostile client (scripts/nbd-hostile.py) connects again and again and
# misbehaves (pipelined large READs never read, a WRITE header claiming 32 MiB then silence).
# Samples udmd's VmRSS at the start, every minute and at the end.
#
# Prints verify errors, hangs (control commands run under `timeout 30`), failed control
# commands, and start/end RSS; exits non-zero on any verify error, hang, failed command, a
# failed fio, a dead udmd, or RSS grown by more than SOAK_RSS_GROWTH_MB.
#
#   SOAK_MINUTES=30        duration
#   SOAK_DISK_MB=64        size of each disk
#   SOAK_PROFILE=release   cargo profile of udmd/udmsetup/udm (dev: no release build)
#   SOAK_RSS_GROWTH_MB=256 allowed growth of udmd's RSS from start to end
#   KEEP=1                 keep the work directory (logs) afterwards
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MINUTES=${SOAK_MINUTES:-30}
DISK_MB=${SOAK_DISK_MB:-64}
PROFILE=${SOAK_PROFILE:-release}
RSS_GROWTH_MB=${SOAK_RSS_GROWTH_MB:-256}
for t in fio python3 timeout; do
  command -v $t >/dev/null || { echo "soak: $t missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
if [ "$PROFILE" = release ]; then
  (cd "$ROOT" && cargo build --quiet --release -p udm-daemon -p udm-cli)
else
  (cd "$ROOT" && cargo build --quiet --profile "$PROFILE" -p udm-daemon -p udm-cli)
fi
[ "$PROFILE" = dev ] && PROFILE=debug
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
WORK=$(mktemp -d /tmp/udm-soak.XXXXXX)
export UDM_RUNTIME_DIR=$WORK/run UDM_STATE_DIR=$WORK/state
SOCK=$WORK/run/nbd.sock
LOG=$WORK/control.log
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${UDMD:-}" ] && kill "$UDMD" 2>/dev/null && wait "$UDMD" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "soak: logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

"$BIN/udmd" >"$WORK/udmd.log" 2>&1 &
UDMD=$!
for _ in $(seq 200); do "$BIN/udmsetup" version >/dev/null 2>&1 && break; sleep 0.1; done

hangs=0 failures=0 commands=0
# ctl CMD ARGS...: one control command under `timeout 30`; a timeout is a hang.
ctl() {
  local rc=0
  commands=$((commands + 1))
  echo "+ $*" >>"$LOG"
  timeout 30 "$@" >>"$LOG" 2>&1 || rc=$?
  if [ $rc -eq 124 ]; then
    hangs=$((hangs + 1)); echo "soak: HANG (30 s): $*"
  elif [ $rc -ne 0 ]; then
    failures=$((failures + 1)); echo "soak: FAILED ($rc): $*"
  fi
  return 0
}
u() { ctl "$BIN/udmsetup" "$@"; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$UDMD/status" 2>/dev/null || echo 0; }

SECTORS=$((DISK_MB * 2048))
for i in 0 1 2 3; do
  u disk add "d$i" --file "$WORK/d$i.img" --create "${DISK_MB}M"
  u create "lin$i" --table "0 $SECTORS linear d$i 0"
  u export add "lin$i" --nbd
done
if [ $((hangs + failures)) -ne 0 ]; then
  echo "soak: set-up failed"; cat "$LOG"; tail -20 "$WORK/udmd.log"; exit 1
fi
RSS_START=$(rss)
RSS_SAMPLES="$RSS_START"
echo "soak: udmd pid $UDMD, ${MINUTES} min, 4 x ${DISK_MB} MiB, RSS at start ${RSS_START} kB"

RUNTIME=$((MINUTES * 60))
{
  echo "[global]"
  echo "ioengine=nbd"
  echo "rw=randwrite"
  echo "bs=4k"
  echo "iodepth=8"
  echo "size=${DISK_MB}m"
  echo "verify=crc32c"
  echo "verify_backlog=256"
  echo "verify_fatal=1"
  echo "do_verify=1"
  echo "verify_state_save=0"
  echo "time_based=1"
  echo "runtime=${RUNTIME}"
  for i in 0 1 2 3; do
    echo "[lin$i]"
    echo "uri=nbd+unix:///lin$i?socket=$SOCK"
  done
} >"$WORK/soak.fio"
fio "$WORK/soak.fio" --output="$WORK/fio.out" >/dev/null 2>"$WORK/fio.err" &
FIO=$!
PIDS+=("$FIO")
python3 "$ROOT/scripts/nbd-hostile.py" "$SOCK" lin0 "$RUNTIME" 3 >"$WORK/hostile.log" 2>&1 &
HOSTILE=$!
PIDS+=("$HOSTILE")

start=$(date +%s)
end=$((start + RUNTIME))
next_sample=$((start + 60))
iter=0
while [ "$(date +%s)" -lt "$end" ]; do
  d=lin$((iter % 4))
  u create "ip$iter" --interpose --table "0 $SECTORS linear $d 0"
  sleep 1
  u remove "ip$iter"
  ctl "$BIN/udm" snapshot take "$d" --cow "$WORK/snap.cow" --size "$((DISK_MB * 2))M" --name "$d-snap"
  sleep 1
  ctl "$BIN/udm" snapshot drop "$d-snap"
  rm -f "$WORK/snap.cow"
  u export add "$d" --nbd --name extra
  sleep 0.5
  u export remove nbd:extra
  iter=$((iter + 1))
  if ! kill -0 "$UDMD" 2>/dev/null; then echo "soak: udmd died"; break; fi
  now=$(date +%s)
  if [ "$now" -ge "$next_sample" ]; then
    r=$(rss)
    RSS_SAMPLES="$RSS_SAMPLES $r"
    echo "soak: $(((now - start) / 60)) min: $iter rounds, RSS $r kB, hangs $hangs, failed commands $failures"
    next_sample=$((next_sample + 60))
  fi
done

# fio stops at its runtime; give it time to finish its verification.
fio_rc=0
for _ in $(seq 300); do kill -0 "$FIO" 2>/dev/null || break; sleep 1; done
if kill -0 "$FIO" 2>/dev/null; then
  echo "soak: fio did not finish 5 min after its runtime"; kill "$FIO"; fio_rc=124
fi
wait "$FIO" || fio_rc=$?
wait "$HOSTILE" || true
alive=yes
kill -0 "$UDMD" 2>/dev/null || alive=no
RSS_END=$(rss)
# (grep finds nothing in a clean run: `|| true` keeps pipefail from ending the script)
verify_errors=$({ grep -ciE 'verify.*(fail|bad)|bad magic|crc32c: verify' "$WORK/fio.out" "$WORK/fio.err" || true; } | awk -F: '{s += $NF} END {print s + 0}')
io_errors=$({ grep -oE 'err= *[0-9]+' "$WORK/fio.out" || true; } | grep -oE '[0-9]+' | awk '{s += ($1 != 0)} END {print s + 0}')
written=$(grep -E '^ +WRITE:' "$WORK/fio.out" | head -1 | sed 's/^ *//' || true)

echo "== soak summary ($MINUTES min, $iter rounds, $commands control commands)"
echo "fio:              exit $fio_rc; ${written:-no WRITE summary}"
echo "verify errors:    $verify_errors"
echo "fio jobs w/ err:  $io_errors"
echo "hangs:            $hangs"
echo "failed commands:  $failures"
echo "hostile client:   $(tail -1 "$WORK/hostile.log")"
echo "udmd alive:       $alive"
echo "udmd RSS:         start ${RSS_START} kB, end ${RSS_END} kB (every minute: $RSS_SAMPLES $RSS_END)"
rss_ok=yes
[ $((RSS_END - RSS_START)) -le $((RSS_GROWTH_MB * 1024)) ] || rss_ok=no
echo "RSS growth ok:    $rss_ok (limit ${RSS_GROWTH_MB} MiB)"
fail=0
if [ "$verify_errors" -ne 0 ] || [ "$io_errors" -ne 0 ] || [ "$fio_rc" -ne 0 ] || [ "$hangs" -ne 0 ] ||
  [ "$failures" -ne 0 ] || [ "$alive" != yes ] || [ "$rss_ok" != yes ]; then
  fail=1
  echo "soak: FAILED (logs: $WORK; set KEEP=1 to keep them)"
  grep -iE 'verify|error' "$WORK/fio.err" | head -5 || true
  grep -B1 -A3 'FAILED\|error' "$LOG" | head -20 || true
  tail -5 "$WORK/udmd.log"
fi
exit $fail
