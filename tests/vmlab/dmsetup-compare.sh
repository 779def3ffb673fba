#!/usr/bin/env bash
# udmsetup's output against the kernel's dmsetup, command for command: boots Linux 6.1 under
# QEMU (../../shared/vmlab/run.sh) with udmd and udmsetup inside, runs
# dmsetup-compare/commands.sh once with dmsetup and once with udmsetup (guest.sh), normalises
# what must differ (normalise() below) and diffs the two transcripts.
# Usage: dmsetup-compare.sh [OUTDIR]  (keeps both transcripts there). Needs root and what run.sh
# needs. Env: VMLAB_RUN, VMLAB_EXTRA_PATH, VMLAB_KERNEL, UDM_BIN_DIR (binaries to test; built
# from this checkout when unset), DMCMP_GUEST_OUT (re-check a saved guest.out without booting).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
vmlab_init "dmsetup comparison"
trap 'rm -rf "$W"' EXIT
vmlab_bins "" udmd udmsetup
OUT=${1:-$W}
mkdir -p "$OUT"
{ echo "session() {"; cat "$HERE/dmsetup-compare/commands.sh"; echo "}"; cat "$HERE/dmsetup-compare/guest.sh"; } > "$W/guest.sh"
truncate -s 16M "$W/vda.img" "$W/vdb.img"
rc=0
if [ -n "${DMCMP_GUEST_OUT:-}" ]; then out=$(cat "$DMCMP_GUEST_OUT"); else
out=$(VMLAB_BINS="$W/bin/udmd $W/bin/udmsetup" VMLAB_TIMEOUT=${VMLAB_TIMEOUT:-600} \
      "$RUN" "$W/guest.sh" "$W/vda.img" "$W/vdb.img" 2>&1) || rc=$?
printf '%s\n' "$out" > "$OUT/guest.out"; fi
grep -q '^@@TRANSCRIPT udmsetup' <<<"$out" && [ $rc = 0 ] \
  || { echo "$out"; echo "dmsetup-compare: FAIL in the guest (rc=$rc)"; exit 1; }
VMAJ=$(val MAJOR_VIRTBLK); DMAJ=$(val MAJOR_DM)
echo "guest: virtblk major $VMAJ, device-mapper major $DMAJ; $(val DMSETUP_VERSION)"
transcript() { sed -n "/^@@TRANSCRIPT $1\$/,/^@@TRANSCRIPT-END\$/p" <<<"$out" | sed '1d;$d'; }
# What must differ, and only that:
# * device numbers of the backing disks: the kernel's virtio disks are VMAJ:0 and VMAJ:16, udmd's
#   disks vda and vdb get udm's synthetic 8:0 and 8:16; udm's are rewritten to the kernel's.
# * mapped devices: udm's major 253 is rewritten to the kernel's device-mapper major (the minors,
#   allocated lowest-free by both, must agree).
# * `targets`: the kernel lists every registered target (mirror, era, ... which udm lacks) newest
#   module first; both lists are cut to the targets udm implements and sorted, and the versions
#   are not compared (udm reports mainline's target versions, Linux 6.1 older ones: linear
#   v1.4.0 against v1.5.0 and so on; a version is the kernel's, not an output format).
# * stderr: udmsetup adds a line `udmd: <reason> [ERRNO]` after dmsetup's error line (by design:
#   the daemon's reason); those lines are dropped.
normalise_udm() {
  perl -pe "s/(?<![0-9])8:(0|16)(?![0-9])/$VMAJ:\$1/g; s/\\(8, (0|16)\\)/($VMAJ, \$1)/g;
            s/(?<![0-9])253:([0-9]+)/$DMAJ:\$1/g; s/\\(253, ([0-9]+)\\)/($DMAJ, \$1)/g;
            s/^(Major, minor: +)253, /\${1}$DMAJ, /" | grep -v '^E: udmd: '
}
targets_sorted() {
  # Within the `targets` command only: keep udm's target names, sorted.
  local line intg=0 buf=()
  while IFS= read -r line; do
    if [[ $line == '$ '* || $line == '## '* ]]; then
      if [ $intg = 1 ] && [ ${#buf[@]} -gt 0 ]; then printf '%s\n' "${buf[@]}" | LC_ALL=C sort; fi
      buf=(); intg=0; [ "$line" = '$ dmsetup targets' ] && intg=1
      printf '%s\n' "$line"
    elif [ $intg = 1 ]; then
      [[ " $1 " == *" ${line%% *} "* ]] && buf+=("${line%% *}")
    else
      printf '%s\n' "$line"
    fi
  done
  if [ $intg = 1 ] && [ ${#buf[@]} -gt 0 ]; then printf '%s\n' "${buf[@]}" | LC_ALL=C sort; fi
}
transcript udmsetup | normalise_udm > "$OUT/udmsetup.raw"
names=$(awk '/^\$ dmsetup targets$/ {f=1; next} /^(\$|##) / {f=0} f {print $1}' "$OUT/udmsetup.raw" | tr '\n' ' ')
targets_sorted "$names" < "$OUT/udmsetup.raw" > "$OUT/udmsetup.txt"
transcript dmsetup | targets_sorted "$names" > "$OUT/dmsetup.txt"
if diff -u "$OUT/dmsetup.txt" "$OUT/udmsetup.txt" > "$OUT/diff.txt"; then
  echo "dmsetup-compare: transcripts equal ($(grep -c '^\$ ' "$OUT/dmsetup.txt") commands)"
else
  cat "$OUT/diff.txt"
  echo "dmsetup-compare: FAIL: udmsetup differs from dmsetup ($(grep -c '^[-+][^-+]' "$OUT/diff.txt") lines)"
  exit 1
fi
