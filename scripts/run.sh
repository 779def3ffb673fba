#!/usr/bin/env bash
# The main job: build udm, start udmd with its default directories (root: /run/udm and
# /var/lib/udm; a user: $XDG_RUNTIME_DIR/udm and ~/.local/state/udm) and run a short live demo:
# a disk, a linear mapping exported over NBD, a client writing and reading through it, and a delay
# interposer attached to the device in use and detached again, a live snapshot, and a full and an
# incremental backup (a qcow2 chain that qemu-img reads), with the data checked throughout.
# udmd keeps running afterwards; the last lines say how to reach and stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --quiet
export PATH="${CARGO_TARGET_DIR:-$PWD/target}/release:$PATH"
RUN=${UDM_RUNTIME_DIR:-$( [ "$(id -u)" = 0 ] && echo /run/udm || echo "${XDG_RUNTIME_DIR:-/tmp}/udm")}
export UDM_RUNTIME_DIR=$RUN
mkdir -p "$RUN"
if ! udmsetup version >/dev/null 2>&1; then
  nohup udmd >"$RUN/udmd.log" 2>&1 &
  echo $! >"$RUN/udmd.pid"
  for _ in $(seq 100); do udmsetup version >/dev/null 2>&1 && break; sleep 0.1; done
fi
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
DEMO=${UDM_DEMO_DIR:-/var/tmp/udm-demo}; mkdir -p "$DEMO"
SECTORS=$((256 * 2048))
URI="nbd+unix:///vol?socket=$RUN/nbd.sock"

say "udmd is up"
run udmsetup version
say "a 256 MiB disk, a linear mapping over it, exported over NBD"
udmsetup disk list | grep -q '^demo0 ' || run udmsetup disk add demo0 --file "$DEMO/demo0.img" --create 256M
udmsetup info vol >/dev/null 2>&1 || run udmsetup create vol --table "0 $SECTORS linear demo0 0"
udmsetup export list | grep -q 'nbd:vol' || run udmsetup export add vol --nbd
run udmsetup ls --tree
run udmsetup table vol
say "a client writes 8 MiB through NBD and reads it back"
run qemu-io -f raw -c 'write -P 0x5a 0 8M' -c 'read -P 0x5a 0 8M' "$URI"
say "attach a 25 ms delay interposer to the device while it is exported and in use"
run udmsetup create slow --interpose --table "0 $SECTORS delay vol 0 25"
run udmsetup ls --tree
t0=$(date +%s%N); qemu-io -f raw -c 'read -P 0x5a 0 4k' "$URI" >/dev/null; t1=$(date +%s%N)
echo "one 4k read through the interposer took $(( (t1 - t0) / 1000000 )) ms"
run udmsetup info slow
say "detach it again; the client's data is intact"
run udmsetup remove slow
t0=$(date +%s%N); qemu-io -f raw -c 'read -P 0x5a 0 8M' "$URI" | tail -1; t1=$(date +%s%N)
echo "8 MiB read back after detach in $(( (t1 - t0) / 1000000 )) ms"
say "a live snapshot of the exported device, for backup (udm snapshot take)"
udm snapshot list | grep -q '^vol-snap ' && udm snapshot drop vol-snap >/dev/null
rm -f "$DEMO/vol.cow"
run udm snapshot take vol --cow "$DEMO/vol.cow" --size 64M --export nbd
run qemu-io -f raw -c 'write -P 0x77 0 4M' "$URI"
echo "the snapshot still holds the point-in-time data:"
run qemu-io -f raw -r -c 'read -P 0x5a 0 8M' "nbd+unix:///vol-snap?socket=$RUN/nbd.sock"
run udm snapshot list
run udm snapshot drop vol-snap
say "full and incremental backups of the device in use (udm backup: era tracking, a qcow2 chain)"
run udm backup full vol --to "$DEMO/backup"
run qemu-io -f raw -c 'write -P 0x66 16M 1M' "$URI"
run udm backup incremental vol --to "$DEMO/backup"
run udm backup list "$DEMO/backup"
LAST=$(ls "$DEMO"/backup/point-*.qcow2 | sort -V | tail -1)
run qemu-img compare -F raw "$LAST" "$URI"
run udm backup verify "$DEMO/backup"
run udm track stop vol --delete
run udmsetup export list
say "done: udmd keeps serving"
echo "control socket: $RUN/control.sock   NBD: $URI"
echo "log: $RUN/udmd.log   stop: kill \$(cat $RUN/udmd.pid)"
