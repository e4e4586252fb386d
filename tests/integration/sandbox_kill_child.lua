-- Runs in a test network namespace ("ip netns exec H clawlua this.lua JSON", with
-- CLAWLUA_STATE_DIR set): creates a sandbox with a network through clawlua.sandbox and prints
-- one JSON line per object the network module records. JSON: {id=, network=, hang_at=kind}:
-- with hang_at it stops for good inside sandbox.create once an object of that kind is recorded
-- (mid-create); without, it creates the sandbox and starts a command that hangs (mid-exec). It
-- prints {op="hang"} when the test may SIGKILL it.
local claw = require "clawlua"
local json = require "clawlua.json"
local net = require "clawlua.sandbox.net"
local sandbox = require "clawlua.sandbox"
local policy = require "clawlua.policy"

local function out(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end

local plan = json.decode(arg[1])

local create = net.create
net.create = function(o)
  local record = o.record
  o.record = function(kind, name)
    record(kind, name)
    out { op = "record", kind = kind, name = name }
    if kind == plan.hang_at then
      out { op = "hang" }
      claw.sleep(3600)
    end
  end
  return create(o)
end

claw.run(function()
  local p = assert(policy.from_table({ network = plan.network }, "kill"))
  local sb = assert(sandbox.create(p, { id = plan.id }))
  out { op = "create", info = sb:info().network }
  claw.spawn(function() sb:exec { "sleep", "41.42" } end)
  claw.sleep(0.5)
  out { op = "hang" }
  claw.sleep(3600)
end)
