# Sourced by the bench-*.sh scripts: builds udmd, udmsetup and udm (release), starts a private
# udmd in $WORKDIR (stopped and cleaned up on exit unless KEEP is set), defines `u` (udmsetup)
# and `udm`, and fills $WORKDIR/disk.img with $SIZE of data. Expects ROOT, WORKDIR and SIZE to be set.
for t in fio jq bc nbdcopy; do command -v $t >/dev/null || { echo "$(basename "$0"): $t missing (scripts/deps.sh installs it)" >&2; exit 1; }; done
(cd "$ROOT" && cargo build --quiet --release -p udm-daemon -p udm-cli)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
export UDM_RUNTIME_DIR=$WORKDIR/run UDM_STATE_DIR=$WORKDIR/state
# UDMD_ARGS: extra udmd options (unquoted, split on spaces), e.g. --snapshot-writeback-mib 64.
# shellcheck disable=SC2086
"$BIN/udmd" ${UDMD_ARGS:-} >"$WORKDIR/udmd.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; [[ -n ${KEEP:-} ]] || rm -rf "$WORKDIR"' EXIT
for _ in $(seq 100); do "$BIN/udmsetup" version >/dev/null 2>&1 && break; sleep 0.1; done
u() { "$BIN/udmsetup" "$@"; }
udm() { "$BIN/udm" "$@"; }
fio --name=fill --filename="$WORKDIR/disk.img" --rw=write --bs=1M --size="$SIZE" --ioengine=psync --refill_buffers --output=/dev/null
