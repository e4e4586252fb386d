-- labels: root netns slow
-- timeout: 1200
-- kill -9 of a runtime mid-create and mid-exec of a sandbox with a network, then `clawlua
-- cleanup`: the namespace the runtime ran in (a test namespace: `ip netns exec`, as in
-- sandbox_net_spec) has the same links, addresses, routes and nft ruleset as before, `ip netns
-- list` is the same, and no cgroup, mount, process or state dir of the runtime is left.
local claw = require "clawlua"
local json = require "clawlua.json"
local H = require "helper"
local N = require "netns"

local available, why = N.available()
local W = require "sbnet"

describe("kill -9 mid-create and mid-exec, then clawlua cleanup", function()
  if not available then
    pending("sandbox_kill tests skipped: " .. why)
    return
  end
  local w, base
  setup(function()
    w = W.make()
    base = H.tmpdir("sbkill")
    -- the uplink's IPv6 link-local address settles (DAD) before anything is compared
    assert(H.eventually(function()
      return not H.sh("ip -n " .. w.host .. " addr show"):find("tentative", 1, true)
    end, 10), "duplicate address detection did not finish")
  end)
  teardown(function()
    if w then W.destroy(w) end
    H.rm_rf(base)
    assert.are.same({}, N.leftovers(W.prefix))
  end)

  local function sh(c) return (H.sh(c, { may_fail = true })) end
  -- The host and stock runs of this spec (and other specs) run side by side: what is compared is
  -- this run's own (its namespaces, its sleep), never the whole host's list.
  local SLEEP = ("41.%d"):format(1000 + tonumber(N.pid) % 9000)

  -- Everything of the host (namespace) a sandbox could leave. pid: the killed runtime's.
  local function host_state(pid)
    local info = claw.jail.cgroup_info()
    local cg = {}
    for _, d in pairs(info.v1 or {}) do cg[#cg + 1] = d end
    if info.v2 then cg[#cg + 1] = info.v2 end
    local cgroups = {}
    for _, d in ipairs(cg) do
      cgroups[#cgroups + 1] = sh(("ls -d '%s'/clawlua-%d-* 2>/dev/null || true"):format(d, pid or 0))
    end
    local ns = "ip netns exec " .. w.host .. " "
    return {
      links = sh("ip -n " .. w.host .. " -o link show | sed 's/^[0-9]*: //; s/ state.*//'"),
      addrs = sh("ip -n " .. w.host .. " -o addr show"),
      routes = sh("ip -n " .. w.host .. " route show table all"),
      ruleset = sh(ns .. "nft list ruleset"),
      netns = sh("ip netns list | grep '^" .. W.prefix .. "' || true"),
      cgroups = table.concat(cgroups),
      mounts = sh("grep -E ' (" .. base .. "[^ ]*|[^ ]*/(newroot|oldroot)[^ ]*|/run/netns/clw-[^ ]*) ' "
        .. "/proc/self/mountinfo || true"),
      procs = sh("pgrep -f '^sleep " .. SLEEP .. "$' || true")
        .. (pid and sh("ps -o pid= -p " .. pid .. " || true") or ""),
      sandboxes = sh("ls -A " .. base .. "/sandboxes 2>/dev/null | grep -v '^\\.spare' || true"),
      -- a dead runtime's spare state dirs too (its own pid in their names)
      spares = sh("ls -A " .. base .. "/sandboxes 2>/dev/null | grep '^\\.spare-" .. (pid or 0) .. "-' || true"),
      -- the runtime's process group (what it ran that is not in a jail's cgroup)
      group = pid and sh("pgrep -g " .. pid .. " || true") or "",
    }
  end

  local function run_child(plan)
    return W.child(w, plan, { script = "sandbox_kill_child.lua", until_op = "hang",
                              env = { CLAWLUA_STATE_DIR = base, CLAWLUA_KILL_SLEEP = SLEEP } })
  end

  local function cleanup()
    -- as the runtime ran: `ip netns exec` (a sysfs without /sys/fs/cgroup: cleanup mounts the
    -- cgroup hierarchies in its own mount namespace to reach the killed runtime's cgroups)
    return H.sh(("ip netns exec %s %s cleanup --state-dir %s"):format(w.host, H.bin, base),
      { may_fail = true })
  end

  local function check(plan, made)
    local before = host_state(nil)
    local lines, pid
    if plan.kill_at then
      lines, pid = W.child(w, plan, { script = "sandbox_kill_child.lua", killed = true,
                                      env = { CLAWLUA_STATE_DIR = base, CLAWLUA_KILL_SLEEP = SLEEP } })
    else
      lines, pid = run_child(plan)
    end
    local kinds = {}
    for _, l in ipairs(lines) do if l.op == "record" then kinds[l.kind] = true end end
    for _, k in ipairs(made) do assert.is_true(kinds[k] == true, "nothing of kind " .. k .. " recorded") end
    -- the runtime is gone and left things behind (or the test would prove nothing)
    local mid = host_state(pid)
    if not plan.kill_at then assert.are_not.same(before, mid) end
    local out, r = cleanup()
    assert.equal(0, r.code, out .. (r.stderr or ""))
    local after = host_state(pid)
    for k, v in pairs(before) do
      assert.equal(v, after[k], ("%s differs after cleanup (killed at %s)"):format(k,
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
    out, r = cleanup()
    assert.equal(0, r.code, out)
    assert.are.same(before, host_state(pid))
    return lines
  end

  local policies = H.src .. "/examples/policies/"
  local resolvers = { "203.0.113.53" }

  it("mid-create (the network half made), under examples/policies/pip-install.lua", function()
    check({ id = "sbkill-c", policy = policies .. "pip-install.lua", resolvers = resolvers, hang_at = "fw" },
      { "netns", "link", "addr", "fw" })
  end)

  it("mid-exec (a command running in the sandbox's network), under examples/policies/ci-runner.lua", function()
    local lines = check({ id = "sbkill-e", policy = policies .. "ci-runner.lua", resolvers = resolvers },
      { "netns", "link", "addr", "fw" })
    assert.equal("true\n", W.find(lines, "exec").stdout) -- the policy's env
  end)

  it("at every step of create and a first exec (the runtime SIGKILLs itself), then cleanup", function()
    local plan = { id = "sbkill-s", policy = policies .. "ci-runner.lua", resolvers = resolvers, kill_at = 0 }
    local fds = H.fds()
    local listed = W.child(w, plan, { script = "sandbox_kill_child.lua",
                                      env = { CLAWLUA_STATE_DIR = base, CLAWLUA_KILL_SLEEP = SLEEP } })
    local n = W.find(listed, "points").n
    -- the shared firewall tables a clean exit leaves (cleanup drops them only with a dead
    -- runtime's firewall objects)
    sh("ip netns exec " .. w.host .. " nft delete table inet clawlua; ip netns exec " .. w.host
      .. " nft delete table arp clawlua")
    assert.is_true(n > 20, "only " .. n .. " steps")
    local rounds = tonumber(os.getenv("CLAWLUA_FAULT_ROUNDS")) or 1
    local t0, cycles, seen = claw.now(), 0, {}
    for _ = 1, rounds do
      for k = 1, n do
        plan.kill_at = k
        local lines = check(plan, {})
        local last = lines[#lines - 1] -- the point it died at, then {op="kill"}
        assert.equal("kill", lines[#lines].op)
        assert.equal(k, last.n)
        -- the step's kind: "record netns", "run ip", "audit sandbox.create", ...
        seen[last.name:match("^%S+ [^%s/]+") or last.name] = true
        cycles = cycles + 1
      end
    end
    assert.are.same(fds, H.fds())
    local names = {}
    for name in pairs(seen) do names[#names + 1] = name end
    table.sort(names)
    io.stderr:write(("sandbox_kill: %d steps, %d kills in %.1f s; steps: %s\n")
      :format(n, cycles, claw.now() - t0, table.concat(names, " | ")))
  end)
end)
