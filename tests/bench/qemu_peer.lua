-- The peer of the VM benchmarks: a plain `qemu-system-x86_64` booting the same kernel and initrd
-- with clawlua's own machine, devices and boot arguments, the agent's port on a Unix socket path
-- instead of inherited fds; the clock stops at the agent's READY frame. No jail, no QMP client,
-- no tap. Loaded with dofile by tests/bench/vm.lua and sandbox_vm.lua.
local claw = require "clawlua"
local proc = claw.proc

local M = {}

--- The host's TSC rate in kHz (what clawlua passes as tsc_early_khz), from /proc/cpuinfo.
function M.tsc_khz()
  for line in io.lines("/proc/cpuinfo") do
    local mhz = line:match("^cpu MHz%s*:%s*([%d.]+)")
    if mhz then return math.floor(tonumber(mhz) * 1000 + 0.5) end
  end
  return 0
end

--- Boots kernel + initrd to the agent's READY; returns the seconds it took.
--- opts: kernel, initrd, sock (a path for the agent's socket), console (a file, or nil: none),
--- sandbox (true: QEMU's own -sandbox as clawlua runs it), acpi (false: a kernel without ACPI,
--- booted as clawlua boots scripts/guest-kernel's: microvm,acpi=off, reboot=t, no pci=off).
function M.boot(opts)
  os.remove(opts.sock)
  local no_acpi = opts.acpi == false
  local argv = { "qemu-system-x86_64", "-M", no_acpi and "microvm,acpi=off" or "microvm", "-nodefaults",
    "-no-user-config", "-display", "none", "-accel", "tcg", "-cpu", "max", "-m", "128", "-smp", "1", "-no-reboot" }
  local function add(...) for _, a in ipairs { ... } do argv[#argv + 1] = a end end
  if opts.sandbox then add("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny") end
  add("-kernel", opts.kernel, "-initrd", opts.initrd, "-append",
    ("console=ttyS0 quiet panic=1 %s tsc_early_khz=%d tsc=reliable clawlua.channel=serial")
      :format(no_acpi and "reboot=t" or "pci=off reboot=k", M.tsc_khz()))
  if opts.console then
    add("-chardev", "file,id=con,path=" .. opts.console, "-serial", "chardev:con")
  else
    add("-serial", "null")
  end
  add("-device", "virtio-serial-device",
    "-chardev", "socket,id=agent,path=" .. opts.sock .. ",server=on,wait=off",
    "-device", "virtserialport,chardev=agent,name=org.clawlua.agent")
  argv.stdin, argv.stdout, argv.stderr = "null", "null", "null"
  local t0 = claw.now()
  local p = assert(proc.spawn(argv))
  local s
  for _ = 1, 5000 do
    s = claw.stream.connect_unix(opts.sock, 1)
    if s then break end
    claw.sleep(0.001)
  end
  assert(s, "cannot connect to the plain QEMU's agent socket")
  s:set_timeout(60)
  local hdr = assert(s:read(12), "no READY from the plain QEMU")
  local magic, kind = string.unpack("<I2I2", hdr)
  assert(magic == 0xC1A7 and kind == 64)
  local dt = claw.now() - t0
  s:close()
  p:kill("KILL")
  p:wait()
  p:close()
  return dt
end

return M
