#!/usr/bin/env bash
# Overhead of live interposition: one 1 GiB disk served by udmd and exported over NBD, measured
# plain and with a linear interposer attached (`udmsetup create ip --interpose ...`), with the
# same fio jobs (nbd engine: 4k random read/write at iodepth 16, 1M sequential read/write at
# iodepth 4). Modes alternate within each round; the median of ROUNDS is reported with the
# interposed/plain ratio. Not a timed test: run it by hand and read the table. A failed fio stops
# it; in the first round each job and mode also runs a crc32c-verified write pass (bench-fio.sh).
#
# Environment: RUNTIME (s per run, default 5), ROUNDS (default 3), SIZE (default 1G), WORKDIR.
set -euo pipefail
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/udm-bench-ip.XXXXXX)}
# shellcheck source=bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
# shellcheck source=bench-fio.sh
. "$ROOT/scripts/bench-fio.sh"
u disk add d --file "$WORKDIR/disk.img" >/dev/null
SECTORS=$(( $(stat -c %s "$WORKDIR/disk.img") / 512 ))
u export add d --nbd >/dev/null
URI="nbd+unix:///d?socket=$UDM_RUNTIME_DIR/nbd.sock"
RESULTS=$WORKDIR/results.tsv; : >"$RESULTS"
JOBS=("randread-4k randread 4k 16" "randwrite-4k randwrite 4k 16" "read-1m read 1M 4" "write-1m write 1M 4")
for j in "${JOBS[@]}"; do
  read -r name rw bs depth <<<"$j"
  for round in $(seq "$ROUNDS"); do
    for mode in plain interposed; do
      [[ $mode == interposed ]] && u create ip --interpose --table "0 $SECTORS linear d 0" >/dev/null
      out=$WORKDIR/$mode-$name-$round.json
      fio_json "$out" --name="$name" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" --iodepth="$depth" \
          --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1
      [[ $round == 1 ]] && fio_verify "$URI" "$rw" "$bs" "$depth"
      dir=read; [[ $rw == *write* ]] && dir=write
      jq -r --arg m "$mode" --arg n "$name" --arg d "$dir" \
        '.jobs[0][$d] | [$m, $n, .iops, (.bw_bytes/1048576), ((.clat_ns.percentile["99.000000"] // 0)/1000)] | @tsv' "$out" >>"$RESULTS"
      if [[ $mode == interposed ]]; then
        echo "bench-interpose: $name round $round: $(u info ip | sed -n 's/^Redirected: *//p') requests redirected" >&2
        u remove ip >/dev/null
      fi
    done
  done
done
python3 - "$RESULTS" <<'PY'
import sys, collections
runs = collections.OrderedDict()
for l in open(sys.argv[1]):
    m, n, i, b, p = l.split("\t")
    runs.setdefault(n, {}).setdefault(m, []).append((float(i), float(b), float(p)))
print(f"{'job':<14} {'mode':<11} {'IOPS':>9} {'MiB/s':>8} {'p99 us':>8}")
for n, d in runs.items():
    med = {m: sorted(v)[len(v)//2] for m, v in d.items()}
    for m in ("plain", "interposed"):
        i, b, p = med[m]
        print(f"{n:<14} {m:<11} {i:>9.0f} {b:>8.1f} {p:>8.0f}")
    r = med["interposed"][0] / med["plain"][0]
    print(f"{'':<14} overhead    {100*(1-r):>8.1f}%  (interposed/plain {r:.3f}x)")
PY
