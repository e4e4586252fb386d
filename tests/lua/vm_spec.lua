-- labels: vm root slow
-- timeout: 1200
-- clawlua.vm with real guests: QEMU microvm booting Debian's kernel and clawlua's agent from
-- the image scripts/build-guest-image builds (cached). Few boots: related tests share a VM.
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"

local skip = T.no_qemu() or (not T.is_root() and "taps and /run/clawlua need root") or nil
local files, image_err
if not skip then
  files, image_err = T.image_files()
  skip = not files and image_err or nil
end

local function sha256_host(data)
  return (H.sh("sha256sum", { stdin = data }):match("^%x+"))
end

local function audit_kinds(id)
  local kinds = {}
  for ev in claw.audit.query { sandbox = id } do kinds[#kinds + 1] = ev.kind end
  return table.concat(kinds, " ")
end

describe("vm with a real QEMU guest", function()
  local v, before, dir, filter

  setup(function()
    if skip then return end
    before = T.snapshot()
    dir = H.tmpdir()
    -- The disk is read-only so that the VM restored from a snapshot of this one can share it.
    -- QEMU runs jailed (the default) under a clawlua filter besides its own -sandbox.
    filter = claw.seccomp.available and
      claw.seccomp.filter { default = "allow", rules = { { syscall = "ptrace", action = "kill_process" } } }
    v = T.create { backend = "qemu", kernel = files.kernel, initrd = files.initrd, rootfs = files.rootfs,
                   rootfs_readonly = true, net = true, seccomp = filter or nil,
                   id = "spec-main-" .. (H.sh("echo $PPID"):match("%d+")) }
    local ok, err = v:start()
    assert(ok, err)
  end)

  teardown(function()
    if skip then return end
    if v then v:close() end
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  local function need()
    if skip then
      pending(skip)
      return false
    end
    return true
  end

  it("boots to agent-ready and says how", function()
    if not need() then return end
    local info = v:info()
    assert.are.equal("running", info.state)
    assert.are.equal("qemu", info.backend)
    assert.matches("^qemu with ", info.why)
    assert.is_true(info.agent.ready)
    assert.matches("^Linux 6%.", info.agent.uname)
    assert.is_true(info.boot_seconds > 0 and info.boot_seconds < 60 * H.scale)
    assert.are.equal("virtio-serial", info.channel)
    assert.is_truthy(io.open("/sys/class/net/" .. v.tap .. "/tun_flags"), "the VM's tap exists")
    -- QEMU runs in a jail: its own namespaces, no capabilities, cgroups, and two seccomp
    -- filters: clawlua's (applied by the jail) and QEMU's own -sandbox (only QEMU's where
    -- seccomp.available is false: under valgrind, which cannot probe seccomp(2))
    local pid = v:pid()
    local status = H.read_file("/proc/" .. pid .. "/status")
    assert.matches("Seccomp:%s+2", status)
    assert.matches("Seccomp_filters:%s+" .. (filter and 2 or 1), status)
    assert.matches("CapEff:%s+0+\n", status)
    assert.matches("NoNewPrivs:%s+1", status)
    for _, ns in ipairs { "mnt", "pid", "net", "ipc", "uts" } do
      assert.are_not.equal(H.sh("readlink /proc/self/ns/" .. ns), H.sh("readlink /proc/" .. pid .. "/ns/" .. ns))
    end
    -- With an empty verdict cache on a host whose /dev/kvm does not boot this kernel, the same
    -- start boots once under KVM, sees it fail, and boots again under TCG: two jailed VMMs.
    local fell_back = info.why:find("a boot under it failed", 1, true) ~= nil
    local jail = claw.audit.events { sandbox = v.id, kind = "jail.spawn" }
    assert.are.equal(fell_back and 2 or 1, #jail)
    for _, ev in ipairs(jail) do
      assert.is_true(#ev.detail.cgroups >= 1, "the VMM has no cgroup")
    end
    local boot = "jail.spawn vm.spawn vm.start"
    if fell_back then boot = boot .. " jail.exit vm.exit " .. boot end
    assert.matches("vm.create " .. boot:gsub("%.", "%%.") .. " vm%.ready", audit_kinds(v.id))
  end)

  it("runs uname -a in the guest", function()
    if not need() then return end
    local r = assert(v:exec { "uname", "-a" })
    assert.are.equal(0, r.code)
    assert.matches("^Linux clawlua 6%.%S+ .* x86_64", r.stdout)
    assert.is_false(r.truncated)
  end)

  it("round-trips stdin to stdout, larger than the channel window", function()
    if not need() then return end
    local input = {}
    for i = 1, 20000 do input[i] = ("line %05d\n"):format(i) end
    input = table.concat(input) -- 220 KB
    local r = assert(v:exec { "cat", stdin = input .. input })
    assert.are.equal(#input * 2, #r.stdout)
    assert.is_true(r.stdout == input .. input)
  end)

  it("reports non-zero exit codes and signals", function()
    if not need() then return end
    local r = assert(v:exec { "sh", "-c", "echo out; echo err >&2; exit 42" })
    assert.are.equal(42, r.code)
    assert.are.equal("out\n", r.stdout)
    assert.are.equal("err\n", r.stderr)
    r = assert(v:exec { "sh", "-c", "kill -SEGV $$" })
    assert.is_nil(r.code)
    assert.are.equal(11, r.signal)
    assert.are.equal("SIGSEGV", r.signal_name)
    local _, err = v:exec { "no-such-program" }
    assert.matches("exec no%-such%-program: No such file or directory", err)
  end)

  it("kills only the guest process when an exec times out", function()
    if not need() then return end
    local t0 = claw.now()
    local r = assert(v:exec { "sh", "-c", "echo $$ > /tmp/victim; exec sleep 60", timeout = 1 })
    assert.is_true(r.timed_out)
    assert.are.equal("SIGKILL", r.signal_name)
    assert.is_true(claw.now() - t0 < 10 * H.scale)
    assert.are.equal("running", v:state())
    local pid = assert(v:exec { "cat", "/tmp/victim" }).stdout:match("%d+")
    local ps = assert(v:exec { "sh", "-c", "test -d /proc/" .. pid .. " && echo alive || echo gone" })
    assert.are.equal("gone\n", ps.stdout)
  end)

  it("round-trips a 1 MiB binary file with a matching checksum", function()
    if not need() then return end
    local parts = {}
    for i = 0, 255 do parts[#parts + 1] = string.char(i):rep(4096) end
    local data = table.concat(parts) -- 1 MiB, every byte value
    assert.are.equal(1 << 20, #data)
    assert(v:write_file("/tmp/blob.bin", data, { mode = "0640" }))
    local r = assert(v:exec { "sh", "-c", "sha256sum /tmp/blob.bin; stat -c '%a %s' /tmp/blob.bin" })
    local guest_sum, mode, size = r.stdout:match("^(%x+)  /tmp/blob%.bin\n(%d+) (%d+)")
    assert.are.equal(sha256_host(data), guest_sum)
    assert.are.equal("640", mode)
    assert.are.equal(tostring(1 << 20), size)
    local back = assert(v:read_file("/tmp/blob.bin"))
    assert.are.equal(#data, #back)
    assert.are.equal(sha256_host(data), sha256_host(back))
  end)

  it("streams output to callbacks and caps collected output", function()
    if not need() then return end
    local n, seen = 0, {}
    assert(v:exec { "sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.05; done",
                    on_stdout = function(c) n = n + 1; seen[#seen + 1] = c end })
    assert.are.equal("tick 1\ntick 2\ntick 3\n", table.concat(seen))
    assert.is_true(n >= 2, "output arrived in one piece")
    local r = assert(v:exec { "head", "-c", "100000", "/dev/zero", max_output = 1000 })
    assert.are.equal(1000, #r.stdout)
    assert.is_true(r.truncated)
  end)

  it("reads the ext4 disk the image builder made", function()
    if not need() then return end
    local r = assert(v:exec { "cat", "/mnt/root/README" })
    assert.matches("^clawlua guest disk", r.stdout)
  end)

  it("pauses and resumes the guest", function()
    if not need() then return end
    assert(v:pause())
    assert.are.equal("paused", v:state())
    local t = claw.spawn(function() return v:exec { "echo", "after" } end)
    claw.sleep(0.3)
    assert.is_false(t:done(), "a paused guest answered")
    assert(v:resume())
    assert.are.equal("after\n", t:join().stdout)
  end)

  it("snapshots to a file and restores into a second VM", function()
    if not need() then return end
    assert(v:exec { "sh", "-c", "echo kept-in-memory > /tmp/marker" })
    local s = assert(v:snapshot { dir = dir .. "/snap" })
    assert.are.equal("qemu", s.backend)
    assert.is_true(s.bytes > 1 << 20)
    assert.are.equal("running", v:state())
    local r, err = T.restore { dir = dir .. "/snap" }
    assert(r, err)
    local ok, e2 = pcall(function()
      assert.are.equal("running", r:state())
      assert.are.equal("kept-in-memory\n", assert(r:exec { "cat", "/tmp/marker" }).stdout)
      assert.are_not.equal(v.tap, r.tap)
    end)
    r:close()
    assert(ok, e2)
    assert(v:exec { "true" }, "the original runs on")
  end)

  it("shuts down gracefully", function()
    if not need() then return end
    local tap, rundir = v.tap, v:info().rundir
    local st = assert(v:shutdown { timeout = 20 })
    assert.is_true(st.graceful)
    assert.are.equal(0, st.code)
    assert.are.equal("exited", v:state())
    assert.is_nil(v:pid())
    assert.is_nil(io.open("/sys/class/net/" .. tap .. "/tun_flags"), "the tap went with the VMM")
    local _, err = v:exec { "true" }
    assert.matches("exec: the guest agent channel is closed", err)
    local exit
    for ev in claw.audit.query { sandbox = v.id, kind = "vm.exit" } do exit = ev end
    assert.is_true(exit.detail.expected)
    v:close()
    assert.is_nil(io.open(rundir .. "/vmm.log"), "the run directory is gone")
    v = nil
  end)
end)

describe("vm with two real QEMU guests", function()
  it("keeps two VMs apart, and detects a VMM killed with SIGKILL", function()
    if skip then return pending(skip) end
    local before = T.snapshot()
    local a = T.create { backend = "qemu", kernel = files.kernel, initrd = files.initrd, net = true }
    local b = T.create { backend = "qemu", kernel = files.kernel, initrd = files.initrd, net = true }
    local ok, err = pcall(function()
      local ta = claw.spawn(function() return a:start() end)
      local tb = claw.spawn(function() return b:start() end)
      assert(ta:join())
      assert(tb:join())
      assert(a:write_file("/tmp/who", "a"))
      assert(b:write_file("/tmp/who", "b"))
      assert.are.equal("a", assert(a:read_file("/tmp/who")))
      assert.are.equal("b", assert(b:read_file("/tmp/who")))
      assert.are_not.equal(a:pid(), b:pid())
      assert.are_not.equal(a.tap, b.tap)
      -- kill -9 from outside: detected, the runtime objects go, the other VM is untouched
      local tap, pid = a.tap, a:pid()
      H.sh("kill -9 " .. pid)
      local st = assert(a:wait(10 * H.scale))
      assert.are.equal("SIGKILL", st.signal_name)
      assert.are.equal("exited", a:state())
      local _, e = a:exec { "true" }
      assert.matches("the guest agent channel is closed", e)
      assert(H.eventually(function() return io.open("/sys/class/net/" .. tap .. "/tun_flags") == nil end),
        "the killed VM's tap is still there")
      local exit
      for ev in claw.audit.query { sandbox = a.id, kind = "vm.exit" } do exit = ev end
      assert.are.equal("SIGKILL", exit.detail.signal)
      assert.is_false(exit.detail.expected)
      assert.are.equal("b", assert(b:read_file("/tmp/who")))
    end)
    a:close()
    b:close()
    assert(ok, err)
    T.assert_clean(before)
  end)

  it("enforces clawlua's seccomp filter in the jailed VMM: a denied system call kills it", function()
    if skip then return pending(skip) end
    if not claw.seccomp.available then return pending("seccomp(2) is not available (valgrind)") end
    local before = T.snapshot()
    -- QEMU makes eventfds from its first steps: under this filter it cannot start
    local f = claw.seccomp.filter { default = "allow",
                                    rules = { { syscall = "eventfd2", action = "kill_process" } } }
    local v = T.create { backend = "qemu", kernel = files.kernel, initrd = files.initrd, seccomp = f }
    local ok, err = v:start()
    assert.is_nil(ok)
    assert.matches("start: the VMM was killed during start", err)
    local exit = claw.audit.events { sandbox = v.id, kind = "vm.exit" }
    assert.are.equal("SIGSYS", exit[#exit].detail.signal)
    v:close()
    T.assert_clean(before)
  end)

  it("reports a guest kernel that dies during boot, with the end of its console", function()
    if skip then return pending(skip) end
    local before = T.snapshot()
    local v = T.create { backend = "qemu", kernel = files.kernel, initrd = files.initrd,
                         boot_args = "rdinit=/no/such/init" }
    local ok, err = v:start()
    assert.is_nil(ok)
    assert.matches("start: the VMM exited during start; VMM log %(.-%) ends:\n", err)
    assert.matches("Kernel panic", err)
    v:close()
    T.assert_clean(before)
  end)
end)
