-- Run inside the cgroup v2 guest by cgroup2_guest.sh: jail limits on cgroup v2 with every
-- controller available. Prints "GUEST <name> <json>" lines that tests/lua/jail_v2_spec.lua reads.
-- With the argument "private" (run in a mount namespace of its own whose /sys has no cgroup2
-- mounted, as under `ip netns exec`): the runtime's own cgroup2 mount, and one limit through it;
-- its lines are named private_<name>.
local claw = require "clawlua"
local json = claw.json

local function run(opts)
  local p = assert(claw.jail.spawn(opts))
  local out = p.stdout and p.stdout:read_all() or ""
  local st = p:wait(60)
  st.stdout = out
  st.version = p.jail.cgroup_version
  st.cgroups = p.jail.cgroups
  p:close()
  return st
end

local probe = "/bin/clawlua-probe"
local base = { binds = { probe }, stdout = "pipe", namespaces = { user = false } }
local function with(t)
  local o = { }
  for k, v in pairs(base) do o[k] = v end
  for k, v in pairs(t) do o[k] = v end
  return o
end

local function left_dirs()
  local left = {}
  for name in io.popen("ls /sys/fs/cgroup"):lines() do
    if name:match("^clawlua%-") then left[#left + 1] = name end
  end
  return left
end

if arg[1] == "private" then
  local before = {}
  for l in io.lines("/proc/self/mountinfo") do
    if l:find("/sys/fs/cgroup", 1, true) then before[#before + 1] = l end
  end
  print("GUEST private_before " .. json.encode(before))
  print("GUEST private_info " .. json.encode(claw.jail.cgroup_info()))
  print("GUEST private_oom " .. json.encode(run(with { probe, "alloc", "256", cgroup = { memory = "32M" } })))
  print("GUEST private_left " .. json.encode(left_dirs()))
  return
end

print("GUEST info " .. json.encode(claw.jail.cgroup_info()))
print("GUEST oom " .. json.encode(run(with { probe, "alloc", "256", cgroup = { memory = "32M" } })))
print("GUEST fine " .. json.encode(run(with { probe, "alloc", "4", cgroup = { memory = "32M" } })))
print("GUEST pids " .. json.encode(run(with { probe, "fork", "20", cgroup = { pids = 5 } })))
print("GUEST cpu " .. json.encode(run(with { probe, "getpid", "1000000", cgroup = { cpu = 0.2 } })))
print("GUEST userns " .. json.encode(run { probe, "alloc", "256", binds = { probe }, cgroup = { memory = "32M" } }))
-- nothing left
print("GUEST left " .. json.encode(left_dirs()))
