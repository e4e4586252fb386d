-- labels: root
-- timeout: 300
-- clawlua.jail: namespaces, roots, binds, devices, ids, capabilities, rlimits and cgroup limits,
-- checked from inside the jailed process; and nothing (cgroup, mount, process, fd) left after.
local claw = require "clawlua"
local H = require "helper"
local jail = claw.jail

local PROBE = os.getenv("CLAWLUA_PROBE") or "build/bin/clawlua-probe"
local BUSYBOX = "/bin/busybox"

-- Our cgroups are named clawlua-<our pid>-<n> under the parents jail.cgroup_info() reports.
local function our_cgroups()
  local info = jail.cgroup_info()
  local dirs = {}
  for _, d in pairs(info.v1) do dirs[#dirs + 1] = d end
  if info.v2 then dirs[#dirs + 1] = info.v2 end
  local found = {}
  for _, d in ipairs(dirs) do
    local out = H.sh(("ls -d '%s'/clawlua-%d-* 2>/dev/null || true"):format(d, H.pid))
    for line in out:gmatch("[^\n]+") do found[#found + 1] = line end
  end
  return found
end

-- Mounts in the host's table that a jail could have leaked: anything over our test directories,
-- the set-up directories (newroot, oldroot) or the paths jails mount on. Other work on the
-- machine may mount and unmount elsewhere while the specs run, so the whole table is no measure.
local function mounts()
  -- only this spec's directories: other specs (audit's full-disk tmpfs) may run alongside
  return H.sh("grep -E ' (/tmp/clawlua-test\\.jail\\.[^ ]*|[^ ]*/(newroot|oldroot)[^ ]*|/tmp|/dev/shm/clawlua[^ ]*) ' "
              .. "/proc/self/mountinfo || true")
end

-- Runs argv in a jail with the probe and busybox bound; returns the run result.
local function run(opts)
  local spec = {}
  local binds = { PROBE, BUSYBOX }
  for _, b in ipairs(opts.binds or {}) do binds[#binds + 1] = b end
  for k, v in pairs(opts) do spec[k] = v end
  local timeout = spec.timeout or 30
  spec.timeout = nil
  spec.binds = binds
  spec.stdout, spec.stderr = "pipe", "pipe"
  local p, err, code = jail.spawn(spec)
  if not p then return nil, err, code end
  local out = claw.spawn(function() return p.stdout:read_all() end)
  local errout = claw.spawn(function() return p.stderr:read_all() end)
  local st = p:wait(timeout)
  if not st then
    p:kill("KILL")
    st = p:wait()
  end
  st.stdout, st.stderr = out:join(), errout:join()
  st.handle = p
  p:close()
  return st
end

describe("jail.spawn", function()
  local fds, kids, nmounts
  setup(function()
    H.pid = tonumber(H.sh("echo $PPID"):match("%d+"))
    -- The first jail starts the audit's kernel source (a netlink socket that lives as long as
    -- the runtime, to read seccomp denials): start it now, so fd counts compare like with like.
    claw.audit.kernel_source()
  end)
  before_each(function() fds, kids, nmounts = H.fds(), H.children(), mounts() end)
  after_each(function()
    H.settle()
    assert.are.equal(fds, H.fds())
    assert.are.equal(kids, H.children())
    assert.are.equal(nmounts, mounts())
    assert.same({}, H.eventually(function()
      local c = our_cgroups()
      return #c == 0 and c or nil
    end, 5) or our_cgroups())
  end)

  it("runs as pid 1 with no host interfaces, files or capabilities", function()
    local r = assert(run { PROBE, "pid", hostname = "sandbox" })
    assert.are.equal(0, r.code)
    assert.are.equal("1\n", r.stdout)
    r = assert(run { BUSYBOX, "sh", "-c", PROBE .. " ifaces; hostname; ls /; " .. PROBE .. " caps" ,
                     hostname = "sandbox" })
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("lo", lines[1]) -- the only interface
    assert.are.equal("sandbox", lines[2])
    -- only what was bound or mounted: no /etc, /home, /root, /var
    -- the probe's own top-level directory (the checkout's, wherever it lives) is bound too
    local top = { "bin", "dev", "proc", PROBE:match("^/([^/]+)") }
    table.sort(top)
    assert.matches("^lo\nsandbox\n" .. table.concat(top, "\n") .. "\nUid:", r.stdout)
    assert.is_nil(r.stdout:match("\netc\n"))
    assert.matches("CapEff:%s+0000000000000000", r.stdout)
    assert.matches("CapBnd:%s+0000000000000000", r.stdout)
    assert.matches("NoNewPrivs:%s+1", r.stdout)
    local st = r.handle:status()
    assert.truthy(st.jail)
    -- /dev holds the listed devices only
    r = assert(run { BUSYBOX, "sh", "-c", "ls /dev | tr '\\n' ' '; echo x > /dev/null && echo null-ok",
                     devices = { "null" } })
    assert.are.equal("fd null shm stderr stdin stdout null-ok\n", r.stdout)
  end)

  it("enforces read-only binds and allows read-write ones", function()
    local ro, rw = H.tmpdir("jail"), H.tmpdir("jail")
    H.write_file(ro .. "/file", "host data")
    H.sh("chmod 777 " .. rw)
    local r = assert(run { BUSYBOX, "sh", "-c",
      "cat /ro/file; echo x > /ro/new 2>/dev/null; echo ro=$?; echo jailed > /rw/out; echo rw=$?; " ..
      "echo y > /newfile 2>/dev/null; echo root=$?",
      binds = { { src = ro, dst = "/ro" }, { src = rw, dst = "/rw", rw = true } } })
    assert.are.equal("host data" .. "ro=1\nrw=0\nroot=1\n", r.stdout)
    assert.are.equal("jailed\n", H.read_file(rw .. "/out"))
    assert.is_nil(io.open(ro .. "/new"))
    H.rm_rf(ro)
    H.rm_rf(rw)
  end)

  it("uses a directory as the root", function()
    local root = H.tmpdir("jail")
    H.sh(("mkdir -p %s/bin %s/data %s/dev %s/proc && cp %s %s/bin/busybox && echo in-root > %s/data/f")
      :format(root, root, root, root, BUSYBOX, root, root))
    local r = assert(jail.spawn { "/bin/busybox", "cat", "/data/f", root = root, stdout = "pipe" })
    assert.are.equal("in-root\n", r.stdout:read_all())
    assert.are.equal(0, r:wait().code)
    r:close()
    -- a root without the mount points asked for: a clear error, nothing created in it
    H.sh("rmdir " .. root .. "/proc")
    local p, err = jail.spawn { "/bin/busybox", "true", root = root }
    assert.is_nil(p)
    assert.matches("has no directory /proc to mount on", err)
    H.rm_rf(root)
  end)

  it("is killed by the memory limit and reports it as an OOM kill", function()
    local r = assert(run { PROBE, "alloc", "256", cgroup = { memory = "32M" } })
    assert.are.equal("SIGKILL", r.signal_name)
    assert.is_true(r.oom_killed)
    assert.is_true(r.cgroup.oom_kills >= 1)
    assert.is_true(r.cgroup.memory_peak <= 32 * 1024 * 1024)
    -- under the limit: no OOM
    r = assert(run { PROBE, "alloc", "4", cgroup = { memory = "32M" } })
    assert.are.equal(0, r.code)
    assert.is_false(r.oom_killed)
  end)

  it("cannot fork past the pids limit", function()
    local r = assert(run { PROBE, "fork", "20", cgroup = { pids = 5 } })
    local made, err = r.stdout:match("forked (%d+) errno (%d+)")
    assert.are.equal("4", made) -- the probe itself is the fifth
    assert.are.equal("11", err) -- EAGAIN
    assert.is_true(r.cgroup.pids_denied >= 1)
  end)

  it("limits cpu time with a cpu quota", function()
    local r = assert(run { BUSYBOX, "sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
                           cgroup = { cpu = 0.1 } })
    assert.are.equal(0, r.code)
    -- 10 % of a CPU: wall time is several times the CPU time used
    assert.is_true(r.duration > 3 * (r.utime + r.stime),
      ("duration %.2f cpu %.2f"):format(r.duration, r.utime + r.stime))
  end)

  it("keeps exactly the listed capabilities, as root or as another uid", function()
    local r = assert(run { PROBE, "caps", caps = { "net_bind_service", "CAP_KILL" } })
    -- bits 10 and 5
    assert.matches("CapEff:%s+0000000000000420", r.stdout)
    assert.matches("CapBnd:%s+0000000000000420", r.stdout)
    r = assert(run { PROBE, "caps", caps = { "net_bind_service" }, uid = 1000, gid = 1000,
                     namespaces = { user = false } })
    assert.matches("Uid:%s+1000%s+1000", r.stdout)
    assert.matches("CapEff:%s+0000000000000400", r.stdout)
    assert.matches("CapAmb:%s+0000000000000400", r.stdout)
    -- a user namespace maps the jail's uid 0 to a host uid of our choice
    r = assert(run { BUSYBOX, "sh", "-c", "cat /proc/self/uid_map", uid_map = { { 0, 100000, 1 } },
                     gid_map = { { 0, 100000, 1 } } })
    assert.matches("^%s*0%s+100000%s+1", r.stdout)
  end)

  it("applies rlimits", function()
    local r = assert(run { BUSYBOX, "sh", "-c", "ulimit -u; ulimit -S -c; ulimit -H -c",
                           rlimits = { nproc = 77, core = { 0, 1048576 } } })
    assert.are.equal("77\n0\n2048\n", r.stdout) -- core in 512-byte blocks
  end)

  it("applies the seccomp filter last", function()
    if not claw.seccomp.available then
      return pending("seccomp(2) is not available here (valgrind does not emulate it)")
    end
    local f = claw.seccomp.filter { default = "allow", rules = {
      { syscall = "socket", action = { errno = 1 }, args = { { 0, "==", 2 } } } } }
    local r = assert(run { BUSYBOX, "sh", "-c", PROBE .. " socket inet; " .. PROBE .. " socket unix",
                           seccomp = f })
    assert.are.equal("errno 1\nok\n", r.stdout)
    -- under Docker's profile inside a jail
    local docker = assert(claw.seccomp.load_oci(H.spec("seccomp/docker-default.json")))
    r = assert(run { BUSYBOX, "sh", "-c", "echo a b c | " .. BUSYBOX .. " wc -w; " .. PROBE .. " unshare",
                     seccomp = docker })
    assert.are.equal("3\nerrno 1\n", r.stdout)
  end)

  it("joins an existing network namespace", function()
    local ns = "clawlua-test-" .. H.pid
    H.sh(("ip netns add %s && ip -n %s link add cltest0 type veth peer name cltest1"):format(ns, ns))
    local ok, err = pcall(function()
      local r = assert(run { PROBE, "ifaces", net = "/run/netns/" .. ns })
      assert.matches("cltest0", r.stdout)
      r = assert(run { PROBE, "ifaces", net = "host", namespaces = { user = false } })
      assert.is_nil(r.stdout:match("cltest0"))
    end)
    H.sh("ip netns del " .. ns)
    assert(ok, err)
  end)

  it("uses cgroup v2 when asked, and says which controllers it lacks", function()
    local info = jail.cgroup_info()
    if not info.v2 then return pending("no cgroup2 hierarchy mounted") end
    local p = assert(jail.spawn { BUSYBOX, "sleep", "5", binds = { BUSYBOX }, cgroup = { version = 2 } })
    assert.are.equal(2, p.jail.cgroup_version)
    local cg = p.jail.cgroups[1]
    assert.matches("^" .. info.v2:gsub("%p", "%%%0") .. "/clawlua%-", cg)
    assert.matches(tostring(p:pid()), H.read_file(cg .. "/cgroup.procs"))
    p:close() -- killed through cgroup.kill; the cgroup goes
    local missing
    for c in ("memory pids cpu"):gmatch("%a+") do
      if not (" " .. (info.v2_controllers or "") .. " "):find(" " .. c .. " ") then missing = c end
    end
    if missing then
      local limits = { memory = "32M", pids = 10, cpu = 0.5 }
      local q, err = jail.spawn { BUSYBOX, "true", binds = { BUSYBOX },
                                  cgroup = { version = 2, [missing] = limits[missing] } }
      assert.is_nil(q)
      assert.matches("cgroup v2 at .* has no '" .. missing .. "' controller %(available: ", err)
    end
  end)

  it("kills what a child leaves behind and removes its cgroups on close", function()
    -- no pid namespace: a background process outlives the child, the cgroup catches it
    local p = assert(jail.spawn { BUSYBOX, "sh", "-c", BUSYBOX .. " sleep 30 </dev/null >/dev/null 2>&1 & echo $!",
                                   binds = { BUSYBOX }, namespaces = { pid = false }, proc = false,
                                   cgroup = { pids = 10 }, stdout = "pipe" })
    local straggler = tonumber(p.stdout:read_line())
    assert.is_truthy(straggler)
    assert.are.equal(0, p:wait().code)
    p:close()
    assert.is_true(H.eventually(function()
      local f = io.open("/proc/" .. straggler .. "/stat")
      local alive = f and not f:read("a"):match("^%d+ %b() Z")
      if f then f:close() end
      return not alive
    end, 5), "the background process survived its jail")
    -- and a running jail closed early
    p = assert(jail.spawn { BUSYBOX, "sleep", "30", binds = { BUSYBOX }, cgroup = { memory = "64M" } })
    p:close()
  end)

  it("rejects bad input with clear errors and leaves nothing behind", function()
    local function raises(spec, pat)
      local ok, e = pcall(jail.spawn, spec)
      assert.is_false(ok)
      assert.matches(pat, e)
    end
    raises({ BUSYBOX, "true", binds = { "/usr", "/usr" } },
           "bad field 'binds%[2%]' %('/usr' overlaps an earlier mount at '/usr'%)")
    raises({ BUSYBOX, "true", binds = { "/usr/lib", "/usr" } }, "overlaps an earlier mount at '/usr/lib'")
    raises({ BUSYBOX, "true", binds = { "relative/path" } }, "bad field 'binds%[1%]'")
    raises({ BUSYBOX, "true", cgroup = { memory = 1000 } }, "bad field 'cgroup%.memory' %(1 MiB")
    raises({ BUSYBOX, "true", cgroup = { pids = 0 } }, "bad field 'cgroup%.pids'")
    raises({ BUSYBOX, "true", cgroup = { cpu = -1 } }, "bad field 'cgroup%.cpu'")
    raises({ BUSYBOX, "true", cgroup = { swap = 1 } }, "bad field 'cgroup.swap' %(unknown field%)")
    raises({ BUSYBOX, "true", caps = { "cap_fly" } }, "bad field 'caps%[1%]' %(unknown capability 'cap_fly'%)")
    raises({ BUSYBOX, "true", rlimits = { bogus = 1 } }, "bad field 'rlimits%.bogus'")
    raises({ BUSYBOX, "true", rlimits = { nofile = { 10, 5 } } }, "soft <= hard")
    raises({ BUSYBOX, "true", namespaces = { time = true } }, "bad field 'namespaces.time' %(unknown field%)")
    raises({ BUSYBOX, "true", uid = -5 }, "bad field 'uid'")
    raises({ BUSYBOX, "true", devices = { "no-such-device" } }, "bad field 'devices%[1%]'")
    raises({ BUSYBOX, "true", namespaces = { mount = false }, binds = { "/usr" } }, "needs the mount namespace")
    raises({ BUSYBOX, "true", seccomp = "strict" }, "bad field 'seccomp'")
    raises({ BUSYBOX, "true", net = "bogus" }, "bad field 'net'")
    raises({ BUSYBOX, "true", root = "/", symlinks = { ["/x"] = "y" } }, "bad field 'symlinks' %(not with root=")
    -- a namespace to join is opened after every check, so a later error leaks no fd
    raises({ BUSYBOX, "true", net = "/proc/self/ns/net", caps = { "nope" } }, "unknown capability")
    local p, err = jail.spawn { BUSYBOX, "true", root = "/nonexistent/root" }
    assert.is_nil(p)
    assert.matches("root /nonexistent/root: No such file or directory", err)
    p, err = jail.spawn { BUSYBOX, "true", binds = { "/nonexistent/src" }, cgroup = { memory = "64M" } }
    assert.is_nil(p)
    assert.matches("bind source /nonexistent/src: No such file or directory", err)
    p, err = jail.spawn { "/no/such/program", cgroup = { pids = 10 } }
    assert.is_nil(p)
    assert.matches("exec: No such file or directory", err)
    assert.same({}, our_cgroups()) -- released at once, not when the handle is collected
  end)

  it("cleans up after a running jail whose handle is dropped", function()
    do
      local p = assert(jail.spawn { BUSYBOX, "sleep", "30", binds = { BUSYBOX }, cgroup = { pids = 8 } })
      assert.are.equal(1, #our_cgroups())
      assert.is_true(p:running())
    end
    collectgarbage()
    collectgarbage()
    assert.same({}, H.eventually(function() return #our_cgroups() == 0 and {} or nil end, 5) or our_cgroups())
  end)

  it("supervises a jailed process's notified syscalls", function()
    if not claw.seccomp.available then
      return pending("seccomp(2) is not available here (valgrind does not emulate it)")
    end
    local seen
    local f = claw.seccomp.filter { default = "allow", rules = { { syscall = "mkdir", action = "notify" } },
      handler = function(ev) seen = ev return ev.path == "/scratch/ok" and "allow" or "deny" end }
    -- (not /tmp: the checkout, whose probe is bound into the jail, may live under it)
    local r = assert(run { BUSYBOX, "sh", "-c", PROBE .. " mkdir /scratch/ok; " .. PROBE .. " mkdir /scratch/no",
                           tmpfs = { "/scratch" }, seccomp = f, id = "notify-jail" })
    assert.are.equal("ok\nerrno 1\n", r.stdout)
    assert.are.equal("/scratch/no", seen.path) -- read from the jailed process, as it sees it
    local denies = claw.audit.events { kind = "seccomp.deny", sandbox = "notify-jail" }
    assert.are.equal(1, #denies)
    assert.are.equal(1, r.handle.seccomp:stats().allowed)
  end)

  it("records jail.spawn and jail.exit audit events", function()
    local r = assert(run { PROBE, "pid", id = "audit-test-jail" })
    local spawns = claw.audit.events { kind = "jail.spawn", sandbox = "audit-test-jail" }
    local exits = claw.audit.events { kind = "jail.exit", sandbox = "audit-test-jail" }
    assert.are.equal(1, #spawns)
    assert.are.equal(1, #exits)
    assert.are.equal(r.pid, spawns[1].pid)
  end)
end)
