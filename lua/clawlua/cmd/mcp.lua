-- `clawlua mcp`: the MCP server on stdin/stdout (newline-delimited JSON-RPC 2.0).
--   clawlua mcp [--policy FILE] [--log-level L] [--max-sandboxes N] [--max-message BYTES]
--               [--audit-log FILE]
local claw = require "clawlua"

local M = {}

M.usage = [[clawlua mcp [--policy FILE] [--log-level L] [--max-sandboxes N] [--max-message BYTES]
                   [--audit-log FILE]

Serves the Model Context Protocol on stdin/stdout (revisions 2025-06-18, 2025-11-25 and the
stateless 2026-07-28): the sandbox tools sandbox_create, sandbox_exec, sandbox_write_file,
sandbox_read_file, sandbox_list, sandbox_destroy, sandbox_update_policy, audit_query and
policy_show, and the resources clawlua://audit and clawlua://sandboxes. stdout carries the
protocol only; logs go to stderr. Exits at the end of stdin or on SIGTERM, destroying the
sandboxes it created.

options:
  --policy FILE         the operator's policy (a Lua file, see clawlua.policy); default: the
                        built-in default policy (jail backend, no egress)
  --log-level L         stderr threshold: debug, info, notice, warning, error, critical,
                        alert, emergency or off (default: warning)
  --max-sandboxes N     live sandboxes at most (default 8)
  --max-message BYTES   the longest message accepted or sent (default 16777216); a longer
                        line is answered with an error and skipped without being held
  --audit-log FILE      also write every audit event to FILE, hash-chained JSON lines
                        (rotated at 64 MiB, 5 kept; check with `clawlua audit verify`)
  --bench-echo          benchmark only: add an `echo` tool (for comparing servers)
  --conformance-fixtures  test only: serve the fixed tools, resources and prompts of the
                        official MCP conformance suite instead of the sandbox tools]]

local VALUE = { ["--policy"] = true, ["--log-level"] = true, ["--max-sandboxes"] = true,
                ["--max-message"] = true, ["--audit-log"] = true }
local FLAG = { ["--bench-echo"] = true, ["--conformance-fixtures"] = true }

local function usage_error(msg)
  io.stderr:write("clawlua mcp: ", msg, "\n", M.usage, "\n")
  return 2
end

--- Parses the arguments; returns the options table or nil, message.
function M.parse(args)
  local o = {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    name = name or a
    if VALUE[name] then
      local v = inline
      if v == nil then
        i = i + 1
        v = args[i]
      end
      if v == nil then return nil, ("option '%s' needs a value"):format(name) end
      o[name:sub(3)] = v
    elseif FLAG[name] and not inline then
      o[name:sub(3)] = true
    else
      return nil, ("unknown argument '%s'"):format(a)
    end
    i = i + 1
  end
  local function int(field, min)
    if o[field] == nil then return true end
    local n = math.tointeger(tonumber(o[field]))
    if not n or n < min then return nil, ("option '--%s' needs an integer >= %d"):format(field, min) end
    o[field] = n
    return true
  end
  local ok, err = int("max-sandboxes", 0)
  if not ok then return nil, err end
  ok, err = int("max-message", 1024)
  if not ok then return nil, err end
  return o
end

function M.run(args)
  local o, err = M.parse(args)
  if not o then return usage_error(err) end
  local protocol = require "clawlua.mcp.protocol"
  local level = o["log-level"] or "warning"
  if level ~= "off" and not protocol.LEVEL_RANK[level] then
    return usage_error(("unknown log level '%s'"):format(level))
  end
  local pol
  if o.policy then
    local policy = require "clawlua.policy"
    local p, perr = policy.load(o.policy)
    if not p then
      io.stderr:write("clawlua mcp: ", tostring(perr), "\n")
      return 1
    end
    pol = p
  end
  if o["audit-log"] then
    -- the sink stays active until the process exits; its records are whole at every emit
    local sink, serr = claw.audit.sink { path = o["audit-log"], fsync = "interval" }
    if not sink then
      io.stderr:write("clawlua mcp: --audit-log: ", tostring(serr), "\n")
      return 1
    end
  end
  local tools
  if o["conformance-fixtures"] then
    tools = require("clawlua.mcp.fixtures").new()
  else
    tools = require("clawlua.mcp.tools").new {
      policy = pol, max_sandboxes = o["max-sandboxes"], bench_echo = o["bench-echo"],
    }
  end
  local server = require("clawlua.mcp.server").new {
    input = claw.stream.stdin(), output = claw.stream.stdout(), tools = tools,
    log_level = level, max_message = o["max-message"],
  }
  -- stdin's end closes the server; so does SIGTERM (the loop cancels the serving task, whose
  -- clean-up closes the tool set). A shorter grace than the loop's default keeps the exit
  -- within 2 s.
  claw.loop.shutdown_grace(1.5)
  -- Every call leaves a few KiB of short-lived tables; the generational collector frees them
  -- without re-marking the loaded libraries each cycle (the incremental one did, in bursts of
  -- up to ~0.7 ms every ~100 calls: the tail of the call latency). Switched to a little after
  -- the start: the switch is a full collection, which initialize's answer need not wait for.
  local gc_switch = claw.spawn(function()
    claw.sleep(0.05)
    collectgarbage("generational")
  end)
  server:serve()
  gc_switch:cancel()
  return 0
end

return M
