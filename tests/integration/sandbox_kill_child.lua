-- Runs in a test network namespace ("ip netns exec H clawlua this.lua JSON", with
-- CLAWLUA_STATE_DIR set): creates a sandbox with a network through clawlua.sandbox and prints
-- one JSON line per object the network module records. JSON: {id=, policy=path, resolvers=,
-- hang_at=kind}: the policy file with its upstream resolvers replaced (the test's DNS server);
-- with hang_at it stops for good inside sandbox.create once an object of that kind is recorded
-- (mid-create); without, it creates the sandbox and starts a command that hangs (mid-exec). It
-- prints {op="hang"} when the test may SIGKILL it.
-- With kill_at = n (sandbox_kill_spec, sandbox_vm_kill_spec) every step of create and of a first exec is a numbered
-- point, printed as {op="point", n=, name=}: before each object is recorded, each process run or
-- spawned (ip, nft, the jail), each audit event, and for a VM sandbox each vm.create/restore and
-- each method of the VM (start: the VMM spawned and booted; exec: the guest setup, the first
-- command); at point n the runtime SIGKILLs itself. With kill_at = 0 it lists them, destroys the
-- sandbox and exits 0. policy: a path, or a table for clawlua.policy.from_table (sandbox_vm_kill).
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

local points, armed = 0, false
local function die()
  armed = false
  out { op = "kill" }
  claw.proc.run { "kill", "-KILL", tostring(require("clawlua.sandbox.state").self()) }
  claw.sleep(3600) -- not reached
end
local function point(name)
  if not armed then return end
  points = points + 1
  out { op = "point", n = points, name = name }
  if points == plan.kill_at then die() end
end
-- before f runs, a point named by what it is called with
local function before(tbl, key, describe)
  local f = tbl[key]
  tbl[key] = function(...)
    point(describe(...))
    return f(...)
  end
end
if plan.kill_at then
  local state = require "clawlua.sandbox.state"
  local open = state.open
  local wrapped = false
  state.open = function(...)
    local st, err = open(...)
    if st and not wrapped then
      wrapped = true
      before(getmetatable(st), "record", function(_, kind, name) return "record " .. kind .. " " .. name end)
    end
    return st, err
  end
  before(state, "open", function(id) return "state.open " .. id end)
  local function argv(a) return table.concat(a, " ", 1, math.min(#a, 3)) end
  before(claw.proc, "run", function(a) return "run " .. argv(a) end)
  before(claw.proc, "spawn", function(a) return "spawn " .. argv(a) end)
  before(claw.jail, "spawn", function(a) return "jail.spawn " .. argv(a) end)
  before(claw.audit, "emit", function(kind) return "audit " .. kind end)
  -- the VM's own steps: its methods live in the metatable's `methods` table (one per process)
  local function wrap_methods(v)
    local methods = v and getmetatable(v).methods
    if methods and not methods.__wrapped then
      methods.__wrapped = true
      for _, m in ipairs { "start", "exec", "pause", "resume", "snapshot", "write_file", "read_file" } do
        if methods[m] then before(methods, m, function() return "vm:" .. m end) end
      end
    end
    return v
  end
  for _, f in ipairs { "create", "restore" } do
    local orig = claw.vm[f]
    claw.vm[f] = function(o)
      point("vm." .. f .. " " .. tostring(o.id))
      local v, err, code = orig(o)
      return wrap_methods(v), err, code
    end
  end
end

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

-- template_dir: where the VM backend keeps its template snapshots (sandbox_vm_kill: the test's
-- own); with fresh_templates, one of its own per kill_at (every run boots cold and makes one)
if plan.template_dir then
  local dir = plan.template_dir
  if plan.fresh_templates then dir = ("%s/%d"):format(dir, plan.kill_at or 0) end
  require("clawlua.sandbox.vm").configure { template_dir = dir }
end

claw.run(function()
  local p
  if type(plan.policy) == "table" then
    p = assert(policy.from_table(plan.policy, plan.id))
  else
    p = assert(policy.load(plan.policy))
  end
  if plan.resolvers then p.network.resolvers = plan.resolvers end
  -- prewarm = n: a pool of n VMs, full before the sandbox takes one of them
  local function pool_full()
    for _, pool in ipairs(require("clawlua.sandbox.vm").pools()) do
      if pool.ready >= plan.prewarm then return true end
    end
  end
  local function wait_pool()
    local t0 = claw.now()
    while not pool_full() do
      assert(claw.now() - t0 < 600, "the pool did not fill")
      claw.sleep(0.2)
    end
  end
  if plan.prewarm then
    assert(sandbox.prewarm(p, plan.prewarm))
    wait_pool()
  end
  armed = plan.kill_at ~= nil
  local sb = assert(sandbox.create(p, { id = plan.id }))
  out { op = "create", info = sb:info().network }
  local r = assert(sb:exec { "sh", "-c", "echo $CI" })
  out { op = "exec", stdout = r.stdout }
  if plan.kill_at then
    point("created and exec'd")
    armed = false -- destroy's steps are not counted: a clean exit leaves the shared tables
    sb:destroy()
    out { op = "points", n = points }
    return -- kill_at = 0: the points are listed
  end
  -- a duration of the spec's own, so that it finds this command and not another run's
  claw.spawn(function() sb:exec { "sleep", os.getenv("CLAWLUA_KILL_SLEEP") or "41.42" } end)
  claw.sleep(0.5)
  out { op = "running", info = sb:info().backend_info }
  if plan.prewarm then
    wait_pool() -- refilled behind the sandbox that took a VM
    local r2 = assert(claw.proc.run { "ls", "-A", require("clawlua.sandbox.state").base() .. "/sandboxes" })
    local pools = {}
    for name in r2.stdout:gmatch("pool%-[^\n]+") do pools[#pools + 1] = name end
    out { op = "pool", from = sb:info().backend_info.from, records = pools }
  end
  out { op = "hang" }
  claw.sleep(3600)
end)
