#!/usr/bin/env bash
# Kernel cross-check of dm-era (vmlab, Linux 6.1 or VMLAB_KERNEL=6.12): one write history with
# checkpoints, a metadata snapshot and suspend/resume, run by the kernel's era in the guest and
# by udm's era target (era-tool example) on the host, on fresh metadata each.
#   - the status line after every step, in full: metadata block size, used/total, current era
#     and the held root's block number. udm follows the kernel's rules for the figures
#     (dm-era-target.c, dm-space-map-metadata.c): blocks come from a rolling cursor that a
#     commit does not reset, a space-map bitmap moves to a new block at its first change in a
#     transaction, used = blocks in use at the last commit + blocks allocated since (frees count
#     once committed), a digest is kicked off only when the worker next runs after an archive and
#     commits nothing itself, status is a call to the worker that commits. Each write is
#     followed by a flush on both sides (dd conv=fsync), so each write's mark is one commit;
#   - era_check passes on both metadata images; the eras of all blocks (era_dump, writesets
#     folded in: see eras() below) and era_invalidate --written-since N (N = 1..last era) are
#     the same for both;
#   - the kernel loads the metadata udm wrote (status: udm's last era + 1, as after any resume)
#     and udm loads the kernel's (the same), and neither load changes what was written when.
# ERA_BS, ERA_ORIGIN (a truncate size) and ERA_HISTORY change the block size, the origin and
# the history (tests/vmlab/era-kernel.sh lists the steps); the argument `long` (below) runs a
# long generated history.
# Needs root and what ../shared/vmlab/run.sh needs, plus era_check/era_dump/era_invalidate.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
vmlab_init era-crosscheck era_check era_dump era_invalidate
trap 'rm -rf "$W"' EXIT
(cd "$ROOT" && cargo build -q -p udm-target --example era-tool)
TOOL=${CARGO_TARGET_DIR:-$ROOT/target}/debug/examples/era-tool
# `era-crosscheck.sh long`: 330 steps (320 writes to random blocks, checkpoints, suspends, two
# metadata snapshots) on an 80 MiB origin (1280 blocks: two era-array blocks), enough metadata
# allocations to wrap the space map's cursor; on Linux 6.12 unless VMLAB_KERNEL says otherwise.
if [ "${1:-}" = long ]; then
  export VMLAB_KERNEL=${VMLAB_KERNEL:-6.12}
  ERA_ORIGIN=${ERA_ORIGIN:-80M}
  ops=(c t r d c r t c d) x=7 h=()
  for i in $(seq 0 319); do
    x=$(((x * 1103515245 + 12345) % 2147483648))
    h+=("w$((x % 1280))")
    if ((i % 36 == 35)); then h+=("${ops[i / 36 % 9]}"); fi
  done
  ERA_HISTORY="${h[*]} c"
fi
BS=${ERA_BS:-128}
HISTORY=${ERA_HISTORY:-'w1 w3 w31 c w3 w5 t w7 w8 r w2 w3 d c w9 w0 c r w4'}
fail=0
check() { # what, udm value, kernel value
  if [ "$2" = "$3" ] && [ -n "$2" ]; then echo "OK   $1: $2"; else echo "FAIL $1: udm='$2' kernel='$3'"; fail=1; fi
}
truncate -s 4M "$W/mk.img" "$W/mu.img"
truncate -s "${ERA_ORIGIN:-2M}" "$W/o.img" "$W/ou.img"
ustat=$("$TOOL" "$W/mu.img" "$W/ou.img" $BS "$HISTORY" | sed -n 's/^STATUS //p')
cp "$W/mu.img" "$W/mu0.img"
{ echo "BS=$BS HISTORY='$HISTORY'"; cat "$HERE/era-kernel.sh"; } > "$W/g.sh"
out=$(VMLAB_TIMEOUT=${VMLAB_TIMEOUT:-300} "$RUN" "$W/g.sh" "$W/mk.img" "$W/o.img" "$W/mu.img") || { echo "FAIL vmlab: $out"; exit 1; }
if grep -q '^ERROR' <<<"$out"; then echo "FAIL guest: $(grep '^ERROR' <<<"$out")"; fail=1; fi
kstat=$(sed -n 's/^STATUS //p' <<<"$out")
n=$(wc -l <<<"$ustat")
for i in $(seq 1 "$n"); do
  check "status after step $i" "$(sed -n "${i}p" <<<"$ustat")" "$(sed -n "${i}p" <<<"$kstat")"
done
[ "$(wc -l <<<"$kstat")" = "$n" ] || { echo "FAIL status line count: udm $n, kernel $(wc -l <<<"$kstat")"; fail=1; }
for img in mk mu0; do
  era_check "$W/$img.img" >/dev/null 2>&1 && echo "OK   era_check $img" || { echo "FAIL era_check $img"; fail=1; }
done
# eras IMG: "block era" for every block, from era_dump with every writeset still in the metadata
# folded into the era array in ascending era order (a later era wins), which is what either
# side's digest leaves once it has run. How far each digest got when its device was removed
# depends on timing (under load udm's tool had exited with six writesets undigested), so the
# raw dumps are not compared. era_dump --logical is not the comparison either: with several
# undigested writesets marking one block, thin-provisioning-tools 0.9.0 prints the block's
# earliest era among them (block 3, written in eras 1, 2 and 4, shows as 1), so its output
# depends on the digest too; it is printed for information.
eras() {
  era_dump "$1" | awk '
    function num(key) { if (match($0, key "=\"[0-9]+\"")) return substr($0, RSTART + length(key) + 2, RLENGTH - length(key) - 3) + 0; return -1 }
    /<writeset / { ws = num("era"); next }
    /<\/writeset>/ { ws = -1; next }
    /<bit / && ws >= 0 && /value="true"/ { b = num("block"); if (!(b in w) || ws > w[b]) w[b] = ws; next }
    /<era / { a[num("block")] = num("era") }
    END { for (b in a) { e = a[b]; if ((b in w) && w[b] > e) e = w[b]; print b, e } }' | sort -n
}
check "eras, writesets folded in" "$(eras "$W/mu0.img" | md5sum)" "$(eras "$W/mk.img" | md5sum)"
if [ "$(era_dump --logical "$W/mu0.img")" = "$(era_dump --logical "$W/mk.img")" ]; then
  echo "INFO era_dump --logical: equal"
else
  echo "INFO era_dump --logical: differs (writesets left undigested: udm $(era_dump "$W/mu0.img" | grep -c '<writeset'), kernel $(era_dump "$W/mk.img" | grep -c '<writeset'))"
fi
# The whole dump (superblock, writesets, era array) as information: equal when both digests
# stopped at the same point at removal, which the kernel's timing decides.
if [ "$(era_dump "$W/mu0.img")" = "$(era_dump "$W/mk.img")" ]; then
  echo "INFO era_dump: equal"
else
  echo "INFO era_dump: differs"
fi
last=$(era_dump "$W/mk.img" | sed -n 's/.*current_era="\([0-9]*\)".*/\1/p')
for s in $(seq 1 "$last"); do
  check "era_invalidate --written-since $s" \
    "$(era_invalidate --written-since "$s" "$W/mu0.img" | tr '\n' ' ')" \
    "$(era_invalidate --written-since "$s" "$W/mk.img" | tr '\n' ' ')"
done
# Each side loads the other's metadata: one resume later, the same blocks in the same eras.
uera=$(sed -n '$p' <<<"$ustat" | cut -d' ' -f3)
check "kernel loads udm metadata: era" "$((uera + 1))" "$(sed -n 's/^LOADED //p' <<<"$out" | cut -d' ' -f3)"
era_check "$W/mu.img" >/dev/null 2>&1 && echo "OK   era_check udm metadata after the kernel" || { echo "FAIL era_check mu after kernel"; fail=1; }
check "udm metadata after the kernel's load: same eras" "$(eras "$W/mu0.img" | md5sum)" "$(eras "$W/mu.img" | md5sum)"
cp "$W/mk.img" "$W/mk2.img"
kload=$("$TOOL" "$W/mk2.img" "$W/ou.img" $BS "")
kera=$(sed -n '$p' <<<"$kstat" | cut -d' ' -f3)
check "udm loads kernel metadata: era" "$((kera + 1))" "$(sed -n 's/^STATUS //p' <<<"$kload" | cut -d' ' -f3)"
era_check "$W/mk2.img" >/dev/null 2>&1 && echo "OK   era_check kernel metadata after udm" || { echo "FAIL era_check mk after udm"; fail=1; }
check "kernel metadata after udm's load: same eras" "$(eras "$W/mk.img" | md5sum)" "$(eras "$W/mk2.img" | md5sum)"
if [ $fail -ne 0 ]; then echo "era-crosscheck: MISMATCH"; exit 1; fi
echo "era-crosscheck: all match"
