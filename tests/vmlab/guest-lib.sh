# Sourced into the guest scripts of the kernel export tests (kernel-ublk.sh, kernel-nbd.sh):
# the helpers and the phases every export goes through.
#
# fail MSG: prints a FAIL line, the tails of udmd's log and the kernel log and where requests may
# be stuck (hang_state), and exits 1.
# run CMD...: runs CMD with a 120 s bound; fails naming it when it fails.
# start_udmd [ARGS...]: starts udmd (log appended to /tmp/udmd.log, pid in UDMD) and waits for
# its control socket.
fail() {
  echo "FAIL $*"; echo "--- udmd log"; tail -30 /tmp/udmd.log
  # Repeated hung-request lines would push everything else out of the tail.
  echo "--- dmesg"; dmesg | grep -v 'Possible stuck request' | tail -40
  echo "--- dmesg (stuck requests: $(dmesg | grep -c 'Possible stuck request'))"
  dmesg | grep 'Possible stuck request' | tail -5
  hang_state
  exit 1
}
# hang_state: where a stalled request may sit. udmd's threads (name, state, kernel stack), the
# TCP queues (tx/rx bytes not yet taken by the peer) and the kernel tasks in nbd or ublk code.
hang_state() {
  if [ -n "${UDMD:-}" ] && [ -d /proc/$UDMD ]; then
    echo "--- udmd threads"; grep -E 'VmRSS|Threads' /proc/$UDMD/status
    for t in /proc/$UDMD/task/*; do
      echo "$(cat $t/comm) $(awk '/^State/ {print $2}' $t/status) $(cat $t/wchan)"
      head -6 $t/stack 2>/dev/null | sed 's/^/    /'
    done
  else
    echo "--- udmd not running"
  fi
  echo "--- tcp"; cat /proc/net/tcp
  echo "--- kernel tasks in nbd or ublk code"
  for t in /proc/[0-9]*/task/*; do
    s=$(cat $t/stack 2>/dev/null)
    case "$s" in *nbd*|*ublk*) echo "$(cat $t/comm) $(awk '/^State/ {print $2}' $t/status)"; echo "$s" | head -8;; esac
  done
}
run() { timeout 120 "$@" || fail "$* (exit $?)"; }
export UDM_RUNTIME_DIR=/run/udm UDM_STATE_DIR=/tmp/udm-state
start_udmd() {
  udmd "$@" >> /tmp/udmd.log 2>&1 &
  UDMD=$!
  for _ in $(seq 100); do [ -S /run/udm/control.sock ] && break; sleep 0.2; done
  [ -S /run/udm/control.sock ] || fail "udmd did not start"
}

# fs_phase DEV BACKING: makes ext4 on DEV, mounts it at /mnt, writes 16 MiB and 20 files, syncs,
# deletes a 16 MiB copy and runs fstrim; prints ALLOC_FULL and ALLOC_TRIMMED (KiB allocated in
# the BACKING file udmd serves, before and after the trim) and FSTRIM. Leaves /mnt mounted.
fs_phase() {
  run mkfs.ext4 -q -F "$1"
  mkdir -p /mnt
  run mount -t ext4 "$1" /mnt
  run dd if=/dev/urandom of=/mnt/big bs=1M count=16 2>/dev/null
  mkdir /mnt/dir
  for i in $(seq 20); do echo "file $i $(date)" > /mnt/dir/f$i; done
  run cp /mnt/big /mnt/gone
  run sync
  echo "ALLOC_FULL $(du -k "$2" | cut -f1)"
  rm /mnt/gone
  run sync
  echo "FSTRIM $(fstrim -v /mnt 2>&1)"
  run sync
  echo "ALLOC_TRIMMED $(du -k "$2" | cut -f1)"
}

# The live phase: With udm device VOL's filesystem mounted from DEV at
# MNT, a writer adds files while an interposer is attached and detached three times and a live
# snapshot is taken with `udm snapshot take --freeze`; the snapshot, made a block device by the
# caller's `snap_attach NAME` (sets SDEV) and `snap_detach NAME`, must pass e2fsck -fn and hold
# every file written before it; the live filesystem must hold every file and pass e2fsck after
# unmounting. Prints REDIRECTED_n, WRITTEN, FSCK_SNAPSHOT, SNAPSHOT_FILES and FSCK_LIVE lines;
# leaves the checksums of every file in /tmp/sums.
# Usage: live_phase VOL DEV MNT SECTORS
live_phase() {
  vol=$1; dev=$2; mnt=$3; sectors=$4
  (cd "$mnt" && find . -type f ! -name 'lost+found' | xargs md5sum) > /tmp/pre.sums
  # File wN holds 64 KiB of "N" lines; /tmp/written lists the files whose write returned. Paced
  # (20 ms a file, at most 1000 files: 64 MiB) so that it is still writing when the snapshot
  # is taken and the filesystem never fills.
  mkdir "$mnt/live"; rm -f /tmp/stop /tmp/written; touch /tmp/written
  ( i=0
    while [ ! -e /tmp/stop ] && [ $i -lt 1000 ]; do
      i=$((i + 1))
      yes $i | head -c 65536 > "$mnt/live/w$i" && echo $i >> /tmp/written
      [ $((i % 25)) = 0 ] && sync
      sleep 0.02
    done ) &
  writer=$!
  sleep 1
  for c in 1 2 3; do
    run udmsetup create trace --interpose --table "0 $sectors delay $vol 0 2"
    sleep 1
    echo "REDIRECTED_$c $(udmsetup info trace | awk '/^Redirected:/ {print $2}')"
    run udmsetup remove trace
  done
  before=$(wc -l < /tmp/written)
  run udm snapshot take "$vol" --cow /tmp/vsnap.cow --size 64M --store P --name vsnap --freeze "$mnt"
  sleep 1
  touch /tmp/stop; wait $writer
  echo "WRITTEN before_snapshot=$before total=$(wc -l < /tmp/written)"
  run sync
  snap_attach vsnap
  timeout 120 e2fsck -fn "$SDEV" > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck of the snapshot"; }
  echo "FSCK_SNAPSHOT ok"
  mkdir -p /snap
  run mount -t ext4 -o ro,noload "$SDEV" /snap
  n=0
  for i in $(seq "$before"); do
    [ "$(yes $i | head -c 65536 | md5sum | cut -d' ' -f1)" = "$(md5sum < /snap/live/w$i | cut -d' ' -f1)" ] \
      || fail "snapshot file w$i differs from what was written before the snapshot"
    n=$((n + 1))
  done
  (cd /snap && md5sum -c /tmp/pre.sums > /tmp/sums.out 2>&1) || { cat /tmp/sums.out; fail "snapshot checksums"; }
  echo "SNAPSHOT_FILES ok $n + $(wc -l < /tmp/pre.sums)"
  run umount /snap
  snap_detach vsnap
  run udm snapshot drop vsnap
  rm -f /tmp/vsnap.cow
  for i in $(cat /tmp/written); do
    [ "$(yes $i | head -c 65536 | md5sum | cut -d' ' -f1)" = "$(md5sum < "$mnt/live/w$i" | cut -d' ' -f1)" ] \
      || fail "live file w$i differs"
  done
  (cd "$mnt" && find . -type f ! -name 'lost+found' | sed 's|^\./||' | xargs md5sum) > /tmp/sums
  run umount "$mnt"
  timeout 120 e2fsck -fn "$dev" > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck after the live phase"; }
  echo "FSCK_LIVE ok $(wc -l < /tmp/sums) files"
}
