#!/usr/bin/env bash
# The peer figure for udm's change tracking: Linux's own dm-era (vmlab, Linux 6.1 under KVM) on
# a virtio disk, with fio direct I/O on the bare disk and on the era device right after a
# checkpoint (every write the first to its 64K era block) and again (rewrites). Compare the
# ratios with scripts/bench-backup.sh's tracking-overhead table (udm's era over NBD).
# Environment: VMLAB_KERNEL (6.1 or 6.12), VMLAB_TIMEOUT (default 300).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/udm-era-kernel.XXXXXX)
trap 'rm -rf "$W"' EXIT
truncate -s 1G "$W/origin.img"
truncate -s 64M "$W/meta.img"
QEMU_DIR=$("$ROOT/scripts/vmlab-qemu.sh")
VMLAB_TIMEOUT=${VMLAB_TIMEOUT:-300} VMLAB_BINS=fio VMLAB_EXTRA_PATH="$QEMU_DIR" \
    bash "$ROOT/../shared/vmlab/run.sh" "$ROOT/tests/vmlab/era-perf.sh" "$W/origin.img" "$W/meta.img" |
    sed -n 's/^RESULT //p'
