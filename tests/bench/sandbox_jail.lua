-- Sandbox (jail backend) benchmark, with bubblewrap as the peer in the same run:
--   1. create -> first exec answered: sandbox.create(default policy) + exec{"sh","-c","echo hi"}
--      against bwrap building the same root (busybox, /work and /tmp binds, /proc, /dev, new
--      user/pid/net/ipc/uts/cgroup namespaces) and running the same command;
--   2. orchestration overhead per exec round trip: sb:exec against jail.spawn with the very
--      options the sandbox uses (same root, cgroups, seccomp), the command's own time.
--   build/bin/clawlua tests/bench/sandbox_jail.lua [runs=30]
local claw = require "clawlua"
local sandbox = require "clawlua.sandbox"
local policy = require "clawlua.policy"

local RUNS = tonumber(arg and arg[1]) or 30

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

local p = policy.default()

local function create_exec(pol)
  return function()
    local t0 = claw.now()
    local sb = assert(sandbox.create(pol))
    local r = assert(sb:exec { "sh", "-c", "echo hi" })
    local dt = claw.now() - t0
    assert(r.stdout == "hi\n", r.stderr)
    sb:destroy()
    return dt
  end
end

local scratch = os.tmpname()
os.remove(scratch)
assert(os.execute("mkdir -p " .. scratch .. "/work " .. scratch .. "/tmp"))
local bb = assert(io.popen("realpath /bin/busybox")):read("l")
local bwrap = { "bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
  "--unshare-uts", "--unshare-cgroup", "--ro-bind", bb, "/bin/busybox", "--symlink", "busybox",
  "/bin/sh", "--bind", scratch .. "/work", "/work", "--bind", scratch .. "/tmp", "/tmp",
  "--proc", "/proc", "--dev", "/dev", "--chdir", "/work", "--die-with-parent",
  "/bin/sh", "-c", "echo hi" }

local function time_bwrap()
  local t0 = claw.now()
  local r = assert(claw.proc.run { argv = bwrap, stdin = "null" })
  local dt = claw.now() - t0
  assert(r.code == 0 and r.stdout == "hi\n", "bwrap failed: " .. r.stderr)
  return dt
end

local sb = assert(sandbox.create(p))
local priv_opts -- the options the sandbox's jail backend spawns with
do
  local jail = require "clawlua.sandbox.jail"
  local st = require("clawlua.sandbox.state")
  local rec = assert(st.open("bench-raw", { "work", "tmp", "etc" }))
  local h = assert(jail.start { id = "bench-raw", policy = p, state = rec })
  priv_opts = { h = h, rec = rec }
end

local function time_sb_exec()
  local t0 = claw.now()
  local r = assert(sb:exec { "sh", "-c", "echo hi" })
  local dt = claw.now() - t0
  assert(r.stdout == "hi\n")
  return dt
end

local function time_raw_spawn(no_cgroup)
  local o = {}
  for k, v in pairs(priv_opts.h.options) do o[k] = v end
  if no_cgroup then o.cgroup = nil end
  o[1], o[2], o[3] = "sh", "-c", "echo hi"
  o.env, o.cwd, o.stdin, o.stdout, o.stderr = priv_opts.h.env, "/work", "null", "pipe", "pipe"
  local t0 = claw.now()
  local proc = assert(claw.jail.spawn(o))
  local out = proc.stdout:read_all()
  proc.stderr:read_all()
  proc:wait()
  local dt = claw.now() - t0
  proc:close()
  assert(out == "hi\n")
  return dt
end

local cases = {
  { "sandbox create + first exec (default policy)", create_exec(p) },
  { "bwrap, same root and namespaces, same command", time_bwrap },
  { "sb:exec round trip in a live sandbox", time_sb_exec },
  { "jail.spawn with the sandbox's own options", function() return time_raw_spawn(false) end },
  { "jail.spawn, same options without cgroups", function() return time_raw_spawn(true) end },
}
local samples = {}
for i = 1, #cases do samples[i] = {} end
local order = {}
for i = 1, #cases do order[i] = i end
for _ = 1, RUNS do -- interleaved in a new order each round, so load drift and what one case
  for i = #order, 2, -1 do -- leaves behind (exiting namespaces) hit every case alike
    local j = math.random(i)
    order[i], order[j] = order[j], order[i]
  end
  for _, i in ipairs(order) do table.insert(samples[i], cases[i][2]()) end
end
sb:destroy()
priv_opts.h:close()
priv_opts.rec:close()
os.execute("rm -rf " .. scratch)

local ms = {}
print(("sandbox (jail) benchmark: median of %d runs"):format(RUNS))
for i, c in ipairs(cases) do
  ms[i] = median(samples[i]) * 1000
  print(("  %-50s %8.2f ms"):format(c[1], ms[i]))
end
print(("create -> first exec / bwrap = %.2f (goal <= 1.0); absolute %.2f ms (goal <= 10)")
  :format(ms[1] / ms[2], ms[1]))
print(("overhead per exec round trip = %.3f ms (goal <= 1 ms); cgroup limits cost %.2f ms of each exec")
  :format(ms[3] - ms[4], ms[4] - ms[5]))
