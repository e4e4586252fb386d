-- labels: root
-- The kernel audit stream as a source: seccomp denials of sandboxed processes become seccomp.*
-- events attributed to their sandbox; an unavailable source says so once and the runtime goes on.
local claw = require "clawlua"
local H = require "helper"
local audit = claw.audit

local PROBE = os.getenv("CLAWLUA_PROBE") or "build/bin/clawlua-probe"

local function kernel_ready()
  if not H.is_root() then return false, "needs root (CAP_AUDIT_READ)" end
  if not claw.seccomp.available then return false, "seccomp filters are not available here" end
  local st = audit.kernel_source()
  if st.state ~= "running" then return false, "kernel audit source unavailable: " .. tostring(st.error) end
  if not io.open(PROBE) then return false, "probe not built: " .. PROBE end
  return true
end

--- A filter that lets everything through but getppid, which gets `action`.
local function filter(action, log)
  return assert(claw.seccomp.filter { default = "allow", log = log,
                                      rules = { { syscall = "getppid", action = action } } })
end

--- Waits for a seccomp event about pid after seq.
local function seccomp_event(seq, pid, timeout)
  local deadline = claw.now() + (timeout or 5) * H.scale
  while claw.now() < deadline do
    for _, ev in ipairs(audit.events { after_seq = seq, kind = "seccomp" }) do
      if ev.pid == pid then return ev end
    end
    audit.wait(audit.stats().last_seq, 0.1)
  end
end

--- Runs the probe with a filter through proc.spawn, attributing it to `sandbox` (as a sandbox
--- backend would) unless that is false; returns its pid and exit status.
local function run_probe(argv, f, sandbox)
  local cmd = { PROBE, seccomp = f, stdout = "pipe" }
  for _, a in ipairs(argv) do cmd[#cmd + 1] = a end
  local p = assert(claw.proc.spawn(cmd))
  if sandbox ~= false then audit.track_pid(p:pid(), sandbox or "sb-test") end
  local st = p:wait(30 * H.scale)
  if sandbox ~= false then audit.forget_pid(p:pid()) end -- reaped, as a backend does
  local pid = p:pid()
  p:close()
  return pid, st
end

describe("the kernel audit source", function()
  it("turns a jailed process's seccomp kill into seccomp.kill, attributed to the jail", function()
    local ok, why = kernel_ready()
    if not ok then pending(why) return end
    local seq = audit.stats().last_seq
    local p = assert(claw.jail.spawn { PROBE, "getppid", "1", binds = { PROBE }, id = "jail-kill",
                                       seccomp = filter("kill_process"), stdout = "null" })
    local pid = p:pid()
    local st = p:wait(30 * H.scale)
    p:close()
    assert.are.equal("SIGSYS", st.signal_name)
    local ev = seccomp_event(seq, pid)
    assert.is_table(ev, "no seccomp event for pid " .. pid)
    assert.are.equal("seccomp.kill", ev.kind)
    assert.are.equal("jail-kill", ev.sandbox)
    assert.are.equal(pid, ev.pid)
    local d = ev.detail
    assert.are.equal("getppid", d.syscall)
    assert.are.equal(110, d.nr)
    assert.are.equal("x86_64", d.arch)
    assert.are.equal("kill_process", d.action)
    assert.are.equal("0x80000000", d.code)
    assert.are.equal(31, d.sig)
    assert.are.equal("clawlua-probe", d.comm)
    assert.matches("clawlua%-probe$", d.exe)
    assert.are.equal("kernel", d.source)
    assert.matches("^%d+%.%d+:%d+$", d.audit_id)
    -- The jail's own events name the same sandbox.
    assert.are.equal(1, #audit.events { after_seq = seq, kind = "jail.exit", sandbox = "jail-kill" })
  end)

  it("turns a logged errno denial into seccomp.deny", function()
    local ok, why = kernel_ready()
    if not ok then pending(why) return end
    local seq = audit.stats().last_seq
    local pid, st = run_probe({ "getppid", "1" }, filter({ errno = "EPERM" }, true), "sb-deny")
    assert.are.equal(0, st.code)
    local ev = seccomp_event(seq, pid)
    assert.is_table(ev)
    assert.are.equal("seccomp.deny", ev.kind)
    assert.are.equal("errno", ev.detail.action)
    assert.are.equal("getppid", ev.detail.syscall)
    assert.are.equal("sb-deny", ev.sandbox)
  end)

  it("attributes a denial to the sandbox of a tracked ancestor", function()
    local ok, why = kernel_ready()
    if not ok then pending(why) return end
    local seq = audit.stats().last_seq
    -- A clawlua process is the tracked sandbox process; the probe is its child, reaped only
    -- once we have the event: a descendant already reaped when its record is read has no /proc
    -- entry left to find its ancestors by.
    local p = assert(claw.proc.spawn { H.bin, "-e", [[
      local claw = require "clawlua"
      local f = claw.seccomp.filter { default = "allow", rules = { { syscall = "getppid", action = "kill_process" } } }
      local v = assert(claw.proc.spawn { os.getenv("PROBE"), "getppid", "1", seccomp = f, stdout = "null" })
      print(v:pid())
      io.stdout:flush()
      io.stdin:read("l")
      v:wait()
      print("done")
    ]], env = { PROBE = PROBE }, stdin = "pipe", stdout = "pipe" })
    audit.track_pid(p:pid(), "sb-parent")
    p.stdout:set_timeout(30 * H.scale)
    local pid = tonumber(assert(p.stdout:read_line()))
    assert.are_not.equal(p:pid(), pid)
    local ev = seccomp_event(seq, pid, 30)
    p.stdin:write("reap\n")
    assert.are.equal("done", p.stdout:read_line())
    p:wait()
    audit.forget_pid(p:pid())
    p:close()
    assert.is_table(ev)
    assert.are.equal("sb-parent", ev.sandbox)
  end)

  it("records a process name that is not UTF-8 with replacement characters", function()
    local ok, why = kernel_ready()
    if not ok then pending(why) return end
    -- The kernel takes the name from the file: give the probe one that is not UTF-8.
    local dir = H.tmpdir()
    local odd = dir .. "/\xff\xfeA\xc3"
    H.sh(("cp '%s' '%s'"):format(PROBE, odd))
    local seq = audit.stats().last_seq
    local p = assert(claw.proc.spawn { odd, "getppid", "1", seccomp = filter("kill_process"), stdout = "null" })
    audit.track_pid(p:pid(), "sb-utf8")
    local pid = p:pid()
    p:wait()
    p:close()
    H.rm_rf(dir)
    local ev = seccomp_event(seq, pid)
    assert.is_table(ev)
    assert.are.equal("\u{fffd}\u{fffd}A\u{fffd}", ev.detail.comm)
    assert.are.equal(dir .. "/\u{fffd}\u{fffd}A\u{fffd}", ev.detail.exe)
    assert.is_true(ev.truncated)
  end)

  it("ignores processes it cannot attribute, unless scope is all", function()
    local ok, why = kernel_ready()
    if not ok then pending(why) return end
    local before = audit.stats().kernel.unmatched
    local seq = audit.stats().last_seq
    local pid = run_probe({ "getppid", "1" }, filter("kill_process"), false)
    assert.is_true(H.eventually(function() return audit.stats().kernel.unmatched > before end,
      5 * H.scale))
    assert.is_nil(seccomp_event(seq, pid, 0.2))
    audit.kernel_source { scope = "all" }
    local ok2, err = pcall(function()
      seq = audit.stats().last_seq
      pid = run_probe({ "getppid", "1" }, filter("kill_process"), false)
      local ev = seccomp_event(seq, pid, 15)
      assert.is_table(ev)
      assert.is_nil(ev.sandbox)
    end)
    audit.kernel_source { scope = "tracked" }
    assert(ok2, err)
  end)

  it("reports records the kernel could not deliver because the loop fell behind", function()
    local ok, why = kernel_ready()
    if not ok then pending(why) return end
    local before = audit.stats().kernel.overruns
    local seq = audit.stats().last_seq
    -- A socket buffer that holds a few records, and a loop that does not read while a process
    -- has 200 calls denied (and logged).
    audit.kernel_source { rcvbuf = 4096 }
    local ok2, err = pcall(function()
      local p = assert(claw.proc.spawn { PROBE, "getppid", "200", seccomp = filter({ errno = "EPERM" }, true),
                                         stdout = "null" })
      audit.track_pid(p:pid(), "sb-flood")
      os.execute(("t=0; while [ -e /proc/%d ] && ! grep -q '^%d (clawlua-probe) Z' /proc/%d/stat && "
        .. "[ $t -lt %d ]; do sleep 0.05; t=$((t+1)); done; sleep 0.5"):format(p:pid(), p:pid(), p:pid(),
        math.floor(600 * H.scale)))
      p:wait()
      audit.forget_pid(p:pid())
      p:close()
      assert.is_true(H.eventually(function()
        return #audit.events { after_seq = seq, kind = "audit.source.overrun" } > 0
      end, 10 * H.scale))
      assert.is_true(audit.stats().kernel.overruns > before)
      local got = #audit.events { after_seq = seq, kind = "seccomp.deny", sandbox = "sb-flood" }
      -- Not all of them: the buffer overflowed. (Possibly none: every listener gets every
      -- record, so a flood from another process on the machine, such as this spec's run in the
      -- other host, can fill a 4 KiB buffer before ours arrive.)
      assert.is_true(got < 200, ("%d of 200 denials seen"):format(got))
    end)
    audit.kernel_source { rcvbuf = 1 << 20 }
    assert(ok2, err)
  end)

  it("says once, as an event, that it is unavailable without CAP_AUDIT_READ", function()
    if not H.is_root() then pending("needs root to drop a capability") return end
    local r = assert(claw.proc.run { "setpriv", "--bounding-set=-audit_read", "--inh-caps=-all", H.bin, "-e", [[
      local claw = require "clawlua"
      local audit = claw.audit
      audit.track_pid(1, "x")        -- starts the source
      audit.track_pid(2, "y")        -- does not try again
      audit.kernel_source()          -- tries again, but does not say it twice
      for _, ev in ipairs(audit.events { kind = "audit.source" }) do
        print(ev.kind, ev.detail.source, ev.detail.error)
      end
      print(audit.stats().kernel.state)
      audit.emit("test.after", {})   -- and the runtime carries on
      print(#audit.events { kind = "test.after" })
    ]], timeout = 30 }).stdout
    assert.matches("^audit%.source%.unavailable\tkernel%.seccomp\t[^\n]*CAP_AUDIT_READ[^\n]*\nunavailable\n1\n$", r)
  end)

  it("says it is unavailable outside the initial network namespace", function()
    if not H.is_root() then pending("needs root to create a network namespace") return end
    local r = assert(claw.proc.run { "unshare", "-n", H.bin, "-e", [[
      local audit = require("clawlua").audit
      local st = audit.kernel_source()
      print(st.state, #audit.events { kind = "audit.source.unavailable" })
      print(st.error)
    ]], timeout = 30 }).stdout
    assert.matches("^unavailable\t1\nnot in the initial network namespace", r)
  end)
end)

describe("the seccomp record parser", function()
  local REC = 'audit(1795928580.265:2): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=29754 '
    .. 'comm="python3" exe="/usr/bin/python3.11" sig=31 arch=c000003e syscall=110 compat=0 '
    .. 'ip=0x7f638191f829 code=0x80000000'

  it("parses a kernel record", function()
    local kind, d, pid = audit._parse_kernel(REC)
    assert.are.equal("seccomp.kill", kind)
    assert.are.equal(29754, pid)
    assert.are.same({ audit_id = "1795928580.265:2", source = "kernel", auid = 4294967295, uid = 0,
      gid = 0, ses = 4294967295, comm = "python3", exe = "/usr/bin/python3.11", sig = 31,
      arch = "x86_64", syscall = "getppid", nr = 110, compat = 0, ip = "0x7f638191f829",
      code = "0x80000000", action = "kill_process" }, d)
  end)

  it("maps every action and decodes hex-encoded names", function()
    local codes = { ["0x7fc00000"] = "seccomp.notify", ["0x00050001"] = "seccomp.deny",
      ["0x00030000"] = "seccomp.trap", ["0x7ffc0000"] = "seccomp.log", ["0x0"] = "seccomp.kill",
      ["0x7ff00000"] = "seccomp.trace", ["0x12340000"] = "seccomp.unknown" }
    for code, kind in pairs(codes) do
      assert.are.equal(kind, (audit._parse_kernel(REC:gsub("code=0x80000000", "code=" .. code))))
    end
    local _, d = audit._parse_kernel(REC:gsub('comm="python3"', "comm=6D7920636F6D6D"))
    assert.are.equal("my comm", d.comm)
    _, d = audit._parse_kernel(REC:gsub("arch=c000003e", "arch=deadbeef"))
    assert.are.equal("0xdeadbeef", d.arch)
    assert.is_nil(d.syscall)
  end)

  it("rejects garbage with a reason and never reads past the record", function()
    local bad = {
      "", "audit(", "audit(123", "hello world", "audit(1.1:1): pid=1",
      "audit(1.1:1): syscall=1 code=0", "audit(1.1:1): pid=abc syscall=1 code=0",
      REC:sub(1, 60), "\0\0\0\0\0\0\0\0\0",
    }
    for _, s in ipairs(bad) do
      local kind, why = audit._parse_kernel(s)
      assert.is_nil(kind, s)
      assert.is_string(why)
    end
    -- Odd bytes, huge values, unterminated quotes: parsed or rejected, never a crash.
    local odd = {
      REC:gsub('comm="python3"', 'comm="unterminated'),
      REC:gsub('comm="python3"', "comm=ABC"),
      REC:gsub('comm="python3"', "comm=" .. ("41"):rep(100000)),
      REC .. " " .. ("k=v "):rep(10000),
      REC:gsub("pid=29754", "pid=99999999999999999999"),
      REC .. "\0garbage",
    }
    for _, s in ipairs(odd) do
      local kind, d = audit._parse_kernel(s)
      if kind then
        assert.is_table(d)
        assert.is_true(#(d.comm or "") <= 512)
      end
    end
  end)
end)
