-- clawlua.mcp.client against the official reference server @modelcontextprotocol/server-everything
-- (installed from npm into build/npm/server-everything by this spec) and, for the stateless
-- 2026-07-28 revision and server-to-client requests, a small scripted server.
local claw = require "clawlua"
local json = require "clawlua.json"
local mcp = require "clawlua.mcp.client"
local H = require "helper"
local U = require "agent_util"

local everything = U.everything

-- A stateless (2026-07-28) server: answers server/discover, insists on the protocol version in
-- every request's _meta, and asks the client for a sampling before it answers a tool call.
local STATELESS_SERVER = [[
local json = require "clawlua.json"
local function send(t) io.write(json.encode(t), "\n") io.flush() end
local V = "io.modelcontextprotocol/"
for line in io.lines() do
  local m = json.decode(line)
  local meta = m.params and m.params._meta or {}
  if m.id and m.method and meta[V .. "protocolVersion"] ~= "2026-07-28" then
    send { jsonrpc = "2.0", id = m.id, error = { code = -32602, message = "no protocol version in _meta" } }
  elseif m.method == "server/discover" then
    send { jsonrpc = "2.0", id = m.id, result = { supportedVersions = { "2026-07-28" }, resultType = "complete",
      capabilities = { tools = {} }, serverInfo = { name = "stateless-test", version = "1" },
      cacheScope = "public", ttlMs = 0 } }
  elseif m.method == "tools/list" then
    send { jsonrpc = "2.0", id = m.id, result = { resultType = "complete", tools = {
      { name = "ask", description = "asks the client", inputSchema = { type = "object" } } } } }
  elseif m.method == "tools/call" then
    send { jsonrpc = "2.0", method = "notifications/message", params = { level = "info", data = "working" } }
    send { jsonrpc = "2.0", id = "s1", method = "sampling/createMessage", params = { messages = {} } }
    local answer = json.decode(io.read("l"))
    send { jsonrpc = "2.0", method = "notifications/progress",
           params = { progressToken = meta.progressToken, progress = 1, total = 1 } }
    send { jsonrpc = "2.0", id = m.id, result = { resultType = "complete", content = {
      { type = "text", text = "client answered " .. tostring(answer.error and answer.error.code) ..
        " for " .. tostring(answer.id) .. "; client " .. tostring(meta[V .. "clientInfo"].name) } } } }
  elseif m.method == "exit" then
    os.exit(3)
  end
end
]]

describe("mcp client", function()
  local cmd, why
  local dir
  setup(function()
    cmd, why = everything()
    if not cmd then print("skipping server-everything tests: " .. why) end
    dir = H.tmpdir("mcpc")
    H.write_file(dir .. "/stateless.lua", STATELESS_SERVER)
  end)
  teardown(function() H.rm_rf(dir) end)

  local function need()
    if not cmd then pending(why) return false end
    return true
  end

  it("connects to server-everything (auto: server/discover refused, then initialize), lists and calls", function()
    if not need() then return end
    local before, fds = H.children(), H.fds()
    local c = assert(mcp.connect { command = cmd, name = "everything" })
    assert.are.equal("2025-11-25", c.protocol)
    assert.are.equal("mcp-servers/everything", c.server_info.name)
    local names = {}
    for _, t in ipairs(c:list_tools()) do names[t.name] = t end
    assert.is_table(names.echo)
    assert.are.equal("object", names["get-sum"].inputSchema.type)
    local r = assert(c:call_tool("echo", { message = "hello from clawlua" }))
    assert.are.equal("Echo: hello from clawlua", r.content[1].text)
    r = assert(c:call_tool("get-sum", { a = 2, b = 40 }))
    assert.matches("42", r.content[1].text)
    -- a tool the server does not have: the server's own answer, not a crash
    r = c:call_tool("no-such-tool", {})
    assert.is_true(r == nil or r.isError == true)
    c:close()
    c:close()
    assert.is_true(H.eventually(function() return H.children() <= before end, 5))
    H.settle()
    assert.are.equal(fds, H.fds()) -- the server's three pipes are closed
  end)

  it("speaks 2025-06-18 when asked, and is a tool set for the agent loop", function()
    if not need() then return end
    local c <close> = assert(mcp.connect { command = cmd, protocol = "2025-06-18" })
    assert.are.equal("2025-06-18", c.protocol)
    assert.is_true(#c:list() > 5)
    local r = assert(c:call("echo", { message = "x" }, { client = "test" }))
    assert.are.equal("Echo: x", r.content[1].text)
  end)

  it("routes progress notifications to the caller", function()
    if not need() then return end
    local c <close> = assert(mcp.connect { command = cmd })
    local seen = {}
    local r = assert(c:call_tool("trigger-long-running-operation", { duration = 1, steps = 3 }, {
      progress = function(done, total) seen[#seen + 1] = { done, total } end }))
    assert.matches("completed", r.content[1].text)
    assert.are.same({ { 1, 3 }, { 2, 3 }, { 3, 3 } }, seen)
  end)

  it("times a request out, cancels it on the server, and stays usable", function()
    if not need() then return end
    local c <close> = assert(mcp.connect { command = cmd })
    local t0 = claw.now()
    local r, err, code = c:call_tool("trigger-long-running-operation", { duration = 5, steps = 5 }, { timeout = 0.5 })
    assert.is_nil(r)
    assert.are.equal("mcp node: tools/call timed out after 0.5s", err)
    assert.are.equal(-32001, code)
    assert.is_true(claw.now() - t0 < 2 * H.scale)
    assert.are.equal("Echo: still here", assert(c:call_tool("echo", { message = "still here" })).content[1].text)
  end)

  it("fails pending and later requests when the server dies", function()
    if not need() then return end
    local c <close> = assert(mcp.connect { command = cmd, name = "dying" })
    local t = claw.spawn(function()
      return c:call_tool("trigger-long-running-operation", { duration = 10, steps = 10 })
    end)
    claw.sleep(0.3)
    c.proc:kill("KILL", "group")
    local r, err = t:join(10)
    assert.is_nil(r)
    assert.matches("^mcp dying: server exited %(signal", err)
    local r2, err2 = c:call_tool("echo", { message = "x" })
    assert.is_nil(r2)
    assert.matches("server exited", err2)
  end)

  it("cancelling the calling task cancels the request", function()
    if not need() then return end
    local c <close> = assert(mcp.connect { command = cmd })
    local t = claw.spawn(function()
      return c:call_tool("trigger-long-running-operation", { duration = 10, steps = 10 })
    end)
    claw.sleep(0.3)
    t:cancel()
    assert.are.same({ nil, "cancelled" }, { t:join(5) })
    assert.are.same({}, c.pending)
    assert.are.equal("Echo: ok", assert(c:call_tool("echo", { message = "ok" })).content[1].text)
  end)

  it("speaks the stateless 2026-07-28 revision and refuses the server's sampling request", function()
    local notes = {}
    local c <close> = assert(mcp.connect { command = { H.bin, dir .. "/stateless.lua" }, name = "stateless",
      on_notification = function(method) notes[#notes + 1] = method end })
    assert.are.equal("2026-07-28", c.protocol)
    assert.are.equal("stateless-test", c.server_info.name)
    assert.are.equal("ask", c:list()[1].name)
    local progressed = 0
    local r = assert(c:call("ask", {}, { progress = function() progressed = progressed + 1 end }))
    assert.are.equal("client answered -32601 for s1; client clawlua", r.content[1].text)
    assert.are.equal(1, progressed)
    assert.are.equal(1, c.unsupported)
    assert.are.same({ "notifications/message", "notifications/progress" }, notes)
  end)

  it("reports a server that exits at once, and a command that does not exist", function()
    local c, err = mcp.connect { command = { "sh", "-c", "echo 'no such server' >&2; exit 7" }, name = "bad",
                                 protocol = "2025-06-18" }
    assert.is_nil(c)
    assert.are.equal("mcp bad: server exited (exit code 7): no such server", err)
    c, err = mcp.connect { command = "/nonexistent/server --stdio" }
    assert.is_nil(c)
    assert.matches("^mcp: cannot start /nonexistent/server: ", err)
  end)

  it("speaks every revision with clawlua's own server (clawlua mcp), when the build has it", function()
    local help = H.clawlua { "mcp", "--help" }
    if help.code ~= 0 then
      pending("clawlua mcp is not in this build: " .. help.stderr:match("^[^\n]*"))
      return
    end
    for _, version in ipairs { "2026-07-28", "2025-11-25", "2025-06-18" } do
      local c <close> = assert(mcp.connect { command = { H.bin, "mcp" }, name = "clawlua-mcp", protocol = version })
      assert.are.equal(version, c.protocol)
      local names = {}
      for _, t in ipairs(c:list()) do names[#names + 1] = t.name end
      assert.are.same({ "sandbox_create", "sandbox_exec", "sandbox_write_file", "sandbox_read_file", "sandbox_list",
                        "sandbox_destroy", "sandbox_update_policy", "audit_query", "policy_show" }, names)
      local r = assert(c:call("policy_show", {}, { client = "spec" }))
      assert.is_false(r.isError == true)
    end
  end)

  it("splits command lines with quotes and rejects bad options", function()
    assert.are.same({ "node", "a b.js", "--x=1 2" }, mcp.split_command([[node 'a b.js' --x="1 2"]]))
    assert.has_error(function() mcp.connect { command = {} } end, "bad field 'command' (non-empty array expected)")
    assert.has_error(function() mcp.connect { command = "x", protocol = "2024-01-01" } end,
      "bad field 'protocol' (one of 2026-07-28, 2025-11-25, 2025-06-18 expected, got 2024-01-01)")
    assert.has_error(function() mcp.connect { command = "x", timeout = "1" } end,
      "bad field 'timeout' (number expected, got string)")
    assert.is_nil(json.encode { x = 1 }:find("secret"))
  end)
end)
