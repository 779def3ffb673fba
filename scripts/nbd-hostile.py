#!/usr/bin/env python3
"""A hostile NBD client for scripts/soak.sh: connects to udmd's NBD Unix socket again and again,
negotiates an export (fixed newstyle, NBD_OPT_GO), then misbehaves in turn:

  reads   pipelines large READs and never reads a reply (the server must not buffer them all)
  write   sends a WRITE header claiming 32 MiB, a little of the payload, and stops
  stall   negotiates, then sends nothing at all

Each connection is held for HOLD seconds, then dropped. Runs until SECONDS elapse.
Usage: nbd-hostile.py SOCKET EXPORT SECONDS [HOLD]
Prints one line per connection and a summary; exits 0 unless it could never connect."""

import socket
import struct
import sys
import time

OPTS_MAGIC = 0x49484156454F5054  # IHAVEOPT
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
OPT_GO = 7
REP_ACK = 1
CMD_READ = 0
CMD_WRITE = 1
BIG = 32 << 20


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def negotiate(s, export):
    hello = recv_exact(s, 18)
    if hello[:8] != b"NBDMAGIC" or hello[8:16] != b"IHAVEOPT":
        raise ConnectionError("not a newstyle NBD server")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", OPTS_MAGIC, OPT_GO, len(data)) + data)
    size = None
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        if magic != REP_MAGIC:
            raise ConnectionError("bad option reply magic")
        payload = recv_exact(s, length)
        if rtype == REP_ACK:
            return size
        if rtype & 0x80000000:
            raise ConnectionError("NBD_OPT_GO refused: %#x %r" % (rtype, payload))
        if rtype == 3 and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == 0:
            size = struct.unpack(">Q", payload[2:10])[0]


def request(kind, handle, offset, length):
    return struct.pack(">IHHQQI", REQ_MAGIC, 0, kind, handle, offset, length)


def misbehave(s, mode, size, hold):
    s.setblocking(False)
    deadline = time.monotonic() + hold
    sent = 0
    if mode == "reads":
        length = min(BIG, size)
        handle = 0
        # Pipeline READs without reading a reply until the socket stops taking them.
        while time.monotonic() < deadline and handle < 4096:
            try:
                s.send(request(CMD_READ, handle, 0, length))
            except BlockingIOError:
                time.sleep(0.05)
                continue
            handle += 1
        sent = handle
    elif mode == "write":
        length = min(BIG, size)
        try:
            s.send(request(CMD_WRITE, 1, 0, length) + b"\xa5" * 4096)
        except BlockingIOError:
            pass
        sent = 1
    while time.monotonic() < deadline:
        time.sleep(0.1)
    return sent


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    sock, export, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    hold = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    modes = ["reads", "write", "stall"]
    end = time.monotonic() + seconds
    n = ok = 0
    while time.monotonic() < end:
        mode = modes[n % len(modes)]
        n += 1
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(sock)
            size = negotiate(s, export) or BIG
            sent = misbehave(s, mode, size, min(hold, max(0.0, end - time.monotonic())))
            ok += 1
            print("hostile %d %s: %d requests sent, dropped" % (n, mode, sent), flush=True)
        except (OSError, ConnectionError) as e:
            print("hostile %d %s: %s" % (n, mode, e), flush=True)
            time.sleep(0.5)
        finally:
            s.close()
    print("hostile: %d connections, %d negotiated" % (n, ok), flush=True)
    return 0 if ok > 0 or n == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
