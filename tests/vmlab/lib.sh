# Sourced by the kernel test scripts of tests/vmlab (after they set HERE to their directory):
#   vmlab_init NAME TOOL...   finds run.sh (RUN: VMLAB_RUN, or ../shared/vmlab/run.sh beside the
#                             checkout or its worktree), puts VMLAB_EXTRA_PATH (a private qemu)
#                             and sbin on PATH, and exits 0 with a SKIPPED line naming NAME when
#                             run.sh or a TOOL is missing. Sets ROOT and W (a temporary directory;
#                             the caller sets its own EXIT trap to remove it).
#   vmlab_bins [FEATURES] BIN...
#                             the udm binaries under test (UDM_BIN_DIR, else built from this
#                             checkout with cargo FEATURES) copied stripped into $W/bin: debug
#                             binaries are ~100 MiB, all of which would go into the initramfs.
#   val KEY                   the value of the guest's first `KEY value` line in $out.
#   check_guest_phases STATKEY
#                             the host's checks of what guest-lib.sh's phases printed in $out:
#                             completed discards and flushes in the STATKEY line, the trim
#                             freeing the backing file, the writer running across the snapshot,
#                             I/O through the interposer, a read-only snapshot; each failure
#                             prints a FAIL line and sets fail=1.
vmlab_init() {
  local name=$1 r t; shift
  ROOT=$(cd "$HERE/../.." && pwd)
  RUN=${VMLAB_RUN:-}
  for r in "$ROOT/../shared/vmlab/run.sh" "$ROOT/../../shared/vmlab/run.sh"; do
    [ -n "$RUN" ] || [ ! -f "$r" ] || RUN=$r
  done
  [ -n "$RUN" ] || { echo "SKIPPED $name: no vmlab run.sh (set VMLAB_RUN)"; exit 0; }
  if [ -n "${VMLAB_EXTRA_PATH:-}" ]; then export PATH="$VMLAB_EXTRA_PATH:$PATH"; fi
  export PATH="$PATH:/usr/sbin:/sbin"
  for t in strip "$@"; do
    command -v "$t" >/dev/null || { echo "SKIPPED $name: $t missing (scripts/deps.sh installs it)"; exit 0; }
  done
  W=$(mktemp -d)
}
vmlab_bins() {
  local features=$1 b T; shift
  if [ -n "${UDM_BIN_DIR:-}" ]; then
    T=$UDM_BIN_DIR
  else
    (cd "$ROOT" && cargo build -q ${features:+--features "$features"} -p udm-daemon -p udm-cli $(printf -- '--bin %s ' "$@"))
    T=${CARGO_TARGET_DIR:-$ROOT/target}/debug
  fi
  mkdir -p "$W/bin"
  for b in "$@"; do cp "$T/$b" "$W/bin/" && strip "$W/bin/$b"; done
}
val() { sed -n "s/^$1 //p" <<<"$out" | head -1; }
check_guest_phases() {
  local stat d f full trimmed w b t redirected
  stat=$(val "$1")
  d=$(sed -n 's/.*discards=\([0-9]*\).*/\1/p' <<<"$stat"); f=$(sed -n 's/.*flushes=\([0-9]*\).*/\1/p' <<<"$stat")
  [ "${d:-0}" -gt 0 ] && [ "${f:-0}" -gt 0 ] || { echo "FAIL no completed discards/flushes: $stat"; fail=1; }
  # The 16 MiB file that fstrim released must have left udmd's backing file as holes.
  full=$(val ALLOC_FULL); trimmed=$(val ALLOC_TRIMMED)
  [ "$trimmed" -lt $((full - 8192)) ] || { echo "FAIL trim freed nothing in the backing file: $full -> $trimmed KiB"; fail=1; }
  w=$(val WRITTEN)
  b=$(sed -n 's/.*before_snapshot=\([0-9]*\).*/\1/p' <<<"$w"); t=$(sed -n 's/.*total=\([0-9]*\).*/\1/p' <<<"$w")
  [ "${b:-0}" -gt 0 ] && [ "${t:-0}" -gt "${b:-0}" ] || { echo "FAIL the writer did not run across the snapshot: $w"; fail=1; }
  redirected=$(sed -n 's/^REDIRECTED_[0-9] //p' <<<"$out" | awk '{ s += $1 } END { print s + 0 }')
  [ "$redirected" -gt 0 ] || { echo "FAIL no writer I/O went through the interposer"; fail=1; }
  [ "$(val SNAP_EXPORT | sed 's/.*RO=//')" = 1 ] || { echo "FAIL the snapshot export is not read-only"; fail=1; }
}
