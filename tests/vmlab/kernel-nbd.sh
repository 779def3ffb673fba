#!/usr/bin/env bash
# The kernel's own NBD client against udmd: boots a real kernel under QEMU (run.sh) with udmd,
# udmsetup and Debian's nbd-client inside; nbd-client connects /dev/nbd0 to udmd over TCP on
# 127.0.0.1 with X.509 TLS (client certificate required), the guest makes an ext4 filesystem on
# it, writes, trims and flushes, goes through the live phase (guest-lib.sh: interposer and
# frozen snapshot under a writer), then reconnects over the Unix socket and checks it (see
# kernel-nbd-guest.sh). Afterwards the host runs e2fsck -fn on the disk the guest copied out and
# compares the files (debugfs) with the guest's checksums.
# Usage: kernel-nbd.sh [tls|insecure]  (default tls). Needs root and what run.sh needs.
# Env: VMLAB_RUN (path of run.sh), VMLAB_EXTRA_PATH (a private qemu), VMLAB_KERNEL (6.1, 6.12),
# UDM_BIN_DIR (udmd and udmsetup to test; built from this checkout when unset).
set -euo pipefail
MODE=${1:-tls}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
vmlab_init "kernel NBD test" nbd-client mkfs.ext4 e2fsck debugfs openssl
trap 'rm -rf "$W"' EXIT
vmlab_bins "" udmd udmsetup udm
# Certificates as crates/udm-testkit/src/pki.rs makes them (SAN localhost and 127.0.0.1).
mkdir "$W/pki" && cd "$W/pki"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=udm test CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
for who in server client; do
  usage=serverAuth; [ $who = client ] && usage=clientAuth
  mkdir $who && cp ca-cert.pem $who/
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' $usage > $who/ext
  openssl req "${ec[@]}" -keyout $who/$who-key.pem -out req.csr -subj /CN=localhost 2>/dev/null
  openssl x509 -req -in req.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
    -out $who/$who-cert.pem -days 2 -extfile $who/ext 2>/dev/null
done
cd "$W"
# The guest script: the PEM files as here-documents, then the checks.
{
  echo "MODE=$MODE"
  for f in server/ca-cert.pem server/server-cert.pem server/server-key.pem \
           client/ca-cert.pem client/client-cert.pem client/client-key.pem; do
    echo "mkdir -p /tmp/pki/$(dirname $f); cat > /tmp/pki/$f <<'PEM'"; cat "pki/$f"; echo PEM
  done
  cat "$HERE/guest-lib.sh" "$HERE/kernel-nbd-guest.sh"
} > guest.sh
truncate -s 128M disk.img
rc=0
out=$(VMLAB_BINS="$W/bin/udmd $W/bin/udmsetup $W/bin/udm nbd-client mkfs.ext4 e2fsck" \
      VMLAB_TIMEOUT=${VMLAB_TIMEOUT:-900} "$RUN" guest.sh disk.img 2>&1) || rc=$?
echo "$out"
[ $rc = 0 ] && grep -q '^GUEST_DONE' <<<"$out" || { echo "kernel-nbd: FAIL in the guest (rc=$rc)"; exit 1; }
fail=0
# TRIM and FLUSH: the nbd driver only issues them when udmd advertises them; completed counts
# with a clean kernel log and no udmd errors mean udmd served them.
[ "$(val DISCARD_MAX)" -gt 0 ] || { echo "FAIL no discard on /dev/nbd0"; fail=1; }
[ "$(val WRITE_CACHE)" = "write back" ] || { echo "FAIL /dev/nbd0 not write-back (no FLUSH)"; fail=1; }
check_guest_phases NBD0_STAT
# The host's view of the disk udmd wrote.
if e2fsck -fn disk.img > fsck.out 2>&1; then echo "OK host e2fsck -fn"; else cat fsck.out; echo "FAIL host e2fsck"; fail=1; fi
while read -r sum name; do
  got=$(debugfs -R "cat /$name" disk.img 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$sum" ] || { echo "FAIL host copy of $name: $got != $sum"; fail=1; }
done < <(sed -n 's/^SUM //p' <<<"$out")
echo "OK host checksums of $(grep -c '^SUM ' <<<"$out") files"
if [ $fail -ne 0 ]; then echo "kernel-nbd: FAIL"; exit 1; fi
echo "kernel-nbd: all passed ($MODE)"
