#!/usr/bin/env bash
# Mutation testing (cargo-mutants) of udm's data path and control operations: udm-core, the
# snapshot target (crates/udm-target/src/snapshot, and the write-back it shares with era,
# crates/udm-target/src/writeback.rs) and the NBD server (crates/udm-export/src/nbd).
# Each mutant is built and tested in a copy of the tree (never in place), with the mutated
# crate's own tests only: udm-core's and udm-target's unit and integration tests, udm-export's
# unit and nbd_* tests (not udm-testkit's, which drive these crates through the daemon
# binaries). udm-target's and udm-export's run under cargo-nextest when it is installed
# (cargo install --locked cargo-nextest). Prints caught/missed/unviable/timeout
# counts per scope and the missed mutants.
# Not part of CI (see README): it is slow.
#
#   scripts/mutants.sh                        every scope, every mutant
#   MUTANTS_SCOPE="snapshot nbd" scripts/mutants.sh     some scopes (core, snapshot, nbd)
#   MUTANTS_FILE='crates/udm-export/src/nbd/exec.rs'    only files matching this glob
#   MUTANTS_EXCLUDE='crates/udm-core/src/node.rs'       not the files matching this glob
#   MUTANTS_RE='Conn::validate'               only mutants whose name (see --list) matches
#   MUTANTS_SHARD=2/8                         one shard of the mutants (0-based, as cargo-mutants)
#   MUTANTS_BUDGET=3600                       stop each scope after that many seconds
#   MUTANTS_LIST=1                            just count the mutants per scope and file
#   MUTANTS_BASELINE=skip                     skip the unmutated test run
#   MUTANTS_JOBS=2                            mutants built and tested at once (default 1)
#   MUTANTS_ITERATE=1                         test again only the mutants the last run of the
#                                             scope did not catch (after new tests; cargo-mutants
#                                             --iterate)
#
# Size (cargo-mutants 27.1, `MUTANTS_LIST=1`, 2026-12-02): udm-core 523 mutants, snapshot 809
# (the write-back included), nbd 993. Measured on 2 cores: udm-core 9-13 s a mutant at -j 1
# (386 of its mutants took 56 min); the snapshot scope's 809 took 1 h 30 at -j 2 with mold, no
# debug info (its timeouts, 30 s each, a good part of it); the nbd scope runs at 6-7 a minute
# at -j 2 (its 769 mutants outside exec.rs and meta.rs took 2 h beside test writing).
# `MUTANTS_SHARD` splits a scope
# across machines. Outputs: target/mutants/SCOPE/mutants.out (caught.txt, missed.txt,
# timeout.txt, unviable.txt, outcomes.json, log/). With -j 1 builds go to
# target/mutants-build/SCOPE, kept between runs, so dependencies are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo mutants --version >/dev/null 2>&1; then
  echo "cargo-mutants not found: cargo install --locked cargo-mutants"
  cargo install --locked cargo-mutants
fi
scopes=${MUTANTS_SCOPE:-core snapshot nbd}
out_root=$PWD/target/mutants
build_root=${MUTANTS_TARGET_DIR:-$PWD/target/mutants-build}

# cargo-nextest runs udm-target's and udm-export's tests when it is installed.
nextest=0
if cargo nextest --version >/dev/null 2>&1; then nextest=1; fi

# Per scope: the package, the files, and the test targets run for each mutant.
scope_args() {
  tool=()
  case $1 in
    core) pkg=udm-core glob='crates/udm-core/src/**' tests=(--lib --tests) limit=30 ;;
    snapshot)
      pkg=udm-target glob='crates/udm-target/src/{snapshot/**,writeback.rs}' limit=30
      # All of udm-target's tests: the table, kernel-example and concise tests check the
      # snapshot lines (table_params, version), era's tests drive the shared write-back.
      tests=(--lib --tests)
      if [ "$nextest" = 1 ]; then tool=(--test-tool nextest) tests+=(--test-threads 4) limit=60; fi
      ;;
    nbd)
      pkg=udm-export glob='crates/udm-export/src/nbd/**' limit=120
      # Every nbd_* test but the two that time the server in milliseconds (nbd_slow_device,
      # nbd_reply_latency): run by nextest 16 at a time beside two mutant builds on 2 cores,
      # they failed under mutants that change nothing, so each catch of theirs was a false one
      # (the mutants they are meant for were checked by hand, docs/mutation-testing.md).
      # nbd_interop and nbd_tls drive real clients (qemu-io, nbdinfo, nbdcopy, openssl) and
      # skip what is not installed.
      tests=(--lib)
      for t in crates/udm-export/tests/nbd_*.rs; do
        case $(basename "$t") in
          nbd_slow_device.rs | nbd_reply_latency.rs) ;;
          *) tests+=(--test "$(basename "$t" .rs)") ;;
        esac
      done
      # Most of these tests wait (timeouts of hostile clients): run by nextest, many at once
      # and each in its own process (the RSS tests measure theirs), they take 6 s, not 35 s.
      # A hung test is ended after 20 s (.config/nextest.toml, profile mutants): a failure.
      if [ "$nextest" = 1 ]; then
        tool=(--test-tool nextest) tests+=(--test-threads 16) limit=60
        export NEXTEST_PROFILE=mutants
      fi
      ;;
    *) echo "unknown scope $1 (core, snapshot, nbd)" >&2; exit 1 ;;
  esac
}

status=0
base_rustflags=${RUSTFLAGS:-}
for scope in $scopes; do
  scope_args "$scope"
  args=(-p "$pkg" -f "${MUTANTS_FILE:-$glob}")
  [ -n "${MUTANTS_RE:-}" ] && args+=(--re "$MUTANTS_RE")
  [ -n "${MUTANTS_EXCLUDE:-}" ] && args+=(-e "$MUTANTS_EXCLUDE")
  if [ "${MUTANTS_LIST:-0}" = 1 ]; then
    list=$(cargo mutants --list "${args[@]}")
    echo "== $scope: $(grep -c . <<<"$list" || true) mutants"
    cut -d: -f1 <<<"$list" | sort | uniq -c | sort -rn
    continue
  fi
  [ -n "${MUTANTS_SHARD:-}" ] && args+=(--shard "$MUTANTS_SHARD")
  [ "${MUTANTS_ITERATE:-0}" = 1 ] && args+=(--iterate)
  out=$out_root/$scope
  # One build directory per scope (scopes may run at once, and cargo locks a build directory),
  # kept between runs. With MUTANTS_JOBS > 1 each job builds in its own copy of the tree
  # instead: jobs sharing a build directory run each other's test binaries.
  if [ "${MUTANTS_JOBS:-1}" = 1 ]; then
    export CARGO_TARGET_DIR=$build_root/$scope
  else
    unset CARGO_TARGET_DIR
  fi
  # Each mutant relinks every test binary of its crate: without debug info, and with mold where
  # it is installed, that is most of a mutant's build time saved. Only this build directory is
  # affected (the flags are part of its fingerprints).
  export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
  if command -v mold >/dev/null; then export RUSTFLAGS="$base_rustflags -C link-arg=-fuse-ld=mold"; fi
  mkdir -p "$out"
  echo "== $scope: $pkg ${MUTANTS_FILE:-$glob} ${MUTANTS_RE:+re $MUTANTS_RE }(output $out/mutants.out)"
  # A mutant that makes the tests hang is a timeout after `limit` seconds (MUTANTS_TIMEOUT):
  # about 5 times the unmutated tests (5 s for core and snapshot; nbd 30 s), more under nextest,
  # whose timings are looser under load. Warnings are capped so a mutant is unviable only when
  # it does not compile.
  cmd=(nice -n 10 cargo mutants "${args[@]}" "${tool[@]}" -o "$out" -j "${MUTANTS_JOBS:-1}" --timeout "${MUTANTS_TIMEOUT:-$limit}"
    --build-timeout 900 --cap-lints true --baseline "${MUTANTS_BASELINE:-run}"
    -- "${tests[@]}")
  rc=0
  if [ -n "${MUTANTS_BUDGET:-}" ]; then
    # SIGINT: cargo-mutants stops and keeps the outcomes so far.
    timeout -s INT -k 120 "$MUTANTS_BUDGET" "${cmd[@]}" || rc=$?
  else
    "${cmd[@]}" || rc=$?
  fi
  # 2: missed mutants, 3: timeouts; both are results, reported below.
  case $rc in 0 | 2 | 3 | 124 | 130) ;; *) status=$rc ;; esac
  res=$out/mutants.out
  count() { if [ -f "$res/$1.txt" ]; then grep -c . "$res/$1.txt" || true; else echo 0; fi; }
  echo "== $scope: caught $(count caught) missed $(count missed) unviable $(count unviable) timeout $(count timeout)${MUTANTS_BUDGET:+ (budget ${MUTANTS_BUDGET}s, rc $rc)}"
  if [ -s "$res/missed.txt" ]; then
    echo "missed:"
    sed 's/^/  /' "$res/missed.txt"
  fi
done
exit $status
