# Runs inside the vmlab guest (busybox sh, Linux 6.12 with ublk_drv), started by kernel-ublk.sh.
# udmd exports a linear device over a file on the guest's tmpfs as /dev/ublkbN; the guest uses
# it as an ext4 filesystem: write, sync, trim, check, remount; an interposer attached and
# detached and a live snapshot taken with --freeze while a writer runs; then the ends of a ublk
# device's life: export remove, SIGTERM and restart (same /dev/ublkbN), kill -9 and restart.
# Prints KEY value lines for the host; any FAIL line (or a non-zero exit) fails the test.
# fail, run and start_udmd come from guest-lib.sh (sourced above).
echo "KERNEL $(uname -r)"
[ -e /dev/ublk-control ] || fail "no /dev/ublk-control in this kernel"
# Waits up to $2 seconds for path $1 to exist (or, with a leading !, to be gone).
wait_for() {
  p=$1; n=$(( $2 * 5 ))
  while [ $n -gt 0 ]; do
    case $p in !*) [ -e "${p#!}" ] || return 0 ;; *) [ -e "$p" ] && return 0 ;; esac
    sleep 0.2; n=$((n - 1))
  done
  return 1
}
SECTORS=262144 # 128 MiB
truncate -s $((SECTORS * 512)) /tmp/disk.img
start_udmd
run udmsetup disk add d0 --file /tmp/disk.img >/dev/null
run udmsetup create vol --table "0 $SECTORS linear d0 0"
out=$(timeout 60 udmsetup export add vol --ublk --queues 2 --queue-depth 32 2>&1) || {
  case $out in *"without ublk support"*) echo "NO_UBLK_FEATURE"; exit 0 ;; esac
  fail "export add: $out"
}
DEV=$(echo "$out" | awk '{print $2}')
B=${DEV#/dev/}
echo "EXPORT $out"
[ -b "$DEV" ] || fail "$DEV is not a block device"
Q=/sys/block/$B/queue
echo "NR_QUEUES $(ls /sys/block/$B/mq | wc -l)"
echo "SIZE $(blockdev --getsize64 "$DEV")"
echo "WRITE_CACHE $(cat $Q/write_cache)"
echo "FUA $(cat $Q/fua)"
echo "DISCARD_MAX $(cat $Q/discard_max_bytes)"
echo "WRITE_ZEROES_MAX $(cat $Q/write_zeroes_max_bytes)"

# 1. A filesystem: write, sync, trim, unmount, check, remount and verify.
fs_phase "$DEV" /tmp/disk.img
mkdir -p /snap
(cd /mnt && md5sum big dir/*) > /tmp/sums
run umount /mnt
# Field 12: discards completed, field 16: flushes completed (Documentation/block/stat.rst).
set -- $(cat /sys/block/$B/stat)
echo "STAT writes=$5 discards=${12} flushes=${16}"
timeout 120 e2fsck -fn "$DEV" > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck after unmount"; }
echo "FSCK_1 ok"
run mount -t ext4 "$DEV" /mnt
(cd /mnt && md5sum -c /tmp/sums > /tmp/sums.out 2>&1) || { cat /tmp/sums.out; fail "checksums after remount"; }
echo "SUMS_REMOUNT ok"

# 2. The live phase (guest-lib.sh, sourced above): writer, interposer, frozen snapshot.
snap_attach() {
  out=$(timeout 60 udmsetup export add "$1" --ublk --read-only) || fail "export add $1: $out"
  SDEV=$(echo "$out" | awk '{print $2}')
  echo "SNAP_EXPORT $out RO=$(cat /sys/block/${SDEV#/dev/}/ro)"
}
snap_detach() { run udmsetup export remove "$1" >/dev/null; }
live_phase vol "$DEV" /mnt $SECTORS

# 3. The ends of the device's life.
udmsetup export list
errs=$(udmsetup export list | awk '$1 ~ /^ublk:/ { print $7 }')
echo "UDM_ERRORS $errs"
[ "$errs" = 0 ] || fail "udmd answered requests with errors"
# export remove: the block device goes away; export add again with the same id.
run udmsetup export remove vol >/dev/null
wait_for "!$DEV" 10 || fail "$DEV still there after export remove"
ID=${B#ublkb}
out=$(timeout 60 udmsetup export add vol --ublk --ublk-id "$ID") || fail "export add --ublk-id: $out"
[ "$(echo "$out" | awk '{print $2}')" = "$DEV" ] || fail "asked for $DEV, got $out"
echo "REMOVE_READD ok"
# SIGTERM: udmd removes the device within its bound; a restart brings back the same device.
kill -TERM $UDMD
for _ in $(seq 100); do kill -0 $UDMD 2>/dev/null || break; sleep 0.2; done
kill -0 $UDMD 2>/dev/null && fail "udmd did not end within 20 s of SIGTERM"
wait_for "!$DEV" 10 || fail "$DEV still there after udmd ended"
start_udmd
wait_for "$DEV" 20 || fail "$DEV not restored after restart: $(udmsetup export list)"
run mount -t ext4 "$DEV" /mnt
(cd /mnt && md5sum -c /tmp/sums > /tmp/sums.out 2>&1) || { cat /tmp/sums.out; fail "checksums after restart"; }
echo "RESTART ok"
bad=$(dmesg | grep -iE 'i/o error|blk_update_request|EXT4-fs (error|warning)|buffer i/o|ublk.*(fail|err)')
[ -z "$bad" ] || fail "kernel log before kill -9: $bad"
# kill -9 with the filesystem mounted: the kernel drops the disk (no hung task); a restart
# reclaims the dead device and serves the same /dev/ublkbN; synced data survive.
run sync
kill -KILL $UDMD
wait $UDMD 2>/dev/null
wait_for "!/sys/block/$B" 30 || fail "$B still present 30 s after kill -9"
umount -l /mnt 2>/dev/null
echo "KILL9_DISK_GONE ok"
start_udmd
wait_for "/sys/block/$B" 20 || fail "$DEV not restored after kill -9 and restart: $(udmsetup export list)"
timeout 120 e2fsck -fn "$DEV" > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck after kill -9"; }
run mount -t ext4 -o ro "$DEV" /mnt
(cd /mnt && md5sum -c /tmp/sums > /tmp/sums.out 2>&1) || { cat /tmp/sums.out; fail "checksums after kill -9"; }
run umount /mnt
echo "KILL9_RESTART ok"
# Removal while a request is parked in a suspended device returns within its bound; the
# device goes away once `resume` lets the request finish.
run udmsetup suspend vol
( dd if="$DEV" of=/dev/null bs=4k count=1 skip=12345 iflag=direct 2>/dev/null; touch /tmp/dd.done ) &
sleep 1
[ -e /tmp/dd.done ] && fail "a read on the suspended device was not held"
t0=$(date +%s); out=$(timeout 60 udmsetup export remove vol 2>&1); rc=$?; t1=$(date +%s)
echo "REMOVE_PARKED rc=$rc secs=$((t1 - t0)) $out"
[ $((t1 - t0)) -le 20 ] || fail "export remove with a parked request took $((t1 - t0)) s"
run udmsetup resume vol
wait_for /tmp/dd.done 20 || fail "the parked read never finished after resume"
wait_for "!$DEV" 20 || fail "$DEV still there after the parked request finished"
echo "REMOVE_PARKED_DONE ok"
# After kill -9 the mounted filesystem saw I/O errors by design; nothing may hang or oops.
bad=$(dmesg | grep -E 'hung task|blocked for more than|BUG:|WARNING:|Oops:')
[ -z "$bad" ] || fail "kernel log: $bad"
echo "DMESG_CLEAN ok"
# Warnings udmd logs by design on this path: the reclaimed device after kill -9, the removal
# that outlived its bound.
bad=$(grep -E ' (ERROR|WARN) ' /tmp/udmd.log | grep -v -e 'deleting device .* left by a udmd that ended' -e 'did not stop within')
[ -z "$bad" ] || fail "udmd log: $bad"
echo "UDMD_LOG_CLEAN ok"
echo "GUEST_DONE"
