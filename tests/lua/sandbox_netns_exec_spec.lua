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
    local netns_before = H.sh("ip netns list | grep '^clw-' || true")
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
    assert.are.equal(netns_before, H.sh("ip netns list | grep '^clw-' || true"))
    assert.are.equal("", H.sh("ls -A " .. base .. "/state/sandboxes 2>/dev/null | grep -v '^\\.spare' || true"))
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
