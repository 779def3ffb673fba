#!/usr/bin/env bash
# udm's test suite: unit and property tests, in-process tests on fault-injecting memory devices,
# and integration tests that start udmd and drive it with udmsetup and real clients (qemu-io,
# qemu-img, nbdinfo, nbdcopy, fio, losetup + mkfs + mount + e2fsck). Tests that need a tool or
# privilege the machine lacks print a SKIPPED line.
# Kernel cross-checks in a VM (slow) run too when UDM_VMLAB=1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --features udm-export/ublk -- -D warnings
cargo test --workspace --features udm-export/ublk -- --test-threads=2 2>&1 | tee target/test.log
echo "skipped tests:"; grep -h "SKIPPED" target/test.log | sort -u || echo "  none"
