#!/usr/bin/env bash
# A VM attaches a udm device through udmd's vhost-user-blk export: udmd runs on the HOST and
# serves vol (a linear device over a file) on a socket; run.sh boots a real kernel under QEMU with
# a vhost-user-blk-pci device on that socket (shared memfd guest RAM, 2 queues), and the guest's
# virtio_blk driver uses it as an ext4 disk (vhost-user-blk-guest.sh).
# Live phase, coordinated through a mailbox disk (a file QEMU attaches with cache=directsync,
# which the host reads and writes): while a writer runs in the guest, the host attaches a delay
# interposer to vol (checks that it redirects the VM's I/O) and detaches it; the guest syncs and
# runs fsfreeze --freeze; the host takes `udm snapshot take vol` (without --freeze: the filesystem is
# in the guest) exported over NBD; the guest thaws and finishes. Then the host copies the
# snapshot out with nbdcopy, runs e2fsck -fn on it and checks its files against the checksums
# the guest took while frozen; and runs e2fsck -fn on the origin's backing file and checks the
# final checksums.
# Needs root and what run.sh needs. Env: VMLAB_RUN, VMLAB_EXTRA_PATH (a private qemu, see
# scripts/vmlab-qemu.sh), VMLAB_TIMEOUT (guest run, default 900 s), UDM_BIN_DIR (udmd, udmsetup
# and udm to test; built from this checkout when unset).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
vmlab_init "vhost-user-blk test" qemu-system-x86_64 nbdcopy mkfs.ext4 e2fsck debugfs md5sum
vmlab_bins "" udmd udmsetup udm
T=$W/bin
TIMEOUT=${VMLAB_TIMEOUT:-900}
UDMD=
cleanup() {
  [ -z "$UDMD" ] || { kill "$UDMD" 2>/dev/null; wait "$UDMD" 2>/dev/null || true; }
  rm -rf "$W"
}
trap cleanup EXIT
export UDM_RUNTIME_DIR=$W/run
setup() { timeout 120 "$T/udmsetup" "$@"; }
udm() { timeout 120 "$T/udm" "$@"; }
"$T/udmd" --runtime-dir "$W/run" --state-dir "$W/state" > "$W/udmd.log" 2>&1 &
UDMD=$!
for _ in $(seq 100); do [ -S "$W/run/control.sock" ] && break; sleep 0.1; done
SECTORS=262144 # 128 MiB
setup disk add d0 --file "$W/d0.img" --create $((SECTORS * 512))
setup create vol --table "0 $SECTORS linear d0 0"
setup export add vol --vhost-user "$W/vol.sock" --num-queues 2
truncate -s 1M "$W/mbox.img"
MEM=512
export VMLAB_MEM=$MEM VMLAB_QEMU_ARGS="-object memory-backend-memfd,id=mem,size=${MEM}M,share=on \
-numa node,memdev=mem -chardev socket,id=vu,path=$W/vol.sock \
-device vhost-user-blk-pci,chardev=vu,num-queues=2 \
-drive file=$W/mbox.img,format=raw,if=none,id=mbox,cache=directsync \
-device virtio-blk-pci,drive=mbox,serial=mbox"
VMLAB_BINS="mkfs.ext4 e2fsck" VMLAB_TIMEOUT=$TIMEOUT "$RUN" "$HERE/vhost-user-blk-guest.sh" \
  > "$W/guest.out" 2>&1 &
GUEST=$!
fail=0
# The guest's word in mailbox sector 0; the host's goes in sector 1.
word() { dd if="$W/mbox.img" bs=512 count=1 2>/dev/null | tr -d '\000\n'; }
tell() { printf '%s' "$1" | dd of="$W/mbox.img" bs=512 seek=1 count=1 conv=notrunc,sync 2>/dev/null; }
await() {
  local end=$((SECONDS + TIMEOUT))
  while [ "$(word)" != "$1" ]; do
    kill -0 $GUEST 2>/dev/null || { echo "FAIL guest ended before $1"; return 1; }
    [ $SECONDS -lt $end ] || { echo "FAIL no $1 from the guest"; return 1; }
    sleep 0.5
  done
}
live() {
  await READY || return 1
  # An interposer attached while the VM writes: the VM's I/O goes through it.
  setup create trace --interpose --table "0 $SECTORS delay vol 0 5"
  sleep 3
  local redirected
  redirected=$(setup info trace | sed -n 's/^Redirected: *//p')
  echo "REDIRECTED $redirected"
  [ "${redirected:-0}" -gt 0 ] || { echo "FAIL the interposer saw none of the VM's I/O"; fail=1; }
  setup remove trace
  tell GO-FREEZE
  await FROZEN || return 1
  udm snapshot take vol --cow "$W/vol.cow" --size 64M --export nbd
  tell SNAPPED
  await DONE || return 1
}
live || fail=1
wait $GUEST && rc=0 || rc=$?
out=$(cat "$W/guest.out")
echo "$out"
[ $rc = 0 ] && grep -q '^GUEST_DONE' <<<"$out" || { echo "FAIL in the guest (rc=$rc)"; fail=1; }
[ "$(val QUEUES)" = 2 ] || { echo "FAIL guest sees $(val QUEUES) queues, not 2"; fail=1; }
[ "$(val DISCARD_MAX)" -gt 0 ] || { echo "FAIL no discard"; fail=1; }
[ "$(val WZEROES_MAX)" -gt 0 ] || { echo "FAIL no write-zeroes"; fail=1; }
[ "$(val WRITE_CACHE)" = "write back" ] || { echo "FAIL not write-back (no FLUSH)"; fail=1; }
setup export list
errors=$(setup --json export list | python3 -c 'import json, sys
print(sum(e["errors"] for e in json.load(sys.stdin) if e["kind"] == "vhost-user"))')
[ "${errors:-1}" = 0 ] || { echo "FAIL udmd counted $errors failed vhost-user requests"; fail=1; }
# The writer went on after the thaw, so the snapshot's files differ from the final ones (the
# check below then shows the snapshot is the frozen point in time, not the end state).
frozen_log=$(sed -n 's/^FROZEN_SUM \([0-9a-f]*\)  log$/\1/p' <<<"$out")
final_log=$(sed -n 's/^SUM \([0-9a-f]*\)  log$/\1/p' <<<"$out")
[ -n "$frozen_log" ] && [ "$frozen_log" != "$final_log" ] || { echo "FAIL log did not change after the snapshot"; fail=1; }
# The snapshot: the filesystem as frozen.
checksums() { # IMAGE PREFIX: compares the guest's PREFIX checksums with the files in IMAGE
  local n=0 sum name got
  while read -r sum name; do
    got=$(debugfs -R "cat /$name" "$1" 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] || { echo "FAIL $1: $name: $got != $sum"; fail=1; }
    n=$((n + 1))
  done < <(sed -n "s/^$2 //p" <<<"$out")
  if [ $n -eq 0 ]; then echo "FAIL no $2 lines"; fail=1
  else echo "checked $n files of $(basename "$1") against the guest's $2 checksums"; fi
}
if [ -S "$W/run/nbd.sock" ] && timeout 300 nbdcopy \
     "nbd+unix:///vol-snap?socket=$W/run/nbd.sock" "$W/snap.img"; then
  if e2fsck -fn "$W/snap.img" > "$W/fsck-snap" 2>&1; then echo "OK snapshot e2fsck -fn clean"
  else cat "$W/fsck-snap"; echo "FAIL snapshot e2fsck"; fail=1; fi
  checksums "$W/snap.img" FROZEN_SUM
else
  echo "FAIL cannot copy the snapshot out"; fail=1
fi
udm snapshot drop vol-snap || fail=1
setup export remove vol || fail=1
if e2fsck -fn "$W/d0.img" > "$W/fsck-origin" 2>&1; then echo "OK origin e2fsck -fn clean"
else cat "$W/fsck-origin"; echo "FAIL origin e2fsck"; fail=1; fi
checksums "$W/d0.img" SUM
if grep -q 'panicked at' "$W/udmd.log"; then cat "$W/udmd.log"; echo "FAIL udmd panicked"; fail=1; fi
if [ $fail -ne 0 ]; then echo "--- udmd log"; tail -40 "$W/udmd.log"; echo "vhost-user-blk: FAIL"; exit 1; fi
echo "vhost-user-blk: all passed"
