#!/usr/bin/python3
"""STAND-IN for Firecracker, for clawlua's tests only. It is NOT Firecracker and runs no VM.

No Firecracker binary can be installed where clawlua is developed, so this stand-in plays its
API server: it takes Firecracker's command line (--api-sock, --id, --seccomp-filter /
--no-seccomp), loads the OpenAPI description firecracker.yaml FROM THE FILE, and checks every
request against it: the path and method, the body against the schema (required fields, types,
enums, ranges, no unknown fields), path ids against body ids, and the call order Firecracker
enforces ("Pre-boot only." / "Post-boot only." as the spec states them, InstanceStart needing a
boot source, snapshot/load only on a fresh process, snapshot/create only while Paused). Answers
are what the spec says (204, the documented bodies, 400 with a fault_message).

The "guest" is simulated: after InstanceStart the vsock proxy listens on uds_path and answers
"CONNECT <port>" with "OK <port>", and each connection is served by clawlua's real guest agent
(clawlua-agent --fd) running on the host. A guest power-off (the agent exits 100/101) or
SendCtrlAltDel ends the stand-in the way a guest reboot ends Firecracker.

The seccomp filter file (Firecracker's format: bincode map thread name -> BPF program) is parsed
and checked, and the "vcpu" program is installed in a child process that stands for a vCPU
thread: its /proc/<pid>/status shows the filter in force, and a signal makes it try a syscall
the filter denies (it dies of SIGSYS).

usage: firecracker-standin.py --agent PATH [--spec PATH] [--boot-delay S] [--vmm-version V]
                              --api-sock PATH [--id ID] [--seccomp-filter FILE | --no-seccomp]
"""
import ctypes
import json
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    sys.stderr.write("firecracker-standin: %s\n" % msg)
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------------
# The spec

class Spec:
    def __init__(self, path):
        with open(path) as f:
            self.doc = yaml.safe_load(f)
        self.version = self.doc["info"]["version"]
        self.ops = []  # (regex, template, method, op)
        for template, methods in self.doc["paths"].items():
            rx = "^" + re.sub(r"\{([^}]+)\}", r"(?P<\1>[^/]+)", template) + "$"
            for method, op in methods.items():
                self.ops.append((re.compile(rx), template, method.upper(), op))

    def find(self, path, method):
        known = False
        for rx, template, m, op in self.ops:
            match = rx.match(path)
            if match:
                known = True
                if m == method:
                    return template, op, match.groupdict()
        return None, known, None

    def resolve(self, schema):
        while "$ref" in schema:
            name = schema["$ref"].split("/")[-1]
            schema = self.doc["definitions"][name]
        return schema

    def check(self, schema, value, where):
        """Raises ValueError naming the first place where value does not fit schema."""
        schema = self.resolve(schema)
        t = schema.get("type")
        if "enum" in schema and value not in schema["enum"]:
            raise ValueError("%s: %r is not one of %s" % (where, value, schema["enum"]))
        if t == "object" or (t is None and "properties" in schema):
            if not isinstance(value, dict):
                raise ValueError("%s: object expected" % where)
            props = schema.get("properties", {})
            for req in schema.get("required", []):
                if req not in value:
                    raise ValueError("%s: missing field `%s`" % (where, req))
            extra = schema.get("additionalProperties", False)
            for k, v in value.items():
                if k in props:
                    self.check(props[k], v, "%s.%s" % (where, k))
                elif extra is False:
                    raise ValueError("%s: unknown field `%s`" % (where, k))
                elif isinstance(extra, dict):
                    self.check(extra, v, "%s.%s" % (where, k))
        elif t == "string":
            if not isinstance(value, str):
                raise ValueError("%s: string expected" % where)
        elif t == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError("%s: integer expected" % where)
        elif t == "number":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError("%s: number expected" % where)
        elif t == "boolean":
            if not isinstance(value, bool):
                raise ValueError("%s: boolean expected" % where)
        elif t == "array":
            if not isinstance(value, list):
                raise ValueError("%s: array expected" % where)
            for i, item in enumerate(value):
                self.check(schema.get("items", {}), item, "%s[%d]" % (where, i))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                raise ValueError("%s: %s is below the minimum %s" % (where, value, schema["minimum"]))
            if "maximum" in schema and value > schema["maximum"]:
                raise ValueError("%s: %s is above the maximum %s" % (where, value, schema["maximum"]))


def tap_exists(name):
    """The interface exists in this network namespace (asked by ioctl: a jail has no /sys)."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


class Fault(Exception):
    def __init__(self, msg, status=400):
        super().__init__(msg)
        self.status = status


# ------------------------------------------------------------------------------------------------
# Seccomp filters in Firecracker's format

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def parse_filter_file(path):
    """bincode (little-endian, fixed-width ints): u64 count, then per thread a u64-length name
    and a u64-length vector of 8-byte sock_filter instructions."""
    data = open(path, "rb").read()
    if len(data) > 100000:
        raise ValueError("%d bytes: over Firecracker's 100000-byte limit" % len(data))
    off = 0

    def u64():
        nonlocal off
        if off + 8 > len(data):
            raise ValueError("truncated at byte %d" % off)
        (v,) = struct.unpack_from("<Q", data, off)
        off += 8
        return v

    threads = {}
    for _ in range(u64()):
        n = u64()
        name = data[off:off + n].decode()
        off += n
        count = u64()
        if count == 0 or count > 4096:
            raise ValueError("thread %s: %d instructions" % (name, count))
        prog = data[off:off + 8 * count]
        if len(prog) != 8 * count:
            raise ValueError("thread %s: truncated program" % name)
        off += 8 * count
        threads[name] = prog
    if off != len(data):
        raise ValueError("%d trailing bytes" % (len(data) - off))
    for want in ("vmm", "api", "vcpu"):
        if want not in threads:
            raise ValueError("no filter for the %s thread" % want)
    return threads


def vcpu_child(prog):
    """Forks a process that installs prog as its seccomp filter and then waits in futex(2), the
    way a vCPU thread waits in KVM_RUN. SIGUSR1 makes it call getpid(2), which Firecracker's
    vcpu filter does not allow. Returns the child's pid, or raises with the kernel's verdict."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    word = ctypes.c_int(0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.signal(signal.SIGUSR1, lambda *_: os.getpid())
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        rc = libc.prctl(22, 2, ctypes.byref(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        os.write(w, b"%d" % (0 if rc == 0 else ctypes.get_errno()))
        if rc != 0:
            os._exit(1)
        while True:
            libc.syscall(202, ctypes.byref(word), 0, 0, None, None, 0)  # futex(FUTEX_WAIT)
    os.close(w)
    verdict = os.read(r, 16)
    os.close(r)
    if verdict != b"0":
        os.waitpid(pid, 0)
        raise ValueError("the kernel refused the vcpu program: errno %s" % verdict.decode())
    return pid


# ------------------------------------------------------------------------------------------------
# The instance

class Instance:
    def __init__(self, args, spec):
        self.args = args
        self.spec = spec
        self.lock = threading.Lock()
        self.state = "Not started"
        self.configured = set()  # resources other than logger/metrics
        self.cfg = {"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": False},
                    "drives": {}, "network-interfaces": {}}
        self.logger = None
        self.metrics = None
        self.vsock_listener = None
        self.agents = []
        self.vcpu_pid = None
        self.requests = 0
        self.exiting = False
        self.booted_at = None

    def log_line(self, msg):
        line = "%s [%s:standin] %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), self.args["id"], msg)
        if self.logger:
            with open(self.logger, "a") as f:
                f.write(line)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    def path(self, p):
        return p if os.path.isabs(p) else os.path.join(os.getcwd(), p)

    def need_file(self, p, what):
        if not os.path.exists(self.path(p)):
            raise Fault("%s %s: No such file or directory (os error 2)" % (what, p))

    # -- requests --------------------------------------------------------------------------------

    def handle(self, method, path, body_text):
        template, op, params = self.spec.find(path, method)
        if template is None:
            if op:
                raise Fault("Invalid request method and/or path: %s %s." % (method, path))
            raise Fault("Invalid request method and/or path: %s %s." % (method, path))
        body = None
        for p in op.get("parameters", []):
            if p.get("in") != "body":
                continue
            if not body_text:
                if p.get("required"):
                    raise Fault("The body of the request is empty.")
                continue
            try:
                body = json.loads(body_text)
            except ValueError as e:
                raise Fault("Could not parse the body: %s" % e)
            try:
                self.spec.check(p["schema"], body, "body")
            except ValueError as e:
                raise Fault("An error occurred when deserializing the json body of a request: %s" % e)
        text = op.get("summary", "") + " " + str(op.get("description", ""))
        booted = self.state != "Not started"
        if "Pre-boot only." in text and booted:
            raise Fault("The requested operation is not supported after starting the microVM.")
        if "Post-boot only." in text and not booted:
            raise Fault("The requested operation is not supported before starting the microVM.")
        for name, value in (params or {}).items():
            key = {"drive_id": "drive_id", "iface_id": "iface_id", "id": "id"}.get(name)
            if body is not None and key in body and body[key] != value:
                raise Fault("The id from the path [%s] does not match the id from the body [%s]!"
                            % (value, body[key]))
        handler = getattr(self, "op_" + op["operationId"], None)
        result = handler(body, params or {}) if handler else None
        for code in sorted(op["responses"], key=str):
            if str(code).startswith("2"):
                status = int(code)
                schema = op["responses"][code].get("schema")
                if schema is not None:
                    self.spec.check(schema, result, "response")  # the stand-in keeps its word too
                    return status, result
                return status, None
        return 204, None

    def op_getFirecrackerVersion(self, body, params):
        return {"firecracker_version": self.args["vmm_version"] or self.spec.version}

    def op_describeInstance(self, body, params):
        return {"app_name": "Firecracker", "id": self.args["id"], "state": self.state,
                "vmm_version": self.args["vmm_version"] or self.spec.version}

    def op_getMachineConfiguration(self, body, params):
        return dict(self.cfg["machine-config"])

    def op_getExportVmConfig(self, body, params):
        out = {"machine-config": self.cfg["machine-config"],
               "drives": list(self.cfg["drives"].values()),
               "network-interfaces": list(self.cfg["network-interfaces"].values())}
        for k in ("boot-source", "vsock"):
            if k in self.cfg:
                out[k] = self.cfg[k]
        return out

    def op_putLogger(self, body, params):
        if self.logger:
            raise Fault("Logger already initialized")
        p = body.get("log_path")
        if p:
            self.need_file(p, "Logger path")
            self.logger = self.path(p)
        self.log_line("Running Firecracker STAND-IN with API version %s" % self.spec.version)

    def op_putMetrics(self, body, params):
        if self.metrics:
            raise Fault("Reinitialization of metrics not allowed.")
        self.need_file(body["metrics_path"], "Metrics path")
        self.metrics = self.path(body["metrics_path"])

    def op_putMachineConfiguration(self, body, params):
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise Fault("The vCPU number is invalid! The vCPU number can only be 1 or an even number "
                        "when SMT is enabled.")
        self.cfg["machine-config"] = dict(body, smt=body.get("smt", False))
        self.configured.add("machine-config")

    def op_putGuestBootSource(self, body, params):
        self.need_file(body["kernel_image_path"], "Kernel file")
        if body.get("initrd_path"):
            self.need_file(body["initrd_path"], "Initrd file")
        self.cfg["boot-source"] = body
        self.configured.add("boot-source")

    def op_putGuestDriveByID(self, body, params):
        if "path_on_host" in body:
            self.need_file(body["path_on_host"], "Drive")
        if body.get("is_root_device") and any(d.get("is_root_device") for k, d in
                                               self.cfg["drives"].items() if k != body["drive_id"]):
            raise Fault("A root block device already exists!")
        self.cfg["drives"][body["drive_id"]] = body
        self.configured.add("drives")

    def op_putGuestNetworkInterfaceByID(self, body, params):
        dev = body["host_dev_name"]
        if not tap_exists(dev):
            raise Fault("Open tap device failed: Error while creating ifreq structure: "
                        "No such device (os error 19). Invalid TUN/TAP Backend provided by %s." % dev)
        if body.get("guest_mac") and not re.match(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", body["guest_mac"]):
            raise Fault("Invalid guest MAC address: %s" % body["guest_mac"])
        self.cfg["network-interfaces"][body["iface_id"]] = body
        self.configured.add("network-interfaces")

    def op_putGuestVsock(self, body, params):
        d = os.path.dirname(self.path(body["uds_path"]))
        if not os.path.isdir(d):
            raise Fault("Cannot create backend for vsock device: UnixBind(No such file or directory)")
        self.cfg["vsock"] = body
        self.configured.add("vsock")

    def op_createSyncAction(self, body, params):
        kind = body["action_type"]
        if kind == "InstanceStart":
            if self.state != "Not started":
                raise Fault("The requested operation is not supported after starting the microVM.")
            if "boot-source" not in self.cfg:
                raise Fault("Cannot start microvm without kernel configuration.")
            self.boot()
        elif kind == "SendCtrlAltDel":
            if self.state == "Not started":
                raise Fault("The requested operation is not supported before starting the microVM.")
            self.log_line("Received CtrlAltDel: the guest reboots, the VMM exits")
            threading.Timer(0.05, self.exit, (0,)).start()
        elif kind == "FlushMetrics":
            if not self.metrics:
                raise Fault("The metrics system is not initialized")
            with open(self.metrics, "a") as f:
                f.write(json.dumps({"utc_timestamp_ms": int(time.time() * 1000),
                                    "api_server": {"process_startup_time_us": 1000},
                                    "standin": {"requests": self.requests,
                                                "agents": len(self.agents),
                                                "state": self.state}}) + "\n")

    def op_patchVm(self, body, params):
        if self.state == "Not started":
            raise Fault("The requested operation is not supported before starting the microVM.")
        self.state = "Paused" if body["state"] == "Paused" else "Running"
        self.log_line("vm state: %s" % self.state)
        for p in self.agents:  # the simulated guest stops with its vCPUs
            if p.poll() is None:
                p.send_signal(signal.SIGSTOP if self.state == "Paused" else signal.SIGCONT)

    def op_createSnapshot(self, body, params):
        if self.state != "Paused":
            raise Fault("Cannot create a snapshot: the microVM must be paused.")
        state = {"standin_snapshot": 1, "cfg": self.cfg, "id": self.args["id"]}
        with open(self.path(body["snapshot_path"]), "w") as f:
            json.dump(state, f)
        with open(self.path(body["mem_file_path"]), "wb") as f:
            f.truncate(self.cfg["machine-config"]["mem_size_mib"] << 20)

    def op_loadSnapshot(self, body, params):
        if self.state != "Not started" or self.configured:
            raise Fault("Loading a microVM snapshot not allowed after configuring boot-specific "
                        "resources.")
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise Fault("Exactly one of mem_file_path and mem_backend must be given.")
        mem = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
        self.need_file(body["snapshot_path"], "Snapshot")
        self.need_file(mem, "Memory file")
        with open(self.path(body["snapshot_path"])) as f:
            state = json.load(f)
        if state.get("standin_snapshot") != 1:
            raise Fault("Load snapshot error: not a snapshot of this VMM")
        if os.path.getsize(self.path(mem)) != state["cfg"]["machine-config"]["mem_size_mib"] << 20:
            raise Fault("Load snapshot error: the memory file does not match the snapshot")
        self.cfg = state["cfg"]
        for o in body.get("network_overrides", []):
            if o["iface_id"] not in self.cfg["network-interfaces"]:
                raise Fault("Invalid network override: no interface %s" % o["iface_id"])
            self.cfg["network-interfaces"][o["iface_id"]]["host_dev_name"] = o["host_dev_name"]
        for nic in self.cfg["network-interfaces"].values():
            if not tap_exists(nic["host_dev_name"]):
                raise Fault("Load snapshot error: tap %s: No such device" % nic["host_dev_name"])
        self.boot(resume=body.get("resume_vm", False))

    # -- the simulated guest ---------------------------------------------------------------------

    def boot(self, resume=True):
        self.state = "Running" if resume else "Paused"
        self.booted_at = time.monotonic()
        self.log_line("InstanceStart: simulated guest with %d vCPU, %d MiB (stand-in: no VM runs)"
                      % (self.cfg["machine-config"]["vcpu_count"], self.cfg["machine-config"]["mem_size_mib"]))
        if self.args["seccomp_threads"] is not None:
            self.vcpu_pid = vcpu_child(self.args["seccomp_threads"]["vcpu"])
            self.log_line("vcpu stand-in pid %d runs under the vcpu seccomp filter" % self.vcpu_pid)
            threading.Thread(target=self.watch_vcpu, args=(self.vcpu_pid,), daemon=True).start()
        if "vsock" in self.cfg:
            path = self.path(self.cfg["vsock"]["uds_path"])
            if os.path.exists(path):
                os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(8)
            self.vsock_listener = s
            threading.Thread(target=self.vsock_loop, daemon=True).start()

    def watch_vcpu(self, pid):
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            self.log_line("vcpu stand-in pid %d was killed by signal %d" % (pid, os.WTERMSIG(status)))
        else:
            self.log_line("vcpu stand-in pid %d exited with %d" % (pid, os.WEXITSTATUS(status)))

    def vsock_loop(self):
        while not self.exiting:
            try:
                c, _ = self.vsock_listener.accept()
            except OSError:
                return
            threading.Thread(target=self.vsock_conn, args=(c,), daemon=True).start()

    def vsock_conn(self, c):
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            b = c.recv(1)
            if not b:
                c.close()
                return
            line += b
        m = re.match(rb"^CONNECT (\d+)\n$", line)
        # The guest agent listens once the simulated guest has "booted".
        if not m or self.state != "Running" or time.monotonic() - self.booted_at < self.args["boot_delay"]:
            c.close()
            return
        c.sendall(b"OK 1073741824\n")
        agent = subprocess.Popen([self.args["agent"], "--fd", str(c.fileno())], pass_fds=[c.fileno()],
                                 stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno())
        c.close()
        with self.lock:
            self.agents.append(agent)
        code = agent.wait()
        if code in (100, 101) and not self.exiting:
            self.log_line("the guest %s" % ("rebooted" if code == 101 else "powered off"))
            self.exit(0)

    def exit(self, code):
        if self.exiting:
            return
        self.exiting = True
        for p in self.agents:
            if p.poll() is None:
                p.kill()
        if self.vcpu_pid:
            try:
                os.kill(self.vcpu_pid, signal.SIGKILL)
            except OSError:
                pass
        sys.stdout.flush()
        os._exit(code)


# ------------------------------------------------------------------------------------------------
# HTTP over the API socket

def make_handler(inst):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def respond(self, status, obj):
            data = b"" if obj is None else json.dumps(obj).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        def do(self, method):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n).decode() if n else ""
            with inst.lock:
                inst.requests += 1
                try:
                    status, obj = inst.handle(method, self.path, body)
                    inst.log_line("API %s %s -> %d" % (method, self.path, status))
                except Fault as f:
                    status, obj = f.status, {"fault_message": str(f)}
                    inst.log_line("API %s %s -> %d: %s" % (method, self.path, status, f))
            self.respond(status, obj)

        def do_GET(self):
            self.do("GET")

        def do_PUT(self):
            self.do("PUT")

        def do_PATCH(self):
            self.do("PATCH")

        def do_POST(self):
            self.do("POST")

        def do_DELETE(self):
            self.do("DELETE")

    return Handler


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        req, _ = self.socket.accept()
        return req, ("standin", 0)


def default_spec():
    """Firecracker's published OpenAPI file, the unmodified copy in tests/fixtures/specs/."""
    return os.path.normpath(os.path.join(HERE, "..", "fixtures", "specs", "firecracker",
                                         "firecracker.yaml"))


def main(argv):
    args = {"agent": None, "spec": default_spec(), "boot_delay": 0.05,
            "api_sock": None, "id": "anonymous-instance", "seccomp": None, "no_seccomp": False,
            "vmm_version": None, "seccomp_threads": None}
    i = 1
    flags = {"--agent": "agent", "--spec": "spec", "--boot-delay": "boot_delay", "--api-sock": "api_sock",
             "--id": "id", "--seccomp-filter": "seccomp", "--vmm-version": "vmm_version"}
    while i < len(argv):
        a = argv[i]
        if a in flags and i + 1 < len(argv):
            args[flags[a]] = argv[i + 1]
            i += 2
        elif a == "--no-seccomp":
            args["no_seccomp"] = True
            i += 1
        elif a in ("--level", "--log-path", "--boot-timer"):
            i += 2 if a != "--boot-timer" else 1
        else:
            log("unknown argument %s" % a)
            return 2
    args["boot_delay"] = float(args["boot_delay"])
    if not args["api_sock"] or not args["agent"]:
        log("--api-sock and --agent are required")
        return 2
    spec = Spec(args["spec"])
    if args["seccomp"]:
        try:
            args["seccomp_threads"] = parse_filter_file(args["seccomp"])
        except (OSError, ValueError) as e:
            log("--seccomp-filter %s: %s" % (args["seccomp"], e))
            return 1
        log("seccomp filter %s: %s" % (args["seccomp"], ", ".join(
            "%s %d instructions" % (k, len(v) // 8) for k, v in sorted(args["seccomp_threads"].items()))))
    elif args["no_seccomp"]:
        log("running without seccomp filters (--no-seccomp)")
    else:
        log("no --seccomp-filter given: Firecracker would use its built-in default filters")
    inst = Instance(args, spec)
    if os.path.exists(args["api_sock"]):
        log("Failed to open the API socket at %s: address in use" % args["api_sock"])
        return 1
    server = Server(args["api_sock"], make_handler(inst))
    signal.signal(signal.SIGTERM, lambda *_: inst.exit(0))
    inst.log_line("Firecracker STAND-IN (API %s) listening on %s" % (spec.version, args["api_sock"]))
    try:
        server.serve_forever()
    finally:
        inst.exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
