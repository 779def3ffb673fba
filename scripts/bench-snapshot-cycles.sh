#!/usr/bin/env bash
# Do clients notice a backup? fio 4k random writes at iodepth 8 over NBD on an exported disk,
# RUNTIME seconds per run, once plain and once while CYCLES live snapshots are taken and dropped
# (`udm snapshot take --store N` = interposed snapshot-origin, suspend, snapshot, resume; then
# `udm snapshot drop`), and once while CYCLES linear interposers are attached and detached;
# then the same fio job against qemu-storage-daemon on the same file, plain and while CYCLES
# fleecing backups are attached (blockdev-backup sync=none to a file target) and cancelled.
# Prints IOPS, p99, p99.9 and max completion latency per run and the ratios to the plain run of
# the same server in the same run, plus udmd's largest RSS during the snapshot cycles.
# Goal (issue 12): max <= 2x and p99.9 <= 1.5x of plain for both udm cycle kinds.
# Not a timed test. Environment: SIZE (default 1G), RUNTIME (default 16), CYCLES (default 10),
# WORKDIR, KEEP (keep WORKDIR).
set -euo pipefail
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-16}
CYCLES=${CYCLES:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/udm-bench-cycles.XXXXXX)}
mkdir -p "$WORKDIR"
for t in qemu-storage-daemon python3; do
  command -v $t >/dev/null || { echo "bench-snapshot-cycles: $t missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
# shellcheck source=bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
# shellcheck source=bench-fio.sh
. "$ROOT/scripts/bench-fio.sh"
u disk add vol --file "$WORKDIR/disk.img" >/dev/null
u export add vol --nbd >/dev/null
SECTORS=$(( $(stat -c %s "$WORKDIR/disk.img") / 512 ))
UDM_URI="nbd+unix:///vol?socket=$UDM_RUNTIME_DIR/nbd.sock"
RESULTS=$WORKDIR/results.tsv
: > "$RESULTS"

# fio in the background for RUNTIME s; ACTION runs CYCLES times, spread over the run.
# run_case NAME URI ACTION
run_case() {
  local name=$1 uri=$2 action=$3 out=$WORKDIR/$1.json
  # Every case starts with no dirty data of the earlier ones: the host's write-back of what
  # they left (GiBs at these rates) would stall this one's writes (seen: a 369 ms max in the
  # third case, and the peer at half its rate when it ran last).
  sync
  fio_json "$out" --name="$name" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
    --iodepth=8 --time_based --runtime="$RUNTIME" --size="$SIZE" --randrepeat=0 &
  local fio_pid=$!
  if [ "$action" != none ]; then
    sleep 2
    local gap
    gap=$(echo "scale=2; ($RUNTIME - 4) / $CYCLES" | bc)
    for i in $(seq "$CYCLES"); do
      local t0 t1
      t0=$(date +%s%N)
      "$action" "$i"
      t1=$(date +%s%N)
      echo "$name cycle $i: $(( (t1 - t0) / 1000000 )) ms" >> "$WORKDIR/cycles.log"
      sleep "$(echo "if ($gap - ($t1 - $t0) / 1000000000 > 0) $gap - ($t1 - $t0) / 1000000000 else 0" | bc)"
    done
  fi
  wait "$fio_pid" || exit 1
  jq -r --arg n "$name" '.jobs[0].write as $w | [$n, ($w.iops | floor),
      ($w.clat_ns.percentile["99.000000"] / 1e6), ($w.clat_ns.percentile["99.900000"] / 1e6),
      ($w.clat_ns.max / 1e6)] | @tsv' "$out" >> "$RESULTS"
}

# Phases (control operations) of each take and drop, timed by `udm --timings`.
snapshot_cycle() {
  udm --timings snapshot take vol --cow "$WORKDIR/c.cow" --size 256M --store N --name bsnap \
    2>>"$WORKDIR/phases.log" >/dev/null
  sleep 0.5
  udm --timings snapshot drop bsnap 2>>"$WORKDIR/phases.log" >/dev/null
  rm -f "$WORKDIR/c.cow"
}
interpose_cycle() {
  u create btrace --interpose --table "0 $SECTORS linear vol 0" >/dev/null
  sleep 0.5
  u remove btrace >/dev/null
}
RSS_MAX=0
sample_rss() {
  while kill -0 "$PID" 2>/dev/null; do
    awk '/^VmRSS/ {print $2}' "/proc/$PID/status" 2>/dev/null
    sleep 0.2
  done > "$WORKDIR/rss.log"
}

fio_verify "$UDM_URI" randwrite 4k 8
run_case udm-plain "$UDM_URI" none
sample_rss & RSS_PID=$!
run_case udm-snapshot-cycles "$UDM_URI" snapshot_cycle
kill $RSS_PID 2>/dev/null; wait $RSS_PID 2>/dev/null || true
RSS_MAX=$(sort -n "$WORKDIR/rss.log" | tail -1)
run_case udm-interpose-cycles "$UDM_URI" interpose_cycle
u export remove vol >/dev/null
u disk remove vol >/dev/null

# qemu-storage-daemon on the same file, with a QMP monitor for the fleecing cycles.
QSOCK=$WORKDIR/qsd-nbd.sock QMP=$WORKDIR/qmp.sock
cat > "$WORKDIR/qmp.py" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def reply():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
reply()
def cmd(c, **a):
    f.write(json.dumps({"execute": c, "arguments": a}) + "\n"); f.flush()
    r = reply()
    if "error" in r:
        sys.exit(f"qmp {c}: {r['error']}")
    return r["return"]
cmd("qmp_capabilities")
op = sys.argv[2]
if op == "attach":
    cmd("blockdev-add", driver="raw", **{"node-name": "fl"},
        file={"driver": "file", "filename": sys.argv[3]})
    cmd("blockdev-backup", **{"job-id": "fleece"}, device="r0", target="fl", sync="none")
elif op == "detach":
    cmd("block-job-cancel", device="fleece", force=True)
    for _ in range(500):
        if not [j for j in cmd("query-block-jobs") if j["device"] == "fleece"]:
            break
        time.sleep(0.01)
    cmd("blockdev-del", **{"node-name": "fl"})
PY
qemu-storage-daemon \
  --blockdev file,node-name=f0,filename="$WORKDIR/disk.img",cache.direct=off \
  --blockdev raw,node-name=r0,file=f0 \
  --nbd-server addr.type=unix,addr.path="$QSOCK" \
  --export nbd,id=e0,node-name=r0,name=vol,writable=on \
  --chardev socket,id=m0,path="$QMP",server=on,wait=off --monitor chardev=m0 \
  > "$WORKDIR/qsd.log" 2>&1 &
QSD=$!
trap 'kill $QSD 2>/dev/null; kill $PID 2>/dev/null; wait 2>/dev/null; [[ -n ${KEEP:-} ]] || rm -rf "$WORKDIR"' EXIT
for _ in $(seq 100); do [ -S "$QSOCK" ] && [ -S "$QMP" ] && break; sleep 0.1; done
QSD_URI="nbd+unix:///vol?socket=$QSOCK"
fleece_cycle() {
  truncate -s "$SIZE" "$WORKDIR/fleece.img"
  python3 "$WORKDIR/qmp.py" "$QMP" attach "$WORKDIR/fleece.img"
  sleep 0.5
  python3 "$WORKDIR/qmp.py" "$QMP" detach
  rm -f "$WORKDIR/fleece.img"
}
run_case qsd-plain "$QSD_URI" none
run_case qsd-fleece-cycles "$QSD_URI" fleece_cycle

echo "fio randwrite 4k iodepth 8, ${RUNTIME}s, $SIZE, $CYCLES cycles (latencies in ms; ratios to the same server's plain run)"
awk -F'\t' '
  { n[NR] = $1; iops[NR] = $2; p99[NR] = $3; p999[NR] = $4; mx[NR] = $5
    if ($1 ~ /-plain$/) { split($1, a, "-"); base[a[1]] = NR } }
  END {
    printf "%-22s %8s %8s %8s %9s %8s %8s %8s\n", "run", "IOPS", "p99", "p99.9", "max", "x p99.9", "x max", "x IOPS"
    for (i = 1; i <= NR; i++) {
      split(n[i], a, "-"); b = base[a[1]]
      printf "%-22s %8d %8.3f %8.3f %9.3f %8.2f %8.2f %8.2f\n", n[i], iops[i], p99[i], p999[i], mx[i],
        p999[i] / p999[b], mx[i] / mx[b], iops[i] / iops[b]
    }
  }' "$RESULTS"
echo "udmd max RSS during the snapshot cycles: $((RSS_MAX / 1024)) MiB"
echo "snapshot phases (control operations of udm snapshot take/drop, round trip):"
awk '/^timing: / { k = $4; for (i = 5; i <= NF; i++) k = k " " $i
    if (k ~ /^(ls|table|status|info|disk list|export list)( |$)/) next
    s[k] += $2; c[k]++; if ($2 > m[k]) m[k] = $2 }
  END { for (k in s) printf "  %-24s n %3d  mean %8.2f ms  max %8.2f ms\n", k, c[k], s[k] / c[k], m[k] }' \
  "$WORKDIR/phases.log" | sort
echo "cycle durations (take+drop / attach+detach, incl. 0.5 s held):"
awk '{ split($1, a, "-"); k = a[1] "-" a[2]; s[k] += $(NF-1); c[k]++; if ($(NF-1) > m[k]) m[k] = $(NF-1) }
  END { for (k in s) printf "  %-16s mean %d ms, max %d ms\n", k, s[k] / c[k], m[k] }' "$WORKDIR/cycles.log"
