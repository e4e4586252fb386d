#!/usr/bin/python3
"""A FAKE qemu-system-x86_64 for clawlua's tests: it runs no VM. It takes QEMU's command line,
answers QMP on the inherited `-chardev socket,id=qmp,fd=N`, and plays the guest agent on
`-chardev socket,id=agent,fd=M` the way a broken or hostile guest would, so the host side of
the channel can be tested without booting anything.

usage: fake-qemu.py (--mode MODE | --mode-file FILE) [--agent PATH] <QEMU arguments>
  --mode-file reads MODE from FILE at each start, so one fake (one verdict-cache key) can
  change its behaviour between boots.

modes:
  exit        print an error and exit 1 at once (a VMM that dies during start)
  silent      QMP works, the agent never says READY (a guest that never becomes ready)
  agent       the real agent (--agent PATH --fd M) serves the channel: a VM without a VM
  nokvm       like agent, but under -accel kvm it fails the way a stock kernel fails on a nested
              PVM hypervisor (for the KVM probe boot)
  nokvm-eof   like agent, but under -accel kvm the guest side of the channel closes and the
              VMM lives on: how a stock kernel on this host's nested PVM /dev/kvm looks
  oversized   a frame header announcing a 100 MiB payload (then READY)
  badmagic    bytes that are not a frame (then READY)
  unknown-id  EXIT for a request the host never made (then READY)
  bad-exit    READY, then answers an EXEC with an EXIT whose TLV runs past the frame
  flood       READY, then answers an EXEC with 8 MiB of stdout (the host must cap it)
  early-out   READY, then answers an EXEC with output before STARTED
  hang        READY, then reads every frame and answers none (an agent that hangs)
  garbage     READY, then answers the first frame with garbage and closes (--seed N: N % 3 picks
              random bytes, a whole frame of a random type and payload, or one cut short)
  die         READY, answers a PING, then SIGKILLs itself on an EXEC once it is STARTED (a VMM
              killed mid-exec)
"""
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

MAGIC = 0xC1A7


def frame(t, i, payload=b""):
    return struct.pack("<HHII", MAGIC, t, i, len(payload)) + payload


def tlv(tag, v):
    if isinstance(v, int):
        v = struct.pack("<Q", v)
    if isinstance(v, str):
        v = v.encode()
    return struct.pack("<HI", tag, len(v)) + v


def ready():
    return frame(64, 0, tlv(17, 1) + tlv(18, "Linux fake 0.0 #1 x86_64") + tlv(19, 1) + tlv(21, 1))


def read_frame(sock, buf):
    while True:
        if len(buf) >= 12:
            _, t, i, n = struct.unpack("<HHII", buf[:12])
            if len(buf) >= 12 + n:
                return t, i, buf[12:12 + n], buf[12 + n:]
        d = sock.recv(65536)
        if not d:
            return None, None, None, buf
        buf += d


def qmp(sock, exit_event):
    f = sock.makefile("rwb", buffering=0)
    f.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 0}, "package": "fake"}, '
            b'"capabilities": []}}\r\n')
    for line in f:
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        ex = cmd.get("execute")
        ret = {}
        if ex == "query-status":
            ret = {"status": "running", "running": True, "singlestep": False}
        f.write(json.dumps({"return": ret, "id": cmd.get("id")}).encode() + b"\r\n")
        if ex in ("quit", "system_powerdown"):
            exit_event.set()
            return


def main(argv):
    mode, agent, seed = None, None, 0
    for i, a in enumerate(argv):
        if a == "--seed":
            seed = int(argv[i + 1])
        if a == "--mode":
            mode = argv[i + 1]
        elif a == "--mode-file":
            with open(argv[i + 1]) as f:
                mode = f.read().strip()
        elif a == "--agent":
            agent = argv[i + 1]
    fds = {}
    for a in argv:
        if a.startswith("socket,id="):
            opts = dict(p.split("=", 1) for p in a.split(",")[1:])
            fds[opts["id"]] = int(opts["fd"])
    sys.stderr.write("fake-qemu (no VM runs): mode %s, fds %s\n" % (mode, fds))
    sys.stderr.flush()
    under_kvm = any(a == "kvm" and argv[i - 1] == "-accel" for i, a in enumerate(argv))
    if mode == "nokvm":
        if under_kvm:
            sys.stderr.write("KVM internal error. Suberror: 1 (fake-qemu, mode nokvm)\n")
            return 1
        mode = "agent"
    if mode == "nokvm-eof":
        mode = "eof" if under_kvm else "agent"
    if mode == "exit":
        sys.stderr.write("fake-qemu: cannot initialise the machine (mode exit)\n")
        return 1
    done = threading.Event()
    qsock = socket.socket(fileno=fds["qmp"])
    threading.Thread(target=qmp, args=(qsock, done), daemon=True).start()
    ch = socket.socket(fileno=fds["agent"]) if "agent" in fds else None
    if mode == "eof":
        ch.close()
        done.wait()
        return 0
    if mode == "agent":
        p = subprocess.Popen([agent, "--fd", str(ch.fileno())], pass_fds=[ch.fileno()])
        ch.close()
        while p.poll() is None and not done.is_set():
            time.sleep(0.02)
        if p.poll() is None:
            p.kill()
        return 0
    # The hostile frames come before READY: the host must refuse them while it starts.
    if mode == "oversized":
        ch.sendall(struct.pack("<HHII", MAGIC, 67, 1, 100 << 20))
    elif mode == "badmagic":
        ch.sendall(b"this is not a frame at all\n")
    elif mode == "unknown-id":
        ch.sendall(frame(69, 4242, tlv(12, 0)))
    if mode != "silent":
        ch.sendall(ready())
    buf = b""
    while not done.is_set():
        if ch is None or mode == "silent":
            time.sleep(0.05)
            continue
        t, rid, payload, buf = read_frame(ch, buf)
        if t is None:
            break
        if mode == "hang":
            continue
        if mode == "garbage":
            rnd = random.Random(seed)
            kind = seed % 3
            if kind == 0:  # bytes that are not a frame
                junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
                if junk[:2] == struct.pack("<H", MAGIC):
                    junk = b"\0" + junk
            else:  # a whole frame of a random type (answering the request), or one cut short
                n = rnd.randrange(0, 300)
                body = bytes(rnd.randrange(256) for _ in range(n))
                typ = rnd.choice([rnd.randrange(65536), rnd.randrange(64, 72)])
                junk = struct.pack("<HHII", MAGIC, typ, rid, n) + body
                if kind == 2:
                    junk = junk[:rnd.randrange(1, len(junk))]
            ch.sendall(junk)
            ch.close()
            ch = None
            continue
        if t == 2 and mode == "die":
            ch.sendall(frame(66, rid, tlv(21, 7)))
            os.kill(os.getpid(), signal.SIGKILL)
        if t == 1:  # PING
            ch.sendall(frame(65, rid, tlv(17, 1)))
        elif t == 2:  # EXEC
            if mode == "bad-exit":
                ch.sendall(frame(66, rid, tlv(21, 7)))
                ch.sendall(frame(69, rid, struct.pack("<HI", 12, 1000) + b"\0" * 8))
            elif mode == "flood":
                ch.sendall(frame(66, rid, tlv(21, 7)))
                chunk = b"x" * 65536
                for _ in range(128):
                    ch.sendall(frame(67, rid, chunk))
                ch.sendall(frame(69, rid, tlv(12, 0) + tlv(14, 0)))
            elif mode == "early-out":
                ch.sendall(frame(67, rid, b"too early"))
            else:
                ch.sendall(frame(66, rid, tlv(21, 7)) + frame(69, rid, tlv(12, 0) + tlv(14, 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
