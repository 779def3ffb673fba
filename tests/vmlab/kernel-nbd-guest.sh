# Runs inside the vmlab guest (busybox sh), after a header from kernel-nbd.sh that sets
# MODE (tls or insecure) and writes the PEM files to /tmp/pki. The kernel's nbd driver, set up by
# Debian's nbd-client, uses an export of udmd as an ext4 filesystem: over TCP on 127.0.0.1, then
# again over udmd's Unix socket. The udm disk is a file on the guest's tmpfs, so a TRIM that
# reaches udmd shows as freed blocks; at the end it is copied to /dev/vda for the host to check.
# Prints KEY value lines for the host; any FAIL line (or a non-zero exit) fails the test.
# fail, run and start_udmd come from guest-lib.sh (sourced above).
echo "KERNEL $(uname -r)"
echo "NBDCLIENT $(nbd-client -V 2>&1 | head -1)"
ip link set lo up || fail "loopback up"
SECTORS=262144 # 128 MiB
truncate -s $((SECTORS * 512)) /tmp/disk.img
if [ "$MODE" = tls ]; then
  start_udmd --nbd-listen 127.0.0.1:10809 --tls-creds /tmp/pki/server --tls-verify-peer
else
  start_udmd --nbd-listen 127.0.0.1:10809 --nbd-insecure-tcp
fi
run udmsetup disk add d0 --file /tmp/disk.img >/dev/null
run udmsetup create vol --table "0 $SECTORS linear d0 0"
if [ "$MODE" = tls ]; then
  run udmsetup export add vol --nbd >/dev/null
  # The TCP listener must refuse a client without TLS for this export.
  if timeout 60 nbd-client 127.0.0.1 10809 /dev/nbd2 -N vol >/tmp/plain.out 2>&1; then
    fail "plain TCP connect to a TLS-only export succeeded"
  fi
  echo "PLAIN_REFUSED $(tr '\n' ' ' < /tmp/plain.out)"
  P=/tmp/pki/client
  run nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol -certfile $P/client-cert.pem \
    -keyfile $P/client-key.pem -cacertfile $P/ca-cert.pem -tlshostname localhost
else
  run udmsetup export add vol --nbd --insecure-tcp >/dev/null
  run nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol
fi
echo "SIZE $(blockdev --getsize64 /dev/nbd0)"
echo "DISCARD_MAX $(cat /sys/block/nbd0/queue/discard_max_bytes)"
echo "WRITE_CACHE $(cat /sys/block/nbd0/queue/write_cache)"
fs_phase /dev/nbd0 /tmp/disk.img
# The live phase (guest-lib.sh, sourced above): writer, interposer, frozen snapshot; the
# snapshot reaches the kernel through a second NBD device over the Unix socket. It ends with
# /mnt unmounted, e2fsck clean and /tmp/sums listing every file.
snap_attach() {
  run udmsetup export add "$1" --nbd --read-only >/dev/null
  run nbd-client -u /run/udm/nbd.sock /dev/nbd2 -N "$1"
  SDEV=/dev/nbd2
  echo "SNAP_EXPORT nbd:$1 RO=$(cat /sys/block/nbd2/ro)"
}
snap_detach() { run nbd-client -d /dev/nbd2; run udmsetup export remove "$1" >/dev/null; }
live_phase vol /dev/nbd0 /mnt $SECTORS
# Read before disconnecting (the counters go with the device): field 12 is discards completed,
# field 16 flushes completed (Documentation/block/stat.rst).
set -- $(cat /sys/block/nbd0/stat)
echo "NBD0_STAT writes=$5 discards=${12} flushes=${16}"
run nbd-client -d /dev/nbd0
# Again through the Unix socket: check the filesystem and the files.
run nbd-client -u /run/udm/nbd.sock /dev/nbd1 -N vol
timeout 120 e2fsck -fn /dev/nbd1 > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck on /dev/nbd1"; }
echo "FSCK_UNIX ok"
run mount -t ext4 -o ro /dev/nbd1 /mnt
(cd /mnt && md5sum -c /tmp/sums > /tmp/sums.out 2>&1) || { cat /tmp/sums.out; fail "checksums over the Unix socket"; }
echo "SUMS_UNIX ok $(wc -l < /tmp/sums) files"
run umount /mnt
run nbd-client -d /dev/nbd1
udmsetup export list
errs=$(udmsetup export list | awk 'NR > 1 { print $7 }')
echo "UDM_ERRORS $errs"
[ "$errs" = 0 ] || fail "udmd answered requests with errors"
run udmsetup export remove vol >/dev/null
run udmsetup remove vol
run udmsetup disk remove d0 >/dev/null
bad=$(dmesg | grep -iE 'i/o error|blk_update_request|EXT4-fs (error|warning)|nbd.*(error|timed out|dead)|buffer i/o')
[ -z "$bad" ] || fail "kernel log: $bad"
echo "DMESG_CLEAN ok"
bad=$(grep -E ' (ERROR|WARN) ' /tmp/udmd.log)
[ -z "$bad" ] || fail "udmd log: $bad"
echo "UDMD_LOG_CLEAN ok"
dd if=/tmp/disk.img of=/dev/vda bs=1M 2>/dev/null || fail "copy the disk to /dev/vda"
sync
cat /tmp/sums | sed 's/^/SUM /'
echo "GUEST_DONE"
