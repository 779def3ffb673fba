#!/usr/bin/env bash
# Side-by-side NBD benchmark: the same 1 GiB file served by udm, by nbdkit's file plugin and by
# qemu-storage-daemon, driven by the same fio jobs (ioengine=nbd), one server at a time, on an
# allocated file (random data) and on a fresh sparse one (FILES).
# Prints IOPS, MiB/s and p99 latency per job and server, and the udm/peer ratios. A failed fio
# stops it, and each job runs once per server as a crc32c-verified write pass (bench-fio.sh).
#
# Environment: RUNTIME (seconds per run, default 5), ROUNDS (runs per job and server, median
# reported, default 3), SIZE (default 1G), WORKDIR (default a
# temporary directory), UDM_BIN (directory with udmd and udmsetup; built if unset), JOBS (space
# separated subset of job names).
set -euo pipefail

RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench-fio.sh
. "$ROOT/scripts/bench-fio.sh"
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/udm-bench.XXXXXX)}
FILE=$WORKDIR/disk.img
SOCK=$WORKDIR/nbd.sock
RESULTS=$WORKDIR/results.tsv
SERVER_PID=

for t in fio nbdkit qemu-storage-daemon jq; do
    command -v "$t" >/dev/null || { echo "bench-exports: $t is missing (apt-get install fio nbdkit qemu-utils jq)" >&2; exit 1; }
done

cleanup() {
    stop_server
    [[ -n ${KEEP:-} ]] || rm -rf "$WORKDIR"
}
trap cleanup EXIT

stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    rm -f "$SOCK"
}

wait_socket() {
    for _ in $(seq 100); do
        [[ -S $SOCK ]] && return 0
        sleep 0.1
    done
    echo "bench-exports: server did not create $SOCK" >&2
    exit 1
}

# The udm server: udmd serving the file as a disk, a linear mapping over all of it, and that
# mapped device exported over NBD (the path a user's data takes through udm).
start_udm() {
    local bin=${UDM_BIN:-}
    if [[ -z $bin ]]; then
        (cd "$ROOT" && cargo build --quiet --release -p udm-daemon -p udm-cli)
        bin=${CARGO_TARGET_DIR:-$ROOT/target}/release
    fi
    rm -rf "$WORKDIR/udm-state"
    UDM_RUNTIME_DIR=$WORKDIR UDM_STATE_DIR=$WORKDIR/udm-state "$bin/udmd" >"$WORKDIR/udmd.log" 2>&1 &
    SERVER_PID=$!
    wait_socket
    local u="$bin/udmsetup --socket $WORKDIR/control.sock"
    for _ in $(seq 100); do $u version >/dev/null 2>&1 && break; sleep 0.1; done
    local sectors=$(( $(stat -c %s "$FILE") / 512 ))
    $u disk add benchdisk --file "$FILE" >/dev/null
    $u create bench --table "0 $sectors linear benchdisk 0" >/dev/null
    $u export add bench --nbd >/dev/null
}

start_nbdkit() {
    nbdkit --foreground -U "$SOCK" -e bench file file="$FILE" &
    SERVER_PID=$!
    wait_socket
}

start_qsd() {
    qemu-storage-daemon \
        --blockdev file,node-name=f0,filename="$FILE",cache.direct=off \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export nbd,id=e0,node-name=f0,name=bench,writable=on &
    SERVER_PID=$!
    wait_socket
}

# name rw bs iodepth numjobs
ALL_JOBS=(
    "randread-4k rw=randread 4k 16 1"
    "randwrite-4k rw=randwrite 4k 16 1"
    "read-1m rw=read 1M 4 1"
    "write-1m rw=write 1M 4 1"
    "randread-4k-2conn rw=randread 4k 16 2"
    "randwrite-4k-2conn rw=randwrite 4k 16 2"
)

run_job() { # server job-spec file-kind
    local server=$1 name rw bs depth jobs
    read -r name rw bs depth jobs <<<"$2"
    name="$name/$3"
    local out=$WORKDIR/$server-${name//\//-}.json
    fio_json "$out" --name="$name" --ioengine=nbd --uri="nbd+unix:///bench?socket=$SOCK" \
        --"$rw" --bs="$bs" --iodepth="$depth" --numjobs="$jobs" --group_reporting \
        --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1
    local dir=read
    [[ $rw == *write* ]] && dir=write
    jq -r --arg s "$server" --arg n "$name" --arg d "$dir" \
        '.jobs[0][$d] | [$s, $n, .iops, (.bw_bytes / 1048576), ((.clat_ns.percentile["99.000000"] // 0) / 1000)] | @tsv' \
        "$out" >>"$RESULTS"
}

mkdir -p "$WORKDIR"
: >"$RESULTS"
# The file each server is given: `allocated` (filled with random data once: every write
# overwrites allocated blocks) and `sparse` (a fresh sparse file before every run: writes
# allocate). Both by default; FILES=allocated or FILES=sparse picks one.
FILES=${FILES:-allocated sparse}
prepare() { # kind
    case $1 in
    allocated)
        if [[ ! -e $WORKDIR/filled ]]; then
            echo "bench-exports: filling $SIZE file in $WORKDIR" >&2
            rm -f "$FILE"
            fio --name=fill --filename="$FILE" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
                --refill_buffers --output=/dev/null
            sync
            touch "$WORKDIR/filled"
        fi ;;
    sparse)
        rm -f "$FILE" "$WORKDIR/filled"
        truncate -s "$SIZE" "$FILE" ;;
    *) echo "bench-exports: unknown file kind $1 (allocated or sparse)" >&2; exit 1 ;;
    esac
}

# The page cache is dropped before every run (as root), so each server starts from the same
# cache state. It matters: after the fill, the file sits in the cache in large folios, and a
# 4k write into one costs the filesystem several times a write into a small one (on Linux
# 6.18 with ext4, 4k random writes ran at 33-55k IOPS over such a file and 134-200k after a
# drop, for nbdkit and udm alike, measured 2026-12-01). Which cache state a run met
# made the allocated-file results swing by 2x between runs.
drop_cache() {
    sync
    if [[ -w /proc/sys/vm/drop_caches ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    elif [[ -z ${CACHE_WARNED:-} ]]; then
        echo "bench-exports: cannot drop the page cache (not root): runs may meet different cache states" >&2
        CACHE_WARNED=1
    fi
}

SELECTED=()
for j in "${ALL_JOBS[@]}"; do
    if [[ -z ${JOBS:-} ]] || [[ " $JOBS " == *" ${j%% *} "* ]]; then
        SELECTED+=("$j")
    fi
done

# Servers alternate within each round so that background load hits all of them alike; the
# table shows the median over ROUNDS.
for kind in $FILES; do
for j in "${SELECTED[@]}"; do
    for round in $(seq "$ROUNDS"); do
        for server in udm nbdkit qsd; do
            echo "bench-exports: ${j%% *} ($kind file) round $round $server" >&2
            prepare "$kind"
            drop_cache
            "start_$server"
            run_job "$server" "$j" "$kind"
            # Once per job and server: the same pattern, written and read back verified.
            if [[ $round == 1 ]]; then
                read -r _ rw bs depth _ <<<"$j"
                fio_verify "nbd+unix:///bench?socket=$SOCK" "${rw#rw=}" "$bs" "$depth"
            fi
            stop_server
        done
    done
done
done

python3 - "$RESULTS" <<'EOF'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
import statistics
runs = collections.OrderedDict()
for s, n, iops, mib, p99 in rows:
    runs.setdefault(n, {}).setdefault(s, []).append((float(iops), float(mib), float(p99)))
r = collections.OrderedDict()
for n, d in runs.items():
    for s, l in d.items():
        l.sort()
        r.setdefault(n, {})[s] = l[len(l) // 2]
hdr = f"{'job/file':<24} {'server':<7} {'IOPS':>10} {'MiB/s':>9} {'p99 us':>9}"
print(hdr)
print("-" * len(hdr))
worst = {}
for n, d in r.items():
    for s in ("udm", "nbdkit", "qsd"):
        if s in d:
            i, m, p = d[s]
            print(f"{n:<24} {s:<7} {i:>10.0f} {m:>9.1f} {p:>9.0f}")
    if "udm" in d:
        u = d["udm"][0]
        parts = []
        for peer in ("nbdkit", "qsd"):
            if peer in d and d[peer][0] > 0:
                ratio = u / d[peer][0]
                worst[peer] = min(worst.get(peer, ratio), ratio)
                parts.append(f"udm/{peer} {ratio:.2f}x")
        print(f"{'':<24} {'ratio':<7} " + "  ".join(parts))
print()
print("worst ratio: " + "  ".join(f"udm/{p} {v:.2f}x" for p, v in worst.items()))
EOF
