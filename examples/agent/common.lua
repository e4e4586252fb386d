-- What the agent examples share: calling a tool set's tools from workflow code, and running a
-- workflow as a script (a model from the command line, the sandbox tool set under a policy).
-- Each example is a file that returns {run = function(opts) ... end} when loaded with
-- "--module", and runs itself otherwise.
local claw = require "clawlua"
local json = require "clawlua.json"

local C = {}

C.dir = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."

--- Calls a tool from workflow code; returns its structuredContent, raising on an error result.
function C.call(ts, name, args, who)
  local r, err = ts:call(name, args, { client = who or "workflow" })
  if not r then error(("%s: %s"):format(name, type(err) == "table" and err.message or tostring(err)), 2) end
  if r.isError then
    local text = r.content and r.content[1] and r.content[1].text or json.encode(r.structuredContent)
    error(("%s failed: %s"):format(name, tostring(text)), 2)
  end
  return r.structuredContent or {}
end

function C.read(path)
  local f = assert(io.open(path, "rb"))
  local d = f:read("a")
  f:close()
  return d
end

--- Creates a sandbox through the tool set, runs fn(id), destroys the sandbox (whatever fn did)
--- and returns fn's result or raises its error.
function C.with_sandbox(ts, fn)
  local id = C.call(ts, "sandbox_create", {}).id
  local ok, res = pcall(fn, id)
  pcall(ts.call, ts, "sandbox_destroy", { id = id }, { client = "workflow" })
  if not ok then error(res, 0) end
  return res
end

--- Progress lines on stderr for an agent's events.
function C.progress(who)
  return function(kind, d)
    if kind == "step" then
      io.stderr:write(("[%s] step %d: %d tool call(s)\n"):format(who, d.step, d.tool_calls))
    elseif kind == "tool_call" then
      io.stderr:write(("[%s]   %s %s\n"):format(who, d.tool, d.is_error and "error" or "ok"))
    end
  end
end

local USAGE = "usage: clawlua %s --provider openai|anthropic --model M [--base-url URL] [--policy FILE]\n"

--- Runs a workflow as a script: builds the model client and the sandbox tool set from args,
--- runs it, prints its result as JSON. Returns the exit status.
function C.main(workflow, script, args)
  local opts = {}
  local i = 1
  while i <= #args do
    local k, v = args[i]:match("^%-%-([%w-]+)$"), args[i + 1]
    if not k or not v then
      io.stderr:write(USAGE:format(script))
      return 2
    end
    opts[k] = v
    i = i + 2
  end
  if not opts.provider or not opts.model then
    io.stderr:write(USAGE:format(script))
    return 2
  end
  local ok_p, policy_mod = pcall(require, "clawlua.policy")
  local ok_t, tools = pcall(require, "clawlua.mcp.tools")
  if not (ok_p and ok_t) then
    io.stderr:write("this example needs the sandbox tool set (clawlua.policy, clawlua.mcp.tools)\n")
    return 1
  end
  local policy = opts.policy and assert(policy_mod.load(opts.policy)) or policy_mod.default()
  local ts = assert(tools.new { policy = policy })
  local llm = require("clawlua.llm").new { provider = opts.provider, model = opts.model, base_url = opts["base-url"] }
  local ok, res = pcall(workflow.run, { llm = llm, tools = ts, policy = policy, progress = true })
  ts:close()
  if not ok then
    io.stderr:write(tostring(res), "\n")
    return 1
  end
  io.stdout:write(json.encode(res, { pretty = true, sort_keys = true }), "\n")
  return 0
end

--- The script entry point: runs C.main in a task and exits with its status.
function C.script(workflow, script, args)
  os.exit(claw.run(C.main, workflow, script, args))
end

return C
