-- One of several runtimes started at once by tests/lua/sandbox_netns_exec_spec.lua ("ip netns
-- exec H clawlua this.lua JSON"): waits until the wall clock reaches start_at, creates a jail
-- sandbox with a network from a pool with room for exactly as many /30s as there are runtimes
-- (all sharing one run dir, hence one subnet registry and lock), prints the address its
-- command sees, holds the sandbox until hold_until, destroys it.
-- JSON: {id=, pool=, rundir=, start_at=, hold_until=}
local claw = require "clawlua"
local json = require "clawlua.json"
local sandbox = require "clawlua.sandbox"
local policy = require "clawlua.policy"
local net = require "clawlua.sandbox.net"

local plan = json.decode(arg[1])

local function out(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end

claw.run(function()
  -- the default NFLOG group: a group has one listener per network namespace, so all but the
  -- first of these runtimes take the next free one
  net.configure { pool = plan.pool, rundir = plan.rundir }
  local p = assert(policy.from_table({ backend = "jail", network = { egress = "deny",
    allow = { "allowed.test:80" }, resolvers = { "203.0.113.53" } } }, "race"))
  claw.sleep(math.max(0, plan.start_at - claw.time()))
  local sb, err = sandbox.create(p, { id = plan.id })
  if not sb then
    out { op = "create", err = err }
    return
  end
  local r = assert(sb:exec { "ip", "-4", "-o", "addr", "show", "dev", "eth0" })
  local info = sb:info().network
  out { op = "create", address = info.address, netns = info.netns, inside = r.stdout, code = r.code }
  claw.sleep(math.max(0, plan.hold_until - claw.time()))
  sb:destroy()
  out { op = "destroyed" }
end)
