#!/usr/bin/env bash
# Prepares a private qemu-system-x86_64 for ../shared/vmlab/run.sh and prints the directory to put
# first on PATH (VMLAB_EXTRA_PATH). This machine's qemu-utils 10 (backports) conflicts with
# Debian's qemu-system-x86 7.2, so apt cannot install it; instead the 7.2 packages are
# downloaded and extracted into a cache, and only their non-qemu dependencies are installed.
# Idempotent. Exits non-zero (with a message) when it cannot prepare qemu.
set -euo pipefail
if command -v qemu-system-x86_64 >/dev/null 2>&1; then dirname "$(command -v qemu-system-x86_64)"; exit 0; fi
CACHE=${VMLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/udm-vmlab}/qemu
BIN=$CACHE/bin
if [ -x "$BIN/qemu-system-x86_64" ] && "$BIN/qemu-system-x86_64" --version >/dev/null 2>&1; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE" && cd "$CACHE"
apt-get update -qq >/dev/null 2>&1 || true
apt-get download qemu-system-x86 qemu-system-common qemu-system-data >/dev/null 2>&1 \
  || { echo "vmlab-qemu: cannot download qemu-system-x86" >&2; exit 1; }
deps=()
for deb in ./qemu-system-*.deb; do
  dpkg-deb -x "$deb" root
  for d in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g'); do
    case $d in qemu-*|"") ;; *) deps+=("$d") ;; esac
  done
done
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${deps[@]}" seabios ipxe-qemu busybox-static cpio dmsetup >/dev/null \
  || { echo "vmlab-qemu: cannot install qemu's dependencies: ${deps[*]}" >&2; exit 1; }
mkdir -p "$BIN"
cat > "$BIN/qemu-system-x86_64" <<WRAP
#!/bin/sh
exec $CACHE/root/usr/bin/qemu-system-x86_64 -L $CACHE/root/usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu "\$@"
WRAP
chmod +x "$BIN/qemu-system-x86_64"
"$BIN/qemu-system-x86_64" --version >/dev/null || { echo "vmlab-qemu: extracted qemu does not run" >&2; exit 1; }
echo "$BIN"
