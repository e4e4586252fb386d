-- labels: root netns vm slow
-- timeout: 2400
-- scripts/guest-kernel's minimal kernel (Debian's linux-source-6.1, tinyconfig +
-- scripts/guest-kernel.config), booted for real under QEMU (TCG here): built when missing (the
-- first run takes minutes, later ones find it cached), picked by default by the VM sandboxes,
-- booted without ACPI (microvm,acpi=off: QEMU names the virtio-mmio devices on the command
-- line), powered off by a reset, with the agent's exec and files, a snapshot restore, and guest
-- traffic through the sandbox firewall. Debian's stock kernel keeps working next to it.
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"
local N = require "netns"
local policy = require "clawlua.policy"

local skip = T.no_qemu() or (not T.is_root() and "taps and /run/clawlua need root") or nil
local files, manifest
if not skip then
  local err
  files, err = T.image_files()
  if not files then error(err) end
  -- the test flow builds the kernel (scripts/test does it first; here it is then a no-op)
  local r = assert(claw.proc.run { T.src .. "/scripts/guest-kernel", "--out", T.image, timeout = 3600,
                                   stderr = "inherit" })
  assert(r.code == 0, "scripts/guest-kernel failed")
  files.kernel_min = T.image .. "/vmlinux-min"
  manifest = H.read_file(files.kernel_min .. ".manifest")
end

local B = require "clawlua.sandbox.vm"
local pid = H.sh("echo $PPID"):match("%d+")

local function need()
  if skip then
    pending(skip)
    return false
  end
  return true
end

describe("policy.vm.kernel_flavor and vm.acpi", function()
  it("takes minimal or stock for the built-in image, acpi only with an own kernel", function()
    local p = assert(policy.from_table({ backend = "vm", vm = { kernel_flavor = "stock" } }, "t"))
    assert.are.equal("stock", p.vm.kernel_flavor)
    p = assert(policy.from_table({ backend = "vm", vm = { kernel = "/k", initrd = "/i", acpi = false } }, "t"))
    assert.is_false(p.vm.acpi)
    local function bad(vm, field, msg)
      local ok, err = policy.from_table({ backend = "vm", vm = vm }, "t")
      assert.is_nil(ok)
      assert.matches(field, err, 1, true)
      assert.matches(msg, err, 1, true)
    end
    bad({ kernel_flavor = "tiny" }, "vm.kernel_flavor", '"minimal" or "stock" expected')
    bad({ kernel_flavor = "minimal", kernel = "/k", initrd = "/i" }, "vm.kernel_flavor", "not with vm.kernel")
    bad({ acpi = false }, "vm.acpi", "needs vm.kernel")
    bad({ kernel = "/k", initrd = "/i", acpi = "no" }, "vm.acpi", "boolean expected")
  end)

  it("vm.create refuses a non-boolean acpi, naming the field", function()
    local ok, err = pcall(claw.vm.create, { kernel = "/nonexistent", acpi = "off" })
    assert.is_false(ok)
    assert.matches("acpi", err)
  end)
end)

describe("scripts/guest-kernel", function()
  it("built a PVH vmlinux with no modules, and is a no-op when nothing changed", function()
    if not need() then return end
    assert.matches("inputs: source=linux%-source%-6%.1 ", manifest)
    local release = manifest:match("kernel_release: (%S+)")
    assert.matches("^6%.1%.", release)
    -- the ELF note QEMU looks for to boot it through PVH (XEN_ELFNOTE_PHYS32_ENTRY = 0x12)
    local notes = H.sh("readelf -n " .. files.kernel_min)
    assert.matches("Xen%s+0x%x+%s+Unknown note type: %(0x00000012%)", notes)
    local t0 = claw.now()
    local r = assert(claw.proc.run { T.src .. "/scripts/guest-kernel", "--out", T.image, timeout = 60 })
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("up to date", r.stderr)
    assert.is_true(claw.now() - t0 < 10 * H.scale)
  end)
end)

describe("the minimal kernel in a VM", function()
  local before
  setup(function()
    if skip then return end
    before = T.snapshot()
  end)
  teardown(function()
    if skip then return end
    T.assert_clean(before)
  end)

  it("boots without ACPI from devices on its command line and powers off by a reset", function()
    if not need() then return end
    local v = T.create { kernel = files.kernel_min, initrd = files.initrd, acpi = false, mem_mib = 128 }
    local ok, err = pcall(function()
      assert(v:start())
      local info = v:info()
      assert.is_false(info.acpi)
      assert.matches("^Linux " .. manifest:match("kernel_release: (%S+)"):gsub("%p", "%%%0"), info.agent.uname)
      local r = assert(v:exec { "sh", "-c", "cat /proc/cmdline; ls /sys/firmware; test -e /proc/modules || "
                                .. "echo no-modules; cat /sys/class/virtio-ports/*/name; echo $pci" })
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("virtio_mmio%.device=", r.stdout)
      assert.matches("reboot=t", r.stdout)
      assert.is_nil(r.stdout:find("acpi", 1, true), "an ACPI table reached the guest: " .. r.stdout)
      assert.matches("no%-modules\norg%.clawlua%.agent\n\n$", r.stdout)
      -- the guest's clock comes from the CMOS RTC
      local t = tonumber(assert(v:exec { "date", "+%s" }).stdout)
      assert.is_true(math.abs(t - os.time()) <= 5, "the guest's clock is off: " .. t)
      local s = assert(v:shutdown { timeout = 20 })
      assert.is_true(s.graceful, "the VMM had to be killed")
      assert.are.equal(0, s.code)
    end)
    v:close()
    assert(ok, err)
  end)

  it("runs two vCPUs", function()
    if not need() then return end
    local v = T.create { kernel = files.kernel_min, initrd = files.initrd, acpi = false, mem_mib = 128, vcpus = 2 }
    local ok, err = pcall(function()
      assert(v:start())
      assert.are.equal("2\n", assert(v:exec { "nproc" }).stdout)
    end)
    v:close()
    assert(ok, err)
  end)
end)

describe("VM sandboxes with the minimal kernel built", function()
  local before, dir

  setup(function()
    if skip then return end
    before = T.snapshot()
    dir = H.tmpdir()
    B.configure { template_dir = dir .. "/templates" }
  end)

  teardown(function()
    if skip then return end
    B.drain()
    B.configure {}
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  local function vm_info(sb) return sb:info().vm end

  it("boot it by default: exec, files, a disk of host files", function()
    if not need() then return end
    H.sh(("mkdir -p %s/ro && printf data > %s/ro/f"):format(dir, dir))
    local pol = { resources = { vcpus = 1, memory_mib = 128 }, files = { readonly = { dir .. "/ro" } } }
    local a = assert(B.start { id = "spec-gk-a" .. pid, policy = pol })
    local ok, err = pcall(function()
      local vi = vm_info(a)
      assert.are.equal(files.kernel_min, vi.kernel)
      assert.is_false(vi.acpi)
      assert.are.equal("cold", a:info().from)
      local r = assert(a:exec { "sh", "-c", "cat $0/f; tr a-z A-Z", dir .. "/ro", stdin = "hello" })
      assert.are.equal("dataHELLO", r.stdout)
      assert.are.equal(0, assert(a:exec { "mkdir", "/tmp/gk" }).code)
      assert.is_true(a:write_file("/tmp/gk/x", "payload", { mode = "0640" }))
      assert.are.equal("payload", a:read_file("/tmp/gk/x"))
      assert.are.same({ { name = "x", type = "file", size = 7 } }, a:list_dir("/tmp/gk"))
    end)
    a:close()
    assert(ok, err)
  end)

  it("make a template of it at the first cold boot and restore the next sandbox from it", function()
    if not need() then return end
    local pol = { resources = { vcpus = 1, memory_mib = 128 } }
    local a = assert(B.start { id = "spec-gk-t" .. pid, policy = pol })
    local b
    local ok, err = pcall(function()
      assert.are.equal("cold", a:info().from)
      b = assert(B.start { id = "spec-gk-b" .. pid, policy = pol })
      assert.are.equal("snapshot", b:info().from)
      assert.are.equal(files.kernel_min, vm_info(b).kernel)
      assert.are.equal("ok\n", assert(b:exec { "echo", "ok" }).stdout)
      local t = tonumber(assert(b:exec { "date", "+%s" }).stdout)
      assert.is_true(math.abs(t - os.time()) <= 5, "the restored guest's clock is off: " .. t)
    end)
    a:close()
    if b then b:close() end
    assert(ok, err)
  end)

  it("keep the stock kernel on kernel_flavor = \"stock\"", function()
    if not need() then return end
    local sb = assert(B.start { id = "spec-gk-s" .. pid, policy = {
      resources = { vcpus = 1, memory_mib = 128 }, vm = { start = "cold", kernel_flavor = "stock" } } })
    local ok, err = pcall(function()
      local vi = vm_info(sb)
      assert.are.equal(files.kernel, vi.kernel)
      assert.is_true(vi.acpi)
      assert.matches("%-amd64$", assert(sb:exec { "uname", "-r" }).stdout:gsub("%s+$", ""))
    end)
    sb:close()
    assert(ok, err)
  end)
end)

describe("guest networking with the minimal kernel", function()
  local available, why = N.available()
  if available and skip then available, why = false, skip end
  if not available then
    pending("skipped: " .. why)
    return
  end
  local W = require "sbnet"
  local w, before
  setup(function()
    w = W.make()
    before = W.snapshot(w)
  end)
  teardown(function()
    if w then W.destroy(w) end
    assert.are.same({}, N.leftovers(W.prefix))
  end)

  it("gets its address from clawlua.net=, fetches an allowed name, is dropped elsewhere", function()
    local wget = "busybox wget -q -O - "
    local lines = W.child(w, {
      id = "gk-net",
      vm = { kernel = files.kernel_min, initrd = files.initrd, acpi = false },
      network = { egress = "deny", allow = { { host = "allowed.test", port = 80 } }, resolvers = { "203.0.113.53" } },
      steps = {
        { op = "vexec", argv = { "sh", "-c", "ip -4 addr show eth0; ip route" } },
        { op = "vexec", argv = { "sh", "-c", wget .. "http://allowed.test/hello.txt" }, timeout = 30 },
        { op = "vexec", argv = { "sh", "-c", wget .. "http://203.0.113.11/hello.txt" }, timeout = 5 },
        { op = "events", kind = "fw.drop" },
        { op = "close" },
      },
    })
    local info = W.find(lines, "create").info
    local conf = W.find(lines, "vexec", 1).result
    assert.are.equal(0, conf.code, conf.stderr)
    assert.matches("inet " .. info.address:gsub("%.", "%%.") .. "/30", conf.stdout)
    assert.matches("default via " .. info.gateway:gsub("%.", "%%."), conf.stdout)
    local ok = W.find(lines, "vexec", 2).result
    assert.are.equal(0, ok.code, ok.stderr)
    assert.are.equal("hello-from-inet\n", ok.stdout)
    assert.is_true(W.find(lines, "vexec", 3).result.timed_out)
    local dropped = false
    for _, ev in ipairs(W.find(lines, "events").events) do
      dropped = dropped or (ev.detail.dst == "203.0.113.11" and ev.detail.rule == "egress.policy")
    end
    assert.is_true(dropped, "no egress.policy drop for 203.0.113.11")
    assert.is_true(W.find(lines, "close").ok)
    assert.are.same(before, W.snapshot(w))
  end)
end)
