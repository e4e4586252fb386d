-- labels: root vm slow
-- timeout: 900
-- clawlua.jail's cgroup v2 limits on a real kernel whose memory, pids and cpu controllers are in
-- cgroup v2 (this host binds them to v1): Debian's kernel booted under QEMU with only cgroup2
-- mounted runs tests/integration/cgroup2_guest.lua with this build's clawlua.
local claw = require "clawlua"
local H = require "helper"

describe("jail cgroup v2 limits (in a guest kernel)", function()
  it("enforces and reports memory.max, pids.max and cpu.max, and removes the cgroups", function()
    local build = H.bin:match("^(.*)/bin/[^/]+$") or "build"
    local r = assert(claw.proc.run { "bash", H.src .. "/tests/integration/cgroup2_guest.sh", build,
                                     build .. "/cgroup2-guest", timeout = 800 })
    if r.code == 77 then return pending("cgroup v2 guest not possible here: " .. r.stdout) end
    local res = {}
    for name, doc in r.stdout:gmatch("GUEST ([%a_]+) (%b{})") do res[name] = claw.json.decode(doc) end
    for name, doc in r.stdout:gmatch("GUEST ([%a_]+) (%b[])") do res[name] = claw.json.decode(doc) end
    assert.truthy(res.left, "the guest did not finish:\n" .. r.stdout:sub(-3000) .. r.stderr)
    assert.are.equal(2, res.oom.version)
    assert.is_true(res.oom.oom_killed)
    assert.are.equal("SIGKILL", res.oom.signal_name)
    assert.is_true(res.oom.cgroup.memory_peak <= 32 * 1024 * 1024)
    assert.are.equal(0, res.fine.code)
    assert.is_false(res.fine.oom_killed)
    assert.are.equal("forked 4 errno 11\n", res.pids.stdout)
    assert.is_true(res.pids.cgroup.pids_denied >= 1)
    -- 20 % of a CPU: at least 3x more wall time than CPU time
    assert.is_true(res.cpu.duration > 3 * res.cpu.cgroup.cpu_usec / 1e6,
      ("duration %.2f s, cpu %.2f s"):format(res.cpu.duration, res.cpu.cgroup.cpu_usec / 1e6))
    assert.is_true(res.userns.oom_killed) -- the same with a user namespace
    assert.same({}, res.left)
    -- as under `ip netns exec` (a mount namespace of its own, a sysfs without cgroup2): the
    -- runtime mounted cgroup2 on /sys/fs/cgroup itself, and the limit held through it
    assert.truthy(res.private_left, "the private run did not finish:\n" .. r.stdout:sub(-3000))
    assert.same({}, res.private_before)
    assert.are.equal("private", res.private_info.mounted)
    assert.are.equal("/sys/fs/cgroup", res.private_info.v2)
    assert.are.equal(2, res.private_oom.version)
    assert.is_true(res.private_oom.oom_killed)
    assert.same({}, res.private_left)
  end)
end)
