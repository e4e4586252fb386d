-- labels: root
-- timeout: 600
-- The Firecracker driver. With a real `firecracker` on PATH and a usable KVM these tests run
-- against it; otherwise against tests/integration/firecracker-standin.py, a STAND-IN that is
-- not Firecracker: it checks every API request and the call order against Firecracker's
-- OpenAPI file (tests/fixtures/specs/firecracker/firecracker.yaml) and serves the guest agent on the
-- host. The stand-in is named as such in every test title.
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"
local vm = claw.vm

local real = vm.backend().backend == "firecracker"
local what = real and "Firecracker" or "the Firecracker STAND-IN"

describe("vm with " .. what, function()
  local dir, files, before
  local vmm = not real and { T.standin, "--agent", T.agent, "--spec", T.fc_spec } or nil

  setup(function()
    dir = H.tmpdir()
    if real then
      files = assert(T.image_files())
    else -- the stand-in only checks that the files exist
      files = { kernel = dir .. "/vmlinux", initrd = dir .. "/initrd.img", rootfs = dir .. "/rootfs.ext4" }
      for _, p in pairs(files) do H.write_file(p, "stand-in file\n") end
    end
  end)
  teardown(function() H.rm_rf(dir) end)
  before_each(function() before = T.snapshot() end)
  after_each(function() T.assert_clean(before) end)

  -- Jailed, as by default; the stand-in's script and the agent it serves are bound in, and so
  -- is the test's directory (its "guest" commands write there).
  local function jail() return { binds = { T.src, T.build, T.fc_spec_dir, { src = dir, rw = true } } } end

  local function create(extra)
    local opts = { backend = "firecracker", vmm = vmm, kernel = files.kernel, initrd = files.initrd,
                   jail = not real and jail() or nil }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return T.create(opts)
  end

  it("boots through the whole API sequence and runs commands over vsock (" .. what .. ")", function()
    if not T.is_root() then return pending("taps need root") end
    local v = create { rootfs = files.rootfs, net = true, vcpus = 2, mem_mib = 256 }
    assert(v:start())
    local info = v:info()
    assert.are.equal("running", info.state)
    assert.are.equal("vsock", info.channel)
    assert.matches("^1%.", info.firecracker_version)
    if not real then
      -- The order Firecracker requires, as the stand-in logged it (it refuses anything else).
      local calls = {}
      for line in v:log(65536):gmatch("API ([A-Z]+ [^ ]+) %->") do calls[#calls + 1] = line end
      assert.are.same({ "GET /version", "PUT /logger", "PUT /metrics", "PUT /machine-config",
                        "PUT /boot-source", "PUT /drives/rootfs", "PUT /network-interfaces/eth0",
                        "PUT /vsock", "PUT /actions" }, calls)
      assert.matches("InstanceStart: simulated guest with 2 vCPU, 256 MiB", v:log(65536))
    end
    local r = assert(v:exec { "uname", "-s" })
    assert.are.equal("Linux\n", r.stdout)
    r = assert(v:exec { "sh", "-c", "cat; exit 3", stdin = "over vsock\n" })
    assert.are.equal("over vsock\n", r.stdout)
    assert.are.equal(3, r.code)
    local m = assert(v:metrics())
    assert.is_table(m)
    local tap = v.tap
    assert.is_truthy(io.open("/sys/class/net/" .. tap .. "/tun_flags"), "Firecracker's named tap exists")
    local st = assert(v:shutdown { timeout = 10 })
    assert.is_true(st.graceful)
    assert.are.equal("exited", v:state())
    v:close()
    assert.is_nil(io.open("/sys/class/net/" .. tap .. "/tun_flags"), "the persistent tap was deleted")
  end)

  it("pauses and resumes (" .. what .. ")", function()
    local v = create()
    assert(v:start())
    assert(v:pause())
    assert.are.equal("paused", v:state())
    local t = claw.spawn(function() return v:exec { "echo", "resumed" } end)
    claw.sleep(0.3)
    assert.is_false(t:done(), "a paused guest ran a command")
    local ok, err = v:pause()
    assert.is_nil(ok)
    assert.matches("pause: the vm is paused, not running", err)
    assert(v:resume())
    assert.are.equal("resumed\n", t:join().stdout)
    v:close()
  end)

  it("creates a snapshot and loads it into a new VMM (" .. what .. ")", function()
    local v = create()
    assert(v:start())
    local marker = dir .. "/marker-" .. v.id
    assert(v:exec { "sh", "-c", "echo before-snapshot > " .. marker })
    local snap = dir .. "/snap"
    local s = assert(v:snapshot { dir = snap })
    assert.are.equal("firecracker", s.backend)
    assert.is_truthy(io.open(snap .. "/vmstate.fc"))
    assert.is_truthy(io.open(snap .. "/memory.fc"))
    assert.are.equal("running", v:state(), "the VM runs on after its snapshot")
    assert(v:exec { "true" })
    v:close()
    local r, err = T.restore { dir = snap, vmm = vmm, jail = not real and jail() or nil }
    assert(r, err)
    assert.are.equal("running", r:state())
    assert.are.equal("before-snapshot\n", assert(r:exec { "cat", marker }).stdout)
    if not real then assert.matches("API PUT /snapshot/load %-> 204", r:log(65536)) end
    r:close()
  end)

  it("surfaces Firecracker's fault_message and leaves nothing running (" .. what .. ")", function()
    local v = create()
    assert(v:start())
    local snap = dir .. "/snap2"
    assert(v:snapshot { dir = snap })
    v:close()
    -- A memory file that does not match its snapshot: Firecracker answers 400.
    H.sh("truncate -s 4096 " .. snap .. "/memory.fc")
    local r, err = T.restore { dir = snap, vmm = vmm, jail = not real and jail() or nil }
    assert.is_nil(r)
    assert.matches("^vm [%w-]+: firecracker PUT /snapshot/load: 400: ", err)
    if not real then assert.matches("the memory file does not match the snapshot", err) end
  end)

  -- Firecracker installs the filters itself, per thread; with the stand-in, its "vcpu thread"
  -- (a child process) runs under the vcpu program, and getpid(2), denied there, kills it.
  local function filter_in_force(v, instructions)
    local pid = assert(v:pid())
    if real then
      assert.matches("Seccomp:%s+2", H.read_file("/proc/" .. pid .. "/status"))
      return
    end
    local log = v:log(65536)
    assert.matches(("seccomp filter .*: api %d instructions, vcpu %d instructions, vmm %d instructions")
      :format(instructions, instructions, instructions), log)
    local nspid = assert(log:match("vcpu stand%-in pid (%d+) runs under the vcpu seccomp filter"))
    -- the stand-in runs in the jail's pid namespace: find its vcpu child by the host's pids
    local vcpu
    local me = H.read_file("/proc/" .. pid .. "/cmdline")
    for child in H.read_file(("/proc/%d/task/%d/children"):format(pid, pid)):gmatch("%d+") do
      local f = io.open("/proc/" .. child .. "/cmdline")
      if f and f:read("a") == me then vcpu = child end
      if f then f:close() end
    end
    assert(vcpu, "no vcpu child of the stand-in")
    local status = H.read_file("/proc/" .. vcpu .. "/status")
    assert.matches("Seccomp:%s+2", status)
    assert.matches("Seccomp_filters:%s+1", status)
    assert.matches("NSpid:%s+%d+%s+" .. nspid, status)
    H.sh("kill -USR1 " .. vcpu)
    local died = "vcpu stand%-in pid " .. nspid .. " was killed by signal 31"
    assert(H.eventually(function() return v:log(65536):match(died) end),
      "getpid(2) under the filter did not die of SIGSYS")
  end

  it("gives Firecracker clawlua's seccomp filters in its --seccomp-filter format, in force (" .. what .. ")",
     function()
    if not claw.seccomp.available then return pending("seccomp(2) is not available (valgrind)") end
    local f = claw.seccomp.filter { default = "allow", rules = { { syscall = "getpid", action = "trap" } } }
    local v = create { seccomp = f }
    assert(v:start())
    local cmdline = H.read_file("/proc/" .. v:pid() .. "/cmdline"):gsub("%z", " ")
    local file = assert(cmdline:match("%-%-seccomp%-filter (%S+)"))
    assert.matches("seccomp%-filter%.bpf$", file)
    -- the file is what seccomp.firecracker_file writes for these filters
    assert.are.equal(claw.seccomp.firecracker_file { vmm = f, api = f, vcpu = f }, H.read_file(file))
    filter_in_force(v, #f:bpf() // 8)
    v:close()
    local w = create { seccomp = false }
    assert(w:start())
    assert.matches("%-%-no%-seccomp", H.read_file("/proc/" .. w:pid() .. "/cmdline"):gsub("%z", " "))
    w:close()
  end)

  it("passes a filter file in Firecracker's format as it is (" .. what .. ")", function()
    if not claw.seccomp.available then return pending("seccomp(2) is not available (valgrind)") end
    local filter = dir .. "/filter.bpf"
    T.firecracker_filter(filter, 39) -- every thread: all syscalls but getpid(2)
    local v = create { seccomp = filter }
    assert(v:start())
    local cmdline = H.read_file("/proc/" .. v:pid() .. "/cmdline"):gsub("%z", " ")
    assert.matches("%-%-seccomp%-filter " .. filter:gsub("%p", "%%%0"), cmdline)
    filter_in_force(v, 7)
    v:close()
  end)

  it("reports a VMM that dies during start with its log (" .. what .. ")", function()
    local v = create { vmm = not real and { T.standin, "--agent", T.agent, "--spec", "/nonexistent.yaml" } or
                                { "/bin/sh", "-c", "echo firecracker refuses to start >&2; exit 1" } }
    local ok, err = v:start()
    assert.is_nil(ok)
    assert.matches("start: the VMM exited during start; VMM log %(.-%) ends:\n", err)
    assert.matches(real and "firecracker refuses to start" or "nonexistent%.yaml", err)
    v:close()
  end)
end)
