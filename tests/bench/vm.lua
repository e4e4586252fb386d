-- clawlua.vm, each figure against a peer measured in the same run:
--   1. create -> agent ready: clawlua (vm.create + vm:start, jailed as by default) vs the same
--      image booted by a plain qemu-system-x86_64 command line (clawlua's arguments, the agent's
--      port on a socket path) to the same marker, the agent's READY frame. Median of ROUNDS
--      each, interleaved.
--   2. channel latency (ping, exec of `true`) and file throughput (write_file/read_file 8 MiB)
--      to a TCG guest, vs the same agent and host code with no VM (the agent on the host over a
--      socketpair, behind tests/integration/fake-qemu.py).
--   3. the runtime's own CPU time and RSS per VM, VMMs excluded, vs the VMM's CPU for the same
--      boots.
--   4. Firecracker STAND-IN (tests/integration/firecracker-standin.py, not Firecracker): the
--      runtime's CPU per boot sequence (10 API calls + vsock + READY) vs curl processes making
--      the same API calls.
--   build/bin/clawlua tests/bench/vm.lua [rounds=9]   (TCG boot times swing run to run: 9 or more)
local claw = require "clawlua"
local proc, vm = claw.proc, claw.vm

local ROUNDS = tonumber(arg and arg[1]) or 9
local src = (os.getenv("PWD") or ".")
local build = src .. "/build"
local agent = build .. "/bin/clawlua-agent"
assert(assert(proc.run { src .. "/scripts/build-guest-image", "--out", build .. "/guest", "--agent", agent,
                         "--rootfs", "--quiet", timeout = 900, stderr = "inherit" }).code == 0)
local kernel, initrd = build .. "/guest/vmlinux", build .. "/guest/initrd.img"

local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) // 2] or (t[n // 2] + t[n // 2 + 1]) / 2
end

local function self_rss_kb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmRSS:%s+(%d+)")
    if kb then return tonumber(kb) end
  end
end

local function proc_cpu(pid) -- utime + stime of a live process, seconds
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  local fields = {}
  for x in s:match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

-- 1. create -> ready ------------------------------------------------------------------------
-- The peer: a plain QEMU booting the same kernel to the agent's READY (tests/bench/qemu_peer.lua),
-- with QEMU's own -sandbox as clawlua runs it and the console in a file.
local peer = dofile((debug.getinfo(1, "S").source:match("^@(.*)/") or ".") .. "/qemu_peer.lua")
local console_log = os.tmpname()
local agent_sock = os.tmpname() .. ".sock"

local function plain_qemu()
  return peer.boot { kernel = kernel, initrd = initrd, sock = agent_sock, console = console_log, sandbox = true }
end

local vmm_cpu, self_cpu, rss_deltas = 0, 0, {}
local function clawlua_boot()
  local rss0, c0 = self_rss_kb(), os.clock()
  local t0 = claw.now()
  local v = assert(vm.create { backend = "qemu", kernel = kernel, initrd = initrd })
  assert(v:start())
  local dt = claw.now() - t0
  self_cpu = self_cpu + (os.clock() - c0)
  rss_deltas[#rss_deltas + 1] = self_rss_kb() - rss0
  vmm_cpu = vmm_cpu + proc_cpu(v:pid())
  local c1 = os.clock()
  v:close()
  self_cpu = self_cpu + (os.clock() - c1)
  return dt
end

plain_qemu() -- warm the page cache for both
local tq, tc = {}, {}
for _ = 1, ROUNDS do
  tq[#tq + 1] = plain_qemu()
  tc[#tc + 1] = clawlua_boot()
end
os.remove(console_log)
os.remove(agent_sock)
local mq, mc = median(tq), median(tc)
print(("create -> agent ready (TCG, median of %d): clawlua %.3f s, plain qemu %.3f s, ratio %.3f (goal <= 1.05)")
  :format(ROUNDS, mc, mq, mc / mq))
print(("runtime CPU per VM (create + start + close, VMM excluded): %.2f ms = %.2f%% of the VMM's %.0f ms")
  :format(self_cpu / ROUNDS * 1000, self_cpu / vmm_cpu * 100, vmm_cpu / ROUNDS * 1000))

-- 2. channel ------------------------------------------------------------------------------------
local function channel(v, label)
  local pings, execs = {}, {}
  for _ = 1, 200 do pings[#pings + 1] = assert(v:ping()) end
  for _ = 1, 30 do
    local t0 = claw.now()
    assert(v:exec { "true" })
    execs[#execs + 1] = claw.now() - t0
  end
  local data = string.rep("0123456789abcdef", (8 << 20) // 16)
  local t0 = claw.now()
  assert(v:write_file("/tmp/bench.bin", data))
  local wt = claw.now() - t0
  t0 = claw.now()
  assert(#assert(v:read_file("/tmp/bench.bin")) == #data)
  local rt = claw.now() - t0
  assert(v:exec { "rm", "-f", "/tmp/bench.bin" })
  return { label = label, ping = median(pings), exec = median(execs), write = 8 / wt, read = 8 / rt }
end

local guest = assert(vm.create { backend = "qemu", kernel = kernel, initrd = initrd })
assert(guest:start())
local g = channel(guest, "TCG guest")
local dir = assert(proc.run { "mktemp", "-d", "/tmp/clawlua-bench.XXXXXX" }).stdout:gsub("%s+$", "")
local hostv = assert(vm.create { backend = "qemu", kernel = kernel, jail = false,
  vmm = { src .. "/tests/integration/fake-qemu.py", "--mode", "agent", "--agent", agent } })
assert(hostv:start())
local h = channel(hostv, "agent on the host")
hostv:close()
for _, m in ipairs { g, h } do
  print(("channel, %-18s ping %.3f ms, exec `true` %.2f ms, write_file %.1f MiB/s, read_file %.1f MiB/s")
    :format(m.label .. ":", m.ping * 1000, m.exec * 1000, m.write, m.read))
end
print(("channel ratios guest/host: ping %.1fx, exec %.1fx, write %.2fx, read %.2fx (throughput: host/guest)")
  :format(g.ping / h.ping, g.exec / h.exec, h.write / g.write, h.read / g.read))

-- RSS of the runtime per running VM
collectgarbage("collect")
local rss0 = self_rss_kb()
local extra = {}
for i = 1, 3 do
  extra[i] = assert(vm.create { backend = "qemu", kernel = kernel, initrd = initrd })
  assert(extra[i]:start())
end
collectgarbage("collect")
local per_vm_rss = (self_rss_kb() - rss0) / 3
local vmm_rss = extra[1]:info().vmm_rss_kb
for _, v in ipairs(extra) do v:close() end
guest:close()
print(("runtime RSS per running VM: %.0f KiB (median growth while starting one: %d KiB); each QEMU: %d KiB, ratio %.4f")
  :format(per_vm_rss, median(rss_deltas), vmm_rss, per_vm_rss / vmm_rss))

-- 4. Firecracker stand-in ------------------------------------------------------------------------
local fc_spec = src .. "/tests/fixtures/specs/firecracker"
local standin = { src .. "/tests/integration/firecracker-standin.py", "--agent", agent,
                  "--spec", fc_spec .. "/firecracker.yaml" }
local N = 10
local c0 = os.clock()
local t0 = claw.now()
for _ = 1, N do
  local v = assert(vm.create { backend = "firecracker", vmm = standin, kernel = kernel, initrd = initrd,
                               jail = { binds = { src, build, fc_spec } } })
  assert(v:start())
  v:close()
end
local fc_cpu = (os.clock() - c0) / N
local fc_wall = (claw.now() - t0) / N

-- The same API calls from curl processes, against one stand-in.
local sock = dir .. "/api.sock"
local s = assert(proc.spawn { standin[1], "--agent", agent, "--spec", standin[5], "--api-sock", sock,
                              "--id", "curlpeer",
                              stdout = "null", stderr = "null" })
for _ = 1, 200 do
  if io.open(sock) then break end
  claw.sleep(0.01)
end
local calls = {
  { "GET", "/version" },
  { "PUT", "/machine-config", '{"vcpu_count":1,"mem_size_mib":128,"smt":false}' },
  { "PUT", "/boot-source",
    ('{"kernel_image_path":"%s","initrd_path":"%s","boot_args":"console=ttyS0"}'):format(kernel, initrd) },
  { "PUT", "/vsock", '{"guest_cid":3,"uds_path":"' .. dir .. '/v.sock"}' },
  { "PUT", "/actions", '{"action_type":"InstanceStart"}' },
}
local curl_cpu = 0
for _, c in ipairs(calls) do
  local argv = { "curl", "-sf", "--unix-socket", sock, "-X", c[1], "http://localhost" .. c[2], "-o", "/dev/null" }
  if c[3] then
    for _, a in ipairs { "-H", "Content-Type: application/json", "-d", c[3] } do argv[#argv + 1] = a end
  end
  local r = assert(proc.run(argv))
  assert(r.code == 0, c[2] .. ": curl failed")
  curl_cpu = curl_cpu + r.utime + r.stime
end
curl_cpu = curl_cpu / #calls * 10 -- per 10-call boot sequence
s:kill("KILL")
s:wait()
s:close()
proc.run { "rm", "-rf", dir }
print(("Firecracker STAND-IN boot sequence: runtime CPU %.2f ms per boot (%.0f ms wall, stand-in startup included); "
  .. "curl processes for the same 10 calls: %.2f ms CPU, ratio %.3f"):format(fc_cpu * 1000, fc_wall * 1000,
  curl_cpu * 1000, fc_cpu / curl_cpu))
