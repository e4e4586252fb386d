-- labels: root
-- timeout: 300
-- clawlua.seccomp: filters applied for real to processes clawlua starts, profiles, exports and
-- the notify supervisor. Every filter here is shown to work by a syscall failing in a child.
local claw = require "clawlua"
local H = require "helper"
local seccomp = claw.seccomp

local PROBE = os.getenv("CLAWLUA_PROBE") or "build/bin/clawlua-probe"
local DOCKER = H.spec("seccomp/docker-default.json")
local FIRECRACKER = H.spec("firecracker/seccomp-x86_64.json")

-- Skips (with the reason printed) where seccomp(2) itself is missing: valgrind does not emulate
-- it, so under the valgrind stage only what needs no kernel filter runs.
local function no_seccomp()
  if seccomp.available then return false end
  pending("seccomp(2) with user notification is not available here (valgrind does not emulate it)")
  return true
end

local function probe(args, f, extra)
  local cmd = { PROBE, timeout = 30, seccomp = f }
  for _, a in ipairs(args) do cmd[#cmd + 1] = a end
  for k, v in pairs(extra or {}) do cmd[k] = v end
  return assert(claw.proc.run(cmd))
end

local function u64le(s, pos)
  local v = 0
  for i = 7, 0, -1 do v = (v << 8) | s:byte(pos + i) end
  return v
end

describe("seccomp filters applied to children", function()
  local fds, kids
  -- Kernel audit records are read from the audit stream (clawlua.audit's kernel source): the
  -- kernel log rate-limits them (10 per 5 s), so other work on the machine could hide ours.
  -- Started here, before fds are counted: its socket lives as long as the runtime.
  setup(function() claw.audit.kernel_source { scope = "all" } end)
  teardown(function() claw.audit.kernel_source { scope = "tracked" } end)
  before_each(function()
    H.settle() -- what earlier code dropped is collected first, so only the test is counted
    fds, kids = H.fds(), H.children()
  end)
  after_each(function()
    H.settle()
    assert.are.equal(fds, H.fds())
    assert.are.equal(kids, H.children())
  end)

  it("denies socket(AF_INET) with EPERM while AF_UNIX works", function()
    if no_seccomp() then return end
    local f = seccomp.filter { default = "allow", rules = {
      { syscall = "socket", action = { errno = "EPERM" }, args = { { 0, "==", 2 } } } } }
    assert.are.equal("errno 1\n", probe({ "socket", "inet" }, f).stdout)
    assert.are.equal("ok\n", probe({ "socket", "unix" }, f).stdout)
    -- and without the filter AF_INET is allowed: the filter is what denies it
    assert.are.equal("ok\n", probe({ "socket", "inet" }).stdout)
  end)

  it("ends a child calling ptrace under kill_process with SIGSYS", function()
    if no_seccomp() then return end
    local f = seccomp.filter { default = "allow", rules = { { syscall = "ptrace", action = "kill_process" } } }
    local r = probe({ "ptrace" }, f)
    assert.are.equal("SIGSYS", r.signal_name)
    assert.are.equal("", r.stdout)
    assert.are.equal(0, probe({ "pid" }, f).code) -- other syscalls unaffected
  end)

  it("supports every comparison and the masked one", function()
    if no_seccomp() then return end
    local cases = {
      { { 0, "!=", 1 }, "inet", "errno 13" }, { { 0, "!=", 2 }, "inet", "ok" },
      { { 0, "<", 2 }, "unix", "errno 13" }, { { 0, "<=", 1 }, "inet", "ok" },
      { { 0, ">", 1 }, "inet", "errno 13" }, { { 0, ">=", 3 }, "inet", "ok" },
      { { index = 0, op = "&==", mask = 0x2, value = 0x2 }, "inet", "errno 13" },
      { { index = 0, op = "&==", mask = 0x2, value = 0x2 }, "unix", "ok" },
    }
    for _, c in ipairs(cases) do
      local f = seccomp.filter { default = "allow", rules = {
        { syscall = "socket", action = { errno = 13 }, args = { c[1] } } } }
      assert.are.equal(c[3] .. "\n", probe({ "socket", c[2] }, f).stdout)
    end
  end)

  it("kill_thread, trap and log act as the kernel says", function()
    if no_seccomp() then return end
    local f = seccomp.filter { default = "allow", rules = { { syscall = "mkdir", action = "trap" } } }
    assert.are.equal("SIGSYS", probe({ "mkdir", "/nonexistent/x" }, f).signal_name)
    f = seccomp.filter { default = "allow", rules = { { syscall = "mkdir", action = "kill_thread" } } }
    assert.are.equal("SIGSYS", probe({ "mkdir", "/nonexistent/x" }, f).signal_name)
    f = seccomp.filter { default = "allow", rules = { { syscall = "mkdir", action = "log" } } }
    assert.are.equal("errno 2\n", probe({ "mkdir", "/nonexistent/x" }, f).stdout) -- ran
  end)

  it("makes errno denials visible in the kernel audit stream with log = true", function()
    if no_seccomp() then return end
    local function logged(log)
      local f = seccomp.filter { default = "allow", log = log, rules = {
        { syscall = "mkdir", action = { errno = 13 } } } }
      local seq = claw.audit.stats().last_seq
      local r = probe({ "mkdir", "/nonexistent/x" }, f)
      assert.are.equal("errno 13\n", r.stdout)
      local found = H.eventually(function()
        if claw.audit.stats().kernel.state == "running" then
          return claw.audit.events { after_seq = seq, kind = "seccomp", pid = r.pid }[1]
        end
        local out = H.sh("dmesg | grep 'type=1326' | grep ' pid=" .. r.pid .. " ' || true")
        return out ~= "" and out or nil
      end, log and 3 or 0.3)
      return found
    end
    local found = logged(true)
    assert.truthy(found, "no kernel audit record (type=1326) for the denied mkdir")
    if type(found) == "table" then
      assert.are.equal(83, found.detail.nr)
      assert.are.equal("seccomp.deny", found.kind)
    else
      assert.matches("syscall=83", found)
    end
    assert.is_nil(logged(false))
  end)

  it("leaves nothing behind when the spawn itself fails", function()
    if no_seccomp() then return end
    local f = seccomp.filter { default = "allow", rules = { { syscall = "execve", action = { errno = 13 } } } }
    local p, err, code = claw.proc.spawn { PROBE, "pid", seccomp = f }
    assert.is_nil(p)
    assert.matches("exec: Permission denied", err)
    assert.are.equal("EACCES", code)
  end)
end)

describe("seccomp filter construction", function()
  it("rejects bad input with errors that name the field", function()
    local function err_of(spec)
      local ok, e = pcall(seccomp.filter, spec)
      assert.is_false(ok)
      return e
    end
    assert.matches("bad field 'rules%[1%]%.syscall' %(unknown syscall 'no_such_call'",
      err_of { rules = { { syscall = "no_such_call" } } })
    assert.matches("bad field 'rules%[2%]%.action' %(unknown action 'permit'",
      err_of { rules = { { syscall = "read" }, { syscall = "write", action = "permit" } } })
    assert.matches("bad field 'rules%[1%]%.args%[1%]' %(argument index 0%.%.5 expected, got 6%)",
      err_of { rules = { { syscall = "read", args = { { 6, "==", 1 } } } } })
    assert.matches("unknown op '=~'", err_of { rules = { { syscall = "read", args = { { 0, "=~", 1 } } } } })
    assert.matches("bad field 'default'", err_of { default = "maybe" })
    assert.matches("bad field 'arches%[1%]' %(unknown architecture 'vax'%)", err_of { arches = { "vax" } })
    assert.matches("bad field 'optimize'", err_of { optimize = 3 })
    assert.matches("bad field 'handler' %(a filter with notify rules needs a handler%)",
      err_of { rules = { { syscall = "read", action = "notify" } } })
    assert.matches("bad field 'frobnicate' %(unknown field%)", err_of { frobnicate = 1 })
    assert.matches("errno 0%.%.4095", err_of { rules = { { syscall = "read", action = 5000 } } })
    -- a closed filter and a non-filter are refused by spawn, before anything starts
    local f = seccomp.filter { default = "allow" }
    f:close()
    local kids = H.children()
    assert.matches("closed seccomp filter", select(2, pcall(claw.proc.spawn, { PROBE, "pid", seccomp = f })))
    assert.matches("seccomp filter expected", select(2, pcall(claw.proc.spawn, { PROBE, "pid", seccomp = {} })))
    assert.are.equal(kids, H.children())
    assert.has_error(function() f:bpf() end, "attempt to use a closed seccomp filter")
  end)

  it("refuses a filter longer than the kernel takes", function()
    local rules = {}
    for i = 1, 4200 do rules[i] = { syscall = "read", action = { errno = 1 }, args = { { 0, "==", i } } } end
    local ok, e = pcall(seccomp.filter, { default = "allow", rules = rules })
    assert.is_false(ok)
    assert.matches("compiles to %d+ BPF instructions; the kernel takes at most 4096", e)
  end)

  it("handles native and x86/x32 architectures explicitly", function()
    if no_seccomp() then return end
    local f = seccomp.filter { default = "allow", arches = { "native", "x86", "x32" },
                               rules = { { syscall = "chown32", action = { errno = 1 } } } }
    assert.same({ "x86_64", "x86", "x32" }, f:info().arches)
    assert.matches("if %(%$arch == 1073741827%)", f:pfc()) -- the x86 section
    local ok, e = pcall(seccomp.filter, { rules = { { syscall = "chown32" } } })
    assert.is_false(ok) -- chown32 exists on x86 only
    assert.matches("unknown syscall 'chown32'", e)
  end)

  it("exports raw BPF, PFC text, and builds binary trees at optimize = 2", function()
    if no_seccomp() then return end
    local names = {}
    for nr = 0, 330 do
      local n = seccomp.resolve(nr)
      if n and n ~= "getppid" then names[#names + 1] = n end
    end
    local spec = { default = { errno = 1 }, rules = { { syscalls = names, action = "allow" } } }
    local f1 = seccomp.filter(spec)
    spec.optimize = 2
    local f2 = seccomp.filter(spec)
    assert.are.equal(#f1:bpf(), 8 * f1:info().instructions)
    assert.are_not.equal(f1:bpf(), f2:bpf())
    assert.matches("filter for syscall \"read\"", f1:pfc())
    assert.matches("# filter for syscall \"read\"", f2:pfc())
    -- both behave the same: getpid allowed, getppid denied (it is not in the list)
    for _, f in ipairs { f1, f2 } do
      assert.matches("^%d", probe({ "getpid", "10" }, f).stdout)
      assert.are.equal(0, probe({ "pid" }, f).code)
    end
  end)

  it("writes the filter file Firecracker's --seccomp-filter takes", function()
    if no_seccomp() then return end
    local fc = assert(seccomp.load_firecracker(FIRECRACKER))
    local bytes = seccomp.firecracker_file(fc)
    assert.are.equal(3, u64le(bytes, 1))
    local pos, seen = 9, {}
    for _ = 1, 3 do
      local nl = u64le(bytes, pos)
      local name = bytes:sub(pos + 8, pos + 7 + nl)
      pos = pos + 8 + nl
      local n = u64le(bytes, pos)
      pos = pos + 8
      assert.are.equal(fc[name]:bpf(), bytes:sub(pos, pos + 8 * n - 1))
      pos = pos + 8 * n
      seen[#seen + 1] = name
    end
    assert.are.equal(#bytes + 1, pos)
    assert.same({ "api", "vcpu", "vmm" }, seen) -- sorted, deterministic
    assert.is_true(#bytes <= 100000) -- Firecracker's deserialisation limit
  end)
end)

describe("seccomp profiles", function()
  it("loads Docker's default profile and behaves as under Docker", function()
    if no_seccomp() then return end
    local f = assert(seccomp.load_oci(DOCKER))
    local info = f:info()
    assert.same({ "x86_64", "x86", "x32" }, info.arches) -- archMap for amd64
    assert.are.equal("errno(1)", info.default) -- defaultErrnoRet
    -- names not on this architecture are reported with where they came from, not dropped
    local unknown = table.concat(info.unknown, "\n")
    assert.matches("riscv_hwprobe %(%$%.syscalls%[0%]%)", unknown)
    -- without CAP_SYS_ADMIN: unshare and mount are denied (EPERM); ordinary programs run
    assert.are.equal("errno 1\n", probe({ "unshare" }, f).stdout)
    assert.are.equal("errno 1\n", probe({ "mount" }, f).stdout)
    assert.are.equal("ok\n", probe({ "socket", "inet" }, f).stdout)
    local r = assert(claw.proc.run { "sh", "-c",
      "echo hello world | tr a-z A-Z | sort | wc -c; ls / >/dev/null && echo ls-ok", seccomp = f, timeout = 30 })
    assert.are.equal(0, r.code)
    assert.are.equal("12\nls-ok\n", r.stdout)
    -- with CAP_SYS_ADMIN in the capability set, Docker's includes allow them
    local caps = { "CAP_SYS_ADMIN" }
    for _, c in ipairs(require("clawlua.seccomp_profiles").docker_default_caps) do caps[#caps + 1] = c end
    local admin = assert(seccomp.load_oci(DOCKER, { caps = caps }))
    assert.are.equal("ok\n", probe({ "unshare" }, admin).stdout)
    -- clone3 is ENOSYS without CAP_SYS_ADMIN (errnoRet 38), so libcs fall back to clone
    assert.matches("errno%(38%)", f:pfc():match("clone3.-action ERRNO%(38%)") and "errno(38)" or "")
    -- minKernel: ptrace needs 4.8
    local old = assert(seccomp.load_oci(DOCKER, { kernel = "4.4" }))
    assert.are.equal("errno 1\n", probe({ "ptrace" }, old).stdout)
  end)

  it("names the JSON path of malformed profiles", function()
    if no_seccomp() then return end
    local function load(doc) return select(2, seccomp.load_oci(doc)) end
    assert.matches("%$%.defaultAction: string expected",
      load '{"syscalls": []}')
    local head = '{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"'
    assert.matches("%$%.syscalls%[0%]%.args%[0%]%.index: 0%.%.5 expected, got 9",
      load(head .. ',"args":[{"index":9,"value":1,"op":"SCMP_CMP_EQ"}]}]}'))
    assert.matches("%$%.syscalls%[1%]%.action: unknown action 'SCMP_ACT_MAYBE'",
      load(head .. '},{"names":["write"],"action":"SCMP_ACT_MAYBE"}]}'))
    assert.matches("%$%.syscalls%[0%]%.args%[0%]%.op: unknown operator",
      load(head .. ',"args":[{"index":0,"value":1,"op":"SCMP_CMP_LIKE"}]}]}'))
    -- two actions for the same syscall and argument test, which libseccomp refuses (EEXIST): the
    -- second entry is named, the syscall and why (found by fuzz_lua_seccomp_profiles), on one
    -- architecture and on two (the native one's rules and the others' are built apart)
    for _, arches in ipairs { '', ',"architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"]' } do
      local socket_af_inet = '{"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":%d,'
        .. '"args":[{"index":0,"value":2,"op":"SCMP_CMP_EQ"}]}'
      local conflict = '{"defaultAction":"SCMP_ACT_ERRNO"' .. arches .. ',"syscalls":['
        .. '{"names":["read"],"action":"SCMP_ACT_ALLOW"},'
        .. socket_af_inet:format(97) .. ',' .. socket_af_inet:format(98) .. ']}'
      assert.matches("^seccomp profile profile: %$%.syscalls%[2%]: %(socket%): libseccomp rejected it: "
        .. "File exists %(an earlier rule has the same syscall and argument tests with another action%)$",
        load(conflict))
    end
    -- two rules for dup3 that libseccomp cannot merge (a test other than == before a later
    -- argument's; seccomp_merge_spec): both entries are named by their JSON paths (found by
    -- fuzz_lua_seccomp_profiles: the profile's filter never finished building)
    assert.matches("^seccomp profile profile: %$%.syscalls%[0%]: %(dup3%): its test 'a0 != 7' comes before "
      .. "a later argument's, and libseccomp merges another rule for the syscall %(%$%.syscalls%[1%]%) into",
      load('{"defaultAction":"SCMP_ACT_ERRNO","syscalls":['
        .. '{"names":["dup3"],"action":"SCMP_ACT_ALLOW","args":[{"index":2,"value":8,"op":"SCMP_CMP_EQ"},'
        .. '{"index":0,"value":7,"op":"SCMP_CMP_NE"}]},'
        .. '{"names":["dup3"],"action":"SCMP_ACT_ALLOW","args":[{"index":5,"value":8,"op":"SCMP_CMP_EQ"},'
        .. '{"index":0,"value":7,"op":"SCMP_CMP_NE"}]}]}'))
    -- an errno out of range, for the default and for a rule (found by fuzz_lua_seccomp_profiles)
    assert.matches("%$%.defaultErrnoRet: errno 0%.%.4095 expected, got 5000",
      load '{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":5000}')
    assert.matches("%$%.syscalls%[1%]%.errnoRet: errno 0%.%.4095 expected, got %-1",
      load(head .. '},{"names":["write"],"action":"SCMP_ACT_ERRNO","errnoRet":-1}]}'))
    -- SCMP_ACT_NOTIFY without the handler option (found by fuzz_lua_seccomp_profiles)
    assert.matches("^seccomp profile profile: %$%.syscalls%[1%]%.action: SCMP_ACT_NOTIFY needs a handler",
      load(head .. '},{"names":["write"],"action":"SCMP_ACT_NOTIFY"}]}'))
    assert.matches("^seccomp profile profile: %$%.defaultAction: SCMP_ACT_NOTIFY needs a handler",
      load '{"defaultAction":"SCMP_ACT_NOTIFY"}')
    -- the same from seccomp.filter: the rules[] entry (the second holds two syscalls)
    local a0 = { { index = 0, op = "==", value = 2 } }
    local ok, err = pcall(seccomp.filter, { default = "allow", rules = {
      { syscall = "socket", action = { errno = 1 }, args = a0 },
      { syscalls = { "getppid", "socket" }, action = { errno = 2 }, args = a0 } } })
    assert.is_false(ok)
    assert.matches("rules%[2%] %(socket%): libseccomp rejected it: File exists", err)
    -- an unknown architecture names where the profile gave it (found by fuzz_lua_seccomp_profiles)
    assert.matches("^seccomp profile profile: %$%.architectures%[1%]: unknown architecture 'SCMP_ARCH_NOPE'",
      load '{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_NOPE"]}')
    assert.matches("^seccomp profile profile: %$%.architectures: 1 to 4 architectures expected",
      load('{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86","SCMP_ARCH_X32",'
        .. '"SCMP_ARCH_ARM","SCMP_ARCH_AARCH64","SCMP_ARCH_PPC64LE"]}'))
    assert.matches("^seccomp profile profile: %$%.archMap%[0%]%.subArchitectures%[0%]: unknown architecture",
      load('{"defaultAction":"SCMP_ACT_ERRNO","archMap":[{"architecture":"SCMP_ARCH_'
        .. seccomp.native_arch:upper() .. '","subArchitectures":["SCMP_ARCH_NOPE"]}]}'))
    -- one libseccomp cannot combine with the native one (endianness) is named too
    assert.matches("^seccomp profile profile: %$%.archMap%[0%]%.subArchitectures%[0%]: libseccomp cannot combine",
      load('{"defaultAction":"SCMP_ACT_ERRNO","archMap":[{"architecture":"SCMP_ARCH_X86_64",'
        .. '"subArchitectures":["SCMP_ARCH_MIPS"]}]}'))
    assert.matches("json: .* at byte %d+", load '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [')
    assert.matches("No such file", select(2, seccomp.load_oci("/nonexistent/profile.json")))
    local _, e = seccomp.load_firecracker('{"vmm":{"default_action":"trap","filter_action":"allow",'
      .. '"filter":[{"syscall":"read","args":[{"index":1,"type":"dword","op":"like","val":1}]}]}}')
    assert.matches("%$%.vmm%.filter%[0%]%.args%[0%]%.op: unknown operator 'like'", e)
  end)

  it("loads Firecracker's seccompiler JSON per thread category", function()
    if no_seccomp() then return end
    local fc = assert(seccomp.load_firecracker(FIRECRACKER))
    for _, t in ipairs { "vmm", "api", "vcpu" } do
      assert.truthy(fc[t], t)
      assert.are.equal("trap", fc[t]:info().default)
      assert.same({}, fc[t]:info().unknown)
    end
    -- the api thread's socket rule allows AF_UNIX stream sockets only: a probe under it dies of
    -- SIGSYS (trap) somewhere in its start-up, which shows the filter is in force
    assert.are.equal("SIGSYS", probe({ "socket", "inet" }, fc.api).signal_name)
  end)
end)

describe("seccomp notify supervisor", function()
  local fds, kids
  before_each(function()
    H.settle() -- what earlier code dropped is collected first, so only the test is counted
    fds, kids = H.fds(), H.children()
  end)
  after_each(function()
    H.settle()
    assert.are.equal(fds, H.fds())
    assert.are.equal(kids, H.children())
  end)

  it("delivers syscalls with paths and addresses; allow and deny are both observable", function()
    if no_seccomp() then return end
    local dir = H.tmpdir()
    local seen = {}
    local f = seccomp.filter { default = "allow", rules = {
      { syscall = "mkdir", action = "notify" }, { syscall = "connect", action = "notify" } },
      handler = function(ev)
        seen[#seen + 1] = ev
        if ev.syscall == "connect" then return 111 end -- ECONNREFUSED
        if ev.path:match("denied") then return "deny" end
        return "allow"
      end }
    local r1 = probe({ "mkdir", dir .. "/allowed" }, f)
    local r2 = probe({ "mkdir", dir .. "/denied" }, f)
    local r3 = probe({ "connect", "127.0.0.1", "9" }, f)
    assert.are.equal("ok\n", r1.stdout)
    assert.are.equal("errno 1\n", r2.stdout)
    assert.are.equal("errno 111\n", r3.stdout)
    H.sh("test -d " .. dir .. "/allowed && test ! -e " .. dir .. "/denied")
    assert.are.equal(3, #seen)
    assert.are.equal("mkdir", seen[1].syscall)
    assert.are.equal(dir .. "/allowed", seen[1].path)
    assert.are.equal(r1.pid, seen[1].pid)
    assert.are.equal("x86_64", seen[1].arch)
    assert.same({ family = "inet", address = "127.0.0.1", port = 9 }, seen[3].sockaddr)
    local denies = claw.audit.events { kind = "seccomp.deny", pid = r2.pid }
    assert.are.equal(1, #denies)
    assert.are.equal("mkdir", denies[1].detail.syscall)
    assert.are.equal(1, #claw.audit.events { kind = "seccomp.notify", pid = r1.pid })
    H.rm_rf(dir)
  end)

  it("denies when the handler is too slow, fails, or returns nonsense", function()
    if no_seccomp() then return end
    local f = seccomp.filter { default = "allow", notify_timeout = 0.2 * H.scale,
      rules = { { syscall = "mkdir", action = "notify" } },
      handler = function(ev)
        if ev.path:match("slow") then claw.sleep(5) return "allow" end
        if ev.path:match("boom") then error("handler exploded") end
        return { "not an answer" }
      end }
    local t0 = claw.now()
    assert.are.equal("errno 1\n", probe({ "mkdir", "/tmp/clawlua-test-slow" }, f).stdout)
    assert.is_true(claw.now() - t0 < 3 * H.scale, "the timeout did not deny in time")
    local r = probe({ "mkdir", "/tmp/clawlua-test-boom" }, f)
    assert.are.equal("errno 1\n", r.stdout)
    local ev = claw.audit.events { kind = "seccomp.deny", pid = r.pid }
    assert.matches("^handler error: .*handler exploded", ev[1].detail.reason)
    assert.are.equal("errno 1\n", probe({ "mkdir", "/tmp/clawlua-test-odd" }, f).stdout)
  end)

  it("runs waiting handlers side by side, and goes on after one was cancelled by its timeout", function()
    if no_seccomp() then return end
    local dir = H.tmpdir()
    local f = seccomp.filter { default = "allow", max_pending = 4, notify_timeout = 2 * H.scale,
      rules = { { syscall = "mkdir", action = "notify" } },
      handler = function(ev)
        if ev.path:match("slow$") then claw.sleep(10 * H.scale) end
        if ev.path:match("nap") then claw.sleep(0.6 * H.scale) end
        return "allow"
      end }
    -- two handlers that wait at once: side by side they take one nap, not two
    local line = ("%s mkdir %s/nap1 & %s mkdir %s/nap2 & wait"):format(PROBE, dir, PROBE, dir)
    local t0 = claw.now()
    local r = assert(claw.proc.run { "sh", "-c", line, seccomp = f, timeout = 30 })
    local took = claw.now() - t0
    assert.are.equal("ok\nok\n", r.stdout)
    assert.is_true(took < 1.1 * H.scale, ("two waiting handlers took %.2f s"):format(took))
    -- a handler cancelled by the timeout, then more calls in the same process: answered
    line = ("%s mkdir %s/slow; %s mkdir %s/after"):format(PROBE, dir, PROBE, dir)
    local p = assert(claw.proc.spawn { "sh", "-c", line, seccomp = f, stdout = "pipe" })
    local out = p.stdout:read_all()
    p:wait()
    local st = p.seccomp:stats()
    p:close()
    assert.are.equal("errno 1\nok\n", out)
    assert.are.equal(1, st.timeouts)
    assert.are.equal(1, st.allowed)
    H.rm_rf(dir)
  end)

  it("bounds the notifications in flight (max_pending) and denies the excess", function()
    if no_seccomp() then return end
    local dir = H.tmpdir()
    local f = seccomp.filter { default = "allow", max_pending = 1, notify_timeout = 5,
      rules = { { syscall = "mkdir", action = "notify" } },
      handler = function() claw.sleep(1) return "allow" end }
    local line = ("%s mkdir %s/a & %s mkdir %s/b & wait"):format(PROBE, dir, PROBE, dir)
    local p = assert(claw.proc.spawn { "sh", "-c", line, seccomp = f, stdout = "pipe" })
    local out = p.stdout:read_all()
    p:wait()
    local st = p.seccomp:stats()
    p:close()
    assert.are.equal(1, st.overloaded)
    assert.are.equal(1, st.allowed)
    local oks = select(2, out:gsub("ok\n", ""))
    assert.are.equal(1, oks)
    assert.matches("errno 1\n", out)
    H.rm_rf(dir)
  end)
end)
