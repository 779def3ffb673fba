# Runs inside the vmlab guest (busybox sh). The udm device `vol` is a vhost-user-blk disk served
# by udmd on the HOST (serial "vol", from GET_ID); the disk with serial "mbox" is a mailbox the
# host also reads and writes: sector 0 carries the guest's word, sector 1 the host's.
# Phase 1: mkfs.ext4, mount, files, sync, checksums, umount, e2fsck -fn, remount, verify.
# Phase 2: a writer runs on the mounted filesystem while the host attaches and detaches an
# interposer; then the guest syncs and freezes (fsfreeze --freeze), records the checksums of the
# frozen files, the host takes a snapshot, the guest thaws; the writer stops, e2fsck -fn.
# Prints KEY value lines for the host; any FAIL line (or a non-zero exit) fails the test.
fail() { echo "FAIL $*"; dmesg | tail -20; exit 1; }
run() { timeout 300 "$@" || fail "$* (exit $?)"; }
bydisk() { for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && basename $d; done | head -1; }
V=$(bydisk vol); M=$(bydisk mbox)
[ -n "$V" ] || fail "no vhost-user-blk disk with serial vol: $(cat /sys/block/vd*/serial | tr '\n' ' ')"
[ -n "$M" ] || fail "no mailbox disk"
say() { printf '%s\n' "$1" | dd of=/dev/$M bs=512 count=1 conv=sync,fsync 2>/dev/null; }
# Waits (up to $2 seconds) for the host's word $1 in sector 1.
await() {
  i=0
  while [ $i -lt $2 ]; do
    blockdev --flushbufs /dev/$M
    [ "$(dd if=/dev/$M bs=512 skip=1 count=1 2>/dev/null | tr -d '\000')" = "$1" ] && return 0
    sleep 1; i=$((i + 1))
  done
  fail "no $1 from the host after $2 s"
}
echo "KERNEL $(uname -r)"
echo "DISK $V $(blockdev --getsize64 /dev/$V)"
echo "QUEUES $(ls /sys/block/$V/mq | wc -l)"
echo "DISCARD_MAX $(cat /sys/block/$V/queue/discard_max_bytes)"
echo "WZEROES_MAX $(cat /sys/block/$V/queue/write_zeroes_max_bytes)"
echo "WRITE_CACHE $(cat /sys/block/$V/queue/write_cache)"
echo "RO $(cat /sys/block/$V/ro)"

# Phase 1.
run mkfs.ext4 -q -F -E nodiscard /dev/$V
mkdir -p /mnt && run mount -t ext4 /dev/$V /mnt
for i in 1 2 3 4 5 6; do run dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 4)) 2>/dev/null; done
mkdir /mnt/dir && cp /bin/busybox /mnt/dir/bb
sync
(cd /mnt && md5sum f* dir/bb) > /tmp/sums
rm /mnt/f6 && run fstrim /mnt   # discard reaches udmd
run umount /mnt
timeout 300 e2fsck -fn /dev/$V > /tmp/fsck1 2>&1 || { cat /tmp/fsck1; fail "e2fsck after phase 1"; }
echo "OK e2fsck -fn clean after phase 1"
run mount -t ext4 /dev/$V /mnt
grep -v ' f6$' /tmp/sums > /tmp/sums1
(cd /mnt && md5sum -c /tmp/sums1 > /tmp/check1 2>&1) || { cat /tmp/check1; fail "checksums after remount"; }
echo "OK checksums after remount ($(wc -l < /tmp/sums1) files)"

# Phase 2: a writer on the mounted filesystem.
(
  n=0
  while [ ! -f /tmp/stop ]; do
    dd if=/dev/urandom of=/mnt/w$((n % 24)) bs=16k count=$((n % 8 + 1)) 2>/dev/null
    echo "line $n" >> /mnt/log
    n=$((n + 1))
  done
  echo $n > /tmp/writes
) &
WRITER=$!
sleep 2
say READY
await GO-FREEZE 240            # the host attached and detached an interposer meanwhile
sync
run fsfreeze --freeze /mnt
(cd /mnt && md5sum f* log dir/bb w*) > /tmp/frozen
sed 's/^/FROZEN_SUM /' /tmp/frozen
say FROZEN
await SNAPPED 240              # the host took the snapshot of the frozen filesystem
run fsfreeze --unfreeze /mnt
sleep 3
touch /tmp/stop; wait $WRITER
echo "WRITES $(cat /tmp/writes)"
(cd /mnt && md5sum f* log dir/bb w*) > /tmp/final
sed 's/^/SUM /' /tmp/final
run umount /mnt
timeout 300 e2fsck -fn /dev/$V > /tmp/fsck2 2>&1 || { cat /tmp/fsck2; fail "e2fsck after phase 2"; }
echo "OK e2fsck -fn clean after phase 2"
run mount -t ext4 -o ro /dev/$V /mnt
(cd /mnt && md5sum -c /tmp/final > /tmp/check2 2>&1) || { cat /tmp/check2; fail "checksums after phase 2"; }
run umount /mnt
say DONE
echo GUEST_DONE
