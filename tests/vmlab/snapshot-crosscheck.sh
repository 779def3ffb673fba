#!/usr/bin/env bash
# Kernel cross-check of the dm-snapshot persistent COW format, both directions, chunk sizes 8
# and 32, each with > 1000 exceptions spanning several metadata areas:
#   (a) udm writes a COW store (snap-tool write), the kernel loads it; the md5 of the snapshot
#       view and the status line must match udm's;
#       Then the kernel merges that store (snapshot-merge): the origin must equal udm's view.
#   (b) the kernel writes a COW store (origin + snapshot writes after the snapshot), udm loads
#       it (snap-tool dump); md5 and status must match the kernel's. Then udm merges it
#       (snap-tool merge): the origin must equal the kernel's snapshot view.
# Exits non-zero on any mismatch. Needs root and what /work/shared/vmlab/run.sh needs.
# Env: VMLAB_RUN (path of run.sh), VMLAB_EXTRA_PATH (prepended to PATH, e.g. a private qemu).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUN=${VMLAB_RUN:-$ROOT/../shared/vmlab/run.sh}
if [ -n "${VMLAB_EXTRA_PATH:-}" ]; then export PATH="$VMLAB_EXTRA_PATH:$PATH"; fi
(cd "$ROOT" && cargo build -q --release -p udm-target --example snap-tool)
TOOL=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/snap-tool
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
fail=0
check() { # what, udm value, kernel value
  if [ "$2" = "$3" ] && [ -n "$2" ]; then echo "OK   $1: $2"; else echo "FAIL $1: udm='$2' kernel='$3'"; fail=1; fi
}
for CHUNK in 8 32; do
  case $CHUNK in
    8) OS=16384; CS=16384; N=1200 ;;   # 8 MiB origin, 8 MiB COW, 256 exceptions per area
    32) OS=65536; CS=49152; N=1100 ;;  # 32 MiB origin, 24 MiB COW, 1024 exceptions per area
  esac
  # (a) udm writes, kernel reads
  rm -f "$W"/o.img "$W"/c.img
  "$TOOL" init "$W/o.img" $OS 1
  truncate -s $((CS * 512)) "$W/c.img"
  ustat=$("$TOOL" write "$W/o.img" "$W/c.img" $CHUNK $N 7)
  "$TOOL" dump "$W/o.img" "$W/c.img" "$W/view" >/dev/null
  umd5=$(md5sum < "$W/view" | cut -d' ' -f1)
  { echo "CHUNK=$CHUNK"; cat "$HERE/snapshot-kernel-reads.sh"; } > "$W/a.sh"
  out=$("$RUN" "$W/a.sh" "$W/o.img" "$W/c.img") || { echo "FAIL (a) chunk $CHUNK: vmlab: $out"; fail=1; continue; }
  check "(a) chunk $CHUNK status" "$ustat" "$(sed -n 's/^STATUS //p' <<<"$out")"
  check "(a) chunk $CHUNK snapshot md5" "$umd5" "$(sed -n 's/^MD5 //p' <<<"$out")"
  check "(a) chunk $CHUNK kernel merge: origin = udm view" "$umd5" "$(sed -n 's/^MERGED //p' <<<"$out")"
  check "(a) chunk $CHUNK kernel merge status" "$((2 * CHUNK))/$CS $((2 * CHUNK))" "$(sed -n 's/^MERGESTATUS //p' <<<"$out")"
  # (b) kernel writes, udm reads
  rm -f "$W"/o.img "$W"/c.img
  "$TOOL" init "$W/o.img" $OS 2
  truncate -s $((CS * 512)) "$W/c.img"
  { echo "CHUNK=$CHUNK NCH=$N"; cat "$HERE/snapshot-kernel-writes.sh"; } > "$W/b.sh"
  out=$("$RUN" "$W/b.sh" "$W/o.img" "$W/c.img") || { echo "FAIL (b) chunk $CHUNK: vmlab: $out"; fail=1; continue; }
  ustat=$("$TOOL" dump "$W/o.img" "$W/c.img" "$W/view")
  check "(b) chunk $CHUNK status" "$ustat" "$(sed -n 's/^STATUS //p' <<<"$out")"
  check "(b) chunk $CHUNK snapshot md5" "$(md5sum < "$W/view" | cut -d' ' -f1)" "$(sed -n 's/^MD5 //p' <<<"$out")"
  check "(b) chunk $CHUNK origin md5" "$(md5sum < "$W/o.img" | cut -d' ' -f1)" "$(sed -n 's/^ORIGIN //p' <<<"$out")"
  check "(b) chunk $CHUNK udm merge status" "$("$TOOL" merge "$W/o.img" "$W/c.img")" "$((2 * CHUNK))/$CS $((2 * CHUNK))"
  check "(b) chunk $CHUNK udm merge: origin = kernel view" "$(md5sum < "$W/o.img" | cut -d' ' -f1)" "$(sed -n 's/^MD5 //p' <<<"$out")"
done
if [ $fail -ne 0 ]; then echo "snapshot-crosscheck: MISMATCH"; exit 1; fi
echo "snapshot-crosscheck: all match"
