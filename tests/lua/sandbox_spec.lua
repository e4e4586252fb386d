-- labels: root
-- timeout: 300
-- clawlua.sandbox with the jail backend: exec (stdin, env, cwd, timeout, max_output,
-- cancellation), files, list_dir, the busybox root, no network, seccomp, lifetime, pause,
-- snapshot, hooks, destroy (idempotent, partial creates), audit events carrying the sandbox
-- id, and nothing left behind: processes, fds, cgroups, mounts, state dirs.
local claw = require "clawlua"
local H = require "helper"
local policy = require "clawlua.policy"
local sandbox = require "clawlua.sandbox"
local state = require "clawlua.sandbox.state"

local base, me

local function our_cgroups() return H.cgroups_of(me) end

local function sandbox_dirs()
  local out = H.sh("ls -1 '" .. base .. "/sandboxes' 2>/dev/null || true")
  local t = {}
  for l in out:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

local function mounts()
  return H.sh("grep -F '" .. base .. "' /proc/self/mountinfo || true")
end

local function make(t, opts)
  return assert(sandbox.create(assert(policy.from_table(t or {}, "spec")), opts))
end

describe("sandbox (jail backend)", function()
  setup(function()
    base = H.tmpdir("sandbox")
    state.set_base(base)
    me = state.self()
  end)
  teardown(function()
    state.set_base(nil)
    H.settle()
    H.rm_rf(base)
  end)

  it("runs a command in a busybox root: shell, tools, /work as cwd, root inside", function()
    local sb <close> = make()
    assert.truthy(sb.id:match("^sb%-%x+$"))
    assert.equal("jail", sb.backend)
    local r = assert(sb:exec { "sh", "-c", "pwd; id -u; for t in sh ls cat wget nslookup nc; do which $t; done" })
    assert.equal(0, r.code, r.stderr)
    assert.equal("/work\n0\n/bin/sh\n/bin/ls\n/bin/cat\n/bin/wget\n/bin/nslookup\n/bin/nc\n", r.stdout)
    assert.is_false(r.timed_out)
    assert.is_false(r.truncated)
    assert.is_true(r.duration > 0)
    r = assert(sb:exec { "sh", "-c", "touch /bin/x" })
    assert.is_not.equal(0, r.code)
    assert.truthy(r.stderr:find("Read%-only"), r.stderr)
  end)

  it("passes stdin, merges env (env_clear empties it), honours cwd, reports exit codes", function()
    local sb <close> = make { env = { FROM_POLICY = "p" } }
    local r = assert(sb:exec { "cat", stdin = "data\0with nul" })
    assert.equal("data\0with nul", r.stdout)
    r = assert(sb:exec { "sh", "-c", "echo $FROM_POLICY-$X-$PATH", env = { X = "x" } })
    assert.equal("p-x-/bin:/usr/local/bin:/usr/bin\n", r.stdout)
    r = assert(sb:exec { "/bin/sh", "-c", "echo [$FROM_POLICY][$X]", env = { X = "only" }, env_clear = true })
    assert.equal("[][only]\n", r.stdout)
    r = assert(sb:exec { "sh", "-c", "pwd", cwd = "/tmp" })
    assert.equal("/tmp\n", r.stdout)
    r = assert(sb:exec { "sh", "-c", "echo out; echo err >&2; exit 7" })
    assert.same({ 7, "out\n", "err\n" }, { r.code, r.stdout, r.stderr })
    r = assert(sb:exec { "sh", "-c", "sleep 30", timeout = 0.01 })
    assert.equal(9, r.signal)
    local ok, err = pcall(sb.exec, sb, { "ls", timeout = "soon" })
    assert.is_false(ok)
    assert.truthy(err:find("bad field 'timeout' (number expected, got string)", 1, true), err)
    ok, err = pcall(sb.exec, sb, {})
    assert.is_false(ok)
    assert.truthy(err:find("bad field '1'", 1, true), err)
    local r2, err2 = sb:exec { "/no/such" }
    assert.is_nil(r2)
    assert.truthy(err2:find("No such file", 1, true), err2)
  end)

  it("kills a command at its timeout (a result, not an error) and caps output", function()
    local sb <close> = make { resources = { max_output = "64K" } }
    local t0 = claw.now()
    local r = assert(sb:exec { "sh", "-c", "echo started; sleep 30", timeout = 0.3 })
    assert.is_true(r.timed_out)
    assert.equal("started\n", r.stdout)
    assert.is_true(claw.now() - t0 < 5 * H.scale)
    r = assert(sb:exec { "sh", "-c", "yes | head -c 1000000", max_output = 1000 })
    assert.equal(1000, #r.stdout)
    assert.is_true(r.truncated)
    r = assert(sb:exec { "sh", "-c", "yes | head -c 1000000", max_output = 1 << 30 })
    assert.equal(64 * 1024, #r.stdout) -- the policy's cap wins
    assert.is_true(r.truncated)
    local chunks = {}
    r = assert(sb:exec { "sh", "-c", "echo a; echo b >&2", on_stdout = function(c) chunks[#chunks + 1] = c end })
    assert.equal("a\n", table.concat(chunks))
    assert.equal("a\n", r.stdout)
    assert.equal("b\n", r.stderr)
  end)

  it("cancelling the calling task kills the command", function()
    local sb <close> = make()
    local t = claw.spawn(function() return sb:exec { "sleep", "30" } end)
    claw.sleep(0.2)
    local t0 = claw.now()
    t:cancel()
    t:join()
    assert.is_true(claw.now() - t0 < 2 * H.scale)
    assert.equal(0, sb:info().backend_info.running)
  end)

  it("quotas across sandboxes: max_sandboxes, memory_mib, max_execs; refusals audited", function()
    collectgarbage()
    collectgarbage()
    local u = sandbox.usage()
    local seq = claw.audit.stats().last_seq or 0
    local p = assert(policy.from_table({ resources = { memory_mib = 64 },
      quota = { max_sandboxes = u.sandboxes + 2, max_execs = u.execs + 1 } }, "q"))
    local a <close> = assert(sandbox.create(p))
    local b = assert(sandbox.create(p))
    local n = u.sandboxes + 2
    local c, err, code = sandbox.create(p)
    assert.is_nil(c)
    assert.equal("EDQUOT", code)
    assert.equal(("sandbox.create: quota: %d sandboxes live (max_sandboxes = %d)"):format(n, n), err)
    assert.is_true(b:destroy())
    local c2 <close> = assert(sandbox.create(p))
    -- memory: the total over live sandboxes, this one included
    local m = sandbox.usage().memory_mib
    local big = assert(policy.from_table({ resources = { memory_mib = 300 },
      quota = { memory_mib = m + 500 } }, "big"))
    local d <close> = assert(sandbox.create(big))
    c, err, code = sandbox.create(big)
    assert.is_nil(c)
    assert.equal("EDQUOT", code)
    assert.truthy(err:find(("quota: %d MiB of memory live + 300 MiB asked > memory_mib = %d")
      :format(m + 300, m + 500), 1, true), err)
    -- concurrent execs: the second waits for nothing, it is refused while the first runs
    local t = claw.spawn(function() return a:exec { "sleep", "0.5" } end)
    claw.sleep(0.1)
    local r
    r, err, code = c2:exec { "true" }
    assert.is_nil(r)
    assert.equal("EDQUOT", code)
    assert.equal(("exec: quota: %d commands running (max_execs = %d)"):format(u.execs + 1, u.execs + 1), err)
    assert.equal(0, assert(t:join(5)).code)
    assert.equal(0, assert(c2:exec { "true" }).code)
    local evs = claw.audit.events { kind = "sandbox.quota", after_seq = seq }
    local fields = {}
    for _, ev in ipairs(evs) do fields[#fields + 1] = ev.detail.field end
    assert.same({ "max_sandboxes", "memory_mib", "max_execs" }, fields)
    a:destroy()
    c2:destroy()
    d:destroy()
    assert.same(u, sandbox.usage())
  end)

  it("policy.reload: live sandboxes from the policy take hooks and network; resources wait", function()
    local path = base .. "/reload.lua"
    H.write_file(path, "return { resources = { memory_mib = 128 } }")
    local p = assert(policy.load(path))
    local sb <close> = assert(sandbox.create(p))
    local other <close> = make()
    H.write_file(path, [[return { resources = { memory_mib = 200 },
      hooks = { on_exec = function() return false, "reloaded" end } }]])
    local r = assert(policy.reload(p))
    assert.same({ sb.id }, r.updated)
    local _, err = sb:exec { "true" }
    assert.truthy(err:find("denied by policy reload: reloaded", 1, true), err)
    assert.equal(0, assert(other:exec { "true" }).code)
    assert.equal(128, sb:info().policy.resources.memory_mib) -- new sandboxes only
    local sb2 <close> = assert(sandbox.create(p))
    assert.equal(200, sb2:info().policy.resources.memory_mib)
    -- a sandbox made without network cannot take egress live: reported and audited, kept as is
    H.write_file(path, "return { network = { egress = 'allow' } }")
    local seq = claw.audit.stats().last_seq or 0
    r = assert(policy.reload(p))
    assert.same({}, r.updated)
    local ids = { sb.id, sb2.id }
    table.sort(ids) -- reported in id order
    assert.same(ids, { r.failed[1].id, r.failed[2].id })
    assert.truthy(r.failed[1].error:find("has no network", 1, true))
    assert.equal("deny", sb:info().policy.network.egress)
    local evs = claw.audit.events { kind = "policy.reload_failed", after_seq = seq }
    assert.equal(2, #evs)
    assert.same(ids, { evs[1].sandbox, evs[2].sandbox })
  end)

  it("keeps files between execs; write_file, read_file, list_dir", function()
    local sb <close> = make()
    assert(sb:exec { "sh", "-c", "echo one > /work/a.txt; mkdir d; ln -s a.txt l; echo t > /tmp/t" })
    assert.equal("one\n", assert(sb:read_file("/work/a.txt")))
    assert.equal("t\n", assert(sb:read_file("/tmp/t")))
    assert.is_true(sb:write_file("/work/sub/dir/b.sh", "#!/bin/sh\necho run-b\n", { mode = tonumber("755", 8) }))
    local r = assert(sb:exec { "sub/dir/b.sh" })
    assert.equal("run-b\n", r.stdout)
    r = assert(sb:exec { "stat", "-c", "%a", "sub/dir/b.sh" })
    assert.equal("755\n", r.stdout)
    local big = ("0123456789"):rep(50000)
    assert.is_true(sb:write_file("/tmp/big", big))
    assert.equal(big, sb:read_file("/tmp/big"))
    local d, derr, code = sb:read_file("/tmp/big", { max = 100 })
    assert.is_nil(d)
    assert.equal("EFBIG", code, derr)
    d, derr, code = sb:read_file("/work/none")
    assert.is_nil(d)
    assert.equal("ENOENT", code)
    assert.truthy(derr:find("/work/none", 1, true))
    local ok, werr, wcode = sb:write_file("/bin/evil", "x")
    assert.is_nil(ok)
    assert.equal("EROFS", wcode, werr)
    local list = assert(sb:list_dir("/work"))
    assert.same({ { name = "a.txt", type = "file", size = 4 }, { name = "d", type = "dir", size = list[2].size },
      { name = "l", type = "link", size = 5 }, { name = "sub", type = "dir", size = list[4].size } }, list)
    local l2, lerr, lcode = sb:list_dir("/nope")
    assert.is_nil(l2)
    assert.equal("ENOENT", lcode, lerr)
    assert.is_false(pcall(sb.read_file, sb, "relative"))
  end)

  it("binds files.readonly read-only", function()
    local dir = H.tmpdir("sandbox")
    H.write_file(dir .. "/in.txt", "input\n")
    local sb <close> = make { files = { readonly = { { src = dir, dst = "/src" } } } }
    assert.equal("input\n", assert(sb:read_file("/src/in.txt")))
    local ok, _, code = sb:write_file("/src/in.txt", "changed")
    assert.is_nil(ok)
    assert.equal("EROFS", code)
    assert.equal("input\n", H.read_file(dir .. "/in.txt"))
    H.rm_rf(dir)
  end)

  it("has no network but loopback, and a seccomp filter (no unshare, no mount)", function()
    local sb <close> = make()
    local r = assert(sb:exec { "sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '" })
    assert.equal("lo\n", r.stdout)
    r = assert(sb:exec { "sh", "-c", "nc -l -p 8080 -e echo hello & sleep 0.2; nc 127.0.0.1 8080 </dev/null" })
    assert.equal("hello\n", r.stdout, r.stderr)
    r = assert(sb:exec { "unshare", "-U", "true" })
    assert.is_not.equal(0, r.code)
    assert.truthy(r.stderr:find("Operation not permitted"), r.stderr)
    local open <close> = make { seccomp = "unconfined" }
    r = assert(open:exec { "unshare", "-U", "true" })
    assert.equal(0, r.code, r.stderr)
  end)

  it("enforces memory and pids limits per exec", function()
    local sb <close> = make { resources = { memory_mib = 32, pids = 8 } }
    local r = assert(sb:exec { "sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 1 & done; wait",
      timeout = 10 })
    assert.truthy(r.stderr:find("fork") or r.stderr:find("Resource temporarily unavailable"), r.stderr)
    r = assert(sb:exec { "sh", "-c", "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo survived",
      timeout = 20 })
    assert.is_true(r.oom_killed == true or r.signal == 9, r.stdout .. r.stderr)
  end)

  it("destroys itself at the end of its lifetime, killing what runs", function()
    local sb = make { resources = { lifetime_s = 0.5 } }
    local id = sb.id
    local t = claw.spawn(function() return sb:exec { "sleep", "30" } end)
    local r = t:join(10)
    assert.truthy(r)
    assert.is_true(r.signal == 9 or r.code ~= 0)
    assert.truthy(H.eventually(function() return sb:info().state == "destroyed" end, 5))
    assert.is_nil(sandbox.get(id))
    local x, err, code = sb:exec { "true" }
    assert.is_nil(x)
    assert.equal("ESRCH", code)
    assert.truthy(err:find("is destroyed", 1, true))
    assert.equal(1, #claw.audit.events { kind = "sandbox.lifetime", sandbox = id })
  end)

  it("pauses and resumes the commands it runs", function()
    local sb <close> = make()
    local t = claw.spawn(function() return sb:exec { "sh", "-c", "sleep 0.3; echo done" } end)
    claw.sleep(0.1)
    assert.is_true(sb:pause())
    assert.equal("paused", sb:info().state)
    local r, _, code = sb:exec { "true" }
    assert.is_nil(r)
    assert.equal("EAGAIN", code)
    claw.sleep(0.6)
    assert.is_false(t:done())
    assert.is_true(sb:resume())
    r = t:join(5)
    assert.equal("done\n", r.stdout)
  end)

  it("snapshots the scratch dir and /tmp as a tarball", function()
    local dir = H.tmpdir("sandbox")
    local sb <close> = make()
    assert(sb:write_file("/work/keep.txt", "kept"))
    assert(sb:write_file("/tmp/t.txt", "tmp"))
    local snap = assert(sb:snapshot { dir = dir })
    assert.equal(dir .. "/" .. sb.id .. ".tar.gz", snap.path)
    assert.is_true(snap.bytes > 0)
    local list = H.sh("tar -tzf '" .. snap.path .. "' | sort")
    assert.truthy(list:find("work/keep.txt", 1, true), list)
    assert.truthy(list:find("tmp/t.txt", 1, true), list)
    H.rm_rf(dir)
  end)

  it("tells on_denied about a denial", function()
    local seen = {}
    local sb <close> = make { hooks = {
      on_exec = function() return false, "nothing runs" end,
      on_denied = function(hook, reason) seen[#seen + 1] = hook .. ": " .. reason end } }
    assert.is_nil(sb:exec { "true" })
    assert.same({ "on_exec: nothing runs" }, seen)
  end)

  it("asks the policy's hooks and audits a denial (created from a policy file's path)", function()
    local sb <close> = assert(sandbox.create(H.src .. "/examples/policies/untrusted-code.lua"))
    local r, err, code = sb:exec { "rm", "-rf", "/" }
    assert.is_nil(r)
    assert.equal("EPERM", code)
    assert.truthy(err:find("denied by policy untrusted-code: rm -rf /", 1, true), err)
    local evs = claw.audit.events { kind = "policy.deny", sandbox = sb.id }
    assert.equal(1, #evs)
  end)

  it("read-only-analysis.lua: /usr's tools run, writes through the API are refused", function()
    local sb <close> = assert(sandbox.create(H.src .. "/examples/policies/read-only-analysis.lua"))
    local r = assert(sb:exec { "/usr/bin/env", "sh", "-c", "ls /usr/bin | grep -c . ; echo x > /work/own" })
    assert.equal(0, r.code, r.stderr)
    assert.is_true(tonumber(r.stdout:match("%d+")) > 10)
    local ok, err, code = sb:write_file("/work/f", "x")
    assert.is_nil(ok)
    assert.equal("EPERM", code)
    assert.truthy(err:find("read-only analysis: no writes (/work/f)", 1, true), err)
    assert.equal("x\n", assert(sb:read_file("/work/own")))
    local evs = claw.audit.events { kind = "policy.deny", sandbox = sb.id }
    assert.equal("on_file", evs[#evs].detail.hook)
  end)

  it("update_policy: a sandbox without network refuses new egress, accepts deny", function()
    local sb <close> = make()
    assert.is_true(sb:update_policy { network = { egress = "deny" } })
    local shared = policy.default()
    local s1 <close> = assert(sandbox.create(shared))
    assert.is_true(s1:update_policy { network = { resolvers = { "192.0.2.53" } } })
    assert.same({}, shared.network.resolvers) -- the caller's policy is not changed
    assert.same({ "192.0.2.53" }, s1:info().policy.network.resolvers)
    local ok, err, code = sb:update_policy { network = { allow = { "example.org:443" } } }
    assert.is_nil(ok)
    assert.equal("ENOTSUP", code, err)
    ok, err = sb:update_policy { network = { allow = { 7 } } }
    assert.is_nil(ok)
    assert.truthy(err:find("network.allow[1]", 1, true), err)
    assert.is_false(pcall(sb.update_policy, sb, { backend = "vm" }))
  end)

  it("wires a networking module: records, jail options (a namespace to join), update, close", function()
    -- clawlua.sandbox.net is another module; this stand-in makes a real network namespace with a
    -- dummy link, so the execs really join it, and checks the calls sandbox.lua makes
    local real = package.loaded["clawlua.sandbox.net"]
    local calls, ns = {}, "clawlua-spec-sb-" .. me
    local fake = {}
    function fake.create(o)
      calls[#calls + 1] = "create " .. o.kind .. " " .. o.network.allow[1].host
      o.record("netns", ns)
      H.sh(("ip netns add %s && ip -n %s link add spec0 type veth peer name spec1"):format(ns, ns))
      local n = {}
      function n.jail_options() return { net = "/run/netns/" .. ns } end
      function n.update(_, net)
        calls[#calls + 1] = "update " .. #net.allow
        return true
      end
      function n.info() return { address = "10.0.0.2", gateway = "10.0.0.1" } end
      function n.close()
        calls[#calls + 1] = "close"
        H.sh("ip netns del " .. ns)
        o.forget("netns", ns)
      end
      return n
    end
    package.loaded["clawlua.sandbox.net"] = fake
    local ok, err = pcall(function()
      local sb <close> = make { network = { allow = { "pypi.org:443" } } }
      local objects = H.read_file(sb:info().state_dir .. "/objects")
      assert.truthy(objects:find("+ netns " .. ns, 1, true), objects)
      local r = assert(sb:exec { "sh", "-c", "cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort" })
      assert.equal("lo\nspec0\nspec1\n", r.stdout)
      assert.equal("10.0.0.2", sb:info().network.address)
      assert.is_true(sb:update_policy { network = { allow = { "pypi.org:443", "a.org:80" } } })
      assert.equal(2, #sb:info().policy.network.allow)
      sb:destroy()
      assert.same({ "create jail pypi.org", "update 2", "close" }, calls)
      assert.equal("", H.sh("ip netns list | grep " .. ns .. " || true"))
    end)
    package.loaded["clawlua.sandbox.net"] = real
    H.sh("ip netns del " .. ns .. " 2>/dev/null || true")
    assert(ok, err)
  end)

  it("info, list and get; ids are unique; the state dir records the owner", function()
    local a <close> = make()
    local b <close> = make({}, { id = "spec-fixed-id" })
    assert.equal("spec-fixed-id", b.id)
    assert.equal(b, sandbox.get("spec-fixed-id"))
    local again, err, code = sandbox.create(policy.default(), { id = "spec-fixed-id" })
    assert.is_nil(again)
    assert.equal("EEXIST", code, err)
    local ids = {}
    for _, i in ipairs(sandbox.list()) do ids[i.id] = i.state end
    assert.equal("running", ids[a.id])
    assert.equal("running", ids[b.id])
    local info = a:info()
    assert.equal("jail", info.backend)
    assert.equal("default", info.policy.seccomp == "docker-default" and "default" or "?")
    assert.equal("loopback", info.network.mode)
    assert.truthy(claw.json.encode(info))
    local owner = H.read_file(info.state_dir .. "/owner")
    local pid, start = state.self()
    assert.equal(("%d %d %s\n"):format(pid, start, claw.proc.namespace("net")), owner)
    assert.is_false(pcall(function() a.id = "x" end))
  end)

  it("emits an audit event carrying the sandbox id for every step", function()
    local sb = make()
    local id = sb.id
    assert(sb:exec { "true" })
    assert(sb:write_file("/work/x", "1"))
    assert(sb:read_file("/work/x"))
    assert(sb:list_dir("/work"))
    assert(sb:pause())
    assert(sb:resume())
    assert(sb:destroy())
    local kinds = {}
    for ev in claw.audit.query { sandbox = id } do kinds[#kinds + 1] = ev.kind end
    local want = { "sandbox.create", "sandbox.start", "sandbox.exec", "sandbox.exec_done",
      "sandbox.write_file", "sandbox.read_file", "sandbox.list_dir", "sandbox.pause",
      "sandbox.resume", "sandbox.destroy" }
    local have = {}
    for _, k in ipairs(kinds) do have[k] = true end
    for _, k in ipairs(want) do assert.is_true(have[k], k .. " missing in " .. table.concat(kinds, ",")) end
    assert.equal("sandbox.create", kinds[1])
    assert.equal("sandbox.destroy", kinds[#kinds])
  end)

  it("a failed create releases what it made and says why", function()
    local before = #sandbox_dirs()
    local p = assert(policy.from_table({ seccomp = "/nonexistent/profile.json" }, "bad"))
    local sb, err, code = sandbox.create(p)
    assert.is_nil(sb)
    assert.equal("EIO", code)
    assert.truthy(err:find("seccomp /nonexistent/profile.json", 1, true), err)
    local evs = claw.audit.events { kind = "sandbox.create_failed" }
    assert.truthy(evs[#evs].detail.error:find("seccomp", 1, true))
    assert.equal(before, #sandbox_dirs())
    if not pcall(require, "clawlua.sandbox.vm") then
      sb, err, code = sandbox.create(policy.default(), { backend = "vm" })
      assert.is_nil(sb)
      assert.equal("ENOTSUP", code)
      assert.truthy(err:find("the vm backend is not available", 1, true), err)
    end
    if not pcall(require, "clawlua.sandbox.net") then
      sb, err, code = sandbox.create(assert(policy.from_table({ network = { allow = { "a.org:443" } } }, "n")))
      assert.is_nil(sb)
      assert.equal("ENOTSUP", code)
      assert.truthy(err:find("clawlua.sandbox.net is not available", 1, true), err)
    end
    assert.equal(before, #sandbox_dirs())
    -- a backend that raises midway (a bug, a cancelled task): released, then re-raised
    local jail = require "clawlua.sandbox.jail"
    local start = jail.start
    jail.start = function() error("backend exploded") end
    local ok, rerr = pcall(sandbox.create, policy.default(), { id = "spec-raises" })
    jail.start = start
    assert.is_false(ok)
    assert.truthy(tostring(rerr):find("backend exploded", 1, true))
    assert.is_nil(sandbox.get("spec-raises"))
    assert.equal(before, #sandbox_dirs())
    local bad, berr = sandbox.create { network = { egress = "maybe" } }
    assert.is_nil(bad)
    assert.truthy(berr:find("network.egress", 1, true))
  end)

  it("destroy is idempotent and leaves no process, fd, cgroup, mount or dir; nor does __gc", function()
    H.settle()
    local fds, children, mnt = H.fds(), H.children(), mounts()
    local sb = make()
    local dir = sb:info().state_dir
    -- (a duration of this run's own: the host and stock runs of this spec go side by side)
    local sleep = require("netns").own_sleep(31)
    local t = claw.spawn(function() return sb:exec { "sh", "-c", ("sleep %s & sleep %s"):format(sleep, sleep) } end)
    claw.sleep(0.2)
    assert.truthy(#our_cgroups() > 0)
    assert.is_true(sb:destroy())
    assert.is_true(sb:destroy())
    t:join(5)
    assert.equal("destroyed", sb:info().state)
    assert.truthy(H.eventually(function() return #our_cgroups() == 0 end, 5), table.concat(our_cgroups(), " "))
    assert.is_nil(io.open(dir .. "/owner"))
    -- collected without destroy
    do
      local lost = make()
      dir = lost:info().state_dir
      assert(lost:exec { "true" })
    end
    H.settle()
    assert.is_nil(io.open(dir .. "/owner"))
    -- an exited command's handle is closed a moment later (jail.close_delay), off the caller's time
    assert.truthy(H.eventually(function()
      H.settle()
      return H.fds() == fds
    end, 5), "fds: " .. H.fds() .. " ~= " .. fds)
    assert.equal(children, H.children())
    assert.equal(mnt, mounts())
    assert.truthy(H.eventually(function() return #our_cgroups() == 0 end, 5))
    assert.equal("", H.sh("pgrep -f '^sleep " .. sleep .. "$' || true"))
  end)
end)
