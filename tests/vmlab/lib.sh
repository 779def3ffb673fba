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
