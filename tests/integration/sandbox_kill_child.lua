-- Runs in a test network namespace ("ip netns exec H clawlua this.lua JSON", with
-- CLAWLUA_STATE_DIR set): creates a sandbox with a network through clawlua.sandbox and prints
-- one JSON line per object the network module records. JSON: {id=, policy=path, resolvers=,
-- hang_at=kind}: the policy file with its upstream resolvers replaced (the test's DNS server);
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

-- (no /sys/fs/cgroup under `ip netns exec`: the runtime mounts its cgroup hierarchies in the
-- mount namespace ip gave it, so the jails get their cgroups as anywhere else)
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
  local p = assert(policy.load(plan.policy))
  p.network.resolvers = plan.resolvers
  local sb = assert(sandbox.create(p, { id = plan.id }))
  out { op = "create", info = sb:info().network }
  local r = assert(sb:exec { "sh", "-c", "echo $CI" })
  out { op = "exec", stdout = r.stdout }
  -- a duration of the spec's own, so that it finds this command and not another run's
  claw.spawn(function() sb:exec { "sleep", os.getenv("CLAWLUA_KILL_SLEEP") or "41.42" } end)
  claw.sleep(0.5)
  out { op = "running", info = sb:info().backend_info }
  out { op = "hang" }
  claw.sleep(3600)
end)
