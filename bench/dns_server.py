#!/usr/bin/env python3
"""A tiny DNS server over UDP for bench/realistic.sh (Python 3 stdlib only).

  dns_server.py --names azure-a.bench=127.0.0.1,azure-b.bench=127.0.0.1 --log FILE

Answers A queries for the given names (TTL --ttl, default 30 s), NODATA for their other record types (AAAA),
NXDOMAIN for any other name. glibc always asks port 53, so it binds 127.53.0.x:53, the first x that is free
(root needed), and prints "dns_server listening on 127.53.0.x" once bound. Every query it receives is one line
in the log file ("<unix time> <name> <type>", flushed at once): the benchmark counts lines before and after a
run, so the log is the query counter. It does not recurse, and answers only one question per message, as
getaddrinfo asks. The same protocol subset as tests/support/dns.rs.
"""

import argparse
import signal
import socket
import struct
import sys
import time

TYPE_A = 1
CLASS_IN = 1
TYPE_NAMES = {1: "A", 28: "AAAA", 5: "CNAME", 33: "SRV", 65: "HTTPS"}


def parse_question(msg):
    """(name, qtype, qclass, end offset of the question) or None for anything but a one-question query."""
    if len(msg) < 12 or msg[2] & 0x80 or struct.unpack("!H", msg[4:6])[0] != 1:
        return None
    at, labels = 12, []
    while True:
        if at >= len(msg):
            return None
        n = msg[at]
        at += 1
        if n == 0:
            break
        if n & 0xC0 or at + n > len(msg):  # no compression in a question we accept
            return None
        labels.append(msg[at:at + n].decode("ascii", "replace").lower())
        at += n
    if at + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack("!HH", msg[at:at + 4])
    return ".".join(labels), qtype, qclass, at + 4


def answer(msg, names, ttl):
    q = parse_question(msg)
    if q is None:
        return None, None
    name, qtype, qclass, end = q
    ip = names.get(name)
    a = ip if (ip and qtype == TYPE_A and qclass == CLASS_IN) else None
    flags = 0x8400 | (0x0100 if msg[2] & 0x01 else 0) | 0x0080 | (0 if ip else 3)  # QR AA [RD] RA, NXDOMAIN
    out = msg[0:2] + struct.pack("!HHHHH", flags, 1, 1 if a else 0, 0, 0) + msg[12:end]
    if a:
        out += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4) + socket.inet_aton(a)
    return out, f"{name} {TYPE_NAMES.get(qtype, qtype)}"


def bind_first_free():
    last = None
    for x in range(1, 255):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((f"127.53.0.{x}", 53))
            return s
        except OSError as e:
            last = e
            s.close()
    sys.exit(f"dns_server: no 127.53.0.x:53 free (port 53 needs root): {last}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", required=True, help="name=ipv4,name=ipv4,...")
    ap.add_argument("--log", required=True, help="one line per query received")
    ap.add_argument("--ttl", type=int, default=30)
    a = ap.parse_args()
    names = {}
    for item in a.names.split(","):
        name, ip = item.split("=", 1)
        names[name.strip().lower().rstrip(".")] = ip.strip()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = bind_first_free()
    log = open(a.log, "a", buffering=1)
    print(f"dns_server listening on {sock.getsockname()[0]}", flush=True)
    while True:
        msg, peer = sock.recvfrom(512)
        reply, what = answer(msg, names, a.ttl)
        log.write(f"{time.time():.6f} {what or 'unparsed'}\n")
        if reply is not None:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
