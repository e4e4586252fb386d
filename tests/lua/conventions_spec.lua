-- labels: root
-- The conventions every Lua API follows (README "Conventions"), checked row by row on every
-- primitive with real calls: proc, jail, vm (a fake VMM running the real guest agent on the
-- host: no guest boots), http (a local server on a unix socket), stream and seccomp.
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"
local proc, jail, vm, http, stream, seccomp = claw.proc, claw.jail, claw.vm, claw.http, claw.stream, claw.seccomp

local TIMEOUT = { nil, "timeout", "ETIMEDOUT" }

local function triple(...) return { ... } end

-- A jail that works on this host (binds of the host's programs).
local function jail_opts(extra)
  local o = { binds = { "/usr" }, symlinks = { ["/bin"] = "usr/bin", ["/lib"] = "usr/lib", ["/lib64"] = "usr/lib64" },
              stdout = "pipe", stderr = "pipe" }
  for k, v in pairs(extra) do o[k] = v end
  return o
end

describe("conventions", function()
  local dir, kernel, srv, before
  setup(function()
    dir = H.tmpdir()
    kernel = dir .. "/vmlinux"
    H.write_file(kernel, "not a kernel: the fake VMM never reads it")
    before = T.snapshot()
    srv = H.httpd(dir .. "/http.sock")
  end)
  teardown(function()
    srv.close()
    T.assert_clean(before)
    H.rm_rf(dir)
  end)

  local function fake_vm()
    local v = T.create { backend = "qemu", vmm = T.fake("agent"), kernel = kernel, jail = false, accel = "tcg",
                         guest = { ready_timeout = 10 * H.scale } }
    assert(v:start())
    return v
  end

  it("options: one table; an unknown or mistyped field raises naming it", function()
    for name, call in pairs {
      ["proc.spawn"] = function(o) return proc.spawn(o) end,
      ["proc.run"] = function(o) return proc.run(o) end,
      ["jail.spawn"] = function(o) return jail.spawn(o) end,
      ["vm.create"] = function(o) o.kernel = kernel return vm.create(o) end,
      ["http.request"] = function(o) o.url = srv.url("/json") o.unix_socket = srv.unix return http.request(o) end,
      ["seccomp.filter"] = function(o) return seccomp.filter(o) end,
    } do
      local o = { "true", wings = 1 }
      if name == "seccomp.filter" or name == "http.request" or name == "vm.create" then o[1] = nil end
      local ok, err = pcall(call, o)
      assert.is_false(ok, name)
      assert.matches("bad field 'wings' %(unknown field%)", err, nil, nil, name)
      ok, err = pcall(call, { "true", timeout = "soon" })
      if name ~= "seccomp.filter" and name ~= "jail.spawn" and name ~= "proc.spawn" then
        assert.is_false(ok, name)
        assert.matches("bad field 'timeout' %(", err, nil, nil, name)
      end
    end
    local v = fake_vm()
    assert.has_error(function() v:exec { "true", wings = 1 } end, "bad field 'wings' (unknown field)")
    v:close()
  end)

  it("env merges into the base environment; env_clear starts from an empty one", function()
    local function env_with(extra)
      local o = { "/usr/bin/env" }
      for k, v in pairs(extra) do o[k] = v end
      return "\n" .. assert(proc.run(o)).stdout
    end
    local out = env_with { env = { X = "1" } }
    assert.matches("\nX=1\n", out)
    assert.matches("\nPATH=", out)
    assert.is_nil(env_with({ env = { PATH = false } }):find("\nPATH=")) -- false unsets
    assert.are.equal("\nX=1\n", env_with { env_clear = true, env = { X = "1" } })
    assert.are.equal("\n", env_with { env_clear = true })
    -- jail.spawn: the same rule (a spawn with a jail's extensions)
    local p = assert(jail.spawn(jail_opts { argv = { "/usr/bin/env" }, env = { X = "j" } }))
    out = p.stdout:read_all()
    assert(p:wait())
    p:close()
    assert.matches("\nX=j\n", "\n" .. out)
    assert.matches("\nPATH=", "\n" .. out)
    p = assert(jail.spawn(jail_opts { argv = { "/usr/bin/env" }, env = { X = "j" }, env_clear = true }))
    out = p.stdout:read_all()
    assert(p:wait())
    p:close()
    assert.are.equal("X=j\n", out)
    -- vm:exec: the guest's defaults (PATH, HOME=/root, TERM=linux) are the base
    local v = fake_vm()
    local r = assert(v:exec { "/usr/bin/env", env = { X = "v", HOME = "/h" } })
    assert.matches("\nX=v\n", "\n" .. r.stdout)
    assert.matches("\nHOME=/h\n", "\n" .. r.stdout)
    assert.matches("\nTERM=linux\n", "\n" .. r.stdout)
    r = assert(v:exec { "/usr/bin/env", env = { X = "v" }, env_clear = true })
    assert.are.equal("X=v\n", r.stdout)
    v:close()
  end)

  it("stdin: data for run/exec-style calls, a slot for spawn", function()
    assert.are.equal("data", assert(proc.run { "cat", stdin = "data" }).stdout)
    local v = fake_vm()
    assert.are.equal("data", assert(v:exec { "cat", stdin = "data" }).stdout)
    v:close()
    local p = assert(proc.spawn { "cat", stdin = "pipe", stdout = "pipe" })
    p.stdin:write("slot")
    p.stdin:close()
    assert.are.equal("slot", p.stdout:read_all())
    p:wait()
    p:close()
    p = assert(jail.spawn(jail_opts { argv = { "cat" }, stdin = "pipe" }))
    p.stdin:write("jailed")
    p.stdin:close()
    assert.are.equal("jailed", p.stdout:read_all())
    p:wait()
    p:close()
  end)

  it("timeout: seconds, nil = no limit, 0 = poll once; a wait that times out gives the triple", function()
    -- proc: p:wait
    local p = assert(proc.spawn { "sleep", "0.3" })
    assert.are.same(TIMEOUT, triple(p:wait(0)))
    assert.are.same(TIMEOUT, triple(p:wait(0.01)))
    assert.is_number(assert(p:wait()).code) -- nil: until it exits
    assert.are.equal(0, assert(p:wait(0)).code) -- 0 polls: the exit is there
    p:close()
    -- jail: its handle is a proc handle
    p = assert(jail.spawn(jail_opts { argv = { "sleep", "0.3" } }))
    assert.are.same(TIMEOUT, triple(p:wait(0)))
    assert(p:wait())
    p:close()
    -- stream: per-operation timeout
    local r, w = stream.pipe()
    r:set_timeout(0)
    assert.are.same(TIMEOUT, triple(r:read()))
    w:write("x")
    assert.are.equal("x", r:read()) -- 0 polls: what is there is read
    r:set_timeout(0.02)
    assert.are.same(TIMEOUT, triple(r:read()))
    r:close()
    w:close()
    -- http
    local t0 = claw.now()
    assert.are.same(TIMEOUT, triple(http.request { url = srv.url("/hang"), unix_socket = srv.unix, timeout = 0.2 }))
    assert.is_true(claw.now() - t0 < 5 * H.scale)
    assert.are.same(TIMEOUT, triple(http.request { url = srv.url("/hang"), unix_socket = srv.unix, timeout = 0 }))
    assert(http.request { url = srv.url("/json"), unix_socket = srv.unix, keepalive = false }) -- nil: no limit
    -- loop: task join, event wait, channel send and receive, fd readiness
    local task = claw.spawn(function() claw.sleep(5) end)
    assert.are.same(TIMEOUT, triple(task:join(0)))
    assert.are.same(TIMEOUT, triple(task:join(0.01)))
    task:cancel()
    local ev = claw.event()
    assert.are.same(TIMEOUT, triple(ev:wait(0)))
    assert.are.same(TIMEOUT, triple(ev:wait(0.01)))
    local ch = claw.channel(1)
    assert.are.same(TIMEOUT, triple(ch:recv(0.01)))
    assert(ch:send(1, 0))
    assert.are.same(TIMEOUT, triple(ch:send(2, 0.01)))
    local pr, pw = stream.pipe()
    assert.are.same(TIMEOUT, triple(claw.loop.poll(pr:fileno(), "r", 0.01)))
    pr:close()
    pw:close()
    -- vm: wait, ping, and an exec killed by its timeout is a result
    local v = fake_vm()
    assert.are.same(TIMEOUT, triple(v:wait(0)))
    assert.are.same(TIMEOUT, triple(v:wait(0.01)))
    -- ping(0): one turn of the loop; the fake agent on the host may answer within it
    local polled = triple(v:ping(0))
    assert.is_true(type(polled[1]) == "number" or (polled[2] == "timeout" and polled[3] == "ETIMEDOUT"))
    assert.is_number(v:ping())
    local res = assert(v:exec { "sleep", "5", timeout = 0 })
    assert.is_true(res.timed_out)
    res = assert(v:exec { "sleep", "5", timeout = 0.1 })
    assert.is_true(res.timed_out)
    v:close()
  end)

  it("exec results: {code, signal?, stdout, stderr, timed_out, truncated, duration}", function()
    local function check(res, code)
      assert.are.equal(code, res.code)
      assert.is_string(res.stdout)
      assert.is_string(res.stderr)
      assert.is_boolean(res.timed_out)
      assert.is_boolean(res.truncated)
      assert.is_number(res.duration)
    end
    check(assert(proc.run { "sh", "-c", "echo out; echo err >&2; exit 3" }), 3)
    local killed = assert(proc.run { "sleep", "5", timeout = 0.05 })
    check(killed, nil)
    assert.is_true(killed.timed_out)
    assert.are.equal("SIGKILL", killed.signal_name)
    local v = fake_vm()
    check(assert(v:exec { "sh", "-c", "echo out; echo err >&2; exit 3" }), 3)
    v:close()
  end)

  it("handle state: identity is a read-only field, what changes is a method", function()
    local p = assert(proc.spawn { "sleep", "5", stdout = "pipe" })
    assert.is_function(p.pid) -- a method, not a field
    assert.is_true(p:pid() > 0)
    assert.is_userdata(p.stdout)
    assert.is_true(p:running())
    assert.has_error(function() p.stdout = 1 end)
    p:close()
    local v = T.create { backend = "qemu", kernel = kernel, accel = "tcg", net = true }
    assert.is_string(v.id)
    assert.are.equal("qemu", v.backend)
    assert.matches("^clw", v.tap)
    assert.are.equal("created", v:state())
    assert.is_nil(v:pid())
    assert.is_table(v:info())
    assert.has_error(function() v.id = "other" end)
    v:close()
  end)

  it("failure: expected failures are nil, \"<what>: <reason>\", code; misuse raises", function()
    -- code: the errno's name, from every primitive; http's transport errors: libcurl's number
    local function check(pattern, want_code, ok, err, code)
      assert.is_nil(ok)
      assert.matches(pattern, err)
      assert.are.equal(want_code, code)
    end
    check("^spawn /nonexistent/prog: ", "ENOENT", proc.spawn { "/nonexistent/prog" })
    check("^spawn true: bind source ", "ENOENT",
      jail.spawn(jail_opts { argv = { "true" }, binds = { dir .. "/nope" } }))
    check("^vm%.create: kernel ", "ENOENT", vm.create { kernel = dir .. "/nope" })
    check("^connect ", "ENOENT", stream.connect_unix(dir .. "/nope.sock"))
    check("^http: ", 7, http.request { url = "http://x/", unix_socket = dir .. "/nope.sock" })
    assert.has_error(function() proc.spawn { "true", stdout = 3.5 } end)
    assert.has_error(function() seccomp.filter { default = "maybe" } end)
  end)

  it("close: idempotent, and <close> releases", function()
    local p = assert(proc.spawn { "sleep", "5" })
    assert.is_true(p:close())
    assert.is_true(p:close())
    local r, w = stream.pipe()
    assert(r:close())
    assert(r:close())
    w:close()
    local f = seccomp.filter { default = "allow" }
    f:close()
    f:close()
    local tap
    do
      local v <close> = T.create { backend = "qemu", kernel = kernel, accel = "tcg", net = true }
      tap = v.tap
      assert.is_true(v:close())
      assert.is_true(v:close())
    end
    assert.is_nil(io.open("/sys/class/net/" .. tap .. "/tun_flags"))
    do
      local q <close> = assert(proc.spawn { "sleep", "5" })
      tap = q:pid()
    end
    assert(H.eventually(function() return io.open("/proc/" .. tap .. "/stat") == nil end))
  end)
end)
