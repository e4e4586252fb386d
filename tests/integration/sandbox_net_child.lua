-- Runs inside a test network namespace ("ip netns exec H clawlua this.lua JSON"): builds one
-- sandbox network with clawlua.sandbox.net and runs the steps of JSON in a jail joined to it.
-- Prints one JSON line per record/forget and per step. Steps:
--   {op="wget", url=, timeout=3}  busybox wget -q -O - URL in a jail  -> {code|signal, stdout, stderr}
--   {op="update", network=}        n:update(...)                      -> {ok, err}
--   {op="info"}                    n:info()
--   {op="sleep", seconds=}         waits
--   {op="events", kind=}           audit events of the sandbox      -> {events = {...}}
--   {op="close"}                   n:close() twice                   -> {ok, err, again}
--   {op="hang"}                    sleeps forever (the test kills the process)
--   {op="vexec", argv=, timeout=}  (with vm) a command in the guest  -> v:exec's result
-- JSON: {id=, network=, pool=, min_pin=, rundir=, vm={kernel=, initrd=}, steps={...}} or
-- {cleanup = {{kind, name}, ...}}. With `vm`, the network is of kind "vm": a QEMU guest boots
-- with its boot arguments and the network is attached to the VM's tap before it starts.
local claw = require "clawlua"
local json = require "clawlua.json"
local net = require "clawlua.sandbox.net"

local function out(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end

local plan = json.decode(arg[1])

local function jail_run(n, argv, timeout)
  local jo = n:jail_options()
  local binds = { "/usr" }
  for _, b in ipairs(jo.binds) do binds[#binds + 1] = b end
  local opts = { binds = binds, net = jo.net, stdout = "pipe", stderr = "pipe", tmpfs = { "/tmp" },
                 symlinks = { ["/bin"] = "usr/bin", ["/lib"] = "usr/lib", ["/lib64"] = "usr/lib64" } }
  for i, a in ipairs(argv) do opts[i] = a end
  local p = assert(claw.jail.spawn(opts))
  local killer = claw.spawn(function()
    claw.sleep(timeout)
    p:kill("KILL")
  end)
  local stdout = p.stdout:read_all() or ""
  local stderr = p.stderr:read_all() or ""
  local st = p:wait()
  killer:cancel()
  p:close()
  return { code = st.code, signal = st.signal_name, stdout = stdout, stderr = stderr }
end

claw.run(function()
  if plan.cleanup then
    for _, o in ipairs(plan.cleanup) do
      local ok, err = net.cleanup(o[1], o[2])
      out { op = "cleanup", kind = o[1], name = o[2], ok = ok, err = err }
    end
    return
  end
  if plan.pool then net.configure { pool = plan.pool } end
  if plan.rundir then net.configure { rundir = plan.rundir } end
  if plan.min_pin then net.configure { min_pin = plan.min_pin } end
  local n, err = net.create {
    id = plan.id, kind = plan.vm and "vm" or "jail", network = plan.network,
    record = function(kind, name) out { op = "record", kind = kind, name = name } end,
    forget = function(kind, name) out { op = "forget", kind = kind, name = name } end,
  }
  if not n then
    out { op = "create", err = err }
    return
  end
  local v
  if plan.vm then
    -- `ip netns exec` mounts a sysfs of the namespace without /sys/fs/cgroup: no cgroup limits
    -- for the VMM here (the jail's namespaces, seccomp and the rest stay)
    v = assert(claw.vm.create { kernel = plan.vm.kernel, initrd = plan.vm.initrd, acpi = plan.vm.acpi, net = true,
                                mem_mib = 128, id = plan.id, boot_args = n:vm_options().boot_args,
                                jail = { cgroup = false } })
    assert(n:attach(v.tap, { mac = v:info().mac }))
    assert(v:start())
  end
  out { op = "create", info = n:info() }
  for _, s in ipairs(plan.steps) do
    if s.op == "wget" then
      local url = s.url:gsub("{gateway}", n:info().gateway)
      local r = jail_run(n, { "/usr/bin/busybox", "wget", "-q", "-O", "-", url }, s.timeout or 3)
      r.op, r.url = "wget", s.url
      out(r)
    elseif s.op == "update" then
      local ok, uerr = pcall(n.update, n, s.network)
      out { op = "update", ok = ok and uerr == true, err = (not ok or uerr ~= true) and tostring(uerr) or nil }
    elseif s.op == "sleep" then
      claw.sleep(s.seconds)
      out { op = "sleep" }
    elseif s.op == "info" then
      out { op = "info", info = n:info() }
    elseif s.op == "events" then
      local evs = {}
      for ev in claw.audit.query { sandbox = plan.id, kind = s.kind } do evs[#evs + 1] = ev end
      out { op = "events", events = json.array(evs) }
    elseif s.op == "close" then
      if v then v:close() end
      local ok, cerr = n:close()
      out { op = "close", ok = ok, err = cerr, again = n:close() }
    elseif s.op == "vexec" then
      local argv = { timeout = s.timeout or 10 }
      for i, a in ipairs(s.argv) do argv[i] = a end
      local r, xerr = v:exec(argv)
      out { op = "vexec", argv = s.argv, result = r, err = xerr }
    elseif s.op == "hang" then
      out { op = "hang" }
      claw.sleep(3600)
    end
  end
end)
