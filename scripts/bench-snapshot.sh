#!/usr/bin/env bash
# Cost of live snapshots: origin write throughput with 0, 1 and 2 active snapshots (fresh COW
# stores, so first writes copy chunks) for 4k random and 64k sequential writes, as ratios to the
# plain device, with udmd's largest RSS during each run; and snapshot read throughput relative
# to origin reads. udmd serves one disk
# exported over NBD; snapshots are taken with `udm snapshot take` on the exported device.
# Not a timed test: run it and read the table. Target: one snapshot keeps >= 50% of 64k
# sequential write throughput.
# Write jobs issue a fixed amount of I/O (IO) over the whole SIZE device, so with a fresh
# snapshot most writes are first writes that copy their chunks (all of the 64k sequential ones,
# about 80% of the 4k random ones; time-based runs would soon rewrite copied chunks and flatter
# the snapshot). IO is large against the write-back bound (32 MiB held), so sustained rates are
# measured, not the buffer. Reads are time based.
# Each job runs ROUNDS times, the snapshot counts interleaved within a round, and the medians
# are printed, as the machine's noise between runs is larger than some of the differences.
# Environment: RUNTIME (s per read run, default 5), SIZE (default 1G), IO (default 512M),
# CHUNK (sectors, default 8), ROUNDS (default 3), SNAPS (snapshot counts, default "0 1 2";
# the first is the base of the ratios), ONLY (one job: randwrite-4k, write-64k, or "reads" for
# the read comparison alone), NOREAD (skip the read comparison), VERBOSE (print every run),
# FLUSH_END (each write job ends with a flush and counts it: the plain device then pays for
# making its data durable too, as a snapshot's COW always does), WORKDIR.
# Wrong data cannot score: a failed fio stops the script; in the first round every job and
# snapshot count also runs a crc32c-verified write pass on the origin, and each snapshot must
# read back exactly the origin's content from before it was taken (a write-back that skipped
# the copy would fail here).
set -euo pipefail
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-1G}
CHUNK=${CHUNK:-8}
IO=${IO:-512M}
ROUNDS=${ROUNDS:-3}
SNAPS=${SNAPS:-0 1 2}
JOBS=("randwrite-4k randwrite 4k 16" "write-64k write 64k 4")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/udm-bench-snap.XXXXXX)}
# shellcheck source=bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
# shellcheck source=bench-fio.sh
. "$ROOT/scripts/bench-fio.sh"
u disk add vol --file "$WORKDIR/disk.img" >/dev/null
u export add vol --nbd >/dev/null
BYTES=$(stat -c %s "$WORKDIR/disk.img")
uri() { echo "nbd+unix:///$1?socket=$UDM_RUNTIME_DIR/nbd.sock"; }
take() { # n
  for i in $(seq "$1"); do
    "$BIN/udm" snapshot take vol --name "s$i" --cow "$WORKDIR/s$i.cow" --size $((BYTES + BYTES / 8)) --chunk "$CHUNK" --export nbd >/dev/null
  done
}
drop() { for s in $("$BIN/udm" --json snapshot list | jq -r '.[].name'); do "$BIN/udm" snapshot drop "$s" >/dev/null; rm -f "$WORKDIR/$s.cow"; done; }
# Samples udmd's resident memory until killed and keeps the largest value (KiB) in FILE.
sample_rss() { # file
  local most=0 r
  echo 0 >"$1"
  while :; do
    r=$(awk '/^VmRSS/ {print $2}' "/proc/$PID/status" 2>/dev/null || echo 0)
    if (( r > most )); then most=$r; echo "$most" >"$1"; fi
    sleep 0.2
  done
}
run() { # name uri rw bs depth -> RESULT="iops mibs max-rss-KiB"
  local out=$WORKDIR/$1.json dir=read amount=(--time_based --runtime="$RUNTIME")
  [[ $3 == *write* ]] && { dir=write; amount=(--io_size="$IO"); [[ -n ${FLUSH_END:-} ]] && amount+=(--end_fsync=1); }
  # Start every run with no dirty data of earlier runs being written back meanwhile (the COW's
  # flushes would queue behind it).
  sync
  sample_rss "$WORKDIR/rss" & local sampler=$!
  fio_json "$out" --name="$1" --ioengine=nbd --uri="$2" --rw="$3" --bs="$4" --iodepth="$5" \
      --size="$SIZE" "${amount[@]}"
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  RESULT="$(jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw_bytes/1048576)"' "$out") $(cat "$WORKDIR/rss")"
}
# digest DEV -> DIGEST=md5 of DEV's content read over NBD (a read that fails or hangs stops the script).
digest() {
  local out
  out=$(timeout 600 nbdcopy "$(uri "$1")" - | md5sum) || { echo "bench-snapshot: reading $1 failed or hung" >&2; exit 1; }
  DIGEST=${out%% *}
}
# After a write job with n snapshots: each snapshot still reads the origin's old content, and
# a verified write pass on the origin reads back what it wrote.
check() { # n origin-digest-before job-rw bs depth
  for i in $(seq "$1"); do
    digest "s$i"
    [[ $DIGEST == "$2" ]] || { echo "bench-snapshot: snapshot s$i does not hold the origin's old data" >&2; exit 1; }
  done
  fio_verify "$(uri vol)" "$3" "$4" "$5"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A IOPS MIBS RSS
for round in $(seq "$ROUNDS"); do
  for job in "${JOBS[@]}"; do
    read -r name rw bs depth <<<"$job"
    [[ -n ${ONLY:-} && $name != "$ONLY" ]] && continue
    for n in $SNAPS; do
      [[ $round == 1 ]] && digest vol && before=$DIGEST
      take "$n"
      run "$name-$n" "$(uri vol)" "$rw" "$bs" "$depth"
      read -r iops mib rss <<<"$RESULT"
      [[ $round == 1 ]] && check "$n" "$before" "$rw" "$bs" "$depth"
      drop
      IOPS[$name-$n]+="$iops "
      MIBS[$name-$n]+="$mib "
      RSS[$name-$n]+="$rss "
      [[ -n ${VERBOSE:-} ]] && echo "round $round $name $n: $iops IOPS $mib MiB/s" >&2
    done
  done
done
printf '%-22s %10s %9s %8s %12s   (median of %s rounds; udmd RSS: largest sample during the run)\n' job IOPS MiB/s ratio "RSS MiB" "$ROUNDS"
for job in "${JOBS[@]}"; do
  read -r name _ <<<"$job"
  [[ -n ${ONLY:-} && $name != "$ONLY" ]] && continue
  base=
  for n in $SNAPS; do
    iops=$(tr ' ' '\n' <<<"${IOPS[$name-$n]}" | grep . | median)
    mib=$(tr ' ' '\n' <<<"${MIBS[$name-$n]}" | grep . | median)
    rss=$(tr ' ' '\n' <<<"${RSS[$name-$n]}" | grep . | median)
    [[ -z $base ]] && base=$mib
    printf '%-22s %10.0f %9.1f %7.2fx %12.0f\n' "$name, $n snapshot(s)" "$iops" "$mib" "$(echo "$mib / $base" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
  done
done
[[ -n ${NOREAD:-} ]] && exit 0
# Reads (64k sequential, time based, medians of ROUNDS, origin and snapshot interleaved): the
# origin; a fresh snapshot, whose chunks are all unchanged (read through to the origin: the
# snapshot's own cost); the same snapshot after a round of origin writes copied part of its
# chunks to the COW store (a mix of COW and origin reads).
declare -A READ
reads() { # origin-key snapshot-key: ROUNDS interleaved reads of vol and s1 -> READ[key] IOPS
  for _ in $(seq "$ROUNDS"); do
    run read-origin "$(uri vol)" read 64k 4; READ[$1]+="${RESULT%% *} "
    run read-snap "$(uri s1)" read 64k 4; READ[$2]+="${RESULT%% *} "
  done
}
take 1
reads origin fresh
run warm "$(uri vol)" randwrite 64k 4
reads origin2 copied
drop
med() { tr ' ' '\n' <<<"${READ[$1]}" | grep . | median; }
o=$(med origin) f=$(med fresh) o2=$(med origin2) c=$(med copied)
printf '%-40s %10s %7s\n' "read-64k (median of $ROUNDS)" IOPS ratio
printf '%-40s %10.0f\n' "origin" "$o"
printf '%-40s %10.0f %6.2fx\n' "snapshot, unchanged chunks" "$f" "$(echo "$f / $o" | bc -l)"
printf '%-40s %10.0f\n' "origin (after a write round)" "$o2"
printf '%-40s %10.0f %6.2fx\n' "snapshot, part of its chunks copied" "$c" "$(echo "$c / $o2" | bc -l)"
