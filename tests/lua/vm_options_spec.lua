-- labels: root
-- vm.create validates every option table completely, nested ones included, before it makes
-- anything: the error names the full field path and no tap, run directory, process, cgroup or
-- fd is left. No guest boots (a fake kernel file, accel = "tcg").
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"
local vm = claw.vm

local function run_bases()
  local uid = H.sh("id -u"):match("%d+")
  local xdg = os.getenv("XDG_RUNTIME_DIR")
  local bases = { "/run/clawlua", "/tmp/clawlua-" .. uid }
  if xdg and xdg ~= "" then bases[#bases + 1] = xdg .. "/clawlua" end
  return bases
end

-- Entries of the run directories and the host's interfaces: what a half-made vm leaves.
local function leftovers(id)
  local found = {}
  for _, base in ipairs(run_bases()) do
    for name in H.sh("ls -a " .. base .. " 2>/dev/null; true"):gmatch("[^\n]+") do
      if name:find(id, 1, true) then found[#found + 1] = base .. "/" .. name end
    end
  end
  return found
end

describe("vm.create option checks", function()
  local dir, kernel, before
  before_each(function()
    before = T.snapshot()
    dir = H.tmpdir()
    kernel = dir .. "/vmlinux"
    H.write_file(kernel, "not a kernel: nothing boots in this spec")
  end)
  after_each(function()
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  -- { options, the error vm.create raises }
  local bad = {
    { { jail = { cgroup = { memory = 5 } } },
      "bad field 'jail.cgroup.memory' (1 MiB to 1 PiB expected (bytes or \"64M\"))" },
    { { jail = { cgroup = { memory = "lots" } } }, "bad field 'jail.cgroup.memory' (" },
    { { jail = { cgroup = { pids = 0 } } }, "bad field 'jail.cgroup.pids' (1..4194304 expected)" },
    { { jail = { cgroup = { cpu = 0 } } }, "bad field 'jail.cgroup.cpu' (" },
    { { jail = { cgroup = { version = 3 } } }, "bad field 'jail.cgroup.version' (1 or 2 expected)" },
    { { jail = { cgroup = { swap = 1 } } }, "bad field 'jail.cgroup.swap' (unknown field)" },
    { { jail = { cgroup = 5 } }, "bad field 'jail.cgroup' (table or false expected)" },
    { { jail = { namespaces = { pid = "yes" } } }, "bad field 'jail.namespaces.pid' (boolean expected)" },
    { { jail = { namespaces = { time = true } } }, "bad field 'jail.namespaces.time' (unknown field)" },
    { { jail = { namespaces = { mount = false } } }, "bad field 'jail.binds' (needs the mount namespace" },
    { { jail = { caps = { "cap_flying" } } }, "bad field 'jail.caps[1]' (unknown capability 'cap_flying')" },
    { { jail = { rlimits = { nofile = -1 } } }, "bad field 'jail.rlimits.nofile' (" },
    { { jail = { rlimits = { wings = 1 } } }, "bad field 'jail.rlimits.wings' (unknown resource" },
    { { jail = { groups = { "staff" } } }, "bad field 'jail.groups[1]' (gid expected)" },
    { { jail = { uid = -5 } }, "bad field 'jail.uid' (0..4294967294 expected)" },
    { { jail = { hostname = string.rep("h", 65) } }, "bad field 'jail.hostname' (1 to 64 characters)" },
    { { jail = { net = "elsewhere" } }, "bad field 'jail.net' (" },
    { { jail = { binds = { 42 } } }, "bad field 'jail.binds[1]' (" },
    { { jail = { devices = { "sda" } } }, "bad field 'jail.devices" },
    { { jail = { cwd = "/" } }, "bad field 'jail.cwd' (set by the vm)" },
    { { jail = { root = "/" } }, "bad field 'jail.root' (set by the vm)" },
    { { jail = { "sh" } }, "bad field 'jail[1]' (positional entries (argv) are set by the vm)" },
    { { jail = { wings = true } }, "bad field 'jail.wings' (unknown field)" },
    { { jail = 1 }, "bad field 'jail' (boolean or table of jail.spawn options expected, got number)" },
    { { net = { mac = "01:00:00:00:00:01" } },
      "bad field 'net.mac' (\"01:00:00:00:00:01\" is not a unicast MAC address)" },
    { { net = { mac = "nonsense" } }, "bad field 'net.mac' (" },
    { { net = { tap = "this-name-is-too-long" } },
      "bad field 'net.tap' (\"this-name-is-too-long\" is not a valid interface name)" },
    { { net = { tap = 7 } }, "bad field 'net.tap' (string expected, got number)" },
    { { net = { bridge = "br0" } }, "bad field 'net.bridge' (unknown field)" },
    { { net = "yes" }, "bad field 'net' (boolean or table expected, got string)" },
    { { guest = { ready_timeout = -1 } },
      "bad field 'guest.ready_timeout' (seconds, more than 0 and at most 3600 expected)" },
    { { guest = { ready_timeout = "soon" } }, "bad field 'guest.ready_timeout' (number expected, got string)" },
    { { guest = { channel = "pigeon" } },
      "bad field 'guest.channel' (\"auto\", \"virtio-serial\", \"vsock\" or \"none\" expected, got \"pigeon\")" },
    { { guest = { agent = true } }, "bad field 'guest.agent' (unknown field)" },
    { { seccomp = { vmm = 1 } }, "bad field 'seccomp.vmm' (a clawlua.seccomp filter expected)" },
    { { seccomp = { gpu = 1 } }, "bad field 'seccomp.gpu' (unknown field)" },
    { { seccomp = 3 }, "bad field 'seccomp' (" },
    { { vcpus = 0 }, "bad field 'vcpus' (1 to 32 expected, got 0)" },
    { { wings = 2 }, "bad field 'wings' (unknown field)" },
    { { run_dir = "relative/dir" }, "bad field 'run_dir' (an absolute path of at most 80 bytes without .. expected)" },
    { { run_dir = "/run/clawlua/" .. string.rep("d", 80) }, "bad field 'run_dir' (an absolute path" },
    { { run_dir = "/run/clawlua/../etc" }, "bad field 'run_dir' (an absolute path" },
  }

  it("rejects every bad nested option with its path, and makes nothing", function()
    local pid = H.sh("echo $$"):match("%d+")
    for i, case in ipairs(bad) do
      local opts, want = case[1], case[2]
      local id = ("optcheck-%d-%d"):format(pid, i)
      opts.kernel, opts.accel, opts.id = kernel, "tcg", id
      -- a tap of this name would be made if the checks came late (a name of its own: other
      -- specs running alongside make and remove taps of their own)
      local tap = ("ovt%s_%d"):format(pid, i)
      if opts.net == nil then opts.net = { tap = tap } end
      local ok, err = pcall(vm.create, opts)
      assert.is_false(ok, "case " .. i .. " passed: " .. tostring(err))
      assert.are.equal("vm.create: " .. want, tostring(err):sub(1, #want + 11), "case " .. i)
      assert.are.same({}, leftovers(id), "case " .. i)
      assert.is_nil(io.open("/sys/class/net/" .. tap .. "/tun_flags"), "case " .. i .. ": tap " .. tap .. " left")
      -- the id was not taken by the failed create
      local v = assert(vm.create { kernel = kernel, accel = "tcg", id = id })
      assert.are.equal(1, #leftovers(id), "the check sees a run directory") -- it can fail
      v:close()
      assert.are.same({}, leftovers(id), "case " .. i .. " (the good create)")
    end
  end)

  it("reports what the host lacks as a failure, not a raise", function()
    local v, err, code = vm.create { kernel = kernel, accel = "tcg", net = true,
      jail = { binds = { dir .. "/missing" } } }
    assert.is_nil(v)
    assert.are.equal("vm.create: jail: bind source " .. dir .. "/missing: No such file or directory", err)
    assert.are.equal("ENOENT", code)
  end)

  it("makes the run directory run_dir names (its parents as needed), never one that exists", function()
    local rd = dir .. "/runs/vm-a"
    local v = assert(vm.create { kernel = kernel, accel = "tcg", run_dir = rd })
    assert.are.equal(rd, v:info().rundir)
    assert.is_truthy(io.open(rd .. "/vmm.log"))
    local w, err, code = vm.create { kernel = kernel, accel = "tcg", run_dir = rd }
    assert.is_nil(w)
    assert.are.equal("vm.create: run directory: File exists", err)
    assert.are.equal("EEXIST", code)
    v:close()
    assert.is_nil(io.open(rd), "run directory left: " .. rd)
  end)

  it("takes good nested options", function()
    local v = assert(vm.create { kernel = kernel, accel = "tcg", net = { mac = "02:00:00:00:00:01" },
      guest = { channel = "virtio-serial", ready_timeout = 5 },
      jail = { cgroup = { memory = "512M", pids = 64 }, caps = {}, rlimits = { nofile = 256 } } })
    assert.are.equal("02:00:00:00:00:01", v:info().mac)
    v:close()
  end)
end)
