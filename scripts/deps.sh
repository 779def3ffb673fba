#!/usr/bin/env bash
# Installs what udm's demo and tests use on a fresh Debian machine: real NBD clients and peers
# (fio, libnbd-bin, nbdkit, qemu-utils; nbd-client, which the vmlab test copies into the guest),
# filesystem tools for the FUSE/loop tests (e2fsprogs, fuse3, fdisk for sfdisk, util-linux for
# losetup and setpriv), strace (FileDevice flush/FUA are checked against the fsync calls it sees)
# and thin-provisioning-tools; python3 runs scripts/check-import-loops.py.
# Installs only what is missing; needs root (or sudo) for apt-get.
set -euo pipefail
want=(fio:fio nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdkit:nbdkit qemu-io:qemu-utils
      qemu-storage-daemon:qemu-utils mkfs.ext4:e2fsprogs e2fsck:e2fsprogs fusermount3:fuse3
      sfdisk:fdisk losetup:mount setpriv:util-linux strace:strace era_check:thin-provisioning-tools jq:jq bc:bc openssl:openssl
      nbd-client:nbd-client python3:python3)
missing=()
for w in "${want[@]}"; do
  tool=${w%%:*}; pkg=${w##*:}
  # sbin tools count even when a non-root PATH lacks the sbin directories.
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] || [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
# Build dependency: NBD TLS-PSK uses the openssl crate (openssl-sys links libssl).
pkg-config --exists openssl 2>/dev/null || missing+=(pkg-config libssl-dev)
if ((${#missing[@]})); then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "deps: installing ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Unprivileged FUSE mounts (fuser and fusermount3 open /dev/fuse as the user): udev makes it
# 0666, a container may leave it 0600.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "deps: chmod 0666 /dev/fuse (as udev sets it)"
  $SUDO chmod 0666 /dev/fuse || echo "deps: could not chmod /dev/fuse; unprivileged FUSE tests will skip"
fi
# Components cargo needs for the lint step.
command -v cargo >/dev/null || { echo "deps: cargo not found (install Rust with rustup)"; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
