-- Helpers for the vm specs: the guest image, the fake VMMs, and the leak checks every vm test
-- ends with (processes, fds, taps, run directories, mounts).
local claw = require "clawlua"
local H = require "helper"

local T = {}

local function abs(p)
  if p:sub(1, 1) == "/" then return p end
  return (os.getenv("PWD") or H.sh("pwd"):gsub("%s+$", "")) .. "/" .. p
end

T.build = abs((H.so_dir:gsub("/lib$", "")))
T.src = abs(H.src)
T.agent = T.build .. "/bin/clawlua-agent"
T.image = T.build .. "/guest"
T.fake_qemu = T.src .. "/tests/integration/fake-qemu.py"
T.standin = T.src .. "/tests/integration/firecracker-standin.py"
-- Firecracker's published OpenAPI file, which the stand-in loads and checks every request against.
T.fc_spec = abs(H.spec("firecracker/firecracker.yaml"))
T.fc_spec_dir = T.fc_spec:match("^(.*)/[^/]+$")

--- Builds the guest image (cached: a no-op when its inputs did not change). Returns a table
--- {kernel=, initrd=, rootfs=} or nil and the reason.
function T.image_files()
  if T.files then return T.files end
  local r = claw.proc.run { T.src .. "/scripts/build-guest-image", "--out", T.image, "--agent", T.agent,
                            "--rootfs", timeout = 900, stderr = "inherit" }
  if not r or r.code ~= 0 then
    return nil, "scripts/build-guest-image failed (" .. tostring(r and (r.code or r.signal_name)) .. ")"
  end
  T.files = { kernel = T.image .. "/vmlinux", initrd = T.image .. "/initrd.img", rootfs = T.image .. "/rootfs.ext4" }
  return T.files
end

--- Why real guests cannot run here, or nil when they can.
function T.no_qemu()
  if not claw.proc.find_executable("qemu-system-x86_64") then return "qemu-system-x86_64 is not installed" end
  return nil
end

function T.is_root() return H.is_root() end

--- vmm argv of the fake QEMU in a mode (see tests/integration/fake-qemu.py).
function T.fake(mode)
  return { T.fake_qemu, "--mode", mode, "--agent", T.agent }
end

-- Every VM a test makes is tracked, so that the leak check looks at exactly what this process
-- made (other specs may run in parallel and make their own taps and run directories).
T.tracked = {}

--- Remembers a VM's kernel objects for the leak check; returns the VM.
function T.track(v)
  if v then
    local info = v:info()
    T.tracked[#T.tracked + 1] = { id = v.id, tap = v.tap, rundir = info.rundir, pid = info.pid }
  end
  return v
end

local function mounts_under_run()
  local n = 0
  for line in io.lines("/proc/self/mounts") do
    if line:find("/run/clawlua", 1, true) then n = n + 1 end
  end
  return n
end

--- What a test must leave as it found it.
function T.snapshot()
  if not T.warm then
    -- libcurl's shared multi handle keeps two fds for the loop's lifetime (its wake-up
    -- socketpair): make it exist before counting.
    claw.http.request { url = "http://localhost/", unix_socket = "/nonexistent/clawlua.sock", timeout = 5 }
    -- Likewise the audit's kernel source, which starts with the first process attributed to a
    -- sandbox (every VMM is), and keeps its netlink socket.
    local pid = tonumber(H.sh("echo $$"):match("%d+")) -- a pid that is gone already
    claw.audit.track_pid(pid, "vmtest-warm-up")
    claw.audit.forget_pid(pid)
    T.warm = true
  end
  collectgarbage("collect")
  H.settle()
  return { fds = H.fds(), tracked = #T.tracked, mounts = mounts_under_run() }
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

--- Asserts that nothing the VMs of this test made is left: child processes (the loop reaps
--- killed VMMs asynchronously, so this waits a little), fds, taps, run directories, mounts.
function T.assert_clean(before)
  collectgarbage("collect")
  assert(H.eventually(function() collectgarbage("collect") return H.children() == 0 end, 10 * H.scale),
    "child processes left: " .. table.concat(claw.proc.diagnostics().children, ","))
  H.settle()
  local fds = H.fds()
  assert(fds == before.fds, ("fds: %d before, %d after"):format(before.fds, fds))
  for i = before.tracked + 1, #T.tracked do
    local t = T.tracked[i]
    if t.tap then assert(not exists("/sys/class/net/" .. t.tap), "tap left behind: " .. t.tap) end
    if t.rundir then assert(not exists(t.rundir), "run directory left behind: " .. t.rundir) end
  end
  assert(mounts_under_run() == before.mounts, "a mount under /run/clawlua appeared")
end

--- Creates a VM (tracked), raising with the error when that fails.
function T.create(opts)
  local v, err = claw.vm.create(opts)
  assert(v, err)
  return T.track(v)
end

--- vm.restore, tracked.
function T.restore(opts)
  local v, err = claw.vm.restore(opts)
  return T.track(v), err
end

--- Writes a filter file in Firecracker's --seccomp-filter format (bincode: u64 count, then per
--- thread a u64-length name and a u64-length vector of 8-byte BPF instructions) where every
--- thread's program allows all system calls but `deny` (x86_64 number), which traps.
function T.firecracker_filter(path, deny)
  local function insn(code, jt, jf, k) return string.pack("<I2BBI4", code, jt, jf, k) end
  local prog = insn(0x20, 0, 0, 4)             -- ld [4]: arch
    .. insn(0x15, 1, 0, 0xC000003E)            -- jeq AUDIT_ARCH_X86_64
    .. insn(0x06, 0, 0, 0x80000000)            -- ret KILL_PROCESS
    .. insn(0x20, 0, 0, 0)                     -- ld [0]: nr
    .. insn(0x15, 0, 1, deny)                  -- jeq deny
    .. insn(0x06, 0, 0, 0x00030000)            -- ret TRAP
    .. insn(0x06, 0, 0, 0x7FFF0000)            -- ret ALLOW
  local parts = { string.pack("<I8", 3) }
  for _, name in ipairs { "vmm", "api", "vcpu" } do
    parts[#parts + 1] = string.pack("<I8", #name) .. name .. string.pack("<I8", #prog // 8) .. prog
  end
  H.write_file(path, table.concat(parts))
end

return T
