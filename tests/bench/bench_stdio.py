#!/usr/bin/env python3
# The team's MCP stdio benchmark client, unchanged below these three lines: tests/bench/mcp.lua
# runs it against every server it compares, so all of them are measured by the same client
# (spawn -> initialize answered, sequential tools/call, VmHWM).
"""Benchmark any MCP stdio server with raw newline-delimited JSON-RPC.

usage:
  bench_stdio.py [options] -- <server command> [args...]

  e.g. bench_stdio.py -- node ts_server.mjs
       bench_stdio.py --starts 30 --calls 2000 --sessions 5 -- clawlua mcp

Measures (no SDK involved on the client side, stdlib only):
  1. startup: spawn -> write `initialize` -> read its response  (--starts reps)
  (--modern: 2026-07-28 stateless wire; "startup" ends at the server/discover result)
  2. throughput: one session per rep; after initialize + notifications/initialized,
     --calls sequential `tools/call` (one in flight; --window N for pipelining);
     reports calls/s and per-call round-trip percentiles       (--sessions reps)
  3. peak RSS of the server process (VmHWM from /proc/<pid>/status, read just
     before stdin is closed; also summed over the process tree, and ru_maxrss
     from wait4 as a cross-check)
Prints medians; --json FILE writes all raw samples.
Server requests to the client (e.g. roots/list, ping) are answered with
{} for ping and -32601 otherwise, so the run never stalls on them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROTO_DEFAULT = "2025-11-25"
MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {},
               "io.modelcontextprotocol/clientInfo": {"name": "bench_stdio.py", "version": "0.1"}}


def now():
    return time.perf_counter()


class Server:
    def __init__(self, cmd, env=None, stderr=subprocess.DEVNULL, modern=False):
        self.modern = modern  # 2026-07-28: no initialize; _meta on every request
        self.t_spawn = now()
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        self.next_id = 1
        self.notifications = 0

    def send(self, obj):
        self.p.stdin.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        self.p.stdin.flush()

    def request(self, method, params=None):
        rid = self.next_id
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if self.modern:
            params = dict(params or {})
            params["_meta"] = MODERN_META
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return rid

    def read_response(self, rid=None):
        """Read lines until a response (to rid, or any id if rid is None)."""
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(
                    "server closed stdout (exit=%s)" % self.p.poll()
                )
            line = line.strip()
            if not line:
                continue
            msg = json.loads(line)
            if "method" in msg:
                if "id" in msg:  # server->client request
                    if msg["method"] == "ping":
                        self.send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
                    else:
                        self.send({"jsonrpc": "2.0", "id": msg["id"],
                                   "error": {"code": -32601, "message": "not supported by bench"}})
                else:
                    self.notifications += 1
                continue
            if rid is None or msg.get("id") == rid:
                return msg

    def initialize(self, proto):
        if self.modern:
            rid = self.request("server/discover", {})
            resp = self.read_response(rid)
            if "result" not in resp:
                raise RuntimeError("server/discover failed: %s" % resp)
            resp["result"].setdefault("protocolVersion", MODERN_META["io.modelcontextprotocol/protocolVersion"])
            return resp
        rid = self.request("initialize", {
            "protocolVersion": proto,
            "capabilities": {},
            "clientInfo": {"name": "bench_stdio.py", "version": "0.1"},
        })
        resp = self.read_response(rid)
        if "result" not in resp:
            raise RuntimeError("initialize failed: %s" % resp)
        return resp

    def initialized(self):
        if self.modern:
            return
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def tree_pids(self):
        pids, frontier = [self.p.pid], [self.p.pid]
        while frontier:
            pid = frontier.pop()
            try:
                with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                kids = []
            pids += kids
            frontier += kids
        return pids

    @staticmethod
    def status_kb(pid, key):
        try:
            with open("/proc/%d/status" % pid) as f:
                for l in f:
                    if l.startswith(key + ":"):
                        return int(l.split()[1])
        except OSError:
            pass
        return 0

    def rss(self):
        pids = self.tree_pids()
        return {
            "main_vmhwm_kb": self.status_kb(self.p.pid, "VmHWM"),
            "main_vmrss_kb": self.status_kb(self.p.pid, "VmRSS"),
            "tree_vmhwm_kb": sum(self.status_kb(p, "VmHWM") for p in pids),
            "tree_pids": len(pids),
        }

    def close(self, timeout=5.0):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        t_end = now() + timeout
        while now() < t_end:
            r = os.wait4(self.p.pid, os.WNOHANG)
            if r[0] == self.p.pid:
                self.p.returncode = os.waitstatus_to_exitcode(r[1])
                return {"exited": True, "code": self.p.returncode,
                        "wait4_maxrss_kb": r[2].ru_maxrss}
            time.sleep(0.005)
        self.p.kill()
        _, st, ru = os.wait4(self.p.pid, 0)
        self.p.returncode = os.waitstatus_to_exitcode(st)
        return {"exited": False, "code": self.p.returncode, "killed": True,
                "wait4_maxrss_kb": ru.ru_maxrss}


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def bench_startup(cmd, n, proto, env, modern=False):
    out = []
    for _ in range(n):
        s = Server(cmd, env=env, modern=modern)
        resp = s.initialize(proto)
        dt = now() - s.t_spawn
        s.initialized()
        c = s.close()
        out.append({"ms": dt * 1000, "protocolVersion": resp["result"].get("protocolVersion"),
                    "exit": c})
    return out


def bench_session(cmd, calls, tool, args, proto, env, window, check_echo, modern=False):
    s = Server(cmd, env=env, modern=modern)
    s.initialize(proto)
    s.initialized()
    rid = s.request("tools/list", {})
    tl = s.read_response(rid)
    names = [t["name"] for t in tl.get("result", {}).get("tools", [])]
    if tool not in names:
        s.close()
        raise RuntimeError("tool %r not in tools/list: %s" % (tool, names))
    # warm-up (not timed)
    for _ in range(min(50, calls)):
        s.read_response(s.request("tools/call", {"name": tool, "arguments": args}))
    lat, errors = [], 0
    t0 = now()
    if window <= 1:
        for _ in range(calls):
            t = now()
            r = s.read_response(s.request("tools/call", {"name": tool, "arguments": args}))
            lat.append((now() - t) * 1000)
            res = r.get("result")
            if res is None or res.get("isError"):
                errors += 1
            elif check_echo and res["content"][0].get("text") != args.get("text"):
                errors += 1
    else:
        sent_at, inflight, done, sent = {}, 0, 0, 0
        while done < calls:
            while inflight < window and sent < calls:
                i = s.request("tools/call", {"name": tool, "arguments": args})
                sent_at[i] = now(); inflight += 1; sent += 1
            r = s.read_response(None)
            lat.append((now() - sent_at.pop(r["id"])) * 1000)
            inflight -= 1; done += 1
            if "result" not in r or r["result"].get("isError"):
                errors += 1
    elapsed = now() - t0
    if s.modern:  # ping was removed in 2026-07-28
        ping = {"result": {}}
    else:
        ping = s.read_response(s.request("ping"))
    mem = s.rss()
    c = s.close()
    return {"calls": calls, "seconds": elapsed, "calls_per_s": calls / elapsed,
            "lat_p50_ms": pct(lat, 0.5), "lat_p90_ms": pct(lat, 0.9),
            "lat_p99_ms": pct(lat, 0.99), "lat_max_ms": max(lat), "errors": errors,
            "ping_ok": ping.get("result") == {}, "notifications": s.notifications,
            **mem, "exit": c}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=25, help="startup repetitions (default 25)")
    ap.add_argument("--sessions", type=int, default=5, help="throughput sessions (default 5)")
    ap.add_argument("--calls", type=int, default=2000, help="tools/call per session (default 2000)")
    ap.add_argument("--window", type=int, default=1, help="requests in flight (default 1 = sequential)")
    ap.add_argument("--tool", default="echo")
    ap.add_argument("--args", default='{"text":"hello"}', help="tool arguments JSON")
    ap.add_argument("--proto", default=PROTO_DEFAULT, help="protocolVersion to request")
    ap.add_argument("--modern", action="store_true",
                    help="2026-07-28 stateless wire: server/discover instead of initialize, _meta on every request; ping is skipped")
    ap.add_argument("--no-check", action="store_true", help="don't check echo text")
    ap.add_argument("--json", help="write raw samples to this file")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("server command required after --")
    args = json.loads(a.args)
    env = dict(os.environ)

    print("server: %s" % " ".join(cmd))
    st = bench_startup(cmd, a.starts, a.proto, env, a.modern) if a.starts > 0 else []
    if st:
        ms = [x["ms"] for x in st]
        print("startup->initialize response  n=%d  median=%.1f ms  min=%.1f  p90=%.1f  max=%.1f  (protocolVersion=%s)"
              % (len(ms), statistics.median(ms), min(ms), pct(ms, 0.9), max(ms), st[0]["protocolVersion"]))
    ss = []
    for _ in range(a.sessions):
        ss.append(bench_session(cmd, a.calls, a.tool, args, a.proto, env, a.window,
                                check_echo=not a.no_check and "text" in args, modern=a.modern))
    if ss:
        med = lambda k: statistics.median(x[k] for x in ss)
        print("tools/call x%d (window=%d)  sessions=%d  median=%.0f calls/s  (min %.0f, max %.0f)"
              % (a.calls, a.window, len(ss), med("calls_per_s"),
                 min(x["calls_per_s"] for x in ss), max(x["calls_per_s"] for x in ss)))
        print("  round-trip median-of-sessions: p50=%.3f ms  p90=%.3f  p99=%.3f  max=%.3f  errors=%d"
              % (med("lat_p50_ms"), med("lat_p90_ms"), med("lat_p99_ms"), med("lat_max_ms"),
                 sum(x["errors"] for x in ss)))
        print("  peak RSS (VmHWM) main process: median=%.1f MiB (min %.1f, max %.1f); process tree sum median=%.1f MiB (%d pid(s)); wait4 ru_maxrss median=%.1f MiB"
              % (med("main_vmhwm_kb") / 1024, min(x["main_vmhwm_kb"] for x in ss) / 1024,
                 max(x["main_vmhwm_kb"] for x in ss) / 1024, med("tree_vmhwm_kb") / 1024,
                 ss[0]["tree_pids"], statistics.median(x["exit"]["wait4_maxrss_kb"] for x in ss) / 1024))
        print("  clean exit on stdin EOF: %s" % all(x["exit"]["exited"] for x in ss))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cmd": cmd, "startup": st, "sessions": ss}, f, indent=1)
    bad = sum(x["errors"] for x in ss)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
