-- What the kill -9 specs (sandbox_kill, sandbox_vm_kill) share: a runtime child
-- (tests/integration/sandbox_kill_child.lua) in the host namespace of a tests/lua/sbnet.lua
-- world, SIGKILLed (or SIGKILLing itself at a numbered step), then `clawlua cleanup`, and the
-- host's state compared before and after.
local claw = require "clawlua"
local json = require "clawlua.json"
local H = require "helper"
local N = require "netns"
local W = require "sbnet"
local assert = require "luassert"

local K = {}

local function sh(c) return (H.sh(c, { may_fail = true })) end

--- A killer for world w (once its addresses settled) and state dir base. opts.extra(pid) adds fields to the host state
--- (what a backend could leave besides what every sandbox can). Returns
--- {host_state = fn(pid), child = fn(plan, opts), cleanup = fn(), check = fn(plan, made),
---  steps = fn(plan, made) -> n, seen, sleep = the spec's own sleep duration}.
function K.new(w, base, opts)
  opts = opts or {}
  local k = {}
  -- the uplink's IPv6 link-local address settles (DAD) before anything is compared
  assert(H.eventually(function()
    return not H.sh("ip -n " .. w.host .. " addr show"):find("tentative", 1, true)
  end, 10), "duplicate address detection did not finish")
  -- The host and stock runs of a spec (and other specs) run side by side: what is compared is
  -- this run's own (its namespaces, its sleep), never the whole host's list.
  k.sleep = N.own_sleep(41)
  local env = { CLAWLUA_STATE_DIR = base, CLAWLUA_KILL_SLEEP = k.sleep }
  for name, v in pairs(opts.env or {}) do env[name] = v end

  -- Everything of the host (namespace) a sandbox could leave. pid: the killed runtime's.
  function k.host_state(pid)
    local ns = "ip netns exec " .. w.host .. " "
    local s = {
      links = sh("ip -n " .. w.host .. " -o link show | sed 's/^[0-9]*: //; s/ state.*//'"),
      addrs = sh("ip -n " .. w.host .. " -o addr show"),
      routes = sh("ip -n " .. w.host .. " route show table all"),
      ruleset = sh(ns .. "nft list ruleset"),
      netns = sh("ip netns list | grep '^" .. W.prefix .. "' || true"),
      cgroups = table.concat(H.cgroups_of(pid or 0), "\n"),
      -- (not /run/netns/clw-*: the runtime's netns mounts live in the mount namespace that
      -- `ip netns exec` gave it, so those seen here are other specs' sandboxes, made and
      -- removed meanwhile; the recorded netns are checked by name after cleanup)
      mounts = sh("grep -E ' (" .. base .. "[^ ]*|[^ ]*/(newroot|oldroot)[^ ]*) ' "
        .. "/proc/self/mountinfo || true"),
      procs = sh("pgrep -f '^sleep " .. k.sleep .. "$' || true")
        .. (pid and sh("ps -o pid= -p " .. pid .. " || true") or ""),
      sandboxes = sh("ls -A " .. base .. "/sandboxes 2>/dev/null | grep -v '^\\.spare' || true"),
      -- a dead runtime's spare state dirs too (its own pid in their names)
      spares = sh("ls -A " .. base .. "/sandboxes 2>/dev/null | grep '^\\.spare-" .. (pid or 0) .. "-' || true"),
      -- the runtime's process group (what it ran that is not in a jail's cgroup)
      group = pid and sh("pgrep -g " .. pid .. " || true") or "",
    }
    for name, v in pairs(opts.extra and opts.extra(pid) or {}) do s[name] = v end
    return s
  end

  function k.child(plan, copts)
    copts = copts or {}
    copts.script, copts.env = "sandbox_kill_child.lua", env
    return W.child(w, plan, copts)
  end

  function k.cleanup()
    -- as the runtime ran: `ip netns exec` (a sysfs without /sys/fs/cgroup: cleanup mounts the
    -- cgroup hierarchies in its own mount namespace to reach the killed runtime's cgroups)
    return H.sh(("ip netns exec %s %s cleanup --state-dir %s"):format(w.host, H.bin, base),
      { may_fail = true })
  end

  --- Runs the child (killed at plan.kill_at, else once it hangs), cleans up, compares.
  function k.check(plan, made)
    local before = k.host_state(nil)
    local lines, pid
    if plan.kill_at then
      lines, pid = k.child(plan, { killed = true })
    else
      lines, pid = k.child(plan, { until_op = "hang" })
    end
    local kinds = {}
    for _, l in ipairs(lines) do if l.op == "record" then kinds[l.kind] = true end end
    for _, kind in ipairs(made) do assert.is_true(kinds[kind] == true, "nothing of kind " .. kind .. " recorded") end
    -- the runtime is gone and left things behind (or the test would prove nothing)
    local mid = k.host_state(pid)
    if not plan.kill_at then assert.are_not.same(before, mid) end
    local out, r = k.cleanup()
    assert.equal(0, r.code, out .. (r.stderr or ""))
    local after = k.host_state(pid)
    for name, v in pairs(before) do
      assert.equal(v, after[name], ("%s differs after cleanup (killed at %s)"):format(name,
        plan.kill_at and json.encode(lines[#lines - 1]) or "hang"))
    end
    -- the sandbox's own namespaces (named at random) are gone too
    local names = sh("ip netns list")
    for _, l in ipairs(lines) do
      if l.op == "record" and l.kind == "netns" then
        assert.is_nil(names:find(l.name, 1, true), "netns " .. l.name .. " left")
      end
    end
    -- idempotent: a second run finds nothing
    out, r = k.cleanup()
    assert.equal(0, r.code, out)
    assert.are.same(before, k.host_state(pid))
    return lines
  end

  --- Lists the numbered steps of plan (kill_at = 0: the child runs them all and exits), then
  --- kills a child at each, CLAWLUA_FAULT_ROUNDS times. Returns the step count, the kills, the
  --- sorted step kinds ("record netns", "run ip", "vm.create", ...) and the seconds taken.
  function k.steps(plan)
    plan.kill_at = 0
    local fds = H.fds()
    local n = W.find(k.child(plan), "points").n
    -- the shared firewall tables a clean exit leaves (cleanup drops them only with a dead
    -- runtime's firewall objects)
    sh("ip netns exec " .. w.host .. " nft delete table inet clawlua; ip netns exec " .. w.host
      .. " nft delete table arp clawlua")
    local rounds = tonumber(os.getenv("CLAWLUA_FAULT_ROUNDS")) or 1
    local t0, cycles, seen = claw.now(), 0, {}
    for _ = 1, rounds do
      for i = 1, n do
        plan.kill_at = i
        local lines = k.check(plan, {})
        local last = lines[#lines - 1] -- the point it died at, then {op="kill"}
        assert.equal("kill", lines[#lines].op)
        assert.equal(i, last.n)
        -- the step's kind: "record netns", "run ip", "audit sandbox.create", ...
        seen[last.name:match("^%S+ [^%s/]+") or last.name] = true
        cycles = cycles + 1
      end
    end
    assert.are.same(fds, H.fds())
    local names = {}
    for name in pairs(seen) do names[#names + 1] = name end
    table.sort(names)
    return n, cycles, names, claw.now() - t0
  end

  return k
end

return K
