-- labels: root
-- timeout: 300
-- `clawlua cleanup`: a child clawlua creates sandboxes (one mid-exec) and is killed with
-- SIGKILL; cleanup reclaims every process, cgroup and directory they left, leaves a live
-- runtime's sandbox alone, never kills a process whose start time does not match its record,
-- prints what it would do with --dry-run, and is idempotent.
local claw = require "clawlua"
local H = require "helper"
local sandbox = require "clawlua.sandbox"
local state = require "clawlua.sandbox.state"

local base
-- The sleepers' duration is this run's own: the host and stock runs of this spec go side by side.
local SLEEP = require("netns").own_sleep(41)

local CHILD = [[
local claw = require "clawlua"
local sandbox = require "clawlua.sandbox"
local a = assert(sandbox.create(require("clawlua.policy").default(), { id = "child-exec" }))
local b = assert(sandbox.create(require("clawlua.policy").default(), { id = "child-idle" }))
claw.spawn(function() a:exec { "sh", "-c", "sleep SLEEP & sleep SLEEP" } end)
claw.sleep(0.3)
io.stdout:write("ready\n")
io.stdout:flush()
claw.sleep(60)
]]

local cgroups_of = H.cgroups_of

local function sleepers()
  return H.sh("pgrep -f '^sleep " .. SLEEP .. "$' || true")
end

-- Mounts a sandbox could leak: over the state dir or the jail's set-up dirs (other work on the
-- machine mounts and unmounts elsewhere meanwhile, so the whole table is no measure).
local function mounts()
  return H.sh("grep -E ' (" .. base .. "[^ ]*|[^ ]*/(newroot|oldroot)[^ ]*) ' /proc/self/mountinfo || true")
end

local function cleanup(args)
  local argv = { "cleanup", "--state-dir", base }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return H.clawlua(argv)
end

describe("clawlua cleanup", function()
  setup(function()
    base = H.tmpdir("cleanup")
    state.set_base(base)
  end)
  teardown(function()
    state.set_base(nil)
    H.settle()
    H.rm_rf(base)
  end)

  it("reclaims what a SIGKILLed runtime left, and only that", function()
    local mounts_before = mounts()
    local mine <close> = assert(sandbox.create(require("clawlua.policy").default(), { id = "live-one" }))
    local script = base .. "/child.lua"
    H.write_file(script, (CHILD:gsub("SLEEP", SLEEP)))
    local child = assert(claw.proc.spawn { H.bin, script, stdout = "pipe", stdin = "null",
      env = { CLAWLUA_STATE_DIR = base } })
    child.stdout:set_timeout(30 * H.scale)
    local cpid = child:pid()
    local line, rerr = child.stdout:read_line()
    if line ~= "ready" then
      -- seen once (CI, gc stage, not reproduced in 85 runs): the child neither said ready nor
      -- exited in 30 s. Where it and its children wait, for the next time.
      error(("the child runtime said %q (%s); its threads and children:\n%s"):format(tostring(line), tostring(rerr),
        H.sh("ps -eLo pid,ppid,lwp,stat,wchan:32,args | awk -v p=" .. cpid .. " 'NR == 1 || $1 == p || $2 == p';"
          .. " for t in /proc/" .. cpid .. "/task/*; do echo \"== $t\"; cat $t/stack; done", { may_fail = true })))
    end
    assert.truthy(#cgroups_of(cpid) > 0)
    local ps = H.clawlua { "ps", "--json", "--state-dir", base }
    assert.equal(0, ps.code, ps.stderr)
    local states = {}
    for _, row in ipairs(assert(claw.json.decode(ps.stdout))) do states[row.id] = row end
    assert.equal("running", states["child-exec"].state)
    assert.equal(cpid, states["child-exec"].owner)
    assert.equal("jail", states["child-exec"].backend)
    assert.equal("default", states["child-exec"].policy)
    assert.equal("running", states["live-one"].state)
    -- memory: the running exec's cgroup charges something; an idle jail runs nothing
    assert.is_true(states["child-exec"].memory > 0, tostring(states["child-exec"].memory))
    assert.equal(0, states["child-idle"].memory)
    assert.is_not.equal("", sleepers())
    child:kill("KILL")
    child:wait()
    child:close()
    -- what the dead runtime leaves: its state dirs and its jails' cgroups
    assert.truthy(H.eventually(function() return sleepers() == "" end, 5)) -- parent-death signal
    local left = cgroups_of(cpid)
    assert.truthy(#left > 0, "the killed runtime left no cgroup: the test would prove nothing")
    assert.truthy(io.open(base .. "/sandboxes/child-exec/owner"))
    assert.truthy(io.open(base .. "/sandboxes/child-idle/owner"))
    ps = H.clawlua { "ps", "--state-dir", base }
    -- orphaned, nothing of it runs any more: uptime, then no memory ("-")
    assert.truthy(ps.stdout:find("child%-idle%s+jail%s+orphaned%s+default%s+[%d.]+s%s+%-%s"), ps.stdout)
    assert.truthy(ps.stdout:find("MEMORY", 1, true), ps.stdout)
    assert.truthy(ps.stdout:find("live%-one%s+jail%s+running"), ps.stdout)

    -- a sandbox record whose pid runs but started at another time is not ours: never killed
    local victim = assert(claw.proc.spawn { "sleep", SLEEP, stdin = "null" })
    local fake = base .. "/sandboxes/fake"
    H.sh(("mkdir -p '%s' '%s/scratch'"):format(fake, fake))
    H.write_file(fake .. "/owner", "999999999 1\n")
    H.write_file(fake .. "/objects", ("+ pid %d:%d\n+ dir %s/scratch\n"):format(victim:pid(),
      state.start_time(victim:pid()) + 1, fake))

    -- the dead runtime's spare state dirs (made ahead for its next sandboxes) go too, and say so
    local function spares_of(pid)
      return H.sh("ls -A " .. base .. "/sandboxes | grep '^\\.spare-" .. pid .. "-' || true")
    end
    local spares = spares_of(cpid)
    assert.is_not.equal("", spares, "the killed runtime left no spare state dir: the test would prove nothing")
    local spare = base .. "/sandboxes/" .. spares:match("[^\n]+")

    local r = cleanup { "--dry-run" }
    assert.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("child-exec: would remove cgroup", 1, true), r.stdout)
    assert.truthy(r.stdout:find("would remove spare state dir " .. spare .. " (owner " .. cpid .. " gone)", 1, true),
      r.stdout)
    assert.truthy(io.open(spare .. "/owner"))
    assert.truthy(r.stdout:find("live%-one: owner %d+ is running, left alone"), r.stdout)
    assert.same(left, cgroups_of(cpid))
    assert.truthy(io.open(base .. "/sandboxes/child-exec/owner"))

    r = cleanup()
    assert.equal(0, r.code, r.stderr .. r.stdout)
    assert.truthy(r.stdout:find("reclaimed 3 sandbox%(es%)"), r.stdout)
    assert.truthy(r.stdout:find("removed spare state dir " .. spare .. " (owner " .. cpid .. " gone)", 1, true),
      r.stdout)
    assert.equal("", spares_of(cpid))
    assert.same({}, cgroups_of(cpid))
    assert.is_nil(io.open(base .. "/sandboxes/child-exec/owner"))
    assert.is_nil(io.open(base .. "/sandboxes/child-idle/owner"))
    assert.is_nil(io.open(fake .. "/owner"))
    assert.is_true(victim:running())
    victim:kill("KILL")
    victim:wait()
    victim:close()
    assert.equal("", sleepers())
    assert.equal(mounts_before, mounts())

    -- the live runtime's sandbox is intact and works
    assert.truthy(io.open(base .. "/sandboxes/live-one/owner"))
    assert.equal("ok\n", assert(mine:exec { "echo", "ok" }).stdout)

    r = cleanup()
    assert.equal(0, r.code)
    assert.truthy(r.stdout:find("reclaimed 0 sandbox%(es%), 0 object%(s%); 1 of live runtimes left alone"), r.stdout)
  end)

  it("has nothing to do after a runtime that exits without destroying its sandboxes", function()
    local dir = base .. "/exit-base"
    local script = base .. "/exit.lua"
    H.write_file(script, [[
local sandbox = require "clawlua.sandbox"
local a = assert(sandbox.create(require("clawlua.policy").default()))
assert(a:exec { "sh", "-c", "echo x > /work/f" })
local b = assert(sandbox.create(require("clawlua.policy").default()))
print(a.id, b.id)
]])
    local t0 = claw.now()
    local r = H.clawlua({ script }, { env = { CLAWLUA_STATE_DIR = dir } })
    assert.equal(0, r.code, r.stderr)
    -- the lifetime timers are daemon tasks: they do not keep the host alive for 10 minutes
    assert.is_true(claw.now() - t0 < 10 * H.scale, "exit took " .. (claw.now() - t0) .. " s")
    assert.equal("", H.sh("ls -A '" .. dir .. "/sandboxes'"))
  end)

  it("kills a recorded process of a dead owner when its start time matches", function()
    local p = assert(claw.proc.spawn { "sleep", SLEEP, stdin = "null" })
    local d = base .. "/sandboxes/dead-owner"
    H.sh(("mkdir -p '%s'"):format(d))
    H.write_file(d .. "/owner", "999999999 1\n")
    H.write_file(d .. "/objects", ("+ pid %d:%d\n"):format(p:pid(), state.start_time(p:pid())))
    local r = cleanup()
    assert.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("dead-owner: removed process " .. p:pid(), 1, true), r.stdout)
    local st = p:wait(5)
    assert.equal(9, st.signal)
    p:close()
  end)

  it("leaves the network objects of a runtime that ran in another network namespace to it", function()
    local forward = H.read_file("/proc/sys/net/ipv4/ip_forward")
    -- a namespace that is gone: its objects went with it (the host's forwarding stays as it is)
    local d = base .. "/sandboxes/other-ns-gone"
    H.sh(("mkdir -p '%s'"):format(d))
    H.write_file(d .. "/owner", "999999999 1 net:[1]\n")
    H.write_file(d .. "/objects", "+ sysctl net.ipv4.ip_forward\n+ addr lo 127.7.7.7/32\n")
    local r = cleanup()
    assert.equal(0, r.code, r.stdout .. r.stderr)
    local want = "other-ns-gone: sysctl net.ipv4.ip_forward went with its network namespace net:[1]"
    assert.truthy(r.stdout:find(want, 1, true), r.stdout)
    assert.equal(forward, H.read_file("/proc/sys/net/ipv4/ip_forward"))
    assert.is_nil(io.open(d .. "/owner"))
    -- a namespace that is still there: cleanup says where to run, and keeps the records
    local ns = "clcu" .. H.sh("echo $$"):match("%d+")
    H.sh("ip netns add " .. ns)
    local ok, err = pcall(function()
      local ino = H.sh("stat -L -c %i /run/netns/" .. ns):match("%d+")
      d = base .. "/sandboxes/other-ns-live"
      H.sh(("mkdir -p '%s'"):format(d))
      H.write_file(d .. "/owner", ("999999999 1 net:[%s]\n"):format(ino))
      H.write_file(d .. "/objects", "+ sysctl net.ipv4.ip_forward\n")
      r = cleanup()
      assert.equal(1, r.code)
      assert.truthy(r.stderr:find("nsenter --net=/run/netns/" .. ns .. " clawlua cleanup", 1, true), r.stderr)
      assert.truthy(io.open(d .. "/owner"))
      assert.equal(forward, H.read_file("/proc/sys/net/ipv4/ip_forward"))
      H.sh("rm -rf '" .. d .. "'")
    end)
    H.sh("ip netns del " .. ns)
    assert(ok, err)
  end)

  -- A dead runtime's sandbox with one object cleanup cannot reclaim: exit 1, the error, the
  -- records kept.
  local function unreclaimable(id, object, want)
    local d = base .. "/sandboxes/" .. id
    H.sh(("mkdir -p '%s'"):format(d))
    H.write_file(d .. "/owner", "999999999 1\n")
    H.write_file(d .. "/objects", "+ " .. object .. "\n")
    local r = cleanup()
    assert.equal(1, r.code)
    assert.truthy(r.stderr:find(want, 1, true), r.stderr)
    assert.truthy(io.open(d .. "/owner"))
    H.sh(("rm -rf '%s'"):format(d))
  end

  it("keeps the records it could not reclaim and exits 1", function()
    if pcall(require, "clawlua.sandbox.net") then return end -- then netns records are reclaimable
    unreclaimable("netless", "netns clawlua-spec-none",
      "netns clawlua-spec-none: clawlua.sandbox.net is not available")
  end)

  it("says so when a recorded cgroup's hierarchy is not mounted here (never 'nothing left')", function()
    unreclaimable("unmounted-cg", "cgroup /nonexistent-cgroup-root/memory/clawlua-999999999-",
      "no cgroup hierarchy is mounted over /nonexistent-cgroup-root/memory here")
  end)

  it("takes over what a live runtime failed to release", function()
    local rec = assert(state.open("unreleased"))
    H.sh("mkdir -p '" .. rec.dir .. "/left'")
    rec:record("dir", rec.dir .. "/left")
    local ok, err = rec:close()
    assert.is_nil(ok)
    assert.truthy(err:find("kept for clawlua cleanup: dir " .. rec.dir .. "/left not released", 1, true), err)
    local r = cleanup()
    assert.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("unreleased: removed dir " .. rec.dir .. "/left", 1, true), r.stdout)
    assert.is_nil(io.open(rec.dir .. "/owner"))
  end)

  it("answers --help and refuses unknown options", function()
    local r = H.clawlua { "cleanup", "--help" }
    assert.equal(0, r.code)
    assert.truthy(r.stdout:find("--dry-run", 1, true))
    r = H.clawlua { "cleanup", "--bogus" }
    assert.equal(2, r.code)
  end)
end)
