-- clawlua.sandbox.vm (the VM backend of clawlua.sandbox), against a peer measured in the same run:
--   1. create -> first exec answered, for each way a sandbox starts (cold boot, template snapshot
--      restore, warm pool), vs a plain qemu-system-x86_64 booting the same kernel and initrd to
--      the agent's READY frame (clawlua's machine, devices and boot arguments; no jail, no QMP,
--      no exec). Goals (issue 11, TCG): <= 0.5 s from the pool or a snapshot, <= 1.2 s cold.
--      The kernel: scripts/guest-kernel's minimal one (built here when missing; minutes the first
--      time) or Debian's stock one (`stock`).
--   2. orchestration overhead per exec round trip: sandbox exec of `true` vs clawlua.vm's exec
--      of `true` on the same guest, interleaved (goal: <= 1 ms more).
--   build/bin/clawlua tests/bench/sandbox_vm.lua [rounds=3] [minimal|stock]
--   (needs root and qemu-system-x86_64)
local claw = require "clawlua"
local proc = claw.proc
local B = require "clawlua.sandbox.vm"

local ROUNDS = tonumber(arg and arg[1]) or 3
local FLAVOR = arg and arg[2] or "minimal"
assert(FLAVOR == "minimal" or FLAVOR == "stock", "usage: sandbox_vm.lua [rounds] [minimal|stock]")
local src = (os.getenv("PWD") or ".")
local build = src .. "/build"
assert(assert(proc.run { src .. "/scripts/build-guest-image", "--out", build .. "/guest", "--agent",
                         build .. "/bin/clawlua-agent", "--rootfs", "--quiet", timeout = 900,
                         stderr = "inherit" }).code == 0)
if FLAVOR == "minimal" then
  assert(assert(proc.run { src .. "/scripts/guest-kernel", "--out", build .. "/guest", "--quiet", timeout = 3600,
                           stderr = "inherit" }).code == 0)
end
local kernel = build .. (FLAVOR == "minimal" and "/guest/vmlinux-min" or "/guest/vmlinux")
local initrd = build .. "/guest/initrd.img"

local function median(t)
  local s = {}
  for i, x in ipairs(t) do s[i] = x end
  table.sort(s)
  local n = #s
  return n % 2 == 1 and s[(n + 1) // 2] or (s[n // 2] + s[n // 2 + 1]) / 2
end

local tmp = assert(proc.run { "mktemp", "-d", "/tmp/clawlua-bench.XXXXXX" }).stdout:gsub("%s+$", "")
B.configure { template_dir = tmp .. "/templates" }

-- The peer: a plain QEMU booting the same kernel and initrd to the agent's READY
-- (tests/bench/qemu_peer.lua).
local peer = dofile((debug.getinfo(1, "S").source:match("^@(.*)/") or ".") .. "/qemu_peer.lua")
local function plain_qemu()
  return peer.boot { kernel = kernel, initrd = initrd, sock = tmp .. "/agent.sock", acpi = FLAVOR == "stock" }
end

local policy = { resources = { vcpus = 1, memory_mib = 128 }, vm = { kernel_flavor = FLAVOR } }
local cold_policy = { resources = policy.resources, vm = { start = "cold", kernel_flavor = FLAVOR } }
local serial = 0

--- Starts a sandbox and runs `echo` in it: seconds to the answer, and where it came from.
local function first_exec(pol)
  serial = serial + 1
  local t0 = claw.now()
  local sb = assert(B.start { id = "bench-" .. serial, policy = pol })
  assert(assert(sb:exec { "echo", "hi" }).stdout == "hi\n")
  local dt = claw.now() - t0
  local from = sb:info().from
  sb:close()
  return dt, from
end

claw.run(function()
  -- warm the page cache and the image discovery; the first auto start makes the template
  plain_qemu()
  first_exec(policy)
  local raw, cold, snap, pool, stock = {}, {}, {}, {}, {}
  for _ = 1, ROUNDS do
    raw[#raw + 1] = plain_qemu()
    if FLAVOR == "minimal" then -- Debian's kernel in the same run, for the kernel's own share
      stock[#stock + 1] = peer.boot { kernel = build .. "/guest/vmlinux", initrd = initrd, sock = tmp .. "/agent.sock" }
    end
    local dt, from = first_exec(cold_policy)
    assert(from == "cold")
    cold[#cold + 1] = dt
    dt, from = first_exec(policy)
    assert(from == "snapshot", from)
    snap[#snap + 1] = dt
  end
  assert(B.prewarm(policy, 1, { net = false }))
  local function pool_ready()
    for _, p in ipairs(B.pools()) do
      if p.want == 1 and p.ready == 1 then return true end
    end
  end
  for _ = 1, ROUNDS do
    while not pool_ready() do claw.sleep(0.02) end
    claw.sleep(0.2) -- let the refill's restore settle before the clock starts
    local dt, from = first_exec(policy)
    assert(from == "pool", from)
    pool[#pool + 1] = dt
  end
  B.drain()
  local mr = median(raw)
  local function spread(t)
    local lo, hi = math.huge, -math.huge
    for _, x in ipairs(t) do lo, hi = math.min(lo, x), math.max(hi, x) end
    return ("%.3f-%.3f"):format(lo, hi)
  end
  print(("create -> first exec answered, %s kernel %s (TCG, median of %d [min-max]; peer: plain"
    .. " qemu-system-x86_64 booting it to agent READY %.3f s [%s]):"):format(FLAVOR, kernel, ROUNDS, mr, spread(raw)))
  for _, m in ipairs { { "cold boot", cold, 1.2 }, { "template snapshot", snap, 0.5 }, { "warm pool", pool, 0.5 } } do
    local x = median(m[2])
    print(("  %-18s %.3f s [%s]  ratio %.3f vs plain qemu  goal <= %.1f s: %s"):format(m[1], x, spread(m[2]),
      x / mr, m[3], x <= m[3] and "met" or "NOT met"))
  end
  if #stock > 0 then
    print(("  plain qemu booting Debian's stock kernel to READY, same run: %.3f s [%s]; minimal/stock %.3f")
      :format(median(stock), spread(stock), mr / median(stock)))
  end

  -- 2. exec overhead on one guest
  local sb = assert(B.start { id = "bench-exec", policy = policy })
  local v = sb._v
  local hs, vs = {}, {}
  for _ = 1, 5 do sb:exec { "true" } end
  for _ = 1, 100 do
    local t0 = claw.now()
    sb:exec { "true" }
    local t1 = claw.now()
    v:exec { "true" }
    local t2 = claw.now()
    hs[#hs + 1], vs[#vs + 1] = t1 - t0, t2 - t1
  end
  sb:close()
  local mh, mv = median(hs), median(vs)
  print(("exec `true` round trip (median of 100, interleaved): sandbox %.3f ms, clawlua.vm %.3f ms, overhead %.3f ms"
    .. " (goal <= 1 ms: %s), ratio %.3f"):format(mh * 1000, mv * 1000, (mh - mv) * 1000,
    (mh - mv) <= 0.001 and "met" or "NOT met", mh / mv))
end)
proc.run { "rm", "-rf", tmp }
