#!/usr/bin/env bash
# udm's ublk export on a real kernel: boots Debian's Linux 6.12 (ublk_drv) under QEMU (run.sh)
# with udmd, udmsetup and udm inside; the guest uses /dev/ublkbN as an ext4 filesystem, attaches
# an interposer and takes a frozen live snapshot under a writer, and goes through export remove,
# SIGTERM + restart and kill -9 + restart (see kernel-ublk-guest.sh). The host then checks the
# figures the guest printed.
# Needs root and what run.sh needs. Env: VMLAB_RUN (path of run.sh), VMLAB_EXTRA_PATH (a private
# qemu), UDM_BIN_DIR (udmd, udmsetup and udm to test, built with the ublk feature; built from
# this checkout when unset).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
vmlab_init "kernel ublk test" mkfs.ext4 e2fsck
trap 'rm -rf "$W"' EXIT
vmlab_bins udm-daemon/ublk udmd udmsetup udm
cat "$HERE/guest-lib.sh" "$HERE/kernel-ublk-guest.sh" > "$W/guest.sh"
rc=0
out=$(cd "$W" && VMLAB_KERNEL=6.12 VMLAB_BINS="$W/bin/udmd $W/bin/udmsetup $W/bin/udm mkfs.ext4 e2fsck" \
      VMLAB_TIMEOUT=${VMLAB_TIMEOUT:-900} "$RUN" guest.sh 2>&1) || rc=$?
echo "$out"
if [ $rc = 3 ] && grep -qE '^vmlab: (no kernel package|cannot download)' <<<"$out"; then
  echo "SKIPPED kernel ublk test: vmlab could not get Debian's 6.12 kernel here"; exit 0
fi
if grep -q 'FAIL no /dev/ublk-control' <<<"$out"; then
  echo "SKIPPED kernel ublk test: the vmlab 6.12 kernel has no ublk_drv"; exit 0
fi
if grep -q '^NO_UBLK_FEATURE' <<<"$out"; then
  echo "SKIPPED kernel ublk test: udmd was built without the ublk feature (--features udm-daemon/ublk)"; exit 0
fi
[ $rc = 0 ] && grep -q '^GUEST_DONE' <<<"$out" || { echo "kernel-ublk: FAIL in the guest (rc=$rc)"; exit 1; }
fail=0
[ "$(val NR_QUEUES)" = 2 ] || { echo "FAIL expected 2 hardware queues, got $(val NR_QUEUES)"; fail=1; }
[ "$(val WRITE_CACHE)" = "write back" ] || { echo "FAIL not write-back (no FLUSH)"; fail=1; }
[ "$(val FUA)" = 1 ] || { echo "FAIL no FUA"; fail=1; }
[ "$(val DISCARD_MAX)" -gt 0 ] || { echo "FAIL no discard"; fail=1; }
[ "$(val WRITE_ZEROES_MAX)" -gt 0 ] || { echo "FAIL no write-zeroes"; fail=1; }
check_guest_phases STAT
if [ $fail -ne 0 ]; then echo "kernel-ublk: FAIL"; exit 1; fi
echo "kernel-ublk: all passed"
