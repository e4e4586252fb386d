-- Helpers for the LLM and agent specs: the scripted model server
-- (tests/integration/model_server.py) and an in-test tool set whose tools run real commands
-- through clawlua.proc.
local claw = require "clawlua"
local json = require "clawlua.json"
local H = require "helper"

local U = {}

--- Starts the scripted model server with a script (a table). Returns a server table:
--- base (the /v1 base URL), script(t) to replace the script, requests() -> what it received.
function U.model_server(script)
  local p = assert(claw.proc.spawn { "python3", H.src .. "/tests/integration/model_server.py",
                                     stdout = "pipe", stderr = "inherit" })
  p.stdout:set_timeout(15)
  local line = p.stdout:read_line()
  local port = assert(tonumber(line), "model server did not start")
  local srv = { proc = p, port = port, base = ("http://127.0.0.1:%d/v1"):format(port) }
  function srv.script(t)
    local r = assert(claw.http.request { url = ("http://127.0.0.1:%d/_script"):format(port),
                                         method = "POST", body = json.encode(t), timeout = 10 })
    assert(r.status == 200, "model server refused the script")
  end
  function srv.requests()
    local r = assert(claw.http.request { url = ("http://127.0.0.1:%d/_requests"):format(port), timeout = 10 })
    return assert(json.decode(r.body))
  end
  function srv.close()
    p:kill("KILL", "group")
    p:wait()
    p:close()
  end
  if script then srv.script(script) end
  return srv
end

local NPM_DIR = H.src .. "/build/npm/server-everything"
local ENTRY = NPM_DIR .. "/node_modules/@modelcontextprotocol/server-everything/dist/index.js"

--- The official MCP reference server, installed from npm into build/npm on first use. Returns
--- its command (argv), or nil and npm's error when npm cannot install it.
function U.everything()
  local f = io.open(ENTRY)
  if f then
    f:close()
    return { "node", ENTRY, "stdio" }
  end
  local r = claw.proc.run { "npm", "install", "--no-audit", "--no-fund", "--prefix", NPM_DIR,
                            "@modelcontextprotocol/server-everything", timeout = 300 }
  if not r or r.code ~= 0 then
    return nil, "npm cannot install @modelcontextprotocol/server-everything: " .. (r and r.stderr or "npm failed")
  end
  return { "node", ENTRY, "stdio" }
end

--- The tool result messages a recorded request carried, as {id=, content=} in order, for
--- either wire format.
function U.tool_results(req)
  local out = {}
  for _, m in ipairs(req.body.messages) do
    if m.role == "tool" then
      out[#out + 1] = { id = m.tool_call_id, content = m.content }
    elseif type(m.content) == "table" then
      for _, b in ipairs(m.content) do
        if b.type == "tool_result" then
          out[#out + 1] = { id = b.tool_use_id, content = b.content, is_error = b.is_error }
        end
      end
    end
  end
  return out
end

--- The names of the tools a recorded request offered.
function U.tool_names(req)
  local out = {}
  for _, t in ipairs(req.body.tools or {}) do out[#out + 1] = t.name or t["function"].name end
  return out
end

local function text_result(s, is_error)
  return { content = { { type = "text", text = s } }, isError = is_error or false }
end

--- An in-test tool set ("test tools"): exec runs a real command through clawlua.proc in a
--- working directory, write_file and read_file work under it, sleep waits. Every call is logged
--- in ts.calls. Same duck type as clawlua.mcp.tools: list(), call(name, args, ctx), close().
function U.test_tools(dir)
  local ts = { name = "test tools", dir = dir, calls = {}, closed = false }
  local defs = {
    { name = "exec", description = "Run a command (argv array) in the work directory.",
      inputSchema = { type = "object", required = { "argv" },
                      properties = { argv = { type = "array", items = { type = "string" } },
                                     stdin = { type = "string" } } } },
    { name = "write_file", description = "Write a file under the work directory.",
      inputSchema = { type = "object", required = { "path", "data" },
                      properties = { path = { type = "string" }, data = { type = "string" } } } },
    { name = "read_file", description = "Read a file under the work directory.",
      inputSchema = { type = "object", required = { "path" }, properties = { path = { type = "string" } } } },
    { name = "sleep", description = "Wait some seconds.",
      inputSchema = { type = "object", required = { "seconds" }, properties = { seconds = { type = "number" } } } },
  }
  function ts.list() return defs end
  local function path_of(p)
    if type(p) ~= "string" or p:find("%.%.") or p:sub(1, 1) == "/" then return nil end
    return dir .. "/" .. p
  end
  function ts.call(_, name, args, ctx)
    ts.calls[#ts.calls + 1] = { name = name, args = args, client = ctx and ctx.client, t = claw.now() }
    if name == "exec" then
      if type(args.argv) ~= "table" or #args.argv == 0 then
        return nil, { code = -32602, message = "argv: non-empty array expected" }
      end
      local cmd = { cwd = dir, timeout = 30, input = args.stdin, max_output = 1 << 20 }
      for i, a in ipairs(args.argv) do cmd[i] = tostring(a) end
      local r, err = claw.proc.run(cmd)
      if not r then return text_result(err, true) end
      return { content = { { type = "text", text = ("exit %s\n%s%s"):format(tostring(r.code), r.stdout, r.stderr) } },
               structuredContent = { code = r.code, stdout = r.stdout, stderr = r.stderr },
               isError = r.code ~= 0 }
    elseif name == "write_file" then
      local p = path_of(args.path)
      if not p then return text_result("path must be relative, without ..", true) end
      H.write_file(p, args.data)
      return text_result(("wrote %d bytes"):format(#args.data))
    elseif name == "read_file" then
      local p = path_of(args.path)
      local f = p and io.open(p, "rb")
      if not f then return text_result("cannot read " .. tostring(args.path), true) end
      local d = f:read("a")
      f:close()
      return text_result(d)
    elseif name == "sleep" then
      claw.sleep(tonumber(args.seconds) or 0)
      return text_result("slept")
    end
    return nil, { code = -32602, message = "unknown tool: " .. tostring(name) }
  end
  function ts.close() ts.closed = true end
  return ts
end

return U
