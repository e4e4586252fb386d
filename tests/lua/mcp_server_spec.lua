-- The MCP server (clawlua.mcp.server over clawlua.mcp.rpc): framing errors, the three
-- revisions, concurrency, cancellation, progress, logging, and the exit of `clawlua mcp`.
-- Every message the server emits in these specs is validated against its revision's published
-- schema (tests/fixtures/specs/mcp/schema-*.json) with clawlua.mcp.schema.
-- In-process servers use tests/lua/mcp_fake_sandbox.lua (a fake of clawlua.sandbox).
local claw = require "clawlua"
local H = require "helper"
local server = require "clawlua.mcp.server"
local tools = require "clawlua.mcp.tools"
local schema = require "clawlua.mcp.schema"
local fake = require "mcp_fake_sandbox"

local json, stream = claw.json, claw.stream

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local validators = {}
local function validator(rev)
  if not validators[rev] then
    local root = assert(json.decode(read(H.spec("mcp/schema-" .. rev .. ".json"))))
    validators[rev] = { v = schema.new(root), defs = root["$defs"] and "#/$defs/" or "#/definitions/" }
  end
  return validators[rev]
end

-- The definition a result of `method` must match, per revision.
local RESULT_DEF = {
  initialize = "InitializeResult", ["tools/list"] = "ListToolsResult", ["tools/call"] = "CallToolResult",
  ["resources/list"] = "ListResourcesResult", ["resources/read"] = "ReadResourceResult",
  ["server/discover"] = "DiscoverResult", ping = "Result", ["logging/setLevel"] = "Result",
}

--- Checks one emitted message against a revision's schema: as a JSON-RPC message, and its
--- result as the result of the method it answers.
local function check_schema(rev, msg, method)
  local val = validator(rev)
  if msg.error and msg.id == json.null then
    -- JSON-RPC 2.0 answers a frame whose id cannot be known with id null; MCP's schemas do not
    -- admit null ids (2025-06-18 requires an id, the later ones make it optional). The server
    -- follows JSON-RPC here; check the error object alone.
    local ok, errs = val.v:validate(msg.error, rev == "2025-06-18" and val.defs .. "JSONRPCError/properties/error"
      or val.defs .. "Error")
    assert(ok, table.concat(errs or {}, "\n"))
    return
  end
  local ok, errs = val.v:validate(msg, val.defs .. "JSONRPCMessage")
  assert(ok, ("%s message fails JSONRPCMessage: %s\n%s"):format(rev, json.encode(msg), table.concat(errs or {}, "\n")))
  if msg.method == "notifications/progress" then
    ok, errs = val.v:validate(msg, val.defs .. "ProgressNotification")
  elseif msg.method == "notifications/message" then
    ok, errs = val.v:validate(msg, val.defs .. "LoggingMessageNotification")
  elseif msg.result and RESULT_DEF[method] then
    ok, errs = val.v:validate(msg.result, val.defs .. RESULT_DEF[method])
  end
  assert(ok, ("%s %s fails its schema: %s\n%s"):format(rev, method or msg.method, json.encode(msg),
    table.concat(errs or {}, "\n")))
end

--- An in-process server on two pipes, with a client that records and validates every line.
local function start(opts)
  opts = opts or {}
  fake.reset()
  local in_r, in_w = stream.pipe()
  local out_r, out_w = stream.pipe()
  out_r:set_timeout(10 * H.scale)
  local ts = opts.tools or tools.new { sandbox = fake, policy = fake.policy(), max_sandboxes = 4 }
  local srv = server.new { input = in_r, output = out_w, tools = ts, log_level = "off",
                           max_message = opts.max_message, max_inflight = opts.max_inflight }
  local c = { rev = opts.rev or "2025-11-25", sent = {}, ts = ts, srv = srv, backlog = {} }
  c.task = claw.spawn(function() return srv:serve() end)
  function c.raw(line) assert(in_w:write(line .. "\n")) end
  function c.send(obj)
    if obj.id ~= nil and obj.method then c.sent[json.encode(obj.id)] = obj.method end
    c.raw(json.encode(obj))
  end
  function c.next_message()
    if #c.backlog > 0 then return table.remove(c.backlog, 1) end
    local line = assert(out_r:read_line())
    local msg = assert(json.decode(line))
    local method = msg.id ~= nil and c.sent[json.encode(msg.id)] or nil
    if not c.no_schema then check_schema(c.rev, msg, method) end
    return msg
  end
  --- The response to `id`, keeping notifications and other responses for later.
  function c.response(id)
    local key = json.encode(id)
    for i, m in ipairs(c.backlog) do
      if m.method == nil and json.encode(m.id) == key then return table.remove(c.backlog, i) end
    end
    while true do
      local line = assert(out_r:read_line())
      local msg = assert(json.decode(line))
      local method = msg.id ~= nil and c.sent[json.encode(msg.id)] or nil
      if not c.no_schema then check_schema(c.rev, msg, method) end
      if msg.method == nil and json.encode(msg.id) == key then return msg end
      c.backlog[#c.backlog + 1] = msg
    end
  end
  function c.request(id, method, params)
    c.send { jsonrpc = "2.0", id = id, method = method, params = params }
    return c.response(id)
  end
  function c.initialize(version)
    local r = c.request(0, "initialize", { protocolVersion = version or c.rev, capabilities = json.object {},
                                            clientInfo = { name = "spec-client", version = "1" } })
    c.send { jsonrpc = "2.0", method = "notifications/initialized" }
    return r
  end
  function c.close()
    in_w:close()
    assert(c.task:join(5 * H.scale))
    out_r:close()
    in_r:close() -- the caller owns the streams it gives the server
    out_w:close()
  end
  return c
end

local META = "io.modelcontextprotocol/protocolVersion"
local function meta(extra)
  local m = { [META] = "2026-07-28", ["io.modelcontextprotocol/clientCapabilities"] = json.object {},
              ["io.modelcontextprotocol/clientInfo"] = { name = "modern-client", version = "2" } }
  for k, v in pairs(extra or {}) do m[k] = v end
  return m
end

describe("mcp server: framing", function()
  it("answers every malformed frame as JSON-RPC requires and keeps serving", function()
    claw.run(function()
      local c = start()
      c.raw("this is not json")
      local m = c.next_message()
      assert.are.equal(-32700, m.error.code)
      assert.are.equal(json.null, m.id)
      c.raw('{"jsonrpc":"2.0","id":1,"method":"ping","params":{"s":"\255\254"}}') -- invalid UTF-8
      m = c.next_message()
      assert.are.equal(-32700, m.error.code)
      c.raw('[{"jsonrpc":"2.0","id":1,"method":"ping"}]') -- a batch: removed in 2025-06-18
      m = c.next_message()
      assert.are.equal(-32600, m.error.code)
      assert.are.equal(json.null, m.id)
      assert.matches("batches are not supported", m.error.message)
      c.raw("[]")
      assert.are.equal(-32600, c.next_message().error.code)
      c.raw("42")
      assert.are.equal(-32600, c.next_message().error.code)
      c.raw('{"id":5,"method":"ping"}') -- no "jsonrpc"
      m = c.next_message()
      assert.are.equal(-32600, m.error.code)
      assert.are.equal(5, m.id)
      c.raw('{"jsonrpc":"2.0","id":null,"method":"ping"}')
      m = c.next_message()
      assert.are.equal(-32600, m.error.code)
      assert.are.equal(json.null, m.id)
      c.raw('{"jsonrpc":"2.0","id":6,"method":7}')
      assert.are.equal(-32600, c.next_message().error.code)
      c.raw('{"jsonrpc":"2.0","id":7,"method":"ping","params":"x"}')
      assert.are.equal(-32600, c.next_message().error.code)
      c.raw('{"jsonrpc":"2.0","id":8,"method":"ping","params":[1]}')
      assert.are.equal(-32602, c.next_message().error.code)
      c.raw('{"jsonrpc":"2.0","id":9}')
      assert.are.equal(-32600, c.next_message().error.code)
      -- unknown notifications and stray responses get no reply: the next message answers the ping
      c.raw('{"jsonrpc":"2.0","method":"notifications/whatever","params":{}}')
      c.raw('{"jsonrpc":"2.0","id":99,"result":{}}')
      assert.are.same({ jsonrpc = "2.0", id = 10, result = {} }, c.request(10, "ping"))
      c.close()
    end)
  end)

  it("echoes ids with their JSON type", function()
    claw.run(function()
      local c = start()
      c.no_schema = true -- 7.5 is a valid JSON-RPC id but not an MCP RequestId
      c.raw('{"jsonrpc":"2.0","id":"7","method":"ping"}')
      local line1 = c.next_message()
      assert.are.equal("7", line1.id)
      c.raw('{"jsonrpc":"2.0","id":7,"method":"ping"}')
      assert.are.equal("integer", math.type(c.next_message().id))
      c.raw('{"jsonrpc":"2.0","id":7.5,"method":"ping"}')
      assert.are.equal(7.5, c.next_message().id)
      c.raw('{"jsonrpc":"2.0","id":8.0,"method":"ping"}')
      local m = c.next_message()
      assert.are.equal("float", math.type(m.id))
      assert.matches('"id":8%.0', json.encode(m))
      c.close()
    end)
  end)

  it("rejects a line over the cap without stopping", function()
    claw.run(function()
      local c = start { max_message = 4096 }
      c.raw('{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' .. ("x"):rep(100000) .. '"}}')
      local m = c.next_message()
      assert.are.equal(-32600, m.error.code)
      assert.matches("longer than 4096 bytes", m.error.message)
      assert.are.same({}, c.request(2, "ping").result)
      -- an answer over the cap is not sent; an error says why, and serving goes on
      c.initialize()
      local big = c.request(3, "tools/list")
      assert.are.equal(-32603, big.error.code)
      assert.matches("cannot send the result", big.error.message)
      assert.are.same({}, c.request(4, "ping").result)
      c.close()
    end)
  end)

  it("leaves no fd behind", function()
    claw.run(function()
      local before = H.fds()
      local c = start()
      c.initialize()
      c.request(1, "tools/list")
      c.close()
      collectgarbage()
      H.settle()
      assert.are.equal(before, H.fds())
    end)
  end)

  it("answers a request before initialize with an error, and ping without one", function()
    claw.run(function()
      local c = start()
      local m = c.request(1, "tools/list")
      assert.are.equal(-32600, m.error.code)
      assert.matches("not initialized", m.error.message)
      assert.are.same({}, c.request(2, "ping").result)
      c.close()
    end)
  end)
end)

describe("mcp server: session revisions", function()
  for _, rev in ipairs { "2025-06-18", "2025-11-25" } do
    it("negotiates " .. rev .. " and serves tools, resources, logging", function()
      claw.run(function()
        local c = start { rev = rev }
        local r = c.initialize(rev)
        assert.are.equal(rev, r.result.protocolVersion)
        assert.are.equal("clawlua", r.result.serverInfo.name)
        assert.is_table(r.result.capabilities.tools)
        assert.are.equal(-32600, c.request(1, "initialize", { protocolVersion = rev, capabilities = {},
          clientInfo = { name = "x", version = "1" } }).error.code)
        local tl = c.request(2, "tools/list")
        assert.are.equal(9, #tl.result.tools)
        assert.is_nil(tl.result.resultType) -- only 2026-07-28 results carry it
        local call = c.request(3, "tools/call", { name = "sandbox_create", arguments = {} })
        assert.is_false(call.result.isError)
        local id = call.result.structuredContent.id
        call = c.request(4, "tools/call", { name = "sandbox_exec", arguments = { id = id, command = { "exit", "2" } } })
        assert.are.equal(2, call.result.structuredContent.exit_code)
        assert.are.equal(-32602, c.request(5, "tools/call", { name = "nope" }).error.code)
        local bad = c.request(6, "tools/call", { name = "sandbox_exec", arguments = { id = 1 } })
        assert.are.equal(-32602, bad.error.code)
        assert.are.equal(-32602, c.request(7, "tools/list", { cursor = "abc" }).error.code)
        local rl = c.request(8, "resources/list")
        assert.are.equal(2, #rl.result.resources)
        local rr = c.request(9, "resources/read", { uri = "clawlua://sandboxes" })
        assert.are.equal(id, json.decode(rr.result.contents[1].text).sandboxes[1].id)
        assert.are.equal(-32002, c.request(10, "resources/read", { uri = "clawlua://x" }).error.code)
        assert.are.equal(-32601, c.request(11, "prompts/list").error.code)
        -- logging/setLevel: messages at and above the level reach the client
        assert.are.equal(-32602, c.request(12, "logging/setLevel", { level = "loud" }).error.code)
        assert.are.same({}, c.request(13, "logging/setLevel", { level = "info" }).result)
        c.send { jsonrpc = "2.0", id = 14, method = "tools/call",
                 params = { name = "sandbox_exec", arguments = { id = id, command = { "sleep", "5" } } } }
        claw.sleep(0.05)
        c.send { jsonrpc = "2.0", method = "notifications/cancelled", params = { requestId = 14, reason = "spec" } }
        local m = c.next_message()
        assert.are.equal("notifications/message", m.method)
        assert.are.equal("info", m.params.level)
        assert.matches("cancelled by the client: spec", m.params.data)
        c.close()
        assert.are.same({ id }, fake.destroyed) -- the end of input closed the tool set
      end)
    end)
  end

  it("answers an unknown version with its latest session revision", function()
    claw.run(function()
      local c = start()
      assert.are.equal("2025-11-25", c.initialize("2024-11-05").result.protocolVersion)
      c.close()
    end)
  end)
end)

describe("mcp server: 2026-07-28 (stateless)", function()
  it("serves server/discover and requests that carry the version and capabilities in _meta", function()
    claw.run(function()
      local c = start { rev = "2026-07-28" }
      local d = c.request(1, "server/discover", { _meta = meta() })
      assert.are.same({ "2026-07-28", "2025-11-25", "2025-06-18" }, d.result.supportedVersions)
      assert.are.equal("complete", d.result.resultType)
      assert.are.equal("public", d.result.cacheScope)
      assert.is_true(d.result.ttlMs > 0)
      local tl = c.request(2, "tools/list", { _meta = meta() })
      assert.are.equal("complete", tl.result.resultType)
      assert.are.equal("public", tl.result.cacheScope)
      assert.are.equal("clawlua", tl.result._meta["io.modelcontextprotocol/serverInfo"].name)
      local again = c.request(3, "tools/list", { _meta = meta() })
      assert.are.equal(json.encode(tl.result.tools), json.encode(again.result.tools)) -- deterministic
      local call = c.request(4, "tools/call", { _meta = meta(), name = "sandbox_list", arguments = {} })
      assert.are.equal("complete", call.result.resultType)
      assert.are.same({}, call.result.structuredContent.sandboxes)
      local rl = c.request(5, "resources/list", { _meta = meta() })
      assert.are.equal("private", rl.result.cacheScope)
      c.close()
    end)
  end)

  it("answers an unsupported version with -32022 and the supported list", function()
    claw.run(function()
      local c = start { rev = "2026-07-28" }
      local m = c.request(1, "tools/list", { _meta = meta { [META] = "2030-01-01" } })
      assert.are.equal(-32022, m.error.code)
      assert.are.same({ requested = "2030-01-01", supported = { "2026-07-28", "2025-11-25", "2025-06-18" } },
        m.error.data)
      local v = validator("2026-07-28")
      assert.is_true(v.v:validate(m, v.defs .. "UnsupportedProtocolVersionError"))
      m = c.request(2, "tools/list", { _meta = { [META] = "2026-07-28" } }) -- no clientCapabilities
      assert.are.equal(-32602, m.error.code)
      assert.are.equal(-32601, c.request(3, "logging/setLevel", { _meta = meta(), level = "info" }).error.code)
      c.close()
    end)
  end)

  it("sends log messages only for requests that ask for a level", function()
    claw.run(function()
      local c = start { rev = "2026-07-28" }
      c.request(1, "tools/call", { _meta = meta(), name = "sandbox_create", arguments = {} })
      c.send { jsonrpc = "2.0", id = 2, method = "tools/call",
               params = { _meta = meta { ["io.modelcontextprotocol/logLevel"] = "debug" },
               name = "sandbox_exec", arguments = { id = "fake-1", command = { "sleep", "5" } } } }
      claw.sleep(0.05)
      c.send { jsonrpc = "2.0", method = "notifications/cancelled", params = { requestId = 2 } }
      local m = c.next_message()
      assert.are.equal("notifications/message", m.method)
      assert.is_nil(m.id)
      assert.are.equal(0, #c.backlog)
      c.close()
    end)
  end)
end)

describe("mcp server: concurrency, cancellation, progress", function()
  it("answers ping and tools/list while a 30 s exec runs, and cancels it on request", function()
    claw.run(function()
      local c = start()
      c.initialize()
      local id = c.request(1, "tools/call", { name = "sandbox_create" }).result.structuredContent.id
      c.send { jsonrpc = "2.0", id = "long", method = "tools/call",
               params = { name = "sandbox_exec", arguments = { id = id, command = { "sleep", "30" } } } }
      claw.sleep(0.05)
      local t0 = claw.now()
      assert.are.same({}, c.request(2, "ping").result)
      assert.are.equal(9, #c.request(3, "tools/list").result.tools)
      assert.is_true(claw.now() - t0 < 0.5 * H.scale)
      -- a second request with the id still in flight is refused, the first one goes on
      local dup = c.request("long", "ping")
      assert.are.equal(-32600, dup.error.code)
      assert.matches("still in progress", dup.error.message)
      c.send { jsonrpc = "2.0", method = "notifications/cancelled", params = { requestId = "long" } }
      claw.sleep(0.1)
      assert.are.same({ id }, fake.cancelled) -- the command was killed
      assert.are.same({}, c.request(4, "ping").result)
      assert.are.equal(0, #c.backlog) -- and the cancelled request got no response
      assert.is_true(claw.now() - t0 < 2 * H.scale)
      c.close()
    end)
  end)

  it("stops reading while max_inflight requests run, and goes on when one finishes", function()
    claw.run(function()
      local c = start { max_inflight = 2 }
      c.initialize()
      local id = c.request(1, "tools/call", { name = "sandbox_create" }).result.structuredContent.id
      for i = 2, 3 do
        c.send { jsonrpc = "2.0", id = i, method = "tools/call",
                 params = { name = "sandbox_exec", arguments = { id = id, command = { "sleep", "0.6" } } } }
      end
      local t0 = claw.now()
      assert.are.same({}, c.request(4, "ping").result) -- read only once a slot is free
      local waited = claw.now() - t0
      assert.is_true(waited > 0.4, "ping answered after " .. waited .. " s")
      -- an exec answered first (the slot it freed let the ping in; the other exec, started with
      -- it, may end just before or just after the ping's answer)
      assert.is_true(#c.backlog >= 1)
      c.close()
    end)
  end)

  it("at the end of input, gives requests in flight the drain grace, then cancels them, closes the tools", function()
    claw.run(function()
      local c = start()
      c.initialize()
      local id = c.request(1, "tools/call", { name = "sandbox_create" }).result.structuredContent.id
      c.send { jsonrpc = "2.0", id = 2, method = "tools/call",
               params = { name = "sandbox_exec", arguments = { id = id, command = { "sleep", "30" } } } }
      claw.sleep(0.05)
      local t0 = claw.now()
      c.close()
      local took = claw.now() - t0
      assert.is_true(took >= server.DRAIN_GRACE - 0.1 and took < 2 * H.scale, "serve returned after " .. took .. " s")
      assert.are.same({ id }, fake.cancelled)
      assert.are.same({ id }, fake.destroyed)
    end)
  end)

  it("reports progress while an exec runs when the request has a progressToken", function()
    claw.run(function()
      local c = start()
      c.initialize()
      local id = c.request(1, "tools/call", { name = "sandbox_create" }).result.structuredContent.id
      local r = c.request(2, "tools/call", { _meta = { progressToken = "tok" }, name = "sandbox_exec",
                                             arguments = { id = id, command = { "sleep", "1.3" }, timeout_s = 10 } })
      assert.are.equal(0, r.result.structuredContent.exit_code)
      local progress = {}
      for _, m in ipairs(c.backlog) do
        if m.method == "notifications/progress" then progress[#progress + 1] = m.params end
      end
      assert.is_true(#progress >= 2, "expected progress notifications, got " .. #progress)
      assert.are.equal("tok", progress[1].progressToken)
      assert.are.equal(10, progress[1].total)
      assert.is_true(progress[2].progress > progress[1].progress)
      c.close()
    end)
  end)
end)

describe("mcp server: requests to the client (the conformance fixtures' sampling tool)", function()
  it("sends sampling/createMessage, routes the client's answer back, and drops stray responses", function()
    claw.run(function()
      local c = start { tools = require("clawlua.mcp.fixtures").new() }
      local r = c.request(0, "initialize", { protocolVersion = "2025-11-25",
                                              capabilities = { sampling = json.object {} },
                                              clientInfo = { name = "spec", version = "1" } })
      assert.is_table(r.result.capabilities.prompts)
      c.send { jsonrpc = "2.0", id = 1, method = "tools/call",
               params = { name = "test_sampling", arguments = { prompt = "2+2?" } } }
      local req = c.next_message()
      assert.are.equal("sampling/createMessage", req.method)
      assert.are.equal("2+2?", req.params.messages[1].content.text)
      c.raw('{"jsonrpc":"2.0","id":"clawlua-999","result":{}}') -- answers nothing we asked
      c.send { jsonrpc = "2.0", id = req.id, result = { role = "assistant", model = "m",
               content = { type = "text", text = "4" } } }
      local done = c.response(1)
      assert.are.equal("LLM response: 4", done.result.content[1].text)
      -- a client without the capability gets an isError result, not a hang
      local c2 = start { tools = require("clawlua.mcp.fixtures").new() }
      c2.initialize()
      local e = c2.request(1, "tools/call", { name = "test_sampling", arguments = { prompt = "x" } })
      assert.is_true(e.result.isError)
      c2.close()
      c.close()
    end)
  end)
end)

describe("clawlua mcp (the command)", function()
  it("answers --help and refuses bad options", function()
    local r = H.clawlua { "mcp", "--help" }
    assert.are.equal(0, r.code)
    assert.matches("%-%-max%-message BYTES", r.stdout)
    r = H.clawlua { "mcp", "--max-sandboxes", "many" }
    assert.are.equal(2, r.code)
    assert.matches("option '%-%-max%-sandboxes' needs an integer", r.stderr)
    r = H.clawlua { "mcp", "--log-level", "loud" }
    assert.are.equal(2, r.code)
  end)

  it("writes only protocol to stdout and exits within 2 s of stdin's end", function()
    claw.run(function()
      local input = table.concat({
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",' ..
          '"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}',
        "not json", '{"jsonrpc":"2.0","id":2,"method":"tools/list"}',
      }, "\n") .. "\n"
      local t0 = claw.now()
      local r = H.clawlua({ "mcp", "--log-level", "debug" }, { stdin = input, timeout = 10 })
      assert.is_true(claw.now() - t0 < 2 * H.scale)
      assert.are.equal(0, r.code, r.stderr)
      local n = 0
      for line in r.stdout:gmatch("[^\n]+") do
        local m = assert(json.decode(line), "stdout carries JSON-RPC only: " .. line)
        assert.are.equal("2.0", m.jsonrpc)
        n = n + 1
      end
      assert.are.equal(3, n)
      assert.matches("clawlua mcp: warning: parse error", r.stderr)
    end)
  end)

  it("exits within 2 s of SIGTERM, even with a request in flight", function()
    claw.run(function()
      local p = assert(claw.proc.spawn { H.bin, "mcp", "--bench-echo", stdin = "pipe", stdout = "pipe",
                                         stderr = "null" })
      p.stdin:write('{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
      p.stdout:set_timeout(10)
      assert.matches('"id":1', p.stdout:read_line())
      local t0 = claw.now()
      p:kill("TERM")
      local st = assert(p:wait(5))
      assert.is_true(claw.now() - t0 < 2 * H.scale)
      assert.are.equal(143, st.code)
      p:close()
    end)
  end)
end)
