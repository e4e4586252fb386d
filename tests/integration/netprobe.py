#!/usr/bin/env python3
"""Traffic for the firewall tests, run inside the test's network namespaces.

  netprobe.py serve PORT...           TCP and UDP listeners on every address (v4 and v6) of the
                                      namespace; prints "ready", then one line per arrival:
                                      "tcp <port> <src> <dst>" / "udp <port> <src> <dst> <payload>"
  netprobe.py probe JSON              runs probes in parallel, prints a JSON list of results;
                                      probe: {"kind": "tcp"|"udp"|"icmp", "dst": addr,
                                      "port": n, "timeout": s}
  netprobe.py flood DST PORT N INTERVAL TAG
                                      N UDP datagrams "seq TAG i", each from a new socket (a new
                                      source port, so a new conntrack flow), INTERVAL s apart
  netprobe.py spoof-ip SRC DST PORT   one UDP datagram with a forged source address (raw socket)
  netprobe.py spoof-mac IFACE SRCMAC DSTMAC SRC DST PORT
                                      one UDP datagram in an Ethernet frame with a forged source
                                      MAC (packet socket)
  netprobe.py arp IFACE SRCMAC SPA TPA TIMEOUT
                                      an ARP request "who has TPA, tell SPA"; prints "reply" if
                                      one comes back within TIMEOUT, else "none"
"""
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve(ports):
    socks = []
    for p in ports:
        for fam, addr in ((socket.AF_INET6, "::"),):
            t = socket.socket(fam, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            t.bind((addr, p))
            t.listen(128)
            t.setblocking(False)
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            # the local address each datagram was sent to
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            u.bind((addr, p))
            u.setblocking(False)
            socks.append(("tcp", p, t))
            socks.append(("udp", p, u))
    out("ready")
    poller = select.poll()
    byfd = {}
    for kind, p, s in socks:
        poller.register(s.fileno(), select.POLLIN)
        byfd[s.fileno()] = (kind, p, s)
    while True:
        for fd, _ in poller.poll():
            kind, p, s = byfd[fd]
            if kind == "tcp":
                try:
                    c, peer = s.accept()
                except BlockingIOError:
                    continue
                local = c.getsockname()[0]
                out("tcp %d %s %s" % (p, norm(peer[0]), norm(local)))
                try:
                    c.sendall(("ok %s\n" % norm(local)).encode())
                except OSError:
                    pass
                c.close()
            else:
                while True:
                    try:
                        data, anc, _, peer = s.recvmsg(2048, 256)
                    except BlockingIOError:
                        break
                    local, info = "?", None
                    for level, typ, val in anc:
                        if level == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO:
                            local = norm(socket.inet_ntop(socket.AF_INET6, val[:16]))
                            info = val[:16] + struct.pack("I", 0)
                    text = data.decode(errors="replace").strip()
                    out("udp %d %s %s %s" % (p, norm(peer[0]), local, text))
                    if text == "ping":
                        # answer from the address that was asked, so that the reply belongs
                        # to the same conntrack flow (a wildcard socket would pick its own)
                        anc_out = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)] if info else []
                        try:
                            s.sendmsg([("ok %s" % local).encode()], anc_out, 0, peer)
                        except OSError:
                            pass


def norm(addr):
    return addr[7:] if addr.startswith("::ffff:") else addr


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def probe_tcp(p):
    s = socket.socket(family(p["dst"]), socket.SOCK_STREAM)
    s.settimeout(p.get("timeout", 1.0))
    try:
        s.connect((p["dst"], p["port"]))
        data = s.recv(100).decode().strip()
        return {"ok": data.startswith("ok"), "reply": data}
    except OSError as e:
        return {"ok": False, "error": str(e)}
    finally:
        s.close()


def probe_udp(p):
    s = socket.socket(family(p["dst"]), socket.SOCK_DGRAM)
    s.settimeout(p.get("timeout", 1.0))
    try:
        s.sendto(b"ping", (p["dst"], p["port"]))
        data, _ = s.recvfrom(100)
        return {"ok": data.startswith(b"ok"), "reply": data.decode()}
    except OSError as e:
        return {"ok": False, "error": str(e)}
    finally:
        s.close()


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def probe_icmp(p):
    v6 = ":" in p["dst"]
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto)
    ident = random.getrandbits(16)  # each probe its own flow (thread ids share low bits)
    typ = 128 if v6 else 8
    hdr = struct.pack("!BBHHH", typ, 0, 0, ident, 1) + b"clawlua"
    if not v6:
        hdr = hdr[:2] + struct.pack("!H", checksum(hdr)) + hdr[4:]
    deadline = time.time() + p.get("timeout", 1.0)
    try:
        s.sendto(hdr, (p["dst"], 0))
        while True:
            left = deadline - time.time()
            if left <= 0:
                return {"ok": False, "error": "timed out"}
            s.settimeout(left)
            data, _ = s.recvfrom(2048)
            if not v6:
                data = data[(data[0] & 15) * 4:]
            if len(data) >= 8 and data[0] == (129 if v6 else 0):
                if struct.unpack("!H", data[4:6])[0] == ident:
                    return {"ok": True}
    except OSError as e:
        return {"ok": False, "error": str(e)}
    finally:
        s.close()


def probe(spec):
    probes = json.loads(spec)
    results = [None] * len(probes)
    fns = {"tcp": probe_tcp, "udp": probe_udp, "icmp": probe_icmp}

    def run(i, p):
        results[i] = fns[p["kind"]](p)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(probes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out(json.dumps(results))


def flood(dst, port, n, interval, tag):
    fam = family(dst)
    start = time.time()
    for i in range(n):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.sendto(("seq %s %d" % (tag, i)).encode(), (dst, port))
        except OSError:
            pass
        s.close()
        delay = start + (i + 1) * interval - time.time()
        if delay > 0:
            time.sleep(delay)
    out("sent %d" % n)


def udp_packet(src, dst, port, payload):
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def spoof_ip(src, dst, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(udp_packet(src, dst, port, b"spoofed-ip"), (dst, 0))
    out("sent")


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def spoof_mac(iface, srcmac, dstmac, src, dst, port):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    frame = mac(dstmac) + mac(srcmac) + b"\x08\x00" + udp_packet(src, dst, port, b"spoofed-mac")
    s.send(frame)
    out("sent")


def arp(iface, srcmac, spa, tpa, timeout):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind((iface, 0))
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(srcmac), socket.inet_aton(spa),
                       b"\0" * 6, socket.inet_aton(tpa))
    s.send(b"\xff" * 6 + mac(srcmac) + b"\x08\x06" + body)
    deadline = time.time() + float(timeout)
    while True:
        left = deadline - time.time()
        if left <= 0:
            out("none")
            return
        r, _, _ = select.select([s], [], [], left)
        if not r:
            continue
        frame = s.recv(2048)
        if len(frame) >= 42 and frame[12:14] == b"\x08\x06":
            op = struct.unpack("!H", frame[20:22])[0]
            if op == 2 and frame[28:32] == socket.inet_aton(tpa):
                out("reply")
                return


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve([int(p) for p in args])
    elif cmd == "probe":
        probe(args[0])
    elif cmd == "flood":
        flood(args[0], int(args[1]), int(args[2]), float(args[3]), args[4])
    elif cmd == "spoof-ip":
        spoof_ip(args[0], args[1], int(args[2]))
    elif cmd == "spoof-mac":
        spoof_mac(args[0], args[1], args[2], args[3], args[4], int(args[5]))
    elif cmd == "arp":
        arp(args[0], args[1], args[2], args[3], args[4])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
