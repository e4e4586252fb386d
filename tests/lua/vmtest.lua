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

local function list_dir(dir)
  local out = {}
  local r = claw.proc.run { "ls", "-1", dir }
  if r and r.code == 0 then
    for name in r.stdout:gmatch("[^\n]+") do out[name] = true end
  end
  return out
end

local function count_lines(path)
  local n = 0
  local f = io.open(path)
  if not f then return 0 end
  for _ in f:lines() do n = n + 1 end
  f:close()
  return n
end

--- What a test must leave as it found it.
function T.snapshot()
  if not T.warm then
    -- libcurl's shared multi handle keeps two fds for the loop's lifetime (its wake-up
    -- socketpair): make it exist before counting.
    claw.http.request { url = "http://localhost/", unix_socket = "/nonexistent/clawlua.sock", timeout = 5 }
    T.warm = true
  end
  collectgarbage("collect")
  H.settle()
  return {
    fds = H.fds(),
    taps = list_dir("/sys/class/net"),
    runs = list_dir("/run/clawlua"),
    mounts = count_lines("/proc/self/mounts"),
  }
end

--- Asserts that nothing the VM code made is left: child processes (the loop reaps killed VMMs
--- asynchronously, so this waits a little), fds, interfaces, run directories, mounts.
function T.assert_clean(before)
  collectgarbage("collect")
  assert(H.eventually(function() collectgarbage("collect") return H.children() == 0 end, 10 * H.scale),
    "child processes left: " .. table.concat(claw.proc.diagnostics().children, ","))
  H.settle()
  local after = T.snapshot()
  assert(after.fds == before.fds, ("fds: %d before, %d after"):format(before.fds, after.fds))
  for name in pairs(after.taps) do
    assert(before.taps[name], "interface left behind: " .. name)
  end
  for name in pairs(after.runs) do
    assert(before.runs[name], "run directory left behind: /run/clawlua/" .. name)
  end
  assert(after.mounts == before.mounts, "mount table changed")
end

--- Creates a VM, raising with the error when that fails.
function T.create(opts)
  local v, err = claw.vm.create(opts)
  assert(v, err)
  return v
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
