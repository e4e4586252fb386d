-- fuzz: seeds=mcp_server dict=mcp_server
-- fuzz_lua_mcp_server: JSON-RPC framing and MCP dispatch (lua/clawlua/mcp/rpc.lua, server.lua).
-- The input is the byte stream a client writes to the server's stdin; the server runs in
-- process over two pipes with the real tool set on the in-memory fake of clawlua.sandbox
-- (tests/lua/mcp_fake_sandbox.lua: no sandboxes), a 1 KiB message cap and at most 4 requests
-- in flight. serve() must end without raising once the input ends; every line the server
-- writes must be one JSON-RPC 2.0 object: a notification (method, object params, no id) or a
-- response (an id that a request of the input carried, or null for an error; exactly one of
-- result or error; an error with an integer code and a string message), no request answered
-- more often than it was sent, and every request answered when nothing cancels or sleeps.
local claw = ...
local server = require "clawlua.mcp.server"
local tools = require "clawlua.mcp.tools"
local rpc = require "clawlua.mcp.rpc"

local json, stream = claw.json, claw.stream
local here = debug.getinfo(1, "S").source:match("^@(.*)/") or "."
local fake = dofile(here .. "/../../lua/mcp_fake_sandbox.lua")

server.DRAIN_GRACE = 0.05 -- a fake `sleep` must not cost a second per input
local MAX_MESSAGE = 1024

local function fail(fmt, ...) error(("fuzz_lua_mcp_server: " .. fmt):format(...), 0) end

local function check_line(line, sent, answered)
  local m = json.decode(line)
  if type(m) ~= "table" or json.is_array(m) then fail("output line is not a JSON object: %s", line) end
  if m.jsonrpc ~= "2.0" then fail("output without jsonrpc 2.0: %s", line) end
  if m.method ~= nil then
    if type(m.method) ~= "string" or m.result ~= nil or m.error ~= nil then fail("bad notification: %s", line) end
    if m.params ~= nil and (type(m.params) ~= "table" or json.is_array(m.params)) then
      fail("notification params not an object: %s", line)
    end
    if m.id ~= nil and not (type(m.id) == "string" and m.id:match("^clawlua%-%d+$")) then
      fail("server request with an id of the client's kind: %s", line)
    end
    return
  end
  if (m.result == nil) == (m.error == nil) then fail("response without exactly one of result/error: %s", line) end
  if m.id == nil then fail("response without an id: %s", line) end
  if m.error ~= nil then
    local e = m.error
    if type(e) ~= "table" or math.type(e.code) ~= "integer" or type(e.message) ~= "string" then
      fail("malformed error object: %s", line)
    end
  elseif type(m.result) ~= "table" or json.is_array(m.result) then
    fail("result is not an object: %s", line)
  end
  if m.id == json.null then
    if m.result ~= nil then fail("a result with id null: %s", line) end
    return
  end
  if type(m.id) ~= "string" and type(m.id) ~= "number" then fail("response id of type %s", type(m.id)) end
  local key = rpc.id_key(m.id)
  answered[key] = (answered[key] or 0) + 1
  -- error frames echo the id of anything that carried a valid one; results need a request
  if m.result ~= nil and not sent.requests[key] then fail("result for an id no request carried: %s", line) end
  if not sent.ids[key] then fail("response for an id the input never carried: %s", line) end
  if answered[key] > sent.ids[key] then fail("id %s answered more often than it was sent", key) end
end

-- What the input carried, read the way the server reads it (lines, the cap).
local function survey(data)
  local sent = { ids = {}, requests = {}, nrequests = 0, quiet = true }
  for line in (data .. "\n"):gmatch("([^\n]*)\n") do
    line = line:gsub("\r$", "")
    if #line <= MAX_MESSAGE and line:find("%S") then
      local f = rpc.classify(line)
      if f.id ~= nil then
        local key = rpc.id_key(f.id)
        sent.ids[key] = (sent.ids[key] or 0) + 1
        if f.kind == "request" then
          sent.requests[key] = (sent.requests[key] or 0) + 1
          sent.nrequests = sent.nrequests + 1
        end
      end
    end
  end
  -- cancellations, sleeps and calls that wait on the client may leave requests unanswered
  sent.quiet = not (data:find("cancel", 1, true) or data:find("sleep", 1, true))
  return sent
end

local function session(data)
  fake.reset()
  local in_r, in_w = stream.pipe()
  local out_r, out_w = stream.pipe()
  local ts = tools.new { sandbox = fake, policy = fake.policy(), max_sandboxes = 2 }
  local srv = server.new { input = in_r, output = out_w, tools = ts, log_level = "off",
                           max_message = MAX_MESSAGE, max_inflight = 4 }
  local task = claw.spawn(function() return srv:serve() end)
  local reader = claw.spawn(function() return out_r:read_all() end)
  assert(in_w:write(data))
  in_w:close()
  local ok, err = task:join(30)
  if ok ~= true then fail("serve() did not return true: %s", tostring(err)) end
  out_w:close()
  local out = assert(reader:join(5))
  out_r:close()
  in_r:close()
  return out, ts
end

return function(data)
  local sent = survey(data)
  local out, ts = claw.run(session, data)
  local answered, nlines = {}, 0
  for line in out:gmatch("([^\n]*)\n") do
    nlines = nlines + 1
    check_line(line, sent, answered)
  end
  if out ~= "" and out:sub(-1) ~= "\n" then fail("output ends without a newline") end
  if sent.quiet then
    for key, n in pairs(sent.requests) do
      if (answered[key] or 0) < n then fail("request %s sent %d times, answered %d", key, n, answered[key] or 0) end
    end
  end
  for _, id in ipairs(fake.created) do
    local gone = false
    for _, d in ipairs(fake.destroyed) do gone = gone or d == id end
    if not gone then fail("sandbox %s outlived the server", id) end
  end
  assert(ts)
end
