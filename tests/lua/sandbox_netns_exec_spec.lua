-- labels: root netns nolauncher
-- timeout: 600
-- `ip netns exec NS clawlua ...`: the runtime finds no cgroup hierarchy (ip netns exec unshares
-- the mount namespace and remounts /sys for the network namespace, without /sys/fs/cgroup),
-- mounts the ones it needs privately in that mount namespace, and a jail sandbox with a network
-- through NS works: its command fetches a page from the test "internet" (tests/lua/sbnet.lua),
-- runs in its cgroups, and afterwards no cgroup dir, mount, namespace or state dir is left; the
-- host's own cgroup mounts are the same as before. Also: where a mount would propagate, the
-- runtime refuses with a clear error and mounts nothing.
local claw = require "clawlua"
local H = require "helper"
local N = require "netns"

local available, why = N.available()
local W = require "sbnet"

local function host_cgroup_mounts()
  return H.sh("grep -E ' - cgroup2? ' /proc/self/mountinfo || true")
end

describe("jail.cgroup_mounts (what a mount namespace without cgroups gets)", function()
  local function plan(text)
    local out = {}
    for _, m in ipairs(claw.jail.cgroup_mounts(text)) do
      out[#out + 1] = m.fstype .. " " .. m.target .. (m.options ~= "" and " " .. m.options or "")
    end
    return out
  end
  it("mounts cgroup2 alone on /sys/fs/cgroup on a unified (v2) host", function()
    assert.are.same({ "cgroup2 /sys/fs/cgroup" }, plan("0::/user.slice/user-0.slice/session-1.scope\n"))
  end)
  it("mounts each v1 hierarchy with its controllers, and a hybrid host's cgroup2 on unified", function()
    assert.are.same({ "tmpfs /sys/fs/cgroup mode=755", "cgroup /sys/fs/cgroup/cpu,cpuacct cpu,cpuacct",
      "cgroup /sys/fs/cgroup/memory memory", "cgroup /sys/fs/cgroup/systemd none,name=systemd",
      "cgroup2 /sys/fs/cgroup/unified" },
      plan("3:cpu,cpuacct:/a\n2:memory:/a/b\n1:name=systemd:/a\n0::/a\n"))
    assert.are.same({ "tmpfs /sys/fs/cgroup mode=755", "cgroup /sys/fs/cgroup/pids pids" }, plan("5:pids:/\n"))
  end)
  it("mounts nothing when /proc/self/cgroup names nothing", function()
    assert.are.same({}, plan(""))
  end)
end)

describe("clawlua under ip netns exec", function()
  if not available then
    pending("sandbox_netns_exec tests skipped: " .. why)
    return
  end
  local w, base
  setup(function()
    w = W.make()
    base = H.tmpdir("netnsexec")
  end)
  teardown(function()
    if w then W.destroy(w) end
    H.rm_rf(base)
    assert.are.same({}, N.leftovers(W.prefix))
  end)

  it("mounts its cgroups privately and runs a networked jail sandbox, leaving nothing", function()
    local mounts_before = host_cgroup_mounts()
    H.write_file(base .. "/policy.lua", [[
return { backend = "jail", resources = { memory_mib = 64, pids = 32 },
  network = { egress = "deny", allow = { "allowed.test:80" }, resolvers = { "203.0.113.53" } } }]])
    local lines, pid = W.child(w, { id = "netnsexec-1", policy = base .. "/policy.lua",
      resolvers = { "203.0.113.53" }, url = "http://allowed.test/hello.txt" },
      { script = "netns_exec_child.lua", env = { CLAWLUA_STATE_DIR = base .. "/state" } })
    -- the child saw no cgroup hierarchy at first, then the ones it mounted (v1 here, and the
    -- unified cgroup2 of a hybrid host), in its own mount namespace only
    assert.are.same({}, W.find(lines, "before").mounts)
    local created = W.find(lines, "create")
    assert.are.equal("private", created.info.mounted)
    assert.truthy(created.info.v1.memory or created.info.v2, "no cgroup hierarchy in use")
    local planned = {}
    for _, m in ipairs(claw.jail.cgroup_mounts()) do planned[#planned + 1] = m.fstype .. " " .. m.target end
    assert.are.same(planned, created.mounts)
    -- the network through NS: the name resolved by the sandbox's forwarder, the page fetched
    local wget = W.find(lines, "wget")
    assert.are.equal(0, wget.code, wget.stderr)
    assert.are.equal("hello-from-inet\n", wget.stdout)
    assert.is_true(W.queried(w, "allowed.test"))
    -- the running command sat in its cgroups (memory and pids limits of the policy)
    local sleep = W.find(lines, "sleep")
    assert.are.equal(0, sleep.code)
    assert.is_true(#sleep.held >= 2, "cgroups: " .. claw.json.encode(sleep.held))
    for _, h in ipairs(sleep.held) do
      assert.matches("/clawlua%-" .. pid .. "%-%d+$", h.dir)
      assert.matches("%d", h.procs, "no process in " .. h.dir)
    end
    assert.are.same({}, W.find(lines, "destroyed").left)
    -- nothing left on the host: cgroup dirs (seen through the host's own mounts), the host's
    -- cgroup mount table, sandbox namespaces, state dirs
    assert.are.same({}, H.cgroups_of(pid))
    assert.are.equal(mounts_before, host_cgroup_mounts())
    assert.truthy(created.network.netns)
    assert.is_nil(H.sh("ip netns list"):find(created.network.netns, 1, true), "netns left")
    assert.are.equal("", H.sh("ls -A " .. base .. "/state/sandboxes 2>/dev/null | grep -v '^\\.spare' || true"))
  end)

  it("gives runtimes creating networked sandboxes at the same moment distinct subnets", function()
    -- four runtimes, a pool of exactly four /30s, one run dir (subnet registry and lock): without
    -- the lock they read the same routes and pick at random, so most runs would collide
    local N_RT, t0 = 4, claw.time()
    local rundir = base .. "/race-net"
    local tasks = {}
    for i = 1, N_RT do
      tasks[i] = claw.spawn(function()
        return W.child(w, { id = "race-" .. i, pool = "10.213.7.0/28", rundir = rundir,
          start_at = t0 + 1.5, hold_until = t0 + 6 },
          { script = "subnet_race_child.lua", env = { CLAWLUA_STATE_DIR = base .. "/race-state" } })
      end)
    end
    local seen, pids, netns = {}, {}, {}
    for i = 1, N_RT do
      local lines, pid = tasks[i]:join()
      pids[i] = pid
      local c = W.find(lines, "create")
      assert.is_nil(c.err)
      assert.are.equal(0, c.code)
      assert.matches("inet " .. c.address:gsub("%.", "%%.") .. "/30", c.inside)
      local subnet = c.address:gsub("%d+$", function(d) return tostring(tonumber(d) & ~3) end)
      assert.is_nil(seen[subnet], "two runtimes got " .. subnet)
      seen[subnet] = true
      assert.truthy(W.find(lines, "destroyed"))
      netns[#netns + 1] = c.netns
    end
    -- everything released: the registry is empty, no namespace, cgroup or state dir is left
    assert.are.equal("", H.read_file(rundir .. "/subnets"))
    local names = H.sh("ip netns list")
    for _, ns in ipairs(netns) do assert.is_nil(names:find(ns, 1, true), "netns " .. ns .. " left") end
    for _, pid in ipairs(pids) do assert.are.same({}, H.cgroups_of(pid)) end
    assert.are.equal("", H.sh("ls -A " .. base .. "/race-state/sandboxes 2>/dev/null | grep -v '^\\.spare' || true"))
  end)

  it("refuses to mount where the mount would propagate, and says why", function()
    -- a mount namespace of its own whose fresh /sys is made shared (its peer group has no
    -- member outside this namespace, so the test itself propagates nothing to the host)
    local mounts_before = host_cgroup_mounts()
    H.write_file(base .. "/refuse.lua", [=[
local c = require "clawlua"
local p, err = c.jail.spawn { "/bin/true", binds = { "/usr" }, cgroup = { pids = 8 },
  symlinks = { ["/bin"] = "usr/bin", ["/lib"] = "usr/lib", ["/lib64"] = "usr/lib64" } }
print(p, err)
for l in io.lines("/proc/self/mountinfo") do
  if l:find("/sys/fs/cgroup", 1, true) then print("MOUNTED", l) end
end]=])
    local out, r = H.sh(("unshare --mount --propagation private sh -c 'umount -l /sys && "
      .. "mount -t sysfs sysfs /sys && mount --make-shared /sys && exec %s %s/refuse.lua'")
      :format(H.bin, base), { may_fail = true })
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("nil\tspawn /bin/true: cgroup: no cgroup hierarchy is mounted here, and the mount holding "
      .. "/sys/fs/cgroup is shared", out, 1, true)
    assert.is_nil(out:find("MOUNTED", 1, true), out)
    assert.are.equal(mounts_before, host_cgroup_mounts())
  end)
end)
