-- labels: root
-- timeout: 600
-- clawlua.vm without booting a guest: option checks, and the host side of the agent channel
-- against tests/integration/fake-qemu.py, a fake VMM that plays a broken or hostile guest
-- agent (or runs the real agent on the host, for the protocol itself).
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"
local vm = claw.vm

local function kernel_file(dir)
  local p = dir .. "/vmlinux"
  H.write_file(p, "not a kernel: the fake VMM never reads it")
  return p
end

describe("vm.create", function()
  local dir, kernel, before
  before_each(function()
    before = T.snapshot()
    dir = H.tmpdir()
    kernel = kernel_file(dir)
  end)
  after_each(function()
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  it("raises on misuse, naming the field", function()
    assert.has_error(function() vm.create {} end, "vm.create: bad field 'kernel' (a kernel image path is required)")
    assert.has_error(function() vm.create { kernel = kernel, bogus = 1 } end,
      "vm.create: bad field 'bogus' (unknown field)")
    assert.has_error(function() vm.create { kernel = kernel, vcpus = 0 } end,
      "vm.create: bad field 'vcpus' (1 to 32 expected, got 0)")
    assert.has_error(function() vm.create { kernel = kernel, vcpus = 1000 } end,
      "vm.create: bad field 'vcpus' (1 to 32 expected, got 1000)")
    assert.error_matches(function() vm.create { kernel = kernel, mem_mib = 4 } end,
      "vm.create: bad field 'mem_mib' %(32 to %d+ %(the host's memory%) expected, got 4%)")
    assert.error_matches(function() vm.create { kernel = kernel, mem_mib = 1 << 40 } end,
      "vm.create: bad field 'mem_mib'")
    assert.has_error(function() vm.create { kernel = kernel, vcpus = "2" } end,
      "vm.create: bad field 'vcpus' (integer expected, got string)")
    assert.has_error(function() vm.create { kernel = kernel, backend = "xen" } end,
      "vm.create: bad field 'backend' (\"auto\", \"qemu\" or \"firecracker\" expected, got \"xen\")")
    assert.has_error(function() vm.create { kernel = kernel, id = "no spaces" } end,
      "vm.create: bad field 'id' (1 to 40 characters of [A-Za-z0-9_.-] expected, got \"no spaces\")")
    assert.has_error(function() vm.create { kernel = kernel, vmm = "/bin/true" } end,
      "vm.create: bad field 'vmm' (needs backend = \"qemu\" or \"firecracker\")")
    assert.has_error(function() vm.create { kernel = kernel, net = { mac = "01:00:00:00:00:01" } } end,
      "vm.create: bad field 'net.mac' (\"01:00:00:00:00:01\" is not a unicast MAC address)")
    assert.has_error(function() vm.create { kernel = kernel, net = { tap = "this-name-is-too-long" } } end,
      "vm.create: bad field 'net.tap' (\"this-name-is-too-long\" is not a valid interface name)")
    assert.has_error(function() vm.create { kernel = kernel, guest = { channel = "pigeon" } } end,
      "vm.create: bad field 'guest.channel' (\"auto\", \"virtio-serial\", \"vsock\" or \"none\" expected, "
        .. "got \"pigeon\")")
    assert.has_error(function() vm.create { kernel = kernel, accel = "hvf" } end,
      "vm.create: bad field 'accel' (\"auto\", \"kvm\", \"tcg\" or \"probe\" expected, got \"hvf\")")
    assert.has_error(function() vm.create { kernel = kernel, guest = { ready_timeout = -1 } } end,
      "vm.create: bad field 'guest.ready_timeout' (seconds, more than 0 and at most 3600 expected)")
  end)

  it("fails clearly on missing, empty or unusable kernel and initrd files", function()
    local v, err = vm.create { kernel = dir .. "/nope" }
    assert.is_nil(v)
    assert.are.equal("vm.create: kernel " .. dir .. "/nope: No such file or directory", err)
    v, err = vm.create { kernel = kernel, initrd = dir .. "/missing.img" }
    assert.is_nil(v)
    assert.are.equal("vm.create: initrd " .. dir .. "/missing.img: No such file or directory", err)
    H.write_file(dir .. "/empty", "")
    v, err = vm.create { kernel = dir .. "/empty" }
    assert.is_nil(v)
    assert.are.equal("vm.create: kernel " .. dir .. "/empty: empty file", err)
    v, err = vm.create { kernel = dir }
    assert.is_nil(v)
    assert.are.equal("vm.create: kernel " .. dir .. ": not a regular file", err)
    v, err = vm.create { kernel = kernel, rootfs = dir .. "/disk.img" }
    assert.is_nil(v)
    assert.matches("rootfs .*disk%.img: No such file or directory", err)
  end)

  it("refuses a duplicate id while the first VM lives, and accepts it after close", function()
    local a = T.create { backend = "qemu", kernel = kernel, id = "dup-" .. claw.proc.diagnostics().fds }
    local b, err = vm.create { backend = "qemu", kernel = kernel, id = a.id }
    assert.is_nil(b)
    assert.are.equal('vm.create: id "' .. a.id .. '" is already in use by another vm', err)
    a:close()
    b = T.create { backend = "qemu", kernel = kernel, id = a.id }
    b:close()
  end)

  it("refuses a tap name that exists, and makes and removes its own tap", function()
    if not T.is_root() then return pending("creating interfaces needs root") end
    local name = ("clwt%d"):format(H.sh("echo $PPID"):match("%d+") % 100000)
    H.sh("ip tuntap add dev " .. name .. " mode tap")
    local ok, e = pcall(function()
      local v, err = vm.create { backend = "qemu", kernel = kernel, net = { tap = name } }
      assert.is_nil(v)
      assert.are.equal('vm.create: net.tap: an interface named "' .. name .. '" already exists', err)
    end)
    H.sh("ip tuntap del dev " .. name .. " mode tap")
    assert(ok, e)
    local v = T.create { backend = "qemu", kernel = kernel, net = true }
    assert.matches("^clw%x+$", v.tap)
    assert.is_truthy(io.open("/sys/class/net/" .. v.tap .. "/tun_flags"), "the tap exists")
    assert.matches("^02:c1:a7:", v:info().mac)
    local tap = v.tap
    v:close()
    assert.is_nil(io.open("/sys/class/net/" .. tap .. "/tun_flags"), "the tap is gone")
  end)

  it("says which backend it picks and why", function()
    local b = vm.backend()
    assert.is_string(b.why)
    if b.backend == "qemu" then
      -- the tests' cache starts empty: with a usable /dev/kvm nothing is known yet
      if b.accel == "kvm-probe" then
        assert.matches("^qemu: KVM to be proved by a probe boot %(", b.why)
      else
        assert.matches("^qemu with %u+", b.why)
        assert.is_truthy(b.accel == "tcg" or b.accel == "kvm")
      end
    end
    local v = T.create { backend = "qemu", kernel = kernel, accel = "tcg" }
    assert.are.equal("qemu with TCG (asked for; TCG asked for)", v:info().why)
    assert.are.equal("tcg", v:info().accel)
    assert.are.equal("created", v:state())
    v:close()
    assert.are.equal("closed", v:state())
    assert.has_error(function() v:start() end, "attempt to use a closed vm")
  end)
end)

-- The verdicts the cache holds for one VMM path, oldest first (the tests' cache is their own).
local function verdicts_of(vmm_path)
  local cache = assert(os.getenv("XDG_CACHE_HOME"), "the tests run with a cache of their own")
    .. "/clawlua/kvm-verdicts"
  local out = {}
  local f = io.open(cache)
  if not f then return out end
  for line in f:lines() do
    if line:find(vmm_path, 1, true) then out[#out + 1] = line:match(" (%a+)$") end
  end
  f:close()
  return out
end

describe("vm with a fake VMM", function()
  local dir, kernel, before
  before_each(function()
    before = T.snapshot()
    dir = H.tmpdir()
    kernel = kernel_file(dir)
  end)
  after_each(function()
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  -- The fake VMMs run unjailed (jail = false) unless a test says otherwise: the jail is tested
  -- on its own below, and with real QEMU in vm_spec.lua. They run under TCG unless a test is
  -- about the choice of accelerator.
  local function fake(mode, extra)
    local opts = { backend = "qemu", vmm = T.fake(mode), kernel = kernel, guest = { ready_timeout = 3 * H.scale },
                   jail = false, accel = "tcg" }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return T.create(opts)
  end

  it("reports a VMM that exits at once, quoting its log", function()
    local v = fake("exit")
    local ok, err = v:start()
    assert.is_nil(ok)
    assert.matches("^vm " .. v.id:gsub("%-", "%%-") .. ": start: the VMM exited during start; VMM log %(.-%) ends:\n",
      err)
    assert.matches("cannot initialise the machine %(mode exit%)", err)
    assert.are.equal("failed", v:state())
    assert.matches("cannot initialise the machine", v:log())
    local kinds = {}
    for ev in claw.audit.query { sandbox = v.id } do kinds[#kinds + 1] = ev.kind end
    assert.are.same({ "vm.create", "vm.spawn", "vm.start", "vm.exit", "vm.error" }, kinds)
    v:close()
  end)

  it("gives up on a guest that never becomes ready, and kills its VMM", function()
    local v = fake("silent")
    local t0 = claw.now()
    local ok, err = v:start()
    assert.is_nil(ok)
    assert.matches("start: the guest agent was not ready after %d+ s; VMM log", err)
    assert.is_true(claw.now() - t0 < 10 * H.scale)
    assert(H.eventually(function() return v:state() == "failed" and v:pid() == nil end))
    v:close()
  end)

  for _, case in ipairs {
    { "oversized", "frame of 104857600 bytes, over the limit of 262144" },
    { "badmagic", "bad frame header %(magic 0x6874%)" },
    { "unknown-id", "frame for request 4242, which was never made" },
  } do
    it("refuses an agent that sends " .. case[1] .. " frames while starting", function()
      local v = fake(case[1])
      local ok, err = v:start()
      assert.is_nil(ok)
      assert.matches("start: protocol violation by the guest agent: " .. case[2], err)
      v:close()
    end)
  end

  for _, case in ipairs {
    { "bad-exit", "malformed EXIT frame" },
    { "early-out", "output for request 1 before it started" },
  } do
    it("closes the channel on " .. case[1] .. " frames and says why", function()
      local v = fake(case[1])
      assert(v:start())
      local r, err = v:exec { "true" }
      assert.is_nil(r)
      assert.matches("the guest agent channel closed: protocol violation by the guest agent: " .. case[2], err)
      r, err = v:exec { "true" }
      assert.is_nil(r)
      assert.matches("exec: the guest agent channel is closed: protocol violation", err)
      local found
      for ev in claw.audit.query { sandbox = v.id, kind = "vm.agent_error" } do found = ev end
      assert.matches(case[2]:gsub("%%", ""):sub(1, 20), found.detail.error, 1, true)
      v:close()
    end)
  end

  it("proves KVM with a probe boot, and boots again under TCG when the probe fails", function()
    -- the verdict cache is keyed by the VMM's path: a copy of the fake of our own keeps a spec
    -- running in parallel (host and stock) from touching our entry
    local fake_copy = dir .. "/fake-qemu.py"
    H.sh(("cp '%s' '%s'"):format(T.fake_qemu, fake_copy))
    local v = fake("nokvm", { accel = "probe", vmm = { fake_copy, "--mode", "nokvm", "--agent", T.agent } })
    assert.are.equal("kvm-probe", v:info().accel)
    assert(v:start())
    local info = v:info()
    assert.are.equal("tcg", info.accel)
    assert.matches("a boot under it failed", info.why)
    local spawns = {}
    for ev in claw.audit.query { sandbox = v.id, kind = "vm.spawn" } do
      spawns[#spawns + 1] = table.concat(ev.detail.argv, " ")
    end
    assert.are.equal(2, #spawns)
    assert.matches("%-accel kvm ", spawns[1])
    assert.matches("%-accel tcg ", spawns[2])
    assert.are.equal("ok\n", assert(v:exec { "echo", "ok" }).stdout)
    v:close()
    assert.are.same({ "fails" }, verdicts_of(fake_copy))
  end)

  -- What a first run on a fresh machine does: no cache at all, "auto" everywhere. A child
  -- clawlua with an empty HOME starts a fake whose guest, under KVM, closes its end of the
  -- channel while the VMM lives on (how a stock kernel looks on this host's nested /dev/kvm).
  it("starts on the first run with an empty cache, falling back to TCG in the same start", function()
    local home = dir .. "/home"
    H.sh("mkdir -p '" .. home .. "'")
    local fake_copy = dir .. "/fake-qemu.py"
    H.sh(("cp '%s' '%s'"):format(T.fake_qemu, fake_copy))
    local script = dir .. "/first.lua"
    H.write_file(script, ([[
      local claw = require "clawlua"
      local v = assert(claw.vm.create { backend = "qemu", kernel = %q, jail = false,
        vmm = { %q, "--mode", "nokvm-eof", "--agent", %q }, guest = { ready_timeout = %d } })
      print("before", v:info().accel)
      assert(v:start())
      print("after", v:info().accel, v:info().why)
      print("exec", assert(v:exec { "echo", "ok" }).stdout)
      local n = 0
      for _ in claw.audit.query { sandbox = v.id, kind = "vm.spawn" } do n = n + 1 end
      print("spawns", n)
      v:close()
    ]]):format(kernel, fake_copy, T.agent, 3 * H.scale))
    local env = { HOME = home, PATH = os.getenv("PATH"), XDG_CACHE_HOME = "" }
    local r = assert(claw.proc.run { H.bin, script, env = env, timeout = 60 * H.scale })
    assert.are.equal(0, r.code, r.stderr)
    -- a fake of our own has no verdict yet: "kvm-probe" iff this host has a usable /dev/kvm
    if r.stdout:match("^before\tkvm%-probe\n") then
      assert.matches("before\tkvm%-probe\n", r.stdout)
      assert.matches("after\ttcg\tqemu with TCG %(/dev/kvm exists but a boot under it failed", r.stdout)
      assert.matches("spawns\t2\n", r.stdout)
      -- and the child wrote its verdict to its own empty HOME, nowhere else
      local cached = H.read_file(home .. "/.cache/clawlua/kvm-verdicts")
      assert.matches(fake_copy:gsub("%p", "%%%0") .. ".* fails\n$", cached)
    else
      assert.matches("after\ttcg\t", r.stdout)
      assert.matches("spawns\t1\n", r.stdout)
    end
    assert.matches("exec\tok\n", r.stdout)
  end)

  it("falls back to TCG when a cached 'boots' verdict no longer holds, and remembers", function()
    local fake_copy = dir .. "/fake-qemu.py"
    H.sh(("cp '%s' '%s'"):format(T.fake_qemu, fake_copy))
    local mode_file = dir .. "/mode"
    local function boot(mode)
      H.write_file(mode_file, mode)
      local v = fake("x", { accel = "auto", vmm = { fake_copy, "--mode-file", mode_file, "--agent", T.agent } })
      local accel_before = v:info().accel
      assert(v:start())
      local accels = {}
      for ev in claw.audit.query { sandbox = v.id, kind = "vm.start" } do accels[#accels + 1] = ev.detail.accel end
      local after = v:info().accel
      assert.are.equal("ok\n", assert(v:exec { "echo", "ok" }).stdout)
      v:close()
      return accel_before, after, table.concat(accels, ",")
    end
    -- 1: nothing known: the probe boot is the real boot, and it works
    local first = { boot("agent") }
    if first[1] == "tcg" then
      pending("no usable /dev/kvm here: KVM is never chosen")
      return
    end
    assert.are.same({ "kvm-probe", "kvm", "kvm" }, first)
    assert.are.same({ "boots" }, verdicts_of(fake_copy))
    -- 2: "boots" is cached, but this boot under KVM fails: the same start goes on under TCG
    assert.are.same({ "kvm", "tcg", "kvm,tcg" }, { boot("nokvm-eof") })
    assert.are.same({ "boots", "fails" }, verdicts_of(fake_copy))
    -- 3: the latest verdict counts: TCG at once
    assert.are.same({ "tcg", "tcg", "tcg" }, { boot("nokvm-eof") })
  end)

  it("does not fall back when KVM was asked for", function()
    local v = fake("nokvm", { accel = "kvm" })
    local ok, err = v:start()
    assert.is_nil(ok)
    assert.matches("start: the VMM exited during start", err)
    v:close()
  end)

  it("runs QEMU under its own seccomp sandbox unless seccomp = false", function()
    local function argv_of(v)
      local evs = claw.audit.events { sandbox = v.id, kind = "vm.spawn" }
      return table.concat(evs[#evs].detail.argv, " ")
    end
    local v = fake("agent")
    assert(v:start())
    assert.matches(" %-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny ", argv_of(v))
    v:close()
    v = fake("agent", { seccomp = false })
    assert(v:start())
    assert.is_nil(argv_of(v):find("-sandbox", 1, true))
    v:close()
    local x, err = vm.create { backend = "qemu", kernel = kernel, seccomp = kernel }
    assert.is_nil(x)
    assert.matches("seccomp: a Firecracker filter file needs the firecracker backend", err)
  end)

  it("cleans up after a cancelled start, a close during start and a dropped handle", function()
    -- a task cancelled while its start waits: the VMM is killed, the VM is failed
    local v = fake("silent")
    local t = claw.spawn(function() return v:start() end)
    assert(H.eventually(function() return v:pid() ~= nil end))
    local pid = v:pid()
    t:cancel()
    assert.are.same({ nil, "cancelled" }, { t:join() })
    assert.are.equal("failed", v:state())
    assert(H.eventually(function() return io.open("/proc/" .. pid .. "/stat") == nil end), "the VMM survived")
    v:close()
    -- closed under a waiting start: the start fails at once
    v = fake("silent")
    t = claw.spawn(function() return v:start() end)
    assert(H.eventually(function() return v:pid() ~= nil end))
    v:close()
    local ok, err = t:join()
    assert.is_nil(ok)
    assert.matches("closed", err)
    -- a running VM nobody holds any more: the collector tears it down
    v = fake("agent")
    assert(v:start())
    local rundir = v:info().rundir
    v = nil -- luacheck: ignore 311
    collectgarbage("collect")
    collectgarbage("collect")
    assert(H.eventually(function() return H.children() == 0 end), "the VMM of a collected VM lives on")
    assert.is_nil(io.open(rundir .. "/vmm.log"), "the run directory of a collected VM is still there")
  end)

  it("runs the VMM in a jail by default: namespaces, a root of binds, cgroups, no capabilities", function()
    if not claw.seccomp.available then return pending("the jail needs seccomp(2), which valgrind lacks") end
    local v = fake("agent", { jail = { binds = { T.build, dir } } })
    assert(v:start())
    local pid = assert(v:pid())
    for _, ns in ipairs { "mnt", "pid", "net", "uts", "ipc" } do
      assert.are_not.equal(H.sh("readlink /proc/self/ns/" .. ns), H.sh("readlink /proc/" .. pid .. "/ns/" .. ns),
        ns .. " namespace shared with the runtime")
    end
    local status = H.read_file("/proc/" .. pid .. "/status")
    assert.matches("CapEff:%s+0+\n", status)
    assert.matches("NoNewPrivs:%s+1", status)
    -- the "guest" (the agent, inside the jail) sees the jail's root, not the host's
    local r = assert(v:exec { "sh", "-c", "ls /; test -e /etc/hostname && echo host-etc || echo no-host-etc" })
    assert.matches("usr\n", r.stdout)
    assert.matches("no%-host%-etc", r.stdout)
    local spawn = claw.audit.events { sandbox = v.id, kind = "jail.spawn" }
    assert.are.equal(1, #spawn)
    assert.is_true(#spawn[1].detail.cgroups >= 1, "no cgroup")
    local cgroups = spawn[1].detail.cgroups
    v:close()
    for _, cg in ipairs(cgroups) do
      assert(H.eventually(function() return io.open(cg .. "/cgroup.procs") == nil end), "cgroup left: " .. cg)
    end
    assert.has_error(function() vm.create { backend = "qemu", kernel = kernel, jail = { root = "/" } } end,
      "vm.create: bad field 'jail.root' (set by the vm)")
    assert.has_error(function() vm.create { backend = "qemu", kernel = kernel, jail = 1 } end,
      "vm.create: bad field 'jail' (boolean or table of jail.spawn options expected, got number)")
  end)

  it("caps what a flooding agent sends", function()
    local v = fake("flood")
    assert(v:start())
    local r = assert(v:exec { "anything", max_output = 1000 })
    assert.are.equal(1000, #r.stdout)
    assert.is_true(r.truncated)
    assert.are.equal(8 << 20, r.stdout_bytes)
    assert(v:ping(), "the channel is still usable")
    v:close()
  end)
end)

describe("vm channel with the real agent on the host", function()
  local dir, kernel, before, v
  setup(function()
    before = T.snapshot()
    dir = H.tmpdir()
    kernel = kernel_file(dir)
    v = T.create { backend = "qemu", vmm = T.fake("agent"), kernel = kernel, jail = false }
    assert(v:start())
  end)
  teardown(function()
    v:close()
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  it("runs commands with arguments, env, cwd and exit status", function()
    local r = assert(v:exec { "sh", "-c", "echo $FOO:$(pwd):$1; echo oops >&2; exit 7", "x", "arg1",
                              env = { FOO = "bar" }, cwd = dir })
    assert.are.equal("bar:" .. dir .. ":arg1\n", r.stdout)
    assert.are.equal("oops\n", r.stderr)
    assert.are.equal(7, r.code)
    assert.is_false(r.truncated)
    -- default signal dispositions: `yes` dies of SIGPIPE quietly instead of reporting EPIPE
    r = assert(v:exec { "sh", "-c", "yes | head -n 1" })
    assert.are.same({ "y\n", "" }, { r.stdout, r.stderr })
    r = assert(v:exec { "sh", "-c", "kill -TERM $$" })
    assert.are.equal(15, r.signal)
    assert.are.equal("SIGTERM", r.signal_name)
    assert.is_nil(r.code)
  end)

  it("fails clearly when the program or cwd does not exist", function()
    local r, err = v:exec { "/no/such/program" }
    assert.is_nil(r)
    assert.matches("exec /no/such/program: No such file or directory", err)
    r, err = v:exec { "true", cwd = "/no/such/dir" }
    assert.is_nil(r)
    assert.matches("cwd /no/such/dir: No such file or directory", err)
  end)

  it("feeds stdin larger than the window and gets it back", function()
    local input = ("0123456789abcdef"):rep(40000) -- 640 KiB, over the 256 KiB window
    local r = assert(v:exec { "cat", stdin = input })
    assert.are.equal(#input, #r.stdout)
    assert.is_true(r.stdout == input)
  end)

  it("kills a command at its timeout, and only it", function()
    local t0 = claw.now()
    local r = assert(v:exec { "sh", "-c", "echo started; exec sleep 30", timeout = 0.3 })
    assert.is_true(r.timed_out)
    assert.are.equal("SIGKILL", r.signal_name)
    assert.are.equal("started\n", r.stdout)
    assert.is_true(claw.now() - t0 < 5 * H.scale)
    assert.is_nil(io.open("/proc/" .. r.pid .. "/stat"), "the command is gone")
    assert(v:ping())
  end)

  it("kills the command of a cancelled exec", function()
    local pidfile = dir .. "/pid"
    local t = claw.spawn(function() return v:exec { "sh", "-c", "echo $$ > " .. pidfile .. "; exec sleep 30" } end)
    assert(H.eventually(function() return io.open(pidfile) ~= nil end))
    claw.sleep(0.05)
    local pid = H.read_file(pidfile):match("%d+")
    t:cancel()
    assert.are.same({ nil, "cancelled" }, { t:join() })
    assert(H.eventually(function() return io.open("/proc/" .. pid .. "/stat") == nil end),
      "the cancelled command still runs")
  end)

  it("streams output to callbacks with back-pressure", function()
    local got, chunks = 0, 0
    local r = assert(v:exec { "head", "-c", tostring(6 << 20), "/dev/zero",
      on_stdout = function(c)
        got = got + #c
        chunks = chunks + 1
        if chunks % 16 == 0 then claw.sleep(0.001) end
      end })
    assert.are.equal(0, r.code)
    assert.are.equal(6 << 20, got)
    assert.is_nil(r.stdout)
  end)

  it("writes and reads files atomically, with modes and caps", function()
    local data = {}
    for i = 1, 4096 do data[i] = string.pack("<I4", i * 2654435761 % 4294967296):rep(64) end
    data = table.concat(data) -- 1 MiB of binary
    local path = dir .. "/blob"
    assert(v:write_file(path, data, { mode = "0600" }))
    assert.are.equal(data, H.read_file(path))
    assert.are.equal("600", H.sh("stat -c %a " .. path):match("%d+"))
    assert.are.equal(data, assert(v:read_file(path)))
    local r, err = v:read_file(path, { max = 1000 })
    assert.is_nil(r)
    assert.matches("the file has 1048576 bytes, more than the limit of 1000", err)
    r, err = v:read_file(dir .. "/missing")
    assert.is_nil(r)
    assert.matches("read .*/missing: No such file or directory", err)
    r, err = v:write_file(dir .. "/no/such/dir/f", "x")
    assert.is_nil(r)
    assert.matches("write .*/no/such/dir/f: No such file or directory", err)
    assert.has_error(function() v:write_file("relative", "x") end)
    assert.are.equal("", H.sh("ls -a " .. dir .. " | grep clawlua- || true"), "no temporary file left")
  end)

  it("moves files larger than the agent's output queue both ways", function()
    local big = ("0123456789abcdef"):rep(1 << 20) -- 16 MiB: the agent's queue holds 1 MiB
    local path = dir .. "/big"
    assert(v:write_file(path, big, { timeout = 60 * H.scale }))
    local back = assert(v:read_file(path, { timeout = 60 * H.scale }))
    assert.are.equal(#big, #back)
    assert.is_true(back == big)
    local r, err = v:exec { "sh", "-c", "sleep 0.2; dd if=/dev/zero bs=1M count=20 2>/dev/null", max_output = 10,
                            timeout = 30 }
    assert(r, err)
    assert.are.equal(20 << 20, r.stdout_bytes)
    assert.are.equal(10, #r.stdout)
    assert.is_true(r.truncated)
    os.remove(path)
  end)

  it("runs commands concurrently from several tasks", function()
    local tasks = {}
    for i = 1, 8 do
      tasks[i] = claw.spawn(function() return assert(v:exec { "sh", "-c", "sleep 0.2; echo " .. i }).stdout end)
    end
    local t0 = claw.now()
    for i, t in ipairs(tasks) do assert.are.equal(i .. "\n", t:join()) end
    assert.is_true(claw.now() - t0 < 1.5 * H.scale, "the commands did not overlap")
  end)

  -- Guest output the host cannot keep (an allocation fails) is never dropped silently: the exec
  -- fails with the loss, the command is cancelled, and a vm.output_lost event names it. The
  -- seam (require "clawlua.vm_faults", not part of the public module) makes the next
  -- allocation for output fail, as an out-of-memory malloc would.
  it("fails the exec and audits the loss when output cannot be kept", function()
    local faults = require "clawlua.vm_faults"
    assert.is_nil(claw.vm.fail_output_allocs)
    for _, streaming in ipairs { false, true } do
      local seq0 = claw.audit.stats().last_seq
      local got = {}
      assert.are.equal(0, faults.fail_output_allocs(1))
      local t0 = claw.now()
      local r, err, code = v:exec { "sh", "-c", "echo lost-line; sleep 30; echo never",
        on_stdout = streaming and function(c) got[#got + 1] = c end or nil }
      assert.are.equal(0, faults.fail_output_allocs(0), "the seam was not reached")
      assert.is_nil(r, "an exec that lost output succeeded")
      assert.are.equal("exec: 10 bytes of stdout lost: out of memory", err)
      assert.are.equal("ENOMEM", code)
      assert.is_true(claw.now() - t0 < 10 * H.scale, "the command was not cancelled")
      assert.are.same({}, got)
      local evs = claw.audit.events { after_seq = seq0, kind = "vm.output_lost" }
      assert.are.equal(1, #evs)
      assert.are.equal(v.id, evs[1].sandbox)
      assert.are.equal("stdout", evs[1].detail.stream)
      assert.are.equal(10, evs[1].detail.bytes)
      -- The VM goes on.
      assert.are.equal("ok\n", assert(v:exec { "echo", "ok" }).stdout)
    end
  end)

  it("fails waiting calls when the VM is closed under them", function()
    local w = T.create { backend = "qemu", vmm = T.fake("agent"), kernel = kernel, jail = false }
    assert(w:start())
    local t = claw.spawn(function() return w:exec { "sleep", "30" } end)
    claw.sleep(0.1)
    w:close()
    local r, err = t:join()
    assert.is_nil(r)
    assert.matches("agent channel closed: the vm was closed", err)
  end)
end)
