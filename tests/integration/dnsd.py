#!/usr/bin/env python3
"""A tiny authoritative DNS server for the firewall tests.

  dnsd.py ADDR PORT ZONEFILE

ZONEFILE is JSON, read again for every query so a test can change answers:
  {"name": {"a": ["10.0.0.1"], "aaaa": ["fd00::1"], "ttl": 1, "cname": "other.name",
            "delay": 0.3}}
Unknown names get NXDOMAIN. Prints "ready", then "query <name> <type>" per question.
"""
import json
import socket
import struct
import sys
import time


def read_name(msg, off):
    labels = []
    while True:
        n = msg[off]
        if n == 0:
            return ".".join(labels), off + 1
        labels.append(msg[off + 1:off + 1 + n].decode())
        off += 1 + n


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def rr(name, typ, ttl, rdata):
    return encode_name(name) + struct.pack("!HHIH", typ, 1, ttl, len(rdata)) + rdata


def main():
    addr, port, zonefile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print("ready", flush=True)
    while True:
        msg, peer = s.recvfrom(4096)
        if len(msg) < 12:
            continue
        ident, flags, qd = struct.unpack("!HHH", msg[:6])
        name, off = read_name(msg, 12)
        qtype = struct.unpack("!H", msg[off:off + 2])[0]
        question = msg[12:off + 4]
        print("query %s %d" % (name, qtype), flush=True)
        with open(zonefile) as f:
            zone = json.load(f)
        answers = []
        rcode = 0
        cur = name.lower()
        if cur in zone and zone[cur].get("delay"):
            time.sleep(zone[cur]["delay"])
        seen = 0
        while cur in zone and seen < 5:
            seen += 1
            rec = zone[cur]
            ttl = rec.get("ttl", 60)
            if "cname" in rec:
                answers.append(rr(cur, 5, ttl, encode_name(rec["cname"])))
                cur = rec["cname"]
                continue
            if qtype == 1:
                for a in rec.get("a", []):
                    answers.append(rr(cur, 1, ttl, socket.inet_pton(socket.AF_INET, a)))
            elif qtype == 28:
                for a in rec.get("aaaa", []):
                    answers.append(rr(cur, 28, ttl, socket.inet_pton(socket.AF_INET6, a)))
            break
        if seen == 0:
            rcode = 3
        hdr = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(answers), 0, 0)
        s.sendto(hdr + question + b"".join(answers), peer)


if __name__ == "__main__":
    main()
