-- timeout: 600
-- clawlua.policy: policy files loaded as text in an allow-listed environment under an
-- instruction budget; every validation error names the file, the line and the field path;
-- normalization and defaults; the example policies; `clawlua policy check`.
local claw = require "clawlua"
local H = require "helper"
local policy = require "clawlua.policy"

local dir

local function file(name, src)
  local path = dir .. "/" .. name
  H.write_file(path, src)
  return path
end

local function load_src(src)
  return policy.load(file("p.lua", src))
end

describe("policy", function()
  setup(function() dir = H.tmpdir("policy") end)
  teardown(function() H.rm_rf(dir) end)

  describe("defaults", function()
    it("are safe: jail, no egress, docker-default seccomp, 1 vCPU, 256 MiB, 10 min, 16 MiB output", function()
      local p = policy.default()
      assert.equal("jail", p.backend)
      assert.equal("deny", p.network.egress)
      assert.same({}, p.network.allow)
      assert.equal("docker-default", p.seccomp)
      assert.same({ vcpus = 1, memory_mib = 256, pids = 256, cpu = 1.0, lifetime_s = 600,
        max_output = 16 << 20 }, p.resources)
      assert.same({ max_sandboxes = 32, max_execs = 64, memory_mib = 16384 }, p.quota)
      assert.same(p.quota, policy.describe(p).quota)
      assert.equal("/work", p.files.workdir)
      assert.is_true(policy.is_policy(p))
      assert.is_false(policy.is_policy({}))
    end)

    it("an empty file-returned table is the default, named after the file", function()
      local p = assert(policy.load(file("empty-one.lua", "return {}")))
      assert.equal("empty-one", p.name)
      assert.equal(dir .. "/empty-one.lua", p.source)
    end)
  end)

  describe("normalization", function()
    it("parses sizes, allow entries in both shapes, protocols and ports", function()
      local p = assert(load_src([[
        return {
          name = "n", backend = "vm",
          resources = { vcpus = 2, memory_mib = "512M", lifetime_s = 1.5, max_output = "64K" },
          network = { egress = "deny", resolvers = { "9.9.9.9" },
            allow = { "198.51.100.10:80/tcp", { host = "PyPI.org", port = 443 }, "10.0.0.0/8",
                      "[2001:db8::1]:53/udp", { host = "dns.example", port = "53", proto = "UDP" } } },
          files = { readonly = { "/src", { src = "/data", dst = "/mnt/data" } }, workdir = "/w" },
          env = { A = "1", B = 2 },
          hooks = { on_exec = function() return true end },
        }]]))
      assert.equal("vm", p.backend)
      assert.equal(512, p.resources.memory_mib)
      assert.equal(64 * 1024, p.resources.max_output)
      assert.equal(1.5, p.resources.lifetime_s)
      assert.same({ host = "198.51.100.10", port = 80, proto = "tcp" }, p.network.allow[1])
      assert.same({ host = "pypi.org", port = 443, proto = "tcp" }, p.network.allow[2])
      assert.same({ host = "10.0.0.0/8", proto = "tcp" }, p.network.allow[3])
      assert.same({ host = "2001:db8::1", port = 53, proto = "udp" }, p.network.allow[4])
      assert.same({ host = "dns.example", port = 53, proto = "udp" }, p.network.allow[5])
      assert.same({ { src = "/src", dst = "/src" }, { src = "/data", dst = "/mnt/data" } }, p.files.readonly)
      assert.same({ A = "1", B = "2" }, p.env)
      assert.equal("function", type(p.hooks.on_exec))
    end)

    it("describe is JSON-safe: hooks by name, no functions", function()
      local p = assert(load_src([[return { hooks = { on_tool_call = function() return true end } }]]))
      local d = policy.describe(p)
      assert.same({ "on_tool_call" }, d.hooks)
      local s = assert(claw.json.encode(d))
      assert.is_nil(s:find("function"))
      assert.truthy(s:find('"allow":%[%]'))
    end)

    it("from_table validates the same way and names the table", function()
      local p, err = policy.from_table({ network = { egress = "sometimes" } }, "inline")
      assert.is_nil(p)
      assert.equal('inline: network.egress: "deny" or "allow" expected, got "sometimes"', err)
    end)
  end)

  describe("errors name file:line and the field", function()
    local cases = {
      { "return { colour = 1 }", "p.lua:1: colour: unknown field" },
      { "return {\n backend = 'docker' }", "p.lua:2: backend: \"jail\" or \"vm\" expected, got \"docker\"" },
      { "return {\n resources = {\n  vcpus = 1.5 } }", "p.lua:3: resources.vcpus: integer expected, got float" },
      { "return { resources = { vcpus = 0 } }", "resources.vcpus: 1 to 64 expected, got 0" },
      { "return { resources = { memory_mib = 'lots' } }", "resources.memory_mib: a size expected" },
      { "return { resources = { max_output = '2G' } }", "resources.max_output: 1 to 1073741824 bytes expected" },
      { "return { resources = { lifetime_s = -1 } }", "resources.lifetime_s: 0.001 to 604800 expected" },
      { "return { resources = { disk = 1 } }", "resources.disk: unknown field" },
      { "return {\n quota = {\n  max_sandboxes = 0 } }", "p.lua:3: quota.max_sandboxes: 1 to 4096 expected, got 0" },
      { "return { quota = { max_execs = 1.5 } }", "quota.max_execs: integer expected, got float" },
      { "return { quota = { memory_mib = '1G' }, resources = { memory_mib = 2048 } }",
        "quota.memory_mib: at least resources.memory_mib (2048) expected, got 1024" },
      { "return { quota = { disks = 1 } }", "quota.disks: unknown field" },
      { "return { quota = 8 }", "quota: table expected, got integer" },
      { "return {\n network = {\n  allow = { 'a.org:443',\n 42 } } }",
        "p.lua:3: network.allow[2]: expected \"host:port/proto\" or {host=, port=, proto=}" },
      { "return { network = { allow = { 'a.org:99999' } } }",
        "network.allow[1].port: a port 1..65535 expected, got 99999" },
      { "return { network = { allow = { 'a.org:80/icmp' } } }",
        "network.allow[1].proto: \"tcp\" or \"udp\" expected, got \"icmp\"" },
      { "return { network = { allow = { { host = 'a b' } } } }",
        "network.allow[1].host: a host name, address or cidr expected" },
      { "return { network = { allow = { { port = 1 } } } }", "network.allow[1].host: expected" },
      { "return { network = { allow = { x = 1 } } }", "network.allow: a list expected (found key x)" },
      { "return { network = { resolvers = { 'dns.google' } } }", "network.resolvers[1]: an IP address expected" },
      { "return { seccomp = 'strict' }",
        "seccomp: \"docker-default\", \"unconfined\" or a profile path (.json) expected" },
      { "return { files = { readonly = { 'rel/path' } } }", "files.readonly[1].src: an absolute path without" },
      { "return { files = { readonly = { '/a/../etc' } } }", "files.readonly[1].src: an absolute path without" },
      { "return { files = { readonly = { '/tmp' } } }", "files.readonly[1]: \"/tmp\" cannot be bound over" },
      { "return { files = { workdir = '/' } }", "files.workdir: \"/\" is reserved" },
      { "return { env = { ['1X'] = 'a' } }", "env: variable names expected, got 1X" },
      { "return { env = { A = {} } }", "env.A: string expected, got table" },
      { "return { hooks = { on_boot = function() end } }", "hooks.on_boot: unknown field" },
      { "return { hooks = { on_exec = true } }", "hooks.on_exec: function expected, got boolean" },
    }
    for _, c in ipairs(cases) do
      it(c[2], function()
        local p, err = load_src(c[1])
        assert.is_nil(p)
        assert.is_string(err)
        assert.truthy(err:find(dir .. "/p.lua", 1, true), err)
        assert.truthy(err:find(c[2], 1, true), ("expected %q in %q"):format(c[2], err))
      end)
    end

    it("a list over the cap is refused", function()
      local t = {}
      for i = 1, policy.max_list + 1 do t[i] = "a.org:80" end
      local p, err = policy.from_table({ network = { allow = t } }, "big")
      assert.is_nil(p)
      assert.truthy(err:find("network.allow: at most 1024 entries expected, got 1025", 1, true), err)
    end)
  end)

  describe("the file runs sandboxed", function()
    it("reports syntax errors with file:line", function()
      local p, err = load_src("return {\n  backend = = 'jail' }")
      assert.is_nil(p)
      assert.truthy(err:find(dir .. "/p.lua:2:", 1, true), err)
    end)

    it("names the whole path in a syntax error, and in a parser limit without a position", function()
      -- (Lua's own message keeps the tail of a path over 59 bytes: "...ong/name.lua:1:")
      local long = dir .. "/" .. ("d"):rep(80)
      H.sh("mkdir -p '" .. long .. "'")
      H.write_file(long .. "/p.lua", "return { = }")
      local p, err = policy.load(long .. "/p.lua")
      assert.is_nil(p)
      assert.truthy(err:find(long .. "/p.lua:1: ", 1, true), err)
      -- 300 nested unary operators: the parser's C-stack limit, raised with no file (fuzz_lua_policy)
      p, err = load_src("return { name = " .. ("~"):rep(300) .. "1 }")
      assert.is_nil(p)
      assert.truthy(err:find(dir .. "/p.lua: ", 1, true), err)
      assert.truthy(err:find("C stack overflow", 1, true), err)
    end)

    it("reads at most max_source bytes, from a file or a pipe", function()
      local max = policy.max_source
      local fits = "return {}\n--" .. ("x"):rep(max - 13) .. "\n"
      assert.equal(max, #fits)
      assert.truthy(load_src(fits))
      local p, err = load_src(fits .. "x")
      assert.is_nil(p)
      assert.truthy(err:find(dir .. "/p.lua: policy file over " .. max .. " bytes", 1, true), err)
      -- a FIFO cannot seek: the file's size is not known before it is read
      local fifo = dir .. "/fifo.lua"
      for _, case in ipairs { { "return { name = 'piped' }", true }, { fits .. "x", false } } do
        H.write_file(dir .. "/src", case[1])
        H.sh("rm -f '" .. fifo .. "' && mkfifo '" .. fifo .. "'")
        local writer = assert(claw.proc.spawn { "sh", "-c", ("cat '%s/src' > '%s' 2>/dev/null"):format(dir, fifo),
          stdin = "null" })
        p, err = policy.load(fifo)
        writer:kill("KILL")
        writer:wait()
        writer:close()
        if case[2] then
          assert.truthy(p, err)
          assert.equal("piped", p.name)
        else
          assert.is_nil(p)
          assert.truthy(err:find("policy file over " .. max .. " bytes", 1, true), err)
        end
      end
    end)

    it("refuses binary chunks", function()
      local p, err = load_src(string.dump(function() return {} end))
      assert.is_nil(p)
      assert.truthy(err:find("binary chunks are not loaded", 1, true), err)
    end)

    for _, name in ipairs { "io", "os", "require", "load", "loadfile", "dofile", "debug",
      "collectgarbage", "rawset", "setmetatable", "getmetatable", "pcall", "xpcall", "package",
      "coroutine", "print" } do
      it("has no " .. name, function()
        local p, err = load_src(("return { name = type(%s) }"):format(name))
        assert.truthy(p, err)
        assert.equal("nil", p.name)
      end)
    end

    it("has string (without dump), math (without random), table, utf8", function()
      local p = assert(load_src([[return { name = ("%d-%s-%s"):format(math.max(1, 2), string.upper("a"),
        table.concat({ "x", "y" })) .. tostring(string.dump) .. tostring(math.random) .. utf8.char(65) }]]))
      assert.equal("2-A-xynilnilA", p.name)
    end)

    it("cannot reach the host's globals through _G or _ENV", function()
      local p = assert(load_src([[return { name = tostring(_G) .. "/" .. type(_ENV.io) }]]))
      assert.equal("nil/nil", p.name)
    end)

    it("stops an infinite loop at the instruction budget", function()
      local t0 = claw.now()
      local p, err = load_src("while true do end")
      assert.is_nil(p)
      assert.equal("policy " .. dir .. "/p.lua: instruction budget exceeded", err)
      -- (not timed under the gc stage: a collector that never rests does a step at each of the
      -- budget hook's 250k calls, 48 s here, against 0.1 s)
      assert.is_true(os.getenv("CLAWLUA_GC_STRESS") == "1" or claw.now() - t0 < 5 * H.scale)
    end)

    it("a loop cannot outlive the budget by catching errors (no pcall) or recursion", function()
      local p, err = load_src("local function f() return f() end return f()")
      assert.is_nil(p)
      assert.truthy(err:find("instruction budget exceeded", 1, true), err)
      p, err = load_src("local function f(n) return 1 + f(n + 1) end return f(1)")
      assert.is_nil(p)
      assert.truthy(err:find("stack overflow", 1, true) or err:find("budget", 1, true), err)
    end)

    it("caps string.rep, also as a method, and restores it afterwards", function()
      local p, err = load_src("local s = ('x'):rep(1 << 30) return {}")
      assert.is_nil(p)
      assert.truthy(err:find("string.rep: result of 1073741824 bytes over the limit", 1, true), err)
      assert.equal(3 << 20, #("x"):rep(3 << 20))
      p = assert(load_src("return { name = ('ab'):rep(3, '-') .. string.rep('c', 2) }"))
      assert.equal("ab-ab-abcc", p.name)
    end)

    it("stops a string doubled in a loop at the memory cap", function()
      local p, err = load_src("local s = ('x'):rep(1 << 20) for i = 1, 40 do s = s .. s end return {}")
      assert.is_nil(p)
      assert.truthy(err:find("memory limit of 67108864 bytes exceeded", 1, true), err)
      p, err = load_src("local t = {} for i = 1, 1e7 do t[i] = ('y'):rep(1000) .. i end return {}")
      assert.is_nil(p)
      assert.truthy(err:find("memory limit", 1, true) or err:find("budget", 1, true), err)
    end)

    it("caps gsub and table.concat results before building them", function()
      local p, err = load_src("local s = ('x'):rep(1 << 20) local r = s:gsub('.', s) return {}")
      assert.is_nil(p)
      assert.truthy(err:find("string.gsub: a result of up to", 1, true), err)
      p, err = load_src("local t = {} for i = 1, 100 do t[i] = 'a' end " ..
        "local r = table.concat(t, ('x'):rep(1 << 20)) return {}")
      assert.is_nil(p)
      assert.truthy(err:find("table.concat: result over the limit", 1, true), err)
      p = assert(load_src("return { name = ('a-b'):gsub('-', '_') .. table.concat({ 'x', 'y' }, ',') }"))
      assert.equal("a_bx,y", p.name)
    end)

    -- fuzz_lua_policy findings: C loops and C-built strings that no instruction hook sees
    it("caps table.move and string.pack, which run in C", function()
      local t0 = claw.now()
      local p, err = load_src("local t = table.move({}, 1, math.maxinteger - 1, 2) return {}")
      assert.is_nil(p)
      assert.truthy(err:find("table.move: %d+ elements over the limit"), err)
      assert.is_true(claw.now() - t0 < 5 * H.scale)
      p, err = load_src('return { name = string.pack("c2000000000", "") }')
      assert.is_nil(p)
      assert.truthy(err:find("string.pack: format sizes of 2000000000 bytes over the limit", 1, true), err)
      p, err = load_src('return { name = ("c2000000000"):pack("") }')
      assert.is_nil(p)
      assert.truthy(err:find("string.pack: format sizes", 1, true), err)
      p = assert(load_src('return { name = ("%d"):format(#string.pack("i4c3", 7, "abc")) .. '
        .. '#table.move({ 1, 2, 3 }, 1, 3, 2) }'))
      assert.equal("74", p.name)
    end)

    it("an error without a position, or not a string, still names the file", function()
      for _, src in ipairs { "error({})", "error('plain', 0)", "error(nil)", "table.concat({ {} })" } do
        local p, err = load_src(src)
        assert.is_nil(p)
        assert.truthy(err:find(dir .. "/p.lua", 1, true), src .. " -> " .. err)
      end
    end)

    it("a huge table under the budget is refused by the list cap, not built forever", function()
      local p, err = load_src(
        "local t = {} for i = 1, 5000 do t[i] = 'a.org:80' end return { network = { allow = t } }")
      assert.is_nil(p)
      assert.truthy(err:find("network.allow: at most 1024 entries", 1, true), err)
    end)

    it("a file that returns no table says so", function()
      local p, err = load_src("return 42")
      assert.is_nil(p)
      assert.truthy(err:find("must return a table, got number", 1, true), err)
    end)

    it("a missing file is an error, not a raise", function()
      local p, err = policy.load(dir .. "/nope.lua")
      assert.is_nil(p)
      assert.truthy(err:find("No such file", 1, true), err)
    end)
  end)

  it("caps the name and each environment entry (fuzz_lua_policy: a 25 MB name made describe() too big)", function()
    local p, err = load_src('return { name = ("x"):rep(257) }')
    assert.is_nil(p)
    assert.truthy(err:find("name: at most 256 bytes expected, got 257", 1, true), err)
    p, err = load_src('return { env = { A = ("x"):rep(131072) } }')
    assert.is_nil(p)
    assert.truthy(err:find("env.A: at most 128 KiB expected", 1, true), err)
    assert(load_src('return { name = ("x"):rep(256), env = { A = ("x"):rep(131070) } }'))
  end)

  it("describe() is JSON even with bytes that are not UTF-8 (env values are bytes)", function()
    local p = assert(load_src('return { env = { A = "\\252b" } }'))
    assert.equal("\252b", p.env.A)
    local d = policy.describe(p)
    local text = assert(claw.json.encode(d))
    assert.truthy(text:find('"A":"\u{FFFD}b"', 1, true), text)
  end)

  describe("hooks", function()
    it("run under the budget; an error or a timeout denies and is audited", function()
      local p = assert(load_src([[return { hooks = {
        on_exec = function(argv) if argv[1] == "rm" then return false, "no rm" end return true end,
        on_file = function() while true do end end,
        on_tool_call = function(name) error("boom " .. name) end } }]]))
      assert.is_true(policy.call_hook(p, "on_exec", { "ls" }))
      assert.same({ false, "no rm" }, { policy.call_hook(p, "on_exec", { "rm" }) })
      local ok, why = policy.call_hook(p, "on_file", "write", "/x")
      assert.is_false(ok)
      assert.truthy(why:find("instruction budget exceeded", 1, true))
      local seq = claw.audit.stats().last_seq or 0
      ok, why = policy.call_hook(p, "on_tool_call", "sandbox_exec")
      assert.is_false(ok)
      assert.truthy(why:find("boom sandbox_exec", 1, true))
      local evs = claw.audit.events { kind = "policy.hook_error", after_seq = seq }
      assert.truthy(#evs >= 1)
      assert.equal("on_tool_call", evs[#evs].detail.hook)
      assert.is_true(policy.call_hook(p, "on_denied"))
    end)
  end)

  describe("reload", function()
    local v1 = [[return { network = { egress = "deny", allow = { "a.test:80" }, resolvers = { "192.0.2.53" } },
      hooks = { on_exec = function() return true end } }]]
    local v2 = [[return { backend = "vm", network = { egress = "deny", allow = { "a.test:80", "b.test:443" } },
      resources = { memory_mib = 512 }, hooks = { on_exec = function() return false, "v2" end } }]]

    it("re-reads the file and takes the new fields in place; a bad file changes nothing", function()
      local path = file("rl.lua", v1)
      local p = assert(policy.load(path))
      H.write_file(path, v2)
      local seq = claw.audit.stats().last_seq or 0
      local r = assert(policy.reload(p))
      assert.same({ updated = {}, failed = {} }, r)
      assert.equal("vm", p.backend)
      assert.equal(512, p.resources.memory_mib)
      assert.equal("b.test", p.network.allow[2].host)
      assert.same({ false, "v2" }, { policy.call_hook(p, "on_exec", { "ls" }) })
      assert.is_true(policy.is_policy(p))
      assert.equal(1, #claw.audit.events { kind = "policy.reload", after_seq = seq })
      -- a bad file: an error naming file:line and field, audited, p as it was
      H.write_file(path, "return {\n network = { egress = 'maybe' } }")
      local before = policy.describe(p)
      local ok, err, code = policy.reload(p)
      assert.is_nil(ok)
      assert.equal("EINVAL", code)
      assert.truthy(err:find(path .. ":2: network.egress", 1, true), err)
      assert.same(before, policy.describe(p))
      local evs = claw.audit.events { kind = "policy.reload_failed", after_seq = seq }
      assert.equal(1, #evs)
      assert.equal(path, evs[1].detail.source)
      H.write_file(path, "return {")
      assert.is_nil(policy.reload(p))
      assert.same(before, policy.describe(p))
      local ok2, err2, code2 = policy.reload(policy.default())
      assert.is_nil(ok2)
      assert.equal("EINVAL", code2)
      assert.truthy(err2:find("not loaded from a file", 1, true))
      assert.has_error(function() policy.reload({}) end)
    end)

    it("SIGHUP reloads the policies a clawlua process loaded", function()
      local path = file("hup.lua", v1)
      local script = file("hup-child.lua", [[
        local claw = require "clawlua"
        local policy = require "clawlua.policy"
        local p = assert(policy.load(...))
        io.stdout:write("ready\n"); io.stdout:flush()
        claw.run(function()
          while #p.network.allow < 2 do claw.sleep(0.02) end
        end)
        io.stdout:write(p.backend, " ", p.network.allow[2].host, "\n")
      ]])
      local pr = assert(claw.proc.spawn { H.bin, script, path, stdout = "pipe", stderr = "pipe",
        env = H.lua_env() })
      pr.stdout:set_timeout(20)
      assert.equal("ready", pr.stdout:read_line())
      H.write_file(path, v2)
      assert(pr:kill("HUP"))
      assert.equal("vm b.test", pr.stdout:read_line())
      assert.equal(0, assert(pr:wait(20)).code)
      pr:close()
    end)
  end)

  describe("examples/policies", function()
    for _, name in ipairs { "untrusted-code", "pip-install", "vm", "read-only-analysis", "ci-runner", "demo-egress" } do
      it(name .. ".lua loads", function()
        local p, err = policy.load(H.src .. "/examples/policies/" .. name .. ".lua")
        assert.truthy(p, err)
        assert.equal(name, p.name)
      end)
    end
  end)

  describe("clawlua policy check", function()
    it("prints the effective policy as JSON", function()
      local r = H.clawlua { "policy", "check", H.src .. "/examples/policies/pip-install.lua" }
      assert.equal(0, r.code, r.stderr)
      local d = assert(claw.json.decode(r.stdout))
      assert.equal("pip-install", d.name)
      assert.equal(16 << 20, d.resources.max_output)
    end)

    it("exits 1 with the error on a bad file", function()
      local r = H.clawlua { "policy", "check", file("bad.lua", "return {\n resources = { vcpus = 'x' } }") }
      assert.equal(1, r.code)
      local want = dir .. "/bad.lua:2: resources.vcpus: integer expected, got string"
      assert.truthy(r.stderr:find(want, 1, true), r.stderr)
    end)
  end)
end)
