-- The MCP tool set (clawlua.mcp.tools): shapes, errors, the policy hook, audit, limits.
-- Driven with tests/lua/mcp_fake_sandbox.lua (a fake of clawlua.sandbox whose behaviour the
-- test controls); mcp_sandbox_spec.lua runs the same tools on the real sandbox module.
local claw = require "clawlua"
local tools = require "clawlua.mcp.tools"
local schema = require "clawlua.mcp.schema"
local fake = require "mcp_fake_sandbox"

local json = claw.json
local audit = claw.audit

local function new(opts)
  opts = opts or {}
  fake.reset(opts.fake)
  return tools.new { sandbox = fake, policy = opts.policy or fake.policy(opts.hook),
                     max_sandboxes = opts.max_sandboxes, bench_echo = opts.bench_echo }
end

-- Round-trips through JSON, as arguments arrive from a client.
local function args(s) return assert(json.decode(s)) end

local function check_output(ts, name, res)
  for _, t in ipairs(ts:list()) do
    if t.name == name then
      local wire = json.decode(json.encode(res.structuredContent))
      local ok, errs = schema.validate(json.decode(json.encode(t.outputSchema)), wire)
      assert(ok, name .. " structuredContent fails its outputSchema: " .. table.concat(errs or {}, "; "))
      return
    end
  end
  error("no tool " .. name)
end

describe("mcp tools", function()
  it("lists the nine tools in their fixed order, each with input and output schemas", function()
    local ts = new()
    local names = {}
    for i, t in ipairs(ts:list()) do
      names[i] = t.name
      assert.are.equal("object", t.inputSchema.type)
      assert.is_table(t.outputSchema)
      assert.is_string(t.description)
      -- the schemas are valid JSON Schema the validator accepts (an empty object passes or fails cleanly)
      assert.is_boolean((schema.validate(json.decode(json.encode(t.inputSchema)), json.object {})))
    end
    assert.are.same({ "sandbox_create", "sandbox_exec", "sandbox_write_file", "sandbox_read_file",
      "sandbox_list", "sandbox_destroy", "sandbox_update_policy", "audit_query", "policy_show" }, names)
    assert.are.equal("echo", new { bench_echo = true }:list()[10].name)
  end)

  it("creates, runs, moves files, lists, updates and destroys, with structured and text results", function()
    claw.run(function()
      local ts = new()
      local r = assert(ts:call("sandbox_create", args '{}', { client = "spec" }))
      assert.is_false(r.isError)
      check_output(ts, "sandbox_create", r)
      local id = r.structuredContent.id
      assert.are.equal("fake-1", id)

      r = assert(ts:call("sandbox_exec", args(('{"id":"%s","command":["echo","hi","there"]}'):format(id))))
      assert.is_false(r.isError)
      assert.are.equal(0, r.structuredContent.exit_code)
      assert.are.equal("hi there\n", r.structuredContent.stdout)
      assert.matches("^exit 0\n%-%-%- stdout\nhi there", r.content[1].text)
      check_output(ts, "sandbox_exec", r)

      r = assert(ts:call("sandbox_exec", args(('{"id":"%s","command":["exit","3"],"timeout_s":5}'):format(id))))
      assert.is_false(r.isError) -- a non-zero exit is a result, not a failure
      assert.are.equal(3, r.structuredContent.exit_code)
      assert.are.equal(5, fake.execs[2].timeout)

      r = assert(ts:call("sandbox_exec",
        args(('{"id":"%s","command":["cat"],"stdin":"in put","env":{"A":"1"},"cwd":"/tmp"}'):format(id))))
      assert.are.equal("in put", r.structuredContent.stdout)
      assert.are.same({ A = "1" }, fake.execs[3].env)
      assert.are.equal("/tmp", fake.execs[3].cwd)

      r = assert(ts:call("sandbox_exec", { id = id, command = json.array { "binary" } }))
      assert.are.equal("ok\u{FFFD}\u{FFFD} done\n", r.structuredContent.stdout) -- JSON carries text only
      assert.is_string(json.encode(r))

      r = assert(ts:call("sandbox_write_file", args(('{"id":"%s","path":"/w/a.txt","content":"héllo"}'):format(id))))
      assert.are.equal(6, r.structuredContent.bytes)
      check_output(ts, "sandbox_write_file", r)
      local bin = "\0\1\2\255\254 binary"
      r = assert(ts:call("sandbox_write_file", { id = id, path = "/w/b.bin", content = tools.base64_encode(bin),
                                                 encoding = "base64", mode = 420 }))
      assert.are.equal(#bin, r.structuredContent.bytes)
      local sb = fake.created and ts.boxes[id]
      assert.are.equal(bin, sb.files["/w/b.bin"].data)
      assert.are.equal(420, sb.files["/w/b.bin"].mode)

      r = assert(ts:call("sandbox_read_file", { id = id, path = "/w/a.txt" }))
      assert.are.same({ content = "héllo", encoding = "utf8", bytes = 6 }, r.structuredContent)
      check_output(ts, "sandbox_read_file", r)
      r = assert(ts:call("sandbox_read_file", { id = id, path = "/w/b.bin" }))
      assert.is_true(r.isError)
      assert.matches("not valid UTF%-8 text: read it with encoding 'base64'", r.content[1].text)
      r = assert(ts:call("sandbox_read_file", { id = id, path = "/w/b.bin", encoding = "base64" }))
      assert.are.equal(bin, tools.base64_decode(r.structuredContent.content))
      r = assert(ts:call("sandbox_read_file", { id = id, path = "/nope" }))
      assert.is_true(r.isError)
      assert.matches("No such file", r.content[1].text)

      r = assert(ts:call("sandbox_list", args '{}'))
      assert.are.equal(1, #r.structuredContent.sandboxes)
      assert.are.equal("fake", r.structuredContent.sandboxes[1].policy) -- the policy's name, not its functions
      check_output(ts, "sandbox_list", r)

      r = assert(ts:call("sandbox_update_policy",
        args(('{"id":"%s","network":{"egress":"allow","allow":["deb.debian.org"]}}'):format(id))))
      assert.is_false(r.isError)
      assert.are.same({ "deb.debian.org" }, sb.network.allow)

      r = assert(ts:call("sandbox_destroy", { id = id }))
      assert.is_true(r.structuredContent.destroyed)
      assert.are.same({ id }, fake.destroyed)
      r = assert(ts:call("sandbox_exec", { id = id, command = json.array { "echo" } }))
      assert.is_true(r.isError) -- a missing sandbox is a tool failure
      assert.matches("no sandbox 'fake%-1'", r.content[1].text)
    end)
  end)

  it("answers unknown tools and arguments that fail the schema with invalid params", function()
    local ts = new()
    local r, err = ts:call("rm_rf", {})
    assert.is_nil(r)
    assert.are.same({ code = -32602, message = "unknown tool 'rm_rf'" }, err)
    r, err = ts:call("sandbox_exec", args '{"id":"x","command":[]}')
    assert.is_nil(r)
    assert.are.equal(-32602, err.code)
    assert.matches("%$%.command: must have at least 1 items", err.message)
    r, err = ts:call("sandbox_exec", args '{"id":"x","command":["ls"],"shell":true}')
    assert.is_nil(r)
    assert.matches("%$%.shell: is not allowed", err.message)
    r, err = ts:call("sandbox_write_file", args '{"id":"x","path":"p","content":"c","encoding":"hex"}')
    assert.is_nil(r)
    assert.matches("%$%.encoding: must be one of", err.message)
  end)

  it("asks the policy's hook first, with the client's name, and audits every call", function()
    claw.run(function()
      local seen = {}
      local ts = new { hook = function(name, a, client)
        seen[#seen + 1] = name .. ":" .. client
        if name == "sandbox_exec" and a.command[1] == "exit" then return false, "no exits here" end
        return true
      end }
      local first = audit.stats().last_seq or 0
      local r = assert(ts:call("sandbox_create", {}, { client = "claude" }))
      local id = r.structuredContent.id
      r = assert(ts:call("sandbox_exec", { id = id, command = json.array { "exit", "1" } }, { client = "claude" }))
      assert.is_true(r.isError)
      assert.matches("sandbox_exec denied: no exits here", r.content[1].text)
      assert.are.equal(0, #fake.execs)
      assert.are.same({ "sandbox_create:claude", "sandbox_exec:claude" }, seen)
      local calls, denies = {}, {}
      for _, ev in ipairs(audit.events { after_seq = first }) do
        if ev.kind == "mcp.tool_call" then calls[#calls + 1] = ev end
        if ev.kind == "policy.deny" then denies[#denies + 1] = ev end
      end
      assert.are.equal(2, #calls)
      assert.are.equal("claude", calls[1].detail.client)
      assert.are.equal("sandbox_create", calls[1].detail.tool)
      assert.are.equal(id, calls[1].sandbox)
      assert.is_false(calls[2].detail.allowed)
      assert.are.equal(1, #denies)
      assert.are.equal("no exits here", denies[1].detail.reason)
      -- a hook that raises denies
      local ts2 = new { hook = function() error("boom") end }
      r = assert(ts2:call("sandbox_list", {}))
      assert.is_true(r.isError)
      assert.matches("on_tool_call hook failed: .*boom", r.content[1].text)
    end)
  end)

  it("returns the sandbox's failure to start as an isError result", function()
    local ts = new { fake = { fail_create = "no KVM and no jail" } }
    local r = assert(ts:call("sandbox_create", {}))
    assert.is_true(r.isError)
    assert.matches("cannot create a sandbox: sandbox: no KVM and no jail", r.content[1].text)
    r = assert(ts:call("sandbox_create", { policy = "other" }))
    assert.matches("unknown policy 'other'", r.content[1].text)
  end)

  it("reports progress while a sandbox boots", function()
    claw.run(function()
      local ts = new { fake = { create_delay = 1.3 } }
      local seen = {}
      local r = assert(ts:call("sandbox_create", {}, { progress = function(done, total, msg)
        seen[#seen + 1] = { done, total, msg }
      end }))
      assert.is_false(r.isError)
      assert.is_true(#seen >= 2, "progress reports: " .. #seen)
      assert.are.same({ 0, nil, "started sandbox boot" }, seen[1])
      assert.matches("^sandbox boot: running for 1 s$", seen[2][3])
    end)
  end)

  it("caps live sandboxes and destroys every one on close", function()
    claw.run(function()
      local ts = new { max_sandboxes = 2 }
      assert.is_false(ts:call("sandbox_create", {}).isError)
      assert.is_false(ts:call("sandbox_create", {}).isError)
      local r = ts:call("sandbox_create", {})
      assert.is_true(r.isError)
      assert.matches("sandbox limit reached %(2 live, at most 2%)", r.content[1].text)
      -- one ends without the set (its lifetime ran out): it no longer counts nor lists
      ts.boxes["fake-2"]:destroy()
      local listed = ts:call("sandbox_list", {}).structuredContent.sandboxes
      assert.are.same({ "fake-1" }, { listed[1].id, listed[2] and listed[2].id })
      assert.is_false(ts:call("sandbox_create", {}).isError)
      assert.is_true(ts:call("sandbox_create", {}).isError)
      ts:close()
      table.sort(fake.destroyed)
      assert.are.same({ "fake-1", "fake-2", "fake-3" }, fake.destroyed)
      ts:close()
      assert.are.equal(3, #fake.destroyed)
      assert.is_true(ts:call("sandbox_create", {}).isError)
    end)
  end)

  it("queries the audit ring and shows the policy", function()
    local ts = new()
    audit.emit("mcp.spec_probe", { sandbox = "probe-1", n = 1 })
    local r = assert(ts:call("audit_query", { kind = "mcp.spec_probe", limit = 5 }))
    assert.are.equal(1, #r.structuredContent.events)
    assert.are.equal("probe-1", r.structuredContent.events[1].sandbox)
    check_output(ts, "audit_query", r)
    r = assert(ts:call("policy_show", {}))
    assert.is_false(r.isError)
    assert.are.equal("fake", r.structuredContent.name)
    assert.is_nil(json.decode(json.encode(r.structuredContent)).hooks.on_tool_call) -- no functions
  end)

  it("serves the audit log and the sandbox list as resources", function()
    local ts = new()
    local uris = {}
    for _, res in ipairs(ts:resources()) do uris[#uris + 1] = res.uri end
    assert.are.same({ "clawlua://audit", "clawlua://sandboxes" }, uris)
    local c = assert(ts:read_resource("clawlua://sandboxes"))
    assert.are.same({ sandboxes = {} }, json.decode(c[1].text))
    local none, err = ts:read_resource("clawlua://nope")
    assert.is_nil(none)
    assert.are.equal("resource not found: clawlua://nope", err)
  end)

  it("encodes and decodes base64 (RFC 4648 vectors) and rejects bad input", function()
    local v = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==", fooba = "Zm9vYmE=",
                foobar = "Zm9vYmFy" }
    for plain, enc in pairs(v) do
      assert.are.equal(enc, tools.base64_encode(plain))
      assert.are.equal(plain, tools.base64_decode(enc))
    end
    assert.is_nil(tools.base64_decode("Zm9"))
    assert.is_nil(tools.base64_decode("Zm=v"))
    assert.is_nil(tools.base64_decode("Zm9v!A=="))
  end)
end)
