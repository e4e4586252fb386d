-- `clawlua ps [--json] [--state-dir DIR]`: the sandboxes recorded in the state dir, of this
-- and every other runtime: id, backend, state (running, or orphaned when the owning runtime is
-- gone: `clawlua cleanup` reclaims those), policy, uptime, owner pid.
local claw = require "clawlua"
local state = require "clawlua.sandbox.state"

local M = {}

M.usage = [[clawlua ps [--json] [--state-dir DIR]

Lists the sandboxes recorded in the state dir as a table, or one JSON array with --json.
"orphaned" sandboxes belong to a runtime that is gone (reclaim them with clawlua cleanup).]]

--- The rows `clawlua ps` shows.
---@param base string|nil
---@return table[]
function M.rows(base)
  local rows, now = {}, claw.loop.time()
  for _, sb in ipairs(state.list(base)) do
    if not sb.id:match("^%.spare%-") then
      local created = tonumber(sb.meta.created)
      rows[#rows + 1] = { id = sb.id, backend = sb.meta.backend or "?", policy = sb.meta.policy or "?",
        state = sb.alive and "running" or "orphaned", owner = sb.pid,
        uptime = created and math.floor((now - created) * 10 + 0.5) / 10 or nil,
        objects = #sb.objects }
    end
  end
  return rows
end

---@param args string[]
---@return integer
function M.run(args)
  local json, base = false, nil
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--json" then
      json = true
    elseif a == "--state-dir" and args[i + 1] then
      base = args[i + 1]
      i = i + 1
    elseif a == "-h" or a == "--help" then
      io.stdout:write("usage: ", M.usage, "\n")
      return 0
    else
      io.stderr:write(("clawlua ps: unknown argument '%s'\n"):format(a), M.usage, "\n")
      return 2
    end
    i = i + 1
  end
  local rows = M.rows(base)
  if json then
    io.stdout:write(claw.json.encode(claw.json.array(rows)), "\n")
    return 0
  end
  io.stdout:write(("%-24s %-7s %-9s %-16s %9s %8s\n"):format("ID", "BACKEND", "STATE", "POLICY",
    "UPTIME", "OWNER"))
  for _, r in ipairs(rows) do
    io.stdout:write(("%-24s %-7s %-9s %-16s %8ss %8s\n"):format(r.id, r.backend, r.state, r.policy,
      r.uptime and ("%.1f"):format(r.uptime) or "?", tostring(r.owner or "?")))
  end
  return 0
end

return M
