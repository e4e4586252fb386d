-- `clawlua ps [--json] [--state-dir DIR]`: the sandboxes recorded in the state dir, of this
-- and every other runtime: id, backend, state (running, or orphaned when the owning runtime is
-- gone: `clawlua cleanup` reclaims those), policy, uptime, memory, owner pid. Memory: for a jail
-- the sum of its running execs' memory cgroups (memory.usage_in_bytes, or memory.current on
-- cgroup v2), for a VM the VMM process's resident set.
local claw = require "clawlua"
local state = require "clawlua.sandbox.state"

local M = {}

M.usage = [[clawlua ps [--json] [--state-dir DIR]

Lists the sandboxes recorded in the state dir as a table, or one JSON array with --json.
"orphaned" sandboxes belong to a runtime that is gone (reclaim them with clawlua cleanup).]]

local read = state.read_file

-- Where the memory controller is mounted: {v1 = dir, v2 = dir} (either may be nil).
local function memory_mounts()
  local m = {}
  for line in (read("/proc/self/mountinfo") or ""):gmatch("[^\n]+") do
    local mnt, fstype, opts = line:match("^%S+ %S+ %S+ %S+ (%S+) .- %- (%S+) %S+ (%S+)")
    if fstype == "cgroup" and ("," .. opts .. ","):find(",memory,", 1, true) then m.v1 = mnt end
    if fstype == "cgroup2" then m.v2 = mnt end
  end
  return m
end

-- Bytes charged to the memory cgroup pid is in, and that cgroup's file (nil when unknown).
local function cgroup_memory(pid, mounts)
  for line in (read("/proc/" .. pid .. "/cgroup") or ""):gmatch("[^\n]+") do
    local ctrls, path = line:match("^%d+:([^:]*):(.*)$")
    local file
    if ctrls and mounts.v1 and ("," .. ctrls .. ","):find(",memory,", 1, true) then
      file = mounts.v1 .. path .. "/memory.usage_in_bytes"
    elseif ctrls == "" and mounts.v2 and not mounts.v1 then
      file = mounts.v2 .. path .. "/memory.current"
    end
    local n = file and tonumber(read(file))
    if n then return n, file end
  end
  return nil
end

local function rss(pid)
  local kb = (read("/proc/" .. pid .. "/status") or ""):match("\nVmRSS:%s*(%d+) kB")
  return kb and tonumber(kb) * 1024 or nil
end

-- The memory a recorded sandbox uses now (see the header); nil when nothing of it runs.
local function memory_of(sb, mounts)
  local total, seen, any = 0, {}, false
  -- a VM sandbox records its VMM twice (pid:start, and vmm_pid): counted once, by its cgroup
  -- when it has a memory cgroup, else by its RSS
  local counted = {}
  for _, o in ipairs(sb.objects) do
    if o.kind == "pid" then
      local pid, start = o.name:match("^(%d+):(%d+)$")
      if pid and state.alive(tonumber(pid), tonumber(start)) then
        local n, file = cgroup_memory(pid, mounts)
        if n then counted[pid] = true end
        if n and not seen[file] then
          seen[file], total, any = true, total + n, true
        end
      end
    end
  end
  for _, o in ipairs(sb.objects) do
    if o.kind == "vmm_pid" and not counted[o.name] then
      local n = rss(o.name)
      if n then total, any = total + n, true end
    end
  end
  return any and total or (sb.alive and 0 or nil)
end

local function human(n)
  if not n then return "-" end
  if n < 1 << 20 then return ("%.0fK"):format(n / 1024) end
  if n < 1 << 30 then return ("%.1fM"):format(n / (1 << 20)) end
  return ("%.2fG"):format(n / (1 << 30))
end

--- The rows `clawlua ps` shows.
---@param base string|nil
---@return table[]
function M.rows(base)
  local rows, now, mounts = {}, claw.loop.time(), memory_mounts()
  for _, sb in ipairs(state.list(base)) do
    if not sb.id:match("^%.spare%-") then
      local created = tonumber(sb.meta.created)
      rows[#rows + 1] = { id = sb.id, backend = sb.meta.backend or "?", policy = sb.meta.policy or "?",
        state = sb.alive and "running" or "orphaned", owner = sb.pid,
        uptime = created and math.floor((now - created) * 10 + 0.5) / 10 or nil,
        memory = memory_of(sb, mounts), objects = #sb.objects }
    end
  end
  return rows
end

---@param args string[]
---@return integer
function M.run(args)
  local o = require("clawlua.cli.options").command("ps", M.usage, args,
    { ["--json"] = "flag", ["--state-dir"] = "value" })
  if type(o) == "number" then return o end
  local json, base = o["--json"], o["--state-dir"]
  local rows = M.rows(base)
  if json then
    io.stdout:write(claw.json.encode(claw.json.array(rows)), "\n")
    return 0
  end
  io.stdout:write(("%-24s %-7s %-9s %-16s %9s %8s %8s\n"):format("ID", "BACKEND", "STATE",
    "POLICY", "UPTIME", "MEMORY", "OWNER"))
  for _, r in ipairs(rows) do
    io.stdout:write(("%-24s %-7s %-9s %-16s %8ss %8s %8s\n"):format(r.id, r.backend, r.state,
      r.policy, r.uptime and ("%.1f"):format(r.uptime) or "?", human(r.memory),
      tostring(r.owner or "?")))
  end
  return 0
end

return M
