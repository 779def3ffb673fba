#!/usr/bin/env bash
# The figures of issue 11 (deliverable 6): what change tracking costs the clients of a device,
# and what it buys the backups. One SIZE disk served by a private udmd and exported over NBD.
#
# 1. Tracking overhead. fio (nbd engine) on the same export, untracked and tracked (`udm track
#    start vol --block-size 64K`: an era target interposed), the two modes alternating within each
#    of ROUNDS rounds (which goes first alternates too). Two jobs, each in two passes:
#      4k randwrite iodepth 16
#        first:   one 4k write at a random 4k offset inside every 64K block, blocks in random
#                 order (a fio replay log, SIZE/64K writes), right after `udm track checkpoint`:
#                 every write is the first to its era block in the era, so each needs a mark
#                 and a metadata commit before it reaches the device (the write is held in
#                 memory meanwhile). First passes end with a flush (fio end_fsync=1, in both
#                 modes), so the figure counts the time until every write is durable, not only
#                 acknowledged
#        rewrite: then RUNTIME s (after 1 s ramp) of ordinary 4k random writes over the whole
#                 device: every era block is marked already, no metadata I/O
#      64k write (sequential) iodepth 8
#        first:   one sequential pass over the device (SIZE/64K writes, each the first to its
#                 era block) right after a checkpoint, ending with a flush
#        rewrite: then RUNTIME s (after 1 s ramp) of sequential writes: all rewrites
#    The untracked runs are the same passes on the same device without the era target. Printed:
#    medians of IOPS, MiB/s, p99, p99.9 and max completion latency, and tracked/untracked ratios
#    (goal: tracked IOPS >= 0.9x untracked, i.e. less than 10% overhead). In round 1 each job
#    also runs a crc32c-verified write pass on the tracked device (bench-fio.sh).
# 2. Incremental against full backup. The device (filled with incompressible data, then
#    overwritten by part 1) tracked; ROUNDS times: `udm backup full` into a fresh directory,
#    timed (wall clock) next to the peer reference, `qemu-img convert -f raw -O qcow2` of the same
#    export (-t writeback, so it flushes at the end as udm backup does; the order alternates).
#    Then ROUNDS times: CHANGE% (default 1) of the device rewritten in random 64K blocks through
#    the NBD export (fio randwrite bs=64k, distinct blocks, so the era target sees them) and
#    `udm backup incremental` timed. Printed: medians of wall time, the point's own copy time
#    (`seconds`), bytes copied (data_bytes) and image size; incremental data / device size
#    (goal <= 2%), full / incremental wall time (goal >= 10x), udm full / qemu-img convert time.
#    Last, the latest incremental point is restored to a file with `udm backup restore` and
#    compared (md5) with the device read over NBD with nbdcopy: OK or FAIL (exit status 1).
#
# Not a timed test: run it by hand and read the tables. The defaults finish in a few minutes;
# the figure in issue 11 uses SIZE=4G (RUNTIME=10 ROUNDS=5 for steadier medians).
# Environment: SIZE (default 1G, a multiple of 64K), RUNTIME (s per rewrite run, default 3),
# ROUNDS (default 3), CHANGE (percent of the device changed per incremental, default 1),
# WORKDIR, KEEP (keep WORKDIR). Needs about 3x SIZE free in WORKDIR.
set -euo pipefail
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-3}
ROUNDS=${ROUNDS:-3}
CHANGE=${CHANGE:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/udm-bench-backup.XXXXXX)}
mkdir -p "$WORKDIR"
for t in qemu-img python3 md5sum; do
  command -v $t >/dev/null || { echo "bench-backup: $t missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
# shellcheck source=bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
# shellcheck source=bench-fio.sh
. "$ROOT/scripts/bench-fio.sh"
u disk add vol --file "$WORKDIR/disk.img" >/dev/null
u export add vol --nbd >/dev/null
BYTES=$(stat -c %s "$WORKDIR/disk.img")
BLOCKS=$((BYTES / 65536))
URI="nbd+unix:///vol?socket=$UDM_RUNTIME_DIR/nbd.sock"
META=$WORKDIR/track.era
RESULTS=$WORKDIR/results.tsv BACKUPS=$WORKDIR/backups.tsv
: >"$RESULTS"; : >"$BACKUPS"
log() { echo "bench-backup: $*" >&2; }
now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }

# The 4k first-write pass: one write in each 64K block, blocks in random order.
python3 - "$WORKDIR/first-4k.iolog" "$BLOCKS" <<'PY'
import random, sys
blocks = list(range(int(sys.argv[2])))
random.shuffle(blocks)
with open(sys.argv[1], "w") as f:
    f.write("fio version 2 iolog\nnbd add\nnbd open\n")
    for b in blocks:
        f.write(f"nbd write {b * 65536 + random.randrange(16) * 4096} 4096\n")
    f.write("nbd close\n")
PY

# run MODE JOB PASS ROUND FIO-ARGS...: one fio run, its write figures appended to RESULTS.
run() {
  local mode=$1 job=$2 pass=$3 round=$4; shift 4
  local out=$WORKDIR/$mode-$job-$pass-$round.json
  fio_json "$out" --name="$job-$pass" --ioengine=nbd --uri="$URI" "$@"
  jq -r --arg m "$mode" --arg j "$job" --arg p "$pass" '.jobs[0].write | [$j, $p, $m, .iops,
      (.bw_bytes / 1048576), (.clat_ns.percentile["99.000000"] / 1e6),
      (.clat_ns.percentile["99.900000"] / 1e6), (.clat_ns.max / 1e6), .total_ios] | @tsv' \
    "$out" >>"$RESULTS"
}
# run_jobs MODE ROUND: both jobs, first pass then rewrites; tracked: a checkpoint before each first pass.
run_jobs() {
  local mode=$1 round=$2
  [[ $mode == tracked ]] && udm track checkpoint vol >/dev/null
  run "$mode" randwrite-4k first "$round" --read_iolog="$WORKDIR/first-4k.iolog" --replay_no_stall=1 \
    --rw=randwrite --bs=4k --iodepth=16 --end_fsync=1
  run "$mode" randwrite-4k rewrite "$round" --rw=randwrite --bs=4k --iodepth=16 --size="$BYTES" \
    --time_based --runtime="$RUNTIME" --ramp_time=1
  [[ $mode == tracked && $round == 1 ]] && fio_verify "$URI" randwrite 4k 16
  [[ $mode == tracked ]] && udm track checkpoint vol >/dev/null
  run "$mode" write-64k first "$round" --rw=write --bs=64k --iodepth=8 --size="$BYTES" --end_fsync=1
  run "$mode" write-64k rewrite "$round" --rw=write --bs=64k --iodepth=8 --size="$BYTES" \
    --time_based --runtime="$RUNTIME" --ramp_time=1
  [[ $mode == tracked && $round == 1 ]] && fio_verify "$URI" write 64k 8
  return 0
}
track_start() { udm track start vol --block-size 64K --meta "$META" >/dev/null; }
track_stop() { udm track stop vol >/dev/null; rm -f "$META"; }

# 1. Tracking overhead.
for round in $(seq "$ROUNDS"); do
  modes=(untracked tracked); ((round % 2)) || modes=(tracked untracked)
  for mode in "${modes[@]}"; do
    log "overhead round $round/$ROUNDS: $mode"
    if [[ $mode == tracked ]]; then track_start; run_jobs tracked "$round"; track_stop
    else run_jobs untracked "$round"; fi
  done
done

# 2. Full backups (and the qemu-img reference), then incrementals, on the tracked device.
track_start
point() { tail -1 "$1" | jq -r --arg k "$2" '.result | [$k, .n, .data_bytes, .image_bytes, .changed_bytes, .seconds] | @tsv'; }
for round in $(seq "$ROUNDS"); do
  order=(udm qemu); ((round % 2)) || order=(qemu udm)
  for who in "${order[@]}"; do
    if [[ $who == udm ]]; then
      log "full backup round $round/$ROUNDS: udm backup full"
      rm -rf "$WORKDIR/bk"
      t0=$(now)
      udm backup full vol --to "$WORKDIR/bk" --json >"$WORKDIR/full-$round.json"
      echo -e "$(point "$WORKDIR/full-$round.json" full)\t$(elapsed "$t0")" >>"$BACKUPS"
    else
      log "full backup round $round/$ROUNDS: qemu-img convert"
      rm -f "$WORKDIR/qemu.qcow2"
      t0=$(now)
      qemu-img convert -t writeback -f raw -O qcow2 "$URI" "$WORKDIR/qemu.qcow2"
      t=$(elapsed "$t0")
      echo -e "qemu\t-\t$BYTES\t$(stat -c %s "$WORKDIR/qemu.qcow2")\t$BYTES\t$t\t$t" >>"$BACKUPS"
      rm -f "$WORKDIR/qemu.qcow2"
    fi
  done
done
NCHANGE=$((BLOCKS * CHANGE / 100))
((NCHANGE > 0)) || NCHANGE=1
for round in $(seq "$ROUNDS"); do
  log "incremental round $round/$ROUNDS: $NCHANGE random 64K blocks rewritten, udm backup incremental"
  fio_json "$WORKDIR/change-$round.json" --name=change --ioengine=nbd --uri="$URI" --rw=randwrite \
    --bs=64k --iodepth=8 --size="$BYTES" --number_ios="$NCHANGE" --randrepeat=0 --refill_buffers
  t0=$(now)
  udm backup incremental vol --to "$WORKDIR/bk" --json >"$WORKDIR/incr-$round.json"
  echo -e "$(point "$WORKDIR/incr-$round.json" incremental)\t$(elapsed "$t0")" >>"$BACKUPS"
done
LAST=$(tail -1 "$WORKDIR/incr-$ROUNDS.json" | jq -r .result.n)
log "restoring point $LAST and reading the device with nbdcopy"
t0=$(now)
udm backup restore "$WORKDIR/bk" --point "$LAST" --to "$WORKDIR/restore.img" >/dev/null
RESTORE_S=$(elapsed "$t0")
SUM_RESTORE=$(md5sum <"$WORKDIR/restore.img" | cut -d' ' -f1)
SUM_DEV=$(nbdcopy "$URI" - | md5sum | cut -d' ' -f1)
rm -f "$WORKDIR/restore.img"
track_stop

echo "== tracking overhead: udm track (era, 64K blocks) on a $SIZE NBD export, median of $ROUNDS rounds"
echo "   first = each write is the first to its 64K era block since a checkpoint (SIZE/64K writes, then a flush);"
echo "   rewrite = ${RUNTIME}s of writes to blocks already marked in the era. Latencies in ms."
python3 - "$RESULTS" <<'PY'
import sys, collections
runs = collections.OrderedDict()
for l in open(sys.argv[1]):
    j, p, m, *v = l.rstrip("\n").split("\t")
    runs.setdefault((j, p), {}).setdefault(m, []).append([float(x) for x in v])
def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
print(f"{'job':<13} {'pass':<8} {'mode':<10} {'IOPS':>8} {'MiB/s':>8} {'p99':>8} {'p99.9':>8} {'max':>8} {'ios':>8}")
for (j, p), d in runs.items():
    m = {k: [med(c) for c in zip(*v)] for k, v in d.items()}
    for k in ("untracked", "tracked"):
        i, b, p99, p999, mx, n = m[k]
        print(f"{j:<13} {p:<8} {k:<10} {i:>8.0f} {b:>8.1f} {p99:>8.3f} {p999:>8.3f} {mx:>8.2f} {n:>8.0f}")
    t, u = m["tracked"], m["untracked"]
    r = t[0] / u[0]
    print(f"{'':<13} {'':<8} {'ratio':<10} {r:>7.2f}x {t[1] / u[1]:>7.2f}x {t[2] / u[2]:>7.2f}x"
          f" {t[3] / u[3]:>7.2f}x {t[4] / u[4]:>7.2f}x   tracked/untracked; goal IOPS >= 0.90x:"
          f" {'met' if r >= 0.9 else 'MISSED'}")
PY
echo
echo "== backups of the $SIZE device (tracked), median of $ROUNDS; $CHANGE% = $NCHANGE random 64K blocks changed before each incremental"
python3 - "$BACKUPS" "$BYTES" "$RESTORE_S" "$LAST" "$SUM_RESTORE" "$SUM_DEV" <<'PY'
import sys
rows = {}
for l in open(sys.argv[1]):
    k, n, data, image, changed, secs, wall = l.rstrip("\n").split("\t")
    rows.setdefault(k, []).append([float(data), float(image), float(changed), float(secs), float(wall)])
size = int(sys.argv[2])
def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
m = {k: [med(c) for c in zip(*v)] for k, v in rows.items()}
names = {"full": "udm backup full", "qemu": "qemu-img convert (peer)", "incremental": "udm backup incremental"}
M = 1048576
print(f"{'':<25} {'wall s':>8} {'copy s':>8} {'data MiB':>9} {'image MiB':>10} {'changed MiB':>12} {'MiB/s':>8}")
for k in ("full", "qemu", "incremental"):
    data, image, changed, secs, wall = m[k]
    print(f"{names[k]:<25} {wall:>8.2f} {secs:>8.2f} {data / M:>9.1f} {image / M:>10.1f} {changed / M:>12.1f} {data / M / wall:>8.1f}")
f, q, i = m["full"], m["qemu"], m["incremental"]
frac = 100 * i[0] / size
print(f"incremental data / device size:     {frac:6.2f}%   goal <= 2%:   {'met' if frac <= 2 else 'MISSED'}")
r = f[4] / i[4]
print(f"full / incremental wall time:       {r:6.1f}x   goal >= 10x:  {'met' if r >= 10 else 'MISSED'}")
print(f"udm full / qemu-img convert time:   {f[4] / q[4]:6.2f}x   (below 1: udm is faster)")
ok = sys.argv[5] == sys.argv[6]
print(f"restore of point {sys.argv[4]} ({float(sys.argv[3]):.2f} s) vs nbdcopy of the device: "
      f"{'OK' if ok else 'FAIL'} (md5 {sys.argv[5]} / {sys.argv[6]})")
PY
[[ $SUM_RESTORE == "$SUM_DEV" ]]
