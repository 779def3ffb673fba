#!/usr/bin/env bash
# Cost of live snapshots: origin write throughput with 0, 1 and 2 active snapshots (fresh COW
# stores, so first writes copy chunks) for 4k random and 64k sequential writes, as ratios to the
# plain device; and snapshot read throughput relative to origin reads. udmd serves one disk
# exported over NBD; snapshots are taken with `udm snapshot take` on the exported device.
# Not a timed test: run it and read the table. Target: one snapshot keeps >= 50% of 64k
# sequential write throughput.
# Write jobs issue a fixed amount of I/O (IO, default 128M) over the whole SIZE device, so with a
# fresh snapshot nearly every write is a first write that copies its chunks (time-based runs
# would soon rewrite copied chunks and flatter the snapshot). Reads are time based.
# Environment: RUNTIME (s per read run, default 5), SIZE (default 1G), IO (default 128M),
# CHUNK (sectors, default 8), WORKDIR.
set -euo pipefail
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-1G}
CHUNK=${CHUNK:-8}
IO=${IO:-128M}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/udm-bench-snap.XXXXXX)}
# shellcheck source=bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
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
run() { # name uri rw bs depth -> "iops mibs"
  local out=$WORKDIR/$1.json dir=read amount=(--time_based --runtime="$RUNTIME")
  [[ $3 == *write* ]] && { dir=write; amount=(--io_size="$IO"); }
  fio --name="$1" --ioengine=nbd --uri="$2" --rw="$3" --bs="$4" --iodepth="$5" --size="$SIZE" \
      "${amount[@]}" --output-format=json --output="$out" >/dev/null 2>&1
  jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw_bytes/1048576)"' "$out"
}
printf '%-22s %10s %9s %8s\n' job IOPS MiB/s ratio
for job in "randwrite-4k randwrite 4k 16" "write-64k write 64k 4"; do
  read -r name rw bs depth <<<"$job"
  base=
  for n in 0 1 2; do
    take "$n"
    read -r iops mib <<<"$(run "$name-$n" "$(uri vol)" "$rw" "$bs" "$depth")"
    drop
    [[ -z $base ]] && base=$mib
    printf '%-22s %10.0f %9.1f %7.2fx\n' "$name, $n snapshot(s)" "$iops" "$mib" "$(echo "$mib / $base" | bc -l)"
  done
done
# Reads: origin vs a snapshot that has taken a round of writes (half its chunks copied).
take 1
run warm "$(uri vol)" randwrite 64k 4 >/dev/null
read -r _ o <<<"$(run read-origin "$(uri vol)" read 64k 4)"
read -r _ s <<<"$(run read-snap "$(uri s1)" read 64k 4)"
printf '%-22s %10s %9.1f\n%-22s %10s %9.1f %7.2fx\n' "read-64k origin" - "$o" "read-64k snapshot" - "$s" "$(echo "$s / $o" | bc -l)"
drop
