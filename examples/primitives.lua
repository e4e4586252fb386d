-- The four primitives together, for real: a microVM booted from the guest image, its tap
-- isolated in nftables, a host command confined by a seccomp filter, and every step read back
-- from a hash-chained audit log. Needs root (taps, nftables) and qemu-system-x86_64.
--
--   build/bin/clawlua examples/primitives.lua       (examples/sandbox.lua is the policy-driven
--                                                    sandbox built on them: start there)
--
-- The guest image is built on first use by scripts/build-guest-image (Debian's kernel and
-- busybox-static, fetched with apt, plus clawlua's guest agent) and cached in build/guest.
local claw = require "clawlua"
local audit, firewall, proc, seccomp, vm = claw.audit, claw.firewall, claw.proc, claw.seccomp, claw.vm

local build = os.getenv("CLAWLUA_BUILD") or "build"

local function check(ok, err, ...)
  if not ok then error(err, 2) end
  return ok, err, ...
end

--- A to-be-closed value that runs fn when its scope ends, by error or not.
local function defer(fn) return setmetatable({}, { __close = fn }) end

local function step(fmt, ...)
  io.stdout:write(("==> " .. fmt .. "\n"):format(...))
  io.stdout:flush()
end

claw.run(function()
  local dir = check(proc.run { "mktemp", "-d", "/tmp/clawlua-sandbox.XXXXXX" }).stdout:gsub("%s+$", "")
  local _ <close> = defer(function() proc.run { "rm", "-rf", dir } end)

  -- 1. Every primitive writes to the audit; this sink keeps it in a hash-chained JSONL file.
  local log_path = dir .. "/audit.jsonl"
  local sink = check(audit.sink { path = log_path, fsync = "never" })

  -- 2. The guest image (cached: a no-op when its inputs did not change).
  step("guest image in %s/guest", build)
  local r = check(proc.run { "scripts/build-guest-image", "--out", build .. "/guest",
                             "--agent", build .. "/bin/clawlua-agent", "--rootfs", -- as the tests build it
                             stdout = "inherit", stderr = "inherit", timeout = 1800 })
  if r.code ~= 0 then error("scripts/build-guest-image failed: " .. (r.code or r.signal_name)) end

  -- 3. A VM with a tap of its own. `backend = "auto"` says which VMM and accelerator it took.
  local v <close> = check(vm.create { kernel = build .. "/guest/vmlinux", initrd = build .. "/guest/initrd.img",
                                      net = true, mem_mib = 128, id = "example-vm" })
  local info = v:info()
  step("vm %s: %s, tap %s", v.id, info.why, v.tap)

  -- 4. Its tap isolated before the guest runs: no egress but DNS to one resolver and HTTPS to
  --    one network; ingress only SSH from the operators' network; spoofed sources dropped.
  local fw = check(firewall.open { table = "clawlua_example", log_group = 17 }) -- drops -> fw.drop events
  local _ <close> = defer(function() fw:destroy() end) -- also when something below fails
  check(fw:attach(v.id, {
    iface = v.tap, ip = "10.200.0.2", mac = info.mac, dns = { "10.200.0.1" },
    egress = { policy = "drop", allow = { { cidr = "10.201.0.0/16", proto = "tcp", port = 443 } } },
    ingress = { allow = { { cidr = "10.202.0.0/24", proto = "tcp", port = 22 } } },
    log = true,
  }))
  local rules = 0
  for _ in pairs(check(fw:counters(v.id))) do rules = rules + 1 end
  step("firewall: chain %s with %d counted rules, linked through the table's verdict maps",
       fw:list()[1].chain, rules)

  -- 5. Boot to the guest agent, then run commands and move a file through it.
  check(v:start())
  step("guest agent ready after %.2f s (VMM pid %d, jailed, under seccomp)", v:info().boot_seconds, v:pid())
  r = check(v:exec { "uname", "-sr", timeout = 30 })
  step("guest: %s", r.stdout:gsub("%s+$", ""))
  r = check(v:exec { "sh", "-c", "tr a-z A-Z; exit 3", stdin = "untrusted work\n", timeout = 30 })
  step("guest: stdin -> %s, exit code %d", r.stdout:gsub("\n", "\\n"), r.code)
  r = check(v:exec { "sleep", "60", timeout = 1 })
  step("guest: a command past its timeout was killed (timed_out=%s), the VM lives: %s",
       tostring(r.timed_out), check(v:exec { "echo", "still here" }).stdout:gsub("%s+$", ""))
  local data = {}
  for i = 1, 4096 do data[i] = string.char(i % 256) .. ("x"):rep(63) end
  data = table.concat(data)
  check(v:write_file("/tmp/blob", data, { mode = "0600" }))
  local back = check(v:read_file("/tmp/blob"))
  r = check(v:exec { "sha256sum", "/tmp/blob" })
  local host_sum = check(proc.run { "sha256sum", stdin = data }).stdout:match("%x+")
  step("file of %d bytes round-tripped: %s; guest sha256 %s host",
       #data, back == data and "identical" or "DIFFERENT",
       r.stdout:match("%x+") == host_sum and "matches" or "DIFFERS FROM")

  -- 6. A host-side tool call confined by seccomp: socket(AF_INET) fails with EPERM.
  local filter = seccomp.filter { default = "allow", rules = {
    { syscall = "socket", action = { errno = 1 }, args = { { 0, "==", 2 } } } } }
  r = check(proc.run { "python3", "-c", [[
import socket
try:
    socket.socket(socket.AF_INET); print("inet socket made")
except OSError as e:
    print("inet socket refused:", e.strerror)
socket.socket(socket.AF_UNIX); print("unix socket made")]], seccomp = filter, timeout = 30 })
  step("seccomp: %s", r.stdout:gsub("\n$", ""):gsub("\n", "; "))

  -- 7. Shut down: the agent powers the guest off; the tap, sockets and run directory go.
  local st = check(v:shutdown { timeout = 20 })
  step("shutdown: graceful=%s", tostring(st.graceful))
  check(fw:detach(v.id))
  v:close()

  -- 8. What the audit saw, read back from the file, and its hash chain verified.
  sink:close()
  local kinds, n = {}, 0
  for ev in audit.read_file(log_path) do
    n = n + 1
    kinds[ev.kind] = (kinds[ev.kind] or 0) + 1
  end
  local names = {}
  for k, c in pairs(kinds) do names[#names + 1] = ("%s×%d"):format(k, c) end
  table.sort(names)
  step("audit: %d records: %s", n, table.concat(names, " "))
  local verdict = audit.verify(audit.log_files(log_path))
  step("audit chain verified: %s", verdict.ok and "intact" or "BROKEN")
end)
