-- Runs as `ip netns exec H clawlua this.lua JSON` (tests/lua/sandbox_netns_exec_spec.lua): `ip
-- netns exec` gave this process a mount namespace of its own with a sysfs of the network
-- namespace and no /sys/fs/cgroup. The runtime mounts its cgroup hierarchies there itself; this
-- script creates a jail sandbox with a network through namespace H, runs commands in it, checks
-- its cgroups while one runs and after, and prints one JSON line per step.
-- JSON: {id=, policy=, resolvers=, url=}
local claw = require "clawlua"
local json = require "clawlua.json"
local sandbox = require "clawlua.sandbox"
local policy = require "clawlua.policy"

local function out(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end

local plan = json.decode(arg[1])

local function cgroup_mounts()
  local lines = {}
  for l in io.lines("/proc/self/mountinfo") do
    local mp, fstype = l:match("^%S+ %S+ %S+ %S+ (%S+) .- %- (%S+)")
    if mp and mp:find("^/sys/fs/cgroup") then lines[#lines + 1] = fstype .. " " .. mp end
  end
  return lines
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

claw.run(function()
  out { op = "before", mounts = json.array(cgroup_mounts()) }
  local p = assert(policy.load(plan.policy))
  p.network.resolvers = plan.resolvers
  local sb = assert(sandbox.create(p, { id = plan.id }))
  out { op = "create", network = sb:info().network, info = claw.jail.cgroup_info(),
        mounts = json.array(cgroup_mounts()) }
  local r = assert(sb:exec { "wget", "-q", "-O", "-", plan.url, timeout = 20 })
  out { op = "wget", code = r.code, stdout = r.stdout, stderr = r.stderr }
  -- a command that runs a while: its cgroups exist and hold it
  local t = claw.spawn(function() return sb:exec { "sleep", "1" } end)
  local cgroups
  for _ = 1, 100 do
    local evs = claw.audit.events { kind = "jail.spawn" } -- the jail's own id, not the sandbox's
    cgroups = #evs > 0 and evs[#evs].detail.cgroups or nil
    if cgroups and #cgroups > 0 and exists(cgroups[1]) then break end
    claw.sleep(0.01)
  end
  local held = {}
  for _, d in ipairs(cgroups or {}) do
    local f = io.open(d .. "/cgroup.procs")
    held[#held + 1] = { dir = d, procs = f and f:read("a") or "" }
    if f then f:close() end
  end
  local r2 = t:join()
  out { op = "sleep", code = r2.code, held = json.array(held) }
  sb:destroy()
  local left = {}
  for _, d in ipairs(cgroups or {}) do
    for _ = 1, 100 do
      if not exists(d) then break end
      claw.sleep(0.02)
    end
    if exists(d) then left[#left + 1] = d end
  end
  out { op = "destroyed", left = json.array(left) }
end)
