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
  -- Done once, under a lock: the host and stock runs of a spec install at the same time, and
  -- one must not start a half-extracted package of the other's (the marker is written last).
  local marker = NPM_DIR .. "/.everything-installed"
  local f = io.open(marker)
  if f then
    f:close()
    return { "node", ENTRY, "stdio" }
  end
  local r = claw.proc.run { "sh", "-c", [[mkdir -p "$1" && exec flock "$1/.lock" sh -c '
    [ -f "$1/.everything-installed" ] && exit 0
    npm install --no-audit --no-fund --prefix "$1" @modelcontextprotocol/server-everything &&
      touch "$1/.everything-installed"' sh "$1"]], "sh", NPM_DIR, timeout = 300 }
  if not r or r.code ~= 0 then
    return nil, "npm cannot install @modelcontextprotocol/server-everything: " .. (r and r.stderr or "npm failed")
  end
  return { "node", ENTRY, "stdio" }
end

--- A scripted model server and a scratch directory for a spec: setup(fx.start),
--- teardown(fx.stop), then fx.srv and fx.dir.
function U.fixture(tag)
  local fx = {}
  function fx.start()
    fx.srv = U.model_server()
    fx.dir = H.tmpdir(tag)
  end
  function fx.stop()
    if fx.srv then fx.srv.close() end
    if fx.dir then H.rm_rf(fx.dir) end
  end
  return fx
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
      local cmd = { cwd = dir, timeout = 30, stdin = args.stdin, max_output = 1 << 20 }
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

local function structured(doc, is_error)
  return { content = { { type = "text", text = json.encode(doc) } }, structuredContent = doc,
           isError = is_error or false }
end

--- An in-test tool set with the sandbox tools' names and argument shapes ("test sandbox tools":
--- sandbox_create, sandbox_exec {id, command, cwd?, stdin?, timeout_s?}, sandbox_write_file
--- {id, path, content}, sandbox_read_file {id, path}, sandbox_destroy {id}). A "sandbox" is a
--- directory under dir whose absolute paths are mapped below it; commands run for real through
--- clawlua.proc but without isolation. The examples run with it before the sandbox layer exists
--- and with clawlua.mcp.tools after, the scripted model's turns being the same.
local boxes_made = 0

function U.test_sandbox_tools(dir)
  local ts = { name = "test sandbox tools", calls = {}, boxes = {} }
  local obj = function(props, req) return { type = "object", properties = props, required = req } end
  local str, id = { type = "string" }, { type = "string" }
  local defs = {
    { name = "sandbox_create", description = "Create a sandbox.", inputSchema = obj({}, {}) },
    { name = "sandbox_exec", description = "Run a command in a sandbox.",
      inputSchema = obj({ id = id, command = { type = "array", items = str }, cwd = str, stdin = str,
                          timeout_s = { type = "number" } }, { "id", "command" }) },
    { name = "sandbox_write_file", description = "Write a file in a sandbox.",
      inputSchema = obj({ id = id, path = str, content = str }, { "id", "path", "content" }) },
    { name = "sandbox_read_file", description = "Read a file in a sandbox.",
      inputSchema = obj({ id = id, path = str }, { "id", "path" }) },
    { name = "sandbox_destroy", description = "Destroy a sandbox.", inputSchema = obj({ id = id }, { "id" }) },
  }
  function ts.list() return defs end
  local function root_of(args)
    local root = ts.boxes[args.id]
    if not root then return nil, structured({ error = "no sandbox " .. tostring(args.id) }, true) end
    return root
  end
  local function map(root, p)
    if type(p) ~= "string" or p:find("%.%.") then return nil end
    if p:sub(1, 1) ~= "/" then p = "/work/" .. p end
    return root .. p
  end
  function ts.call(_, name, args, ctx)
    ts.calls[#ts.calls + 1] = { name = name, args = args, client = ctx and ctx.client }
    if name == "sandbox_create" then
      boxes_made = boxes_made + 1
      local sid = ("tsb-%d"):format(boxes_made)
      ts.boxes[sid] = dir .. "/" .. sid
      H.sh(("mkdir -p '%s/work' '%s/tmp'"):format(ts.boxes[sid], ts.boxes[sid]))
      return structured { id = sid, backend = "test" }
    end
    local root, bad = root_of(args)
    if not root then return bad end
    if name == "sandbox_exec" then
      local cmd = { cwd = map(root, args.cwd or "/work"), stdin = args.stdin, timeout = args.timeout_s or 30,
                    max_output = 1 << 20 }
      for i, a in ipairs(args.command or {}) do cmd[i] = tostring(a) end
      if #cmd == 0 then return nil, { code = -32602, message = "command: non-empty array expected" } end
      local t0 = claw.now()
      local r, err = claw.proc.run(cmd)
      if not r then return structured({ error = err }, true) end
      return structured { exit_code = r.code, stdout = r.stdout, stderr = r.stderr, timed_out = r.timed_out,
                          duration_ms = math.floor((claw.now() - t0) * 1000) }
    elseif name == "sandbox_write_file" then
      local p = map(root, args.path)
      if not p then return structured({ error = "bad path" }, true) end
      H.sh(("mkdir -p \"$(dirname '%s')\""):format(p))
      H.write_file(p, args.content)
      return structured { path = args.path, bytes = #args.content }
    elseif name == "sandbox_read_file" then
      local p = map(root, args.path)
      local f = p and io.open(p, "rb")
      if not f then return structured({ error = "cannot read " .. tostring(args.path) }, true) end
      local d = f:read("a")
      f:close()
      return structured { content = d, encoding = "utf8" }
    elseif name == "sandbox_destroy" then
      H.sh(("rm -rf '%s'"):format(root))
      ts.boxes[args.id] = nil
      return structured { id = args.id, destroyed = true }
    end
    return nil, { code = -32602, message = "unknown tool: " .. tostring(name) }
  end
  function ts.close() ts.boxes = {} end
  return ts
end

--- The scripted model's turns for the workflows in examples/agent (the same for the test
--- sandbox tools and the real sandbox tool set: "{{sandbox}}" is the id the task names).
U.example_turns = {}

function U.example_turns.fix_failing_test()
  local sb = "{{sandbox}}"
  local fixed = H.read_file(H.src .. "/examples/agent/repo/mathlib.sh"):gsub("%$1 %- %$2", "$1 + $2")
  return {
    { text = "Running the test first.", tool_calls = { { name = "sandbox_exec",
      arguments = { id = sb, command = { "sh", "test.sh" }, cwd = "/work" } } } },
    { tool_calls = { { name = "sandbox_read_file", arguments = { id = sb, path = "/work/mathlib.sh" } } } },
    { text = "add subtracts; fixing it.", tool_calls = { { name = "sandbox_write_file",
      arguments = { id = sb, path = "/work/mathlib.sh", content = fixed } } } },
    { tool_calls = { { name = "sandbox_exec",
      arguments = { id = sb, command = { "sh", "test.sh" }, cwd = "/work" } } } },
    { text = "Fixed: add() subtracted its arguments; test.sh passes now." },
  }
end

function U.example_turns.untrusted_script()
  return {
    { tool_calls = { { name = "sandbox_exec", arguments = { id = "{{sandbox}}", command = { "sh", "untrusted.sh" },
                                                             cwd = "/work", timeout_s = 20 } } } },
    { text = '{"exit_code": 3, "summary": "It printed facts about the system, warned that it could not reach '
             .. 'the update server, and exited with status 3."}' },
  }
end

function U.example_turns.handover()
  local sb = "{{sandbox}}"
  return {
    { tool_calls = { { name = "sandbox_exec", arguments = { id = sb, cwd = "/work", command = { "sh", "-c",
      "wc -c data/* | grep -v total | sort -rn | head -3 > handover.txt; cat handover.txt" } } } } },
    { text = "Hand-over: the three largest files are listed in /work/handover.txt, delta.txt first." },
    { tool_calls = { { name = "sandbox_read_file", arguments = { id = sb, path = "/work/handover.txt" } } } },
    { tool_calls = { { name = "sandbox_write_file", arguments = { id = sb, path = "/work/report.md",
      content = "# Largest files\n\ndelta.txt, beta.csv and epsilon.json, per the explorer.\n" } } } },
    { text = "The report is at /work/report.md." },
  }
end

--- Loads an example workflow as a module.
function U.example(name)
  return assert(loadfile(H.src .. "/examples/agent/" .. name .. ".lua"))("--module")
end

return U
